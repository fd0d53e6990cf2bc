"""Small helpers every op shares."""
import torch
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of scores, softmax statistics and other sums: float32 for half types, else the input's own."""
    return torch.promote_types(dtype, torch.float32)


def relative_positions(tgt_len: int, src_len: int, query_offset: int, device) -> Tensor:
    """(tgt, src) long tensor of query position minus key position; query ``i`` sits at ``i + query_offset``."""
    q = torch.arange(tgt_len, device=device).unsqueeze(1) + query_offset
    return q - torch.arange(src_len, device=device).unsqueeze(0)
