"""Attention math on (batch, heads, length, head_dim) tensors, free of fairseq."""
from .band import band_attention, dense_attention

__all__ = ["band_attention", "dense_attention"]
