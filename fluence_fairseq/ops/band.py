"""Softmax attention restricted to a band of relative positions, with an optional relative bias.

Query ``i`` sits at key position ``p = i + query_offset`` (``query_offset = src_len - tgt_len`` aligns the last
query with the last key, as in cached decoding). It may attend key ``j`` iff ``-right <= p - j <= left``.
``rel_bias(rel)`` maps a long tensor of offsets ``p - j`` to an additive bias ``(heads, *rel.shape)``; adaptive
span passes the log of its soft mask, which turns "softmax, multiply by the mask, renormalise" into one softmax.

Three paths give the same numbers:
* SDPA when there is no bias and no band restriction beyond causality (fast fused kernel);
* dense: the full (tgt, src) score matrix, needed for ``need_weights``;
* blocked: queries in blocks of ``block_size``; each block scores only the ``block_size + left + right`` keys of
  its band, so work and memory are O(tgt * (left + right)) instead of O(tgt * src).
"""
import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..modules.masks import relative_positions

RelBias = Callable[[Tensor], Tensor]


def _neg(dtype):
    return torch.finfo(dtype).min


def dense_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    query_offset: int,
    left: Optional[int] = None,
    right: Optional[int] = None,
    rel_bias: Optional[RelBias] = None,
    key_padding_mask: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Full score matrix. Returns (out (B,H,Lq,D), probs (B,H,Lq,Lk) or None)."""
    tgt_len, src_len = q.size(2), k.size(2)
    scores = torch.matmul(q * (q.size(-1) ** -0.5), k.transpose(-1, -2))
    rel = relative_positions(tgt_len, src_len, query_offset, q.device)
    if rel_bias is not None:
        scores = scores + rel_bias(rel).to(scores.dtype)
    if attn_mask is not None:
        scores = scores + attn_mask
    disallowed = torch.zeros_like(rel, dtype=torch.bool)
    if left is not None:
        disallowed |= rel > left
    if right is not None:
        disallowed |= rel < -right
    disallowed = disallowed.view(1, 1, tgt_len, src_len)
    if key_padding_mask is not None:
        disallowed = disallowed | key_padding_mask.view(-1, 1, 1, src_len)
    scores = scores.masked_fill(disallowed, _neg(scores.dtype))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    dropped = F.dropout(probs, p=dropout_p) if dropout_p > 0 else probs
    return torch.matmul(dropped, v), (probs if need_weights else None)


def _sdpa(q, k, v, *, query_offset, causal, key_padding_mask, attn_mask, dropout_p):
    tgt_len, src_len = q.size(2), k.size(2)
    if key_padding_mask is None and attn_mask is None and (not causal or (tgt_len == src_len and query_offset == 0)):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal and tgt_len > 1)
    mask = torch.zeros(1, 1, tgt_len, src_len, dtype=q.dtype, device=q.device)
    if attn_mask is not None:
        mask = mask + attn_mask
    disallowed = None
    if causal:
        disallowed = (relative_positions(tgt_len, src_len, query_offset, q.device) < 0).view(1, 1, tgt_len, src_len)
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(-1, 1, 1, src_len)
        disallowed = kpm if disallowed is None else disallowed | kpm
    if disallowed is not None:
        mask = mask.masked_fill(disallowed, _neg(q.dtype))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def _windows(x: Tensor, dim: int, start: int, size: int, step: int, count: int, fill) -> Tensor:
    """Windows ``x[start + b*step : start + b*step + size]`` along ``dim`` for b < count, padding out-of-range
    positions with ``fill``. The window axis is inserted at ``dim`` and the window content goes last."""
    length = x.size(dim)
    pad_left = max(0, -start)
    pad_right = max(0, start + (count - 1) * step + size - length)
    if pad_left or pad_right:
        pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [pad_left, pad_right]
        x = F.pad(x, pad, value=fill)
    begin = start + pad_left
    x = x.narrow(dim, begin, (count - 1) * step + size)
    return x.unfold(dim, size, step)


def blocked_band_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    query_offset: int,
    left: int,
    right: int,
    rel_bias: Optional[RelBias] = None,
    key_padding_mask: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    block_size: int = 64,
) -> Tensor:
    bsz, heads, tgt_len, head_dim = q.shape
    src_len = k.size(2)
    bq = block_size
    nblocks = math.ceil(tgt_len / bq)
    kb = bq + left + right
    start = query_offset - left  # key index of window column 0 for block 0
    # (B, H, nb, D, kb) views of the key/value windows of every query block
    kw = _windows(k, 2, start, kb, bq, nblocks, 0.0)
    vw = _windows(v, 2, start, kb, bq, nblocks, 0.0)
    qb = F.pad(q, (0, 0, 0, nblocks * bq - tgt_len)).view(bsz, heads, nblocks, bq, head_dim)
    scores = torch.matmul(qb * (head_dim**-0.5), kw)  # (B, H, nb, bq, kb)
    # offsets p - j inside a block do not depend on the block: rel[r, c] = r + left - c
    rel = torch.arange(bq, device=q.device).unsqueeze(1) + left - torch.arange(kb, device=q.device).unsqueeze(0)
    if rel_bias is not None:
        scores = scores + rel_bias(rel).unsqueeze(1).to(scores.dtype)  # (H, 1, bq, kb)
    if attn_mask is not None:
        rows = F.pad(attn_mask, (0, 0, 0, nblocks * bq - tgt_len))
        rows = rows.view(*rows.shape[:2], nblocks, bq, src_len)
        cols = _windows(rows, 4, start, kb, bq, nblocks, 0.0)  # (.., nb, bq, nb, kb)
        scores = scores + torch.diagonal(cols, dim1=2, dim2=4).permute(0, 1, 4, 2, 3)
    valid = torch.ones(bsz, src_len, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        valid = ~key_padding_mask
    valid = _windows(valid, 1, start, kb, bq, nblocks, False)  # (B, nb, kb)
    band = (rel <= left) & (rel >= -right)
    disallowed = ~(valid.view(bsz, 1, nblocks, 1, kb) & band)
    scores = scores.masked_fill(disallowed, _neg(scores.dtype))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    out = torch.matmul(probs, vw.transpose(-1, -2))  # (B, H, nb, bq, D)
    return out.reshape(bsz, heads, nblocks * bq, head_dim)[:, :, :tgt_len]


def band_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    query_offset: int,
    left: Optional[int] = None,
    right: Optional[int] = None,
    rel_bias: Optional[RelBias] = None,
    key_padding_mask: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    block_size: Optional[int] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Dispatch to the cheapest exact path. ``left``/``right`` None = unbounded; ``right=0`` = causal."""
    tgt_len, src_len = q.size(2), k.size(2)
    # keys no query can reach are cut off first (a view): decoding with a long cache stays O(band)
    lo = 0 if left is None else max(0, query_offset - left)
    hi = src_len if right is None else min(src_len, query_offset + tgt_len + right)
    if hi <= lo:
        raise ValueError(f"no key lies in the attention band (offset {query_offset}, left {left}, right {right})")
    if lo > 0 or hi < src_len:
        k, v = k[:, :, lo:hi], v[:, :, lo:hi]
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask[:, lo:hi]
        if attn_mask is not None:
            attn_mask = attn_mask[..., lo:hi]
        query_offset -= lo
        cut = (lo, hi, src_len)
        src_len = hi - lo
    else:
        cut = None
    max_rel = query_offset + tgt_len - 1  # largest p - j
    min_rel = query_offset - (src_len - 1)
    left_active = left is not None and left < max_rel
    right_active = right is not None and -right > min_rel
    if need_weights:
        out, probs = dense_attention(
            q, k, v, query_offset=query_offset, left=left, right=right, rel_bias=rel_bias,
            key_padding_mask=key_padding_mask, attn_mask=attn_mask, dropout_p=dropout_p, need_weights=True,
        )
        if cut is not None:
            probs = F.pad(probs, (cut[0], cut[2] - cut[1]))
        return out, probs
    if rel_bias is None and not left_active and (not right_active or right == 0):
        causal = right_active  # right == 0 here
        return _sdpa(q, k, v, query_offset=query_offset, causal=causal, key_padding_mask=key_padding_mask,
                     attn_mask=attn_mask, dropout_p=dropout_p), None
    span = (left if left_active else max(0, max_rel)) + (right if right_active else max(0, -min_rel))
    if block_size is None:
        block_size = max(16, min(256, 1 << max(0, int(span + 1).bit_length() - 1)))
    if tgt_len <= block_size or span + block_size >= src_len:
        out, _ = dense_attention(
            q, k, v, query_offset=query_offset, left=left, right=right, rel_bias=rel_bias,
            key_padding_mask=key_padding_mask, attn_mask=attn_mask, dropout_p=dropout_p,
        )
        return out, None
    out = blocked_band_attention(
        q, k, v, query_offset=query_offset,
        left=left if left_active else max(0, max_rel), right=right if right_active else max(0, -min_rel),
        rel_bias=rel_bias, key_padding_mask=key_padding_mask, attn_mask=attn_mask, dropout_p=dropout_p,
        block_size=block_size,
    )
    return out, None
