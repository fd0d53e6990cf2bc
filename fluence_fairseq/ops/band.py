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
    probs = torch.softmax(scores, dim=-1, dtype=_acc(q.dtype)).to(q.dtype)
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


# Elements of one (batch, heads, blocks, block, window) score tensor processed at a time: bounds the transient
# memory of the blocked path (256K float32 = 1 MiB per tensor) whatever the length and span. Measured on 2 CPU
# cores at L=4096: no slower than 16 MiB groups, and the peak memory of a step drops by 2-3x.
_GROUP_ELEMENTS = 1 << 18
# Sequences with at most this many query-key pairs use the dense path (one plain autograd graph).
_DENSE_PAIRS = 1 << 16


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Dtype of scores and softmax statistics: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _pad_keys(x: Tensor, start: int, length: int) -> Tensor:
    """Rows ``start .. start+length-1`` of ``x`` (B, H, L, D) along dim 2, zero outside ``[0, L)``."""
    return F.pad(x, (0, 0, -start, length + start - x.size(2)))


def _unpad_keys(x: Tensor, start: int, src_len: int) -> Tensor:
    """Inverse of :func:`_pad_keys` for gradients."""
    return F.pad(x, (0, 0, start, src_len - start - x.size(2)))


class _BlockedBand(torch.autograd.Function):
    """Blocked band attention that saves only q, k, v and the output for backward and recomputes the
    probabilities there, block group by block group (as flash attention does): memory stays O(length * head_dim)
    plus one bounded group, instead of keeping every block's probabilities alive. (The fused softmax kernel is
    several times faster on CPU than exp against saved log-sum-exp rows, so backward simply reruns it.)"""

    @staticmethod
    def _band_bias(bias, band, dtype):
        """The relative bias (or zeros) with every offset outside the band at the most negative value: one
        (H|1, bq, kb) table added to each block's scores replaces a mask pass over them."""
        table = torch.zeros(1, *band.shape, dtype=dtype, device=band.device) if bias is None else bias.detach().to(dtype)
        return table.masked_fill(~band, torch.finfo(dtype).min)

    @staticmethod
    def _scores(qb_scaled, kw, band_bias, extra, valid):
        s = torch.matmul(qb_scaled, kw)  # (B, H, G, bq, kb)
        s = s.to(band_bias.dtype) if s.dtype != band_bias.dtype else s
        s += band_bias.unsqueeze(1)
        if extra is not None:
            s += extra
        if not bool(valid.all()):  # only blocks at the sequence edges or with padding need the key mask
            s.masked_fill_(~valid.unsqueeze(1).unsqueeze(3), torch.finfo(s.dtype).min)
        return s

    @staticmethod
    def _groups(shape, nblocks, bq, kb):
        step = max(1, _GROUP_ELEMENTS // (shape[0] * shape[1] * bq * kb))
        return [(g, min(nblocks, g + step)) for g in range(0, nblocks, step)]

    @staticmethod
    def _window(xp, g0, g1, bq, kb):
        """(B, H, G, D, kb) windows of the padded keys/values for blocks g0..g1-1 (a view)."""
        return xp.narrow(2, g0 * bq, (g1 - g0 - 1) * bq + kb).unfold(2, kb, bq)

    @staticmethod
    def forward(ctx, q, k, v, bias, extra, valid, band, start, bq, dropout_p, seed):
        bsz, heads, tgt_len, head_dim = q.shape
        nblocks, kb = valid.size(1), band.size(1)
        length = (nblocks - 1) * bq + kb
        scale = head_dim**-0.5
        qb = F.pad(q * scale, (0, 0, 0, nblocks * bq - tgt_len)).view(bsz, heads, nblocks, bq, head_dim)
        kp, vp = _pad_keys(k, start, length), _pad_keys(v, start, length)
        out = q.new_empty(bsz, heads, nblocks, bq, head_dim)
        gen = torch.Generator(q.device).manual_seed(seed) if dropout_p > 0 else None
        band_bias = _BlockedBand._band_bias(bias, band, _acc(q.dtype))
        for g0, g1 in _BlockedBand._groups(q.shape, nblocks, bq, kb):
            s = _BlockedBand._scores(qb[:, :, g0:g1], _BlockedBand._window(kp, g0, g1, bq, kb), band_bias,
                                     None if extra is None else extra[:, :, g0:g1], valid[:, g0:g1])
            p = torch.softmax(s, dim=-1)
            if gen is not None:
                p = p * torch.empty_like(p).bernoulli_(1 - dropout_p, generator=gen) / (1 - dropout_p)
            out[:, :, g0:g1] = torch.matmul(p.to(v.dtype), _BlockedBand._window(vp, g0, g1, bq, kb).transpose(-1, -2))
        ctx.save_for_backward(q, k, v, bias, extra, valid, band, out)
        ctx.config = (start, bq, dropout_p, seed)
        return out.view(bsz, heads, nblocks * bq, head_dim)[:, :, :tgt_len].contiguous()

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, bias, extra, valid, band, out = ctx.saved_tensors
        start, bq, dropout_p, seed = ctx.config
        bsz, heads, tgt_len, head_dim = q.shape
        nblocks, kb = valid.size(1), band.size(1)
        length = (nblocks - 1) * bq + kb
        pieces = math.ceil(kb / bq)
        scale = head_dim**-0.5
        qb = F.pad(q * scale, (0, 0, 0, nblocks * bq - tgt_len)).view(bsz, heads, nblocks, bq, head_dim)
        kp, vp = _pad_keys(k, start, length), _pad_keys(v, start, length)
        go = F.pad(grad_out, (0, 0, 0, nblocks * bq - tgt_len)).view_as(out)
        acc = _acc(q.dtype)
        delta = (go.to(acc) * out.to(acc)).sum(-1)  # rowsum(dO * O) = rowsum(P * dP)
        grad_q = torch.zeros_like(qb)
        # window gradients are folded back piece by piece into buffers long enough for the last window's pieces
        grad_kp = q.new_zeros(bsz, heads, (nblocks + pieces) * bq, head_dim)
        grad_vp = torch.zeros_like(grad_kp)
        grad_bias = None if bias is None else torch.zeros_like(bias, dtype=acc)
        gen = torch.Generator(q.device).manual_seed(seed) if dropout_p > 0 else None
        band_bias = _BlockedBand._band_bias(bias, band, acc)
        for g0, g1 in _BlockedBand._groups(q.shape, nblocks, bq, kb):
            kw = _BlockedBand._window(kp, g0, g1, bq, kb)  # (B, H, G, D, kb)
            vw = _BlockedBand._window(vp, g0, g1, bq, kb)
            s = _BlockedBand._scores(qb[:, :, g0:g1], kw, band_bias,
                                     None if extra is None else extra[:, :, g0:g1], valid[:, g0:g1])
            p = torch.softmax(s, dim=-1)
            g_out = go[:, :, g0:g1]
            grad_p = torch.matmul(g_out, vw).to(acc)  # (B, H, G, bq, kb)
            if gen is not None:
                keep = torch.empty_like(p).bernoulli_(1 - dropout_p, generator=gen) / (1 - dropout_p)
                p_used, grad_p = p * keep, grad_p * keep
            else:
                p_used = p
            grad_vw = torch.matmul(p_used.to(v.dtype).transpose(-1, -2), g_out)  # (B, H, G, kb, D)
            grad_s = grad_p.sub_(delta[:, :, g0:g1].unsqueeze(-1)).mul_(p)
            if grad_bias is not None:
                grad_bias += grad_s.sum(dim=(0, 2)).sum_to_size(grad_bias.shape)
            grad_s = grad_s.to(q.dtype)
            grad_q[:, :, g0:g1] = torch.matmul(grad_s, kw.transpose(-1, -2)) * scale
            grad_kw = torch.matmul(grad_s.transpose(-1, -2), qb[:, :, g0:g1])  # (B, H, G, kb, D); qb is scaled
            count = g1 - g0
            for grad_w, grad_buf in ((grad_kw, grad_kp), (grad_vw, grad_vp)):
                grad_w = F.pad(grad_w, (0, 0, 0, pieces * bq - kb)).view(bsz, heads, count, pieces, bq, head_dim)
                for t in range(pieces):
                    rows = grad_buf[:, :, (g0 + t) * bq : (g1 + t) * bq]
                    rows += grad_w[:, :, :, t].reshape(bsz, heads, count * bq, head_dim)
        src_len = k.size(2)
        grad_k = _unpad_keys(grad_kp[:, :, :length], start, src_len)
        grad_v = _unpad_keys(grad_vp[:, :, :length], start, src_len)
        grad_q = grad_q.view(bsz, heads, nblocks * bq, head_dim)[:, :, :tgt_len]
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_q, grad_k, grad_v, grad_bias, None, None, None, None, None, None, None


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
    # offsets p - j inside a block do not depend on the block: rel[r, c] = r + left - c
    rel = torch.arange(bq, device=q.device).unsqueeze(1) + left - torch.arange(kb, device=q.device).unsqueeze(0)
    band = (rel <= left) & (rel >= -right)
    bias = None if rel_bias is None else rel_bias(rel)  # (H, bq, kb)
    extra = None
    if attn_mask is not None:
        rows = F.pad(attn_mask, (0, 0, 0, nblocks * bq - tgt_len))
        rows = rows.view(*rows.shape[:2], nblocks, bq, src_len)
        cols = _windows(rows, 4, start, kb, bq, nblocks, 0.0)  # (.., nb, bq, nb, kb)
        extra = torch.diagonal(cols, dim1=2, dim2=4).permute(0, 1, 4, 2, 3).to(_acc(q.dtype)).contiguous()
    valid = torch.ones(bsz, src_len, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        valid = ~key_padding_mask
    valid = _windows(valid, 1, start, kb, bq, nblocks, False).contiguous()  # (B, nb, kb)
    seed = int(torch.randint(0, 2**62, ())) if dropout_p > 0 else 0
    return _BlockedBand.apply(q, k, v, bias, extra, valid, band, start, bq, dropout_p, seed)


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
        # 64-query blocks were fastest on CPU for spans of 64 and more; shorter spans waste less with smaller blocks
        block_size = max(16, min(64, 1 << max(0, int(span + 1).bit_length() - 1)))
    if tgt_len <= block_size or tgt_len * src_len <= _DENSE_PAIRS:
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
