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


def matmul_in_projection_layout(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for (B, H, n, k) @ (B, H, k, D), written into a (B, H, n, D) tensor stored as (n, B, H, D): the
    layout of fairseq's (L, B, H * D) projections, so the result goes back to them (or to their gradients)
    as a view instead of a full-size copy."""
    bsz, heads, rows, _ = a.shape
    out = a.new_empty(rows, bsz, heads, b.size(-1)).permute(1, 2, 0, 3)
    torch.bmm(a.reshape(bsz * heads, rows, -1), b.reshape(bsz * heads, *b.shape[2:]),
              out=out.reshape(bsz * heads, rows, b.size(-1)))
    return out
