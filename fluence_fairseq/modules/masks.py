"""Mask normalisation shared by every attention.

Conventions inside fluence attentions:
* padding masks are bool ``(batch, length)``, True = padding;
* ``attn_mask`` is additive float, broadcastable to ``(batch, heads, tgt_len, src_len)``;
* disallowed scores are filled with ``finfo.min`` instead of ``-inf`` so that a row with no allowed key
  (a padded query) gives finite, ignorable numbers rather than NaNs that would poison gradients.
"""
from typing import Optional

import torch
from torch import Tensor

from ..ops.common import relative_positions  # noqa: F401  (re-exported)

#: additive ``attn_mask`` values at or below this are masks, not biases: attentions that give masked keys exactly
#: zero weight (entmax) treat them as removed (``exp(-1e4)`` is already 0 for softmax)
HARD_MASK = -1e4


def padding_mask_to_bool(mask: Optional[Tensor], bsz: int, length: int, name: str) -> Optional[Tensor]:
    """Bool, byte or float padding mask -> bool (batch, length), True = pad.

    Float masks count every nonzero entry as padding, which covers both fairseq's 0/1 float masks and
    torch's additive 0/-inf masks.
    """
    if mask is None:
        return None
    if mask.dim() != 2 or tuple(mask.shape) != (bsz, length):
        raise ValueError(
            f"{name} must have shape (batch, length) = ({bsz}, {length}), got {tuple(mask.shape)}; "
            "pass one row per sequence with True/1 (or a nonzero float) at padded positions"
        )
    if mask.dtype == torch.bool:
        return mask
    return mask != 0


def attn_mask_to_additive(
    mask: Optional[Tensor], bsz: int, num_heads: int, tgt_len: int, src_len: int, dtype: torch.dtype
) -> Optional[Tensor]:
    """Bool/byte (True = masked) or additive float ``attn_mask`` of shape (tgt, src) or (batch*heads, tgt, src)
    -> additive float of shape (1, 1, tgt, src) or (batch, heads, tgt, src)."""
    if mask is None:
        return None
    if mask.dim() == 2 and tuple(mask.shape) == (tgt_len, src_len):
        mask = mask.view(1, 1, tgt_len, src_len)
    elif mask.dim() == 3 and tuple(mask.shape) == (bsz * num_heads, tgt_len, src_len):
        mask = mask.view(bsz, num_heads, tgt_len, src_len)
    else:
        raise ValueError(
            f"attn_mask must have shape (tgt_len, src_len) = ({tgt_len}, {src_len}) or "
            f"(batch*heads, tgt_len, src_len) = ({bsz * num_heads}, {tgt_len}, {src_len}), "
            f"got {tuple(mask.shape)}"
        )
    if mask.dtype in (torch.bool, torch.uint8):
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask.bool(), torch.finfo(dtype).min
        )
    return mask.to(dtype)


def append_padding_masks(
    prev: Optional[Tensor], prev_len: int, new: Optional[Tensor], new_len: int, bsz: int
) -> Optional[Tensor]:
    """Concatenate cached and new bool key padding masks; a missing side means 'no padding'."""
    if prev is None and new is None:
        return None
    device = (prev if prev is not None else new).device
    if prev is None:
        prev = torch.zeros(bsz, prev_len, dtype=torch.bool, device=device)
    if new is None:
        new = torch.zeros(bsz, new_len, dtype=torch.bool, device=device)
    return torch.cat([prev, new], dim=1)

