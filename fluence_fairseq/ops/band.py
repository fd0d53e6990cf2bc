"""Softmax attention restricted to a band of relative positions, with an optional relative bias.

Query ``i`` sits at key position ``p = i + query_offset`` (``query_offset = src_len - tgt_len`` aligns the last
query with the last key, as in cached decoding). It may attend key ``j`` iff ``-right <= p - j <= left``.
``rel_bias(rel)`` maps a long tensor of offsets ``p - j`` to an additive bias ``(heads, *rel.shape)``; adaptive
span passes the log of its soft mask, which turns "softmax, multiply by the mask, renormalise" into one softmax.

Four paths give the same numbers:
* SDPA when there is no bias and no band restriction beyond causality (fast fused kernel); with
  ``need_weights`` on long inputs (CPU, no dropout), tiles of queries give the output, the weights and the rows'
  log-sum-exp in one pass and the fused kernel's backward runs from them (:func:`softmax_with_weights`);
* dense: the full (tgt, src) score matrix, for ``need_weights`` on short inputs;
* narrow (band no wider than the head dimension, e.g. local attention's windows): every query block of every
  head in one batched matmul over overlapping views of flat key/value buffers, probabilities kept for backward
  (at most 2x a query tensor), window gradients folded back by one matmul (see :class:`_NarrowBand`);
* blocked (wider bands): queries in blocks of ``block_size``; each block scores only the ``block_size + left +
  right`` keys of its band, groups of blocks at a time, probabilities recomputed in backward.

With attention dropout on the CPU, where the fused kernels have none, a long problem with no band but causality
runs in query blocks that keep no (Lq, Lk) tensor (:mod:`~fluence_fairseq.ops.softmax_dropout`) instead of the
math path that ``F.scaled_dot_product_attention`` takes there.
The banded paths do O(tgt * (left + right)) work and keep O(tgt * (left + right + head_dim)) memory.
"""
import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import (FLASH_CPU_BACKWARD, accumulation_dtype as _acc, cpu_flash_applies, dropout_keep_mask,
                     fold_windows, free_memory, relative_positions)
from .softmax_dropout import blocked_softmax_dropout, blocked_softmax_dropout_applies

RelBias = Callable[[Tensor], Tensor]
#: elements of dP the narrow band's backward forms at a time (a few hundred KiB in float32)
_GRAD_CHUNK = 1 << 16


def _neg(dtype):
    return torch.finfo(dtype).min


def _outside(rel: Tensor, left: Optional[int], right: Optional[int],
             key_padding_mask: Optional[Tensor]) -> Tensor:
    """bool (B or 1, 1, Lq, Lk): keys outside the band ``-right <= p - j <= left`` (None = unbounded) or padded."""
    outside = torch.zeros_like(rel, dtype=torch.bool)
    if left is not None:
        outside |= rel > left
    if right is not None:
        outside |= rel < -right
    outside = outside.view(1, 1, *rel.shape)
    if key_padding_mask is not None:
        outside = outside | key_padding_mask.view(-1, 1, 1, rel.size(1))
    return outside


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
    banded = left is not None or right is not None
    # the positions and a mask only where something needs them (a decoding step's cross attention: neither; its
    # few calls were a tenth of the step)
    rel = relative_positions(tgt_len, src_len, query_offset, q.device) if banded or rel_bias is not None else None
    if rel_bias is not None:
        scores = scores + rel_bias(rel).to(scores.dtype)
    if attn_mask is not None:
        scores = scores + attn_mask
    if banded:
        scores = scores.masked_fill(_outside(rel, left, right, key_padding_mask), _neg(scores.dtype))
    elif key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask.view(-1, 1, 1, src_len), _neg(scores.dtype))
    probs = torch.softmax(scores, dim=-1, dtype=_acc(q.dtype)).to(q.dtype)
    dropped = F.dropout(probs, p=dropout_p) if dropout_p > 0 else probs
    return torch.matmul(dropped, v), (probs if need_weights else None)


#: score elements (batch x query rows x keys) of one head's tile in :func:`band_weights`: 2 MiB in float32, so that
#: a tile's scores stay in cache from the product through the softmax to the write-out
_WEIGHT_TILE_ELEMENTS = 1 << 20
#: queries per weight tile at most (fewer when the keys are many)
_WEIGHT_BLOCK = 256


def band_weights(
    q: Tensor,
    k: Tensor,
    *,
    query_offset: int,
    left: Optional[int] = None,
    right: Optional[int] = None,
    rel_bias: Optional[RelBias] = None,
    key_padding_mask: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    block: int = _WEIGHT_BLOCK,
    average_heads: bool = False,
) -> Tensor:
    """The probabilities of :func:`dense_attention` (B, H, Lq, Lk), computed a tile of queries at a time over
    the keys its band reaches: O(Lq x band) work, zeros outside the band (where the dense probabilities are exactly
    zero too). ``average_heads``: their mean over heads, (B, 1, Lq, Lk), accumulated tile by tile (no matrix of
    every head's weights is written).

    Each tile (at most ``block`` queries, fewer when the keys are many: :data:`_WEIGHT_TILE_ELEMENTS`) is scored,
    masked and normalised one head at a time, so its scores stay in cache through every pass (all heads at once
    streamed them through memory four times: 2x the time at L=4096). The band is masked only in the tile's
    columns where it can bind (the diagonal tile of a causal band, the edges of a window).

    Differentiable in q and k (alignment losses train through attention weights): nothing is kept for backward
    but q and k, and a backward recomputes the tiles, so the weights cost nothing beyond their forward unless a
    loss uses them. Where the relative bias or the additive mask needs a gradient itself (adaptive span's soft
    mask), the weights are detached from the graph instead (the output keeps its own gradient)."""
    spec = dict(query_offset=query_offset, left=left, right=right, rel_bias=rel_bias,
                key_padding_mask=key_padding_mask, attn_mask=attn_mask, block=block, average_heads=average_heads)
    wants_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if wants_grad and not _bias_needs_grad(rel_bias, attn_mask, q.device):
        return _BandWeights.apply(q, k, spec)
    with torch.no_grad():
        return _band_weights_forward(q, k, **spec)


def _bias_needs_grad(rel_bias: Optional[RelBias], attn_mask: Optional[Tensor], device) -> bool:
    if attn_mask is not None and attn_mask.requires_grad:
        return True
    return rel_bias is not None and rel_bias(torch.zeros(1, 1, dtype=torch.long, device=device)).requires_grad


class _BandWeights(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, spec):
        ctx.save_for_backward(q, k)
        ctx.spec = spec
        return _band_weights_forward(q, k, **spec)

    @staticmethod
    def backward(ctx, grad_weights):
        q, k = ctx.saved_tensors
        grad_q, grad_k = _band_weights_backward(q, k, grad_weights, **ctx.spec)
        return grad_q, grad_k, None


class _SoftmaxWithWeights(torch.autograd.Function):
    """Softmax attention and its weights from one pass of tiles; the fused kernel's backward (see
    :func:`softmax_with_weights`)."""

    @staticmethod
    def forward(ctx, q, k, v, spec, flash_mask):
        weights, out, lse = _band_weights_forward(q, k, v=v, **spec)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec, ctx.flash_mask = spec, flash_mask
        ctx.set_materialize_grads(False)
        return out, weights

    @staticmethod
    def backward(ctx, grad_out, grad_weights):
        q, k, v, out, lse = ctx.saved_tensors
        grad_q = grad_k = grad_v = None
        if grad_out is not None and grad_weights is not None:  # a loss on both: one pass of tiles for the two
            grad_q, grad_k, grad_v = _band_weights_backward(q, k, grad_weights, v=v, out=out, grad_out=grad_out,
                                                            **ctx.spec)
        elif grad_out is not None:
            mask, is_causal = ctx.flash_mask()
            grad_q, grad_k, grad_v = FLASH_CPU_BACKWARD(grad_out.contiguous(), q, k, v, out, lse, 0.0, is_causal,
                                                        attn_mask=mask)
        elif grad_weights is not None:
            grad_q, grad_k = _band_weights_backward(q, k, grad_weights, **ctx.spec)
        return grad_q, grad_k, grad_v, None, None


def softmax_with_weights(q: Tensor, k: Tensor, v: Tensor, *, query_offset: int, causal: bool,
                         rel_bias: Optional[RelBias] = None, key_padding_mask: Optional[Tensor] = None,
                         attn_mask: Optional[Tensor] = None, average_heads: bool = False) -> Tuple[Tensor, Tensor]:
    """Softmax attention (no band but causality) and its weights, for long inputs on CPU without dropout (where
    :func:`softmax_with_weights_applies`): the weights' tiles (:func:`band_weights`) give the output as well (one
    product with the values per tile) and the rows' log-sum-exp, so the fused kernel's forward is not run at all;
    backward is the fused kernel's, from that output and log-sum-exp (the same numbers as after its own forward,
    to float rounding), plus the weights' own gradient when a loss uses them. Nothing of size (Lq, Lk) per head
    is kept: the additive mask the kernel needs (padding, an offset, a fixed bias) is built in backward."""
    tgt_len, src_len = q.size(2), k.size(2)
    spec = dict(query_offset=query_offset, left=None, right=0 if causal else None, rel_bias=rel_bias,
                key_padding_mask=key_padding_mask, attn_mask=attn_mask, block=_WEIGHT_BLOCK,
                average_heads=average_heads)

    def flash_mask():
        extra = attn_mask
        if rel_bias is not None:
            bias = rel_bias(relative_positions(tgt_len, src_len, query_offset, q.device)).to(q.dtype).unsqueeze(0)
            extra = bias if extra is None else extra + bias
        return _sdpa_mask(q, src_len, query_offset=query_offset, causal=causal, key_padding_mask=key_padding_mask,
                          attn_mask=extra)

    return _SoftmaxWithWeights.apply(q, k, v, spec, flash_mask)


def softmax_with_weights_applies(q: Tensor, *, query_offset: int, causal: bool, rel_bias: Optional[RelBias],
                                 key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor],
                                 dropout_p: float) -> bool:
    """Whether :func:`softmax_with_weights` can run: the CPU kernels, no dropout, float32 or float64, no bias that
    needs a gradient of its own (the kernel's backward gives none), and every causal query sees a key that is not
    padding (a row with none is uniform over every key in the kernel but over its tile's keys in the tiles)."""
    if not (cpu_flash_applies(q, dropout_p) and q.dtype in (torch.float32, torch.float64)):
        return False
    if causal and (query_offset < 0 or (key_padding_mask is not None
                                        and bool(key_padding_mask[:, : query_offset + 1].all(-1).any()))):
        return False
    return not _bias_needs_grad(rel_bias, attn_mask, q.device)


def _weight_tiles(q, k, query_offset, left, right, block):
    """``(i0, i1, k0, k1)`` of every tile: queries ``i0..i1-1`` against the keys ``k0..k1-1`` their band reaches
    (``k1 == k0`` when none)."""
    bsz, _, tgt_len, _ = q.shape
    src_len = k.size(2)
    widest = src_len if left is None or right is None else min(src_len, block + left + right)
    rows = max(16, min(block, _WEIGHT_TILE_ELEMENTS // max(1, bsz * widest)))
    for i0 in range(0, tgt_len, rows):
        i1 = min(tgt_len, i0 + rows)
        k0 = 0 if left is None else max(0, i0 + query_offset - left)
        yield i0, i1, k0, max(k0, src_len if right is None else min(src_len, i1 - 1 + query_offset + right + 1))


def _tile_probabilities(q, k, i0, i1, k0, k1, query_offset, left, right, rel_bias, key_padding_mask, attn_mask):
    """The scaled query tile (B, H, rows, D), the key tile (B, H, keys, D) and a function giving head ``h``'s
    probabilities (B, rows, keys) of the tile, in the accumulation dtype."""
    bsz = q.size(0)
    dtype = _acc(q.dtype)
    q_t = q[:, :, i0:i1].to(dtype) * q.size(-1) ** -0.5
    k_t = k[:, :, k0:k1].to(dtype)
    extra = _tile_bias(rel_bias, attn_mask, i0, i1, k0, k1, query_offset, q.device, dtype)
    edges = _band_edges(i0, i1, k0, k1, query_offset, left, right, q.device)
    padding = None if key_padding_mask is None else key_padding_mask[:, k0:k1].view(bsz, 1, k1 - k0)

    def head(h: int, with_lse: bool = False):
        scores = torch.matmul(q_t[:, h], k_t[:, h].transpose(-1, -2))  # (B, rows, keys)
        if extra is not None:
            scores += extra[:, h if extra.size(1) > 1 else 0]
        for lo, hi, outside in edges:
            scores[:, :, lo:hi].masked_fill_(outside, _neg(dtype))
        if padding is not None:
            scores.masked_fill_(padding, _neg(dtype))
        probs = torch.softmax(scores, dim=-1)
        return (probs, _log_sum_exp(scores, probs)) if with_lse else probs

    return q_t, k_t, head


#: columns of a tile :func:`_log_sum_exp` reads first
_LSE_SAMPLE_STEP = 64
#: a probability from which a row's log-sum-exp is exact to rounding: far above the smallest normal float
_LSE_SAFE_PROBABILITY = 1e-20


def _log_sum_exp(scores: Tensor, probs: Tensor) -> Tensor:
    """The rows' log-sum-exp of ``scores`` (..., n) given ``probs = softmax(scores)``: ``s_j - log p_j`` for any
    column j whose probability is a normal float (its log then carries the full relative precision), taken at
    the most probable of every 64th column; rows where even that one is below :data:`_LSE_SAFE_PROBABILITY` take
    their largest entry, ``max(s) - log(max(p))``. Reading a 64th of the tile instead of all of it twice (the
    exp pass of a ``logsumexp`` costs as much again as the softmax)."""
    sample = probs[..., ::_LSE_SAMPLE_STEP]
    top, at = sample.max(dim=-1, keepdim=True)
    lse = scores[..., ::_LSE_SAMPLE_STEP].gather(-1, at).sub_(top.log()).squeeze(-1)
    weak = top.squeeze(-1) < _LSE_SAFE_PROBABILITY
    if bool(weak.any()):
        lse[weak] = scores[weak].amax(-1).sub_(probs[weak].amax(-1).log_())
    return lse


def _band_weights_forward(q, k, *, query_offset, left, right, rel_bias, key_padding_mask, attn_mask, block,
                          average_heads, v=None):
    """The weights; with values ``v``, also the attention output (B, H, Lq, D) (in the fused kernel's layout,
    (B, Lq, H, D) memory) and the rows' log-sum-exp (B, H, Lq) (every row must see a key)."""
    bsz, heads, tgt_len, _ = q.shape
    # every element is written below (inside the band by a tile, outside it by a fill): no zeroing pass first
    weights = q.new_empty(bsz, 1 if average_heads else heads, tgt_len, k.size(2))
    # each head's keys and values in rows of their own: the tiles' products with fairseq's strided heads views
    # took 1.2-1.8x as long (one copy here costs a few ms at L=4096)
    k = k.contiguous()
    if v is not None:
        v = v.contiguous()
        out = q.new_empty(bsz, tgt_len, heads, v.size(-1)).transpose(1, 2)
        lse = torch.empty(bsz, heads, tgt_len, dtype=_acc(q.dtype), device=q.device)
    for i0, i1, k0, k1 in _weight_tiles(q, k, query_offset, left, right, block):
        weights[:, :, i0:i1, :k0].zero_()
        weights[:, :, i0:i1, k1:].zero_()
        if k1 == k0:
            continue
        _, _, head = _tile_probabilities(q, k, i0, i1, k0, k1, query_offset, left, right, rel_bias,
                                         key_padding_mask, attn_mask)
        tile = weights[:, 0, i0:i1, k0:k1] if average_heads else None
        for h in range(heads):
            if v is None:
                probs = head(h)
            else:
                probs, lse[:, h, i0:i1] = head(h, with_lse=True)
                out[:, h, i0:i1] = torch.matmul(probs, v[:, h, k0:k1].to(probs.dtype))
            if not average_heads:
                weights[:, h, i0:i1, k0:k1] = probs
            elif h == 0:
                torch.mul(probs, 1.0 / heads, out=tile)  # writes through the strided view of ``weights``
            else:
                tile.add_(probs, alpha=1.0 / heads)
    return weights if v is None else (weights, out, lse)


def _band_weights_backward(q, k, grad_weights, *, query_offset, left, right, rel_bias, key_padding_mask,
                           attn_mask, block, average_heads, v=None, out=None, grad_out=None):
    """Gradients of q and k from the weights' gradient, each tile's probabilities recomputed: with P = softmax(S),
    dS = P * (dP - rowsum(dP * P)), then dq = dS k / sqrt(D) and dk = dS^T q / sqrt(D).

    With the values ``v``, the output ``out = P v`` and its gradient ``grad_out`` as well, the gradients of q, k
    and v from both in the same pass: dP gains ``grad_out v^T`` (and its row sum against P is
    ``rowsum(grad_out * out)``), and dv = P^T grad_out."""
    heads = q.size(1)
    dtype = _acc(q.dtype)
    grad_q = torch.zeros(q.shape, dtype=dtype, device=q.device)
    grad_k = torch.zeros(k.shape, dtype=dtype, device=k.device)
    scale = q.size(-1) ** -0.5
    share = 1.0 / heads if average_heads else 1.0
    with_output = grad_out is not None
    k = k.contiguous()  # as in forward
    if with_output:
        v, grad_out = v.contiguous(), grad_out.to(dtype).contiguous()
        grad_v = torch.zeros(v.shape, dtype=dtype, device=v.device)
        output_dot = (grad_out * out.to(dtype)).sum(-1, keepdim=True)  # rowsum(dP_out * P) = rowsum(dO * O)
    for i0, i1, k0, k1 in _weight_tiles(q, k, query_offset, left, right, block):
        if k1 == k0:
            continue
        q_t, k_t, head = _tile_probabilities(q, k, i0, i1, k0, k1, query_offset, left, right, rel_bias,
                                             key_padding_mask, attn_mask)
        for h in range(heads):
            probs = head(h)
            weights_grad = grad_weights[:, 0 if average_heads else h, i0:i1, k0:k1].to(dtype)
            row_dot = (weights_grad * probs).sum(-1, keepdim=True).mul_(share)
            if with_output:
                g_o = grad_out[:, h, i0:i1]
                grad_p = torch.matmul(g_o, v[:, h, k0:k1].transpose(-1, -2)).add_(weights_grad, alpha=share)
                row_dot += output_dot[:, h, i0:i1]
                grad_v[:, h, k0:k1] += torch.matmul(probs.transpose(-1, -2), g_o)
            else:
                grad_p = weights_grad * share
            grad_s = probs.mul_(grad_p.sub_(row_dot))  # probs is ours: dS in place
            grad_q[:, h, i0:i1] += torch.matmul(grad_s, k_t[:, h]).mul_(scale)
            grad_k[:, h, k0:k1] += torch.matmul(grad_s.transpose(-1, -2), q_t[:, h])  # q_t carries the scale
    if with_output:
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)
    return grad_q.to(q.dtype), grad_k.to(k.dtype)


def _tile_bias(rel_bias: Optional[RelBias], attn_mask: Optional[Tensor], i0: int, i1: int, k0: int, k1: int,
               query_offset: int, device, dtype) -> Optional[Tensor]:
    """The relative bias and the additive mask of one tile as a 4-d tensor (B|1, H|1, rows, keys), or None."""
    extra = None
    if rel_bias is not None:
        extra = rel_bias(relative_positions(i1 - i0, k1 - k0, query_offset + i0 - k0, device)).to(dtype)
    if attn_mask is not None:
        part = (attn_mask[..., i0:i1, k0:k1] if attn_mask.size(-2) > 1 else attn_mask[..., k0:k1]).to(dtype)
        extra = part if extra is None else extra + part
    if extra is None:
        return None
    while extra.dim() < 4:
        extra = extra.unsqueeze(0)
    return extra


def _band_edges(i0: int, i1: int, k0: int, k1: int, query_offset: int, left: Optional[int], right: Optional[int],
                device):
    """``(lo, hi, outside)`` for the column ranges of a tile (queries i0..i1-1, keys k0..k1-1) where the band can
    exclude a key, with ``outside`` (rows, hi - lo) bool; every other column is inside the band for every row."""
    width = k1 - k0
    ranges = []
    if left is not None:  # key j < p - left for some row: columns below the last row's lower bound
        hi = min(width, i1 - 1 + query_offset - left - k0)
        if hi > 0:
            ranges.append((0, hi))
    if right is not None:  # key j > p + right for some row: columns above the first row's upper bound
        lo = max(0, i0 + query_offset + right + 1 - k0)
        if lo < width:
            ranges.append((lo, width))
    if len(ranges) == 2 and ranges[1][0] <= ranges[0][1]:
        ranges = [(0, width)]
    edges = []
    for lo, hi in ranges:
        rel = relative_positions(i1 - i0, hi - lo, query_offset + i0 - k0 - lo, device)
        edges.append((lo, hi, _outside(rel, left, right, None).view(i1 - i0, hi - lo)))
    return edges


def _sdpa_mask(q: Tensor, src_len: int, *, query_offset, causal, key_padding_mask, attn_mask):
    """The fused kernel's form of a problem with no band but causality: ``(mask, is_causal)``, the additive mask
    (1|B, 1|H, Lq, Lk) of q's dtype or None, and whether the kernel's own (top-left aligned) causal mask applies."""
    tgt_len = q.size(2)
    if key_padding_mask is None and attn_mask is None and (not causal or (tgt_len == src_len and query_offset == 0)):
        return None, causal and tgt_len > 1
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
    return mask, False


def _sdpa(q, k, v, *, query_offset, causal, key_padding_mask, attn_mask, dropout_p):
    mask, is_causal = _sdpa_mask(q, k.size(2), query_offset=query_offset, causal=causal,
                                 key_padding_mask=key_padding_mask, attn_mask=attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)


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
        band_bias = _BlockedBand._band_bias(bias, band, _acc(q.dtype))
        for g0, g1 in _BlockedBand._groups(q.shape, nblocks, bq, kb):
            s = _BlockedBand._scores(qb[:, :, g0:g1], _BlockedBand._window(kp, g0, g1, bq, kb), band_bias,
                                     None if extra is None else extra[:, :, g0:g1], valid[:, g0:g1])
            p = torch.softmax(s, dim=-1)
            if dropout_p > 0:  # one mask per group, its stream the group's first block: backward draws it again
                p = p * dropout_keep_mask(p.shape, dropout_p, seed, p, stream=g0)
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
        band_bias = _BlockedBand._band_bias(bias, band, acc)
        for g0, g1 in _BlockedBand._groups(q.shape, nblocks, bq, kb):
            kw = _BlockedBand._window(kp, g0, g1, bq, kb)  # (B, H, G, D, kb)
            vw = _BlockedBand._window(vp, g0, g1, bq, kb)
            s = _BlockedBand._scores(qb[:, :, g0:g1], kw, band_bias,
                                     None if extra is None else extra[:, :, g0:g1], valid[:, g0:g1])
            p = torch.softmax(s, dim=-1)
            g_out = go[:, :, g0:g1]
            grad_p = torch.matmul(g_out, vw).to(acc)  # (B, H, G, bq, kb)
            if dropout_p > 0:
                keep = dropout_keep_mask(p.shape, dropout_p, seed, p, stream=g0)
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
            fold_windows(grad_kw, grad_kp, g0, bq)
            fold_windows(grad_vw, grad_vp, g0, bq)
        src_len = k.size(2)
        grad_k = _unpad_keys(grad_kp[:, :, :length], start, src_len)
        grad_v = _unpad_keys(grad_vp[:, :, :length], start, src_len)
        grad_q = grad_q.view(bsz, heads, nblocks * bq, head_dim)[:, :, :tgt_len]
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_q, grad_k, grad_v, grad_bias, None, None, None, None, None, None, None


class _NarrowBand(torch.autograd.Function):
    """Band attention for narrow bands, every block in one batched matmul (no Python loop over blocks).

    Layout: each (batch, head) gets a segment of ``nbs * bq`` rows holding its queries at rows ``[a, a + Lq)``
    and its keys at rows ``[a - query_offset, ...)``; all segments are laid end to end in one flat
    (rows, head_dim) buffer, with ``left`` extra rows before and ``kb - bq - left >= right`` after. Then the
    ``kb >= bq + left + right`` keys of query block ``n`` (over all segments) are flat rows
    ``[n*bq, n*bq + kb)``: one overlapping ``as_strided`` view gives every block's window without copying, and
    one ``bmm`` scores them all. Gaps between segments (at least ``left`` rows before and ``right`` after the
    real rows) are zero and masked, so a real query's window never reaches another head's keys; the few
    all-gap query blocks are computed and dropped.

    Forward saves the scaled queries, the flat keys/values and the probabilities (``kb / head_dim`` of a query
    tensor); backward reuses them instead of recomputing the scores (one softmax pass saved), and computes the
    key and value gradients with one ``bmm`` each through a skewed copy of the probabilities (:meth:`_fold`),
    so no (blocks, kb, head_dim) window gradient is materialised and nothing is accumulated piece by piece.

    ``reuse`` (a whole pass of the attention base: backward runs once, and nothing else reads the heads or the
    output's gradient) puts memory first: the caller's q, k and v are freed once copied, the probabilities are
    recomputed in backward instead of kept (1-3% more time), the output's gradient is freed once copied, and the
    gradients are written over the copies. At L=8192 that takes local attention's training step from 1.83x to
    1.49x the projections' memory (docs/benchmarks.md)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, extra, valid, band, layout, dropout_p, seed, reuse=False):
        bq, a, nbs, query_offset, left, tail = layout
        bsz, heads, tgt_len, head_dim = q.shape
        src_len, kb = k.size(2), band.size(1)
        n = bsz * heads * nbs
        acc = _acc(q.dtype)
        pad = (kb // bq - 1) * bq  # zero rows around the queries for the backward fold (see _fold)
        qs_pad = _flat(q, pad, pad, nbs * bq, a, head_dim**-0.5)
        qs = qs_pad[pad : pad + n * bq].view(n, bq, head_dim)
        kp = _flat(k, left, tail, nbs * bq, a - query_offset)
        vp = _flat(v, left, tail, nbs * bq, a - query_offset)
        if reuse:  # nothing reads the caller's heads again: only the copies stay alive
            free_memory(q, k, v)
        p = _NarrowBand._probs(qs, kp, bias, extra, valid, band, (bsz, heads, nbs, bq, kb), acc)
        p_used = p
        if dropout_p > 0:
            p_used = p * dropout_keep_mask(p.shape, dropout_p, seed, p)
        out = torch.bmm(p_used.to(v.dtype), _NarrowBand._windows(vp, n, bq, kb))
        del p_used
        # ``reuse`` (a whole pass, memory first): the probabilities are recomputed in backward, not kept
        ctx.save_for_backward(qs_pad, kp, vp, None if reuse else p, bias, valid, band, extra)
        ctx.config = (layout, dropout_p, seed, q.shape, src_len, reuse)
        return out.view(bsz, heads, nbs * bq, head_dim)[:, :, a : a + tgt_len]

    @staticmethod
    def _probs(qs, kp, bias, extra, valid, band, shape, acc):
        """(n, bq, kb) probabilities of the scaled query blocks ``qs`` against their key windows in ``kp``."""
        bsz, heads, nbs, bq, kb = shape
        s = torch.bmm(qs, _NarrowBand._windows(kp, qs.size(0), bq, kb).transpose(1, 2))
        s = s.to(acc) if s.dtype != acc else s
        s5 = s.view(shape)
        if bias is None:
            # band and key mask folded into one (B, 1, blocks, bq, kb) table: a single pass over the scores
            allowed = valid.view(bsz, 1, nbs, 1, kb) & band.view(1, 1, 1, bq, kb)
            s5 += torch.zeros((), dtype=acc, device=s.device).masked_fill(~allowed, torch.finfo(acc).min)
        else:
            s5 += _BlockedBand._band_bias(bias, band, acc).unsqueeze(1)
            if not bool(valid.all()):
                s5.masked_fill_(~valid.view(bsz, 1, nbs, 1, kb), torch.finfo(acc).min)
        if extra is not None:
            s5 += extra
        return torch.softmax(s, dim=-1)

    @staticmethod
    def _windows(xp, n, bq, kb):
        """(n, kb, D) overlapping view: rows [i*bq, i*bq + kb) of the flat buffer for block i."""
        return xp.as_strided((n, kb, xp.size(1)), (bq * xp.stride(0), xp.stride(0), xp.stride(1)), xp.storage_offset())

    @staticmethod
    def _skewed(n, bq, kb, like):
        """(buffer, view): a zero-padded buffer in which :meth:`_fold` reads every key block's column pieces as
        one matrix, and its (n, bq, kb) view to write the probabilities or score gradients into.

        Block ``i`` sits at offset ``(i + G) * S`` with ``S = bq * (kb + 1)`` and ``G = kb / bq - 1`` zero blocks
        on either side. Key block ``m`` is covered by column piece ``t`` (columns ``[t*bq, (t+1)*bq)``) of query
        block ``m - t``; its entry (row r, column c of the piece) lies at ``m*S + G*bq + t'*bq*kb + r*kb + c``
        with ``t' = G - t``, so the pieces for one key block form one (bq, kb) matrix of strides (1, kb)."""
        pad = kb // bq - 1
        stride = bq * (kb + 1)
        buf = like.new_empty((n + 2 * pad) * stride)
        buf[: pad * stride].zero_()
        buf[(n + pad) * stride :].zero_()
        return buf, buf.as_strided((n, bq, kb), (stride, kb, 1), pad * stride)

    @staticmethod
    def _fold(buf, rhs_pad, n, bq, kb, out=None):
        """Flat key gradient (rows ``(n + G) * bq``) = for every key block ``m``, the sum over the ``G + 1``
        query blocks whose windows cover it of (their piece of the window)^T @ (their rows of ``rhs``): a single
        ``bmm`` of the skewed buffer (see :meth:`_skewed`) with overlapping windows of ``rhs_pad`` (``rhs`` with
        ``G * bq`` zero rows on either side). No window gradient and no accumulation pass."""
        pad = kb // bq - 1
        head_dim = rhs_pad.size(1)
        lhs = buf.as_strided((n + pad, bq, kb), (bq * (kb + 1), 1, kb), pad * bq)
        rhs = rhs_pad.as_strided((n + pad, kb, head_dim), (bq * head_dim, head_dim, 1), rhs_pad.storage_offset())
        if out is None:
            return torch.bmm(lhs, rhs).view(-1, head_dim)
        torch.bmm(lhs, rhs, out=out.view(n + pad, bq, head_dim))  # (n + G) * bq rows: a flat key buffer's
        return out

    @staticmethod
    def _write(view, a, b=None):
        """view[...] = a (* b), casting to the view's dtype."""
        if b is None:
            view.copy_(a)
        elif a.dtype == view.dtype and b.dtype == view.dtype:
            torch.mul(a, b, out=view)
        else:
            view.copy_(a * b)

    @staticmethod
    def backward(ctx, grad_out):
        qs_pad, kp, vp, p, bias, valid, band, extra = ctx.saved_tensors
        (bq, a, nbs, query_offset, left, _), dropout_p, seed, q_shape, src_len, reuse = ctx.config
        bsz, heads, tgt_len, head_dim = q_shape
        kb = band.size(1)
        n = bsz * heads * nbs
        pad = (kb // bq - 1) * bq
        acc = _acc(qs_pad.dtype)
        seg = nbs * bq
        go_pad = _flat(grad_out, pad, pad, seg, a)
        if reuse:  # the output's gradient is read by nothing but this backward: only its padded copy stays
            free_memory(grad_out)
        del grad_out
        go = go_pad[pad : pad + n * bq].view(n, bq, head_dim)
        vw = _NarrowBand._windows(vp, n, bq, kb)
        if p is None:  # ``reuse``: recomputed, and then overwritten by the score gradient
            qs = qs_pad[pad : pad + n * bq].view(n, bq, head_dim)
            p = _NarrowBand._probs(qs, kp, bias, extra, valid, band, (bsz, heads, nbs, bq, kb), acc)
        keep = None
        if dropout_p > 0:
            keep = dropout_keep_mask(p.shape, dropout_p, seed, p)
        # the probabilities (after dropout) into the skewed buffer for the value gradient's fold; the score
        # gradient P * (dP - rowsum(P * dP)) a few blocks at a time, so that no full dP exists beside the
        # buffer: into p itself when backward runs once (``reuse``), else into a new tensor
        buf, skewed = _NarrowBand._skewed(n, bq, kb, vp)
        grad_s = p if reuse else torch.empty_like(p)
        step = max(1, _GRAD_CHUNK // (bq * kb))
        for c in range(0, n, step):
            pc = p[c : c + step]
            gp = torch.bmm(go[c : c + step], vw[c : c + step].transpose(1, 2))
            gp = gp.to(acc) if gp.dtype != acc else gp
            if keep is None:
                _NarrowBand._write(skewed[c : c + step], pc)
            else:
                _NarrowBand._write(skewed[c : c + step], pc, keep[c : c + step])
                gp *= keep[c : c + step]
            # rowsum(P * dP) (= rowsum(dO * O)): ``vecdot`` took 0.2-0.9x the time of a batched (1 x kb) by (kb x 1)
            # product and 0.7-1.3x that of a product and a sum (AMD EPYC, two threads, torch 2.13)
            delta = torch.linalg.vecdot(pc, gp).unsqueeze(-1)
            torch.mul(gp.sub_(delta), pc, out=grad_s[c : c + step])
        del keep, gp, delta, pc
        # ``reuse`` (one backward, see narrow_band_attention): the value gradient over vp (not read after dP)
        grad_vp = _NarrowBand._fold(buf, go_pad, n, bq, kb, out=vp if reuse else None)
        del go
        _NarrowBand._write(skewed, grad_s)  # the score gradient, into the same skewed buffer
        del grad_s, p  # (``reuse``: the recomputed probabilities, now the score gradient, go)
        grad_bias = None
        if bias is not None:
            grad_bias = skewed.view(bsz, heads, nbs, bq, kb).to(acc).sum(dim=(0, 2)).sum_to_size(bias.shape)
            grad_bias = grad_bias.to(bias.dtype)
        kw = _NarrowBand._windows(kp, n, bq, kb)
        # the key gradient into the output gradient's padded copy (at least as many rows; read for the last
        # time by the value gradient); ``reuse``: the query gradient over qs_pad (read for the last time here)
        spare = go_pad[: kp.size(0)] if go_pad.dtype == kp.dtype else None
        grad_kp = _NarrowBand._fold(buf, qs_pad, n, bq, kb, out=spare)  # qs is scaled: d(q.k*scale)/dk
        if reuse:
            grad_q = torch.bmm(skewed, kw, out=qs_pad[pad : pad + n * bq].view(n, bq, head_dim)).mul_(head_dim**-0.5)
        else:
            grad_q = torch.baddbmm(qs_pad.new_empty(()).expand(n, bq, head_dim), skewed, kw, beta=0,
                                   alpha=head_dim**-0.5)
        start = a - query_offset

        def keys(flat):
            return flat[left : left + bsz * heads * seg].view(bsz, heads, seg, head_dim)[:, :, start : start + src_len]

        grad_q = grad_q.view(bsz, heads, seg, head_dim)[:, :, a : a + tgt_len]
        return grad_q, keys(grad_kp), keys(grad_vp), grad_bias, None, None, None, None, None, None, None


def _flat(x: Tensor, lead: int, tail: int, seg: int, start: int, scale: Optional[float] = None) -> Tensor:
    """(lead + B*H*seg + tail, D) buffer: x (B, H, L, D) at rows [start, start + L) of each (b, h) segment of
    ``seg`` rows (scaled by ``scale``), zeros everywhere else."""
    bsz, heads, length, head_dim = x.shape
    body = bsz * heads * seg
    buf = x.new_empty(lead + body + tail, head_dim)
    buf[:lead].zero_()
    buf[lead + body :].zero_()
    segs = buf[lead : lead + body].view(bsz, heads, seg, head_dim)
    segs[:, :, :start].zero_()
    segs[:, :, start + length :].zero_()
    if scale is None:
        segs[:, :, start : start + length].copy_(x)
    else:
        torch.mul(x, scale, out=segs[:, :, start : start + length])
    return buf


def _band_blocks(q: Tensor, src_len: int, left: int, right: int, bq: int, kb: int, nblocks: int, lead: int,
                 start: int, rel_bias: Optional[RelBias], key_padding_mask: Optional[Tensor],
                 attn_mask: Optional[Tensor], dropout_p: float):
    """What both band paths need per block of ``bq`` query rows and its ``kb``-wide key window (window column 0
    of block 0 is key ``start``; the queries start at row ``lead`` of ``nblocks * bq`` rows):

    * ``band`` (bq, kb): the entries inside the band (offsets ``p - j`` in a block do not depend on the block);
    * ``bias`` (H, bq, kb) from ``rel_bias``, or None;
    * ``extra`` (.., nblocks, bq, kb): ``attn_mask`` cut into the windows, or None;
    * ``valid`` (B, nblocks, kb): real (unpadded, in range) keys of every window;
    * ``seed`` of the dropout mask (0 without dropout)."""
    bsz, _, tgt_len, _ = q.shape
    rel = torch.arange(bq, device=q.device).unsqueeze(1) + left - torch.arange(kb, device=q.device).unsqueeze(0)
    band = (rel <= left) & (rel >= -right)
    bias = None if rel_bias is None else rel_bias(rel)
    extra = None
    if attn_mask is not None:
        rows = F.pad(attn_mask, (0, 0, lead, nblocks * bq - lead - tgt_len))
        rows = rows.view(*rows.shape[:2], nblocks, bq, src_len)
        cols = _windows(rows, 4, start, kb, bq, nblocks, 0.0)  # (.., nb, bq, nb, kb)
        extra = torch.diagonal(cols, dim1=2, dim2=4).permute(0, 1, 4, 2, 3).to(_acc(q.dtype)).contiguous()
    valid = torch.ones(bsz, src_len, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        valid = ~key_padding_mask
    valid = _windows(valid, 1, start, kb, bq, nblocks, False).contiguous()
    seed = int(torch.randint(0, 2**62, ())) if dropout_p > 0 else 0
    return band, bias, extra, valid, seed


def narrow_band_attention(
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
    block_size: int = 16,
    reuse_buffers: bool = False,
) -> Tensor:
    """Band attention with all query blocks in one batched op (see :class:`_NarrowBand`); for narrow bands.

    Needs ``0 <= query_offset <= left`` and every key within ``[query_offset - left, query_offset + tgt_len +
    right)`` (what :func:`band_attention` leaves after cutting unreachable keys). ``reuse_buffers``: nothing
    reads ``q``, ``k``, ``v`` after the call nor the output's gradient after backward receives it, and backward
    runs once: their memory is freed once copied (where each covers its own storage), the probabilities are
    recomputed in backward, and backward writes the gradients over the flat copies forward kept. A second
    backward is refused by autograd; reading a freed tensor is undefined (see :func:`..common.free_memory`), so
    only callers that own the heads set it (the attention base's whole passes)."""
    tgt_len, src_len = q.size(2), k.size(2)
    if not (query_offset <= left and src_len - query_offset <= tgt_len + right):
        raise ValueError(f"keys reach outside the band: offset {query_offset}, left {left}, right {right}, "
                         f"{tgt_len} queries, {src_len} keys")
    bq = block_size
    # windows a whole number of blocks wide: every piece of the backward fold is then a plain (n, bq, D) view
    kb = math.ceil((bq + left + right) / bq) * bq
    tail = kb - bq - left  # >= right: window rows after a block's last query
    a = math.ceil(left / bq) * bq  # first real query row of a segment: the first window starts in the segment
    nbs = (a + tgt_len + bq - 1) // bq + math.ceil(tail / bq)  # the last real window ends in the segment
    start = query_offset - a - left  # key index of window column 0 of segment block 0
    band, bias, extra, valid, seed = _band_blocks(q, src_len, left, right, bq, kb, nbs, a, start, rel_bias,
                                                  key_padding_mask, attn_mask, dropout_p)
    layout = (bq, a, nbs, query_offset, left, tail)
    return _NarrowBand.apply(q, k, v, bias, extra, valid, band, layout, dropout_p, seed, bool(reuse_buffers))


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
    """Band attention block by block (see :class:`_BlockedBand`); for wide bands."""
    tgt_len, src_len = q.size(2), k.size(2)
    bq = block_size
    nblocks = math.ceil(tgt_len / bq)
    kb = bq + left + right
    start = query_offset - left  # key index of window column 0 for block 0
    band, bias, extra, valid, seed = _band_blocks(q, src_len, left, right, bq, kb, nblocks, 0, start, rel_bias,
                                                  key_padding_mask, attn_mask, dropout_p)
    return _BlockedBand.apply(q, k, v, bias, extra, valid, band, start, bq, dropout_p, seed)


def _narrow_block(span: int, head_dim: int) -> int:
    """Query block of the narrow path: about the span (smaller blocks waste fewer scores on the band's
    corners, larger ones make each small matmul more efficient), keeping kb = block + span <= 2 head_dim."""
    return max(8, min(32, 1 << max(0, int(span).bit_length() - 1), 2 * head_dim - span))


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
    reuse_buffers: bool = False,
    average_heads: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Dispatch to the cheapest exact path. ``left``/``right`` None = unbounded; ``right=0`` = causal.
    ``reuse_buffers``: see :func:`narrow_band_attention` (the other paths ignore it). ``average_heads``: with
    ``need_weights``, return the weights' mean over heads (B, 1, Lq, Lk) instead of every head's."""
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
    long_input = tgt_len * src_len > _DENSE_PAIRS
    if need_weights:
        plain = not left_active and (not right_active or right == 0)  # no band but causality
        if long_input and plain and softmax_with_weights_applies(
                q, query_offset=query_offset, causal=right_active, rel_bias=rel_bias,
                key_padding_mask=key_padding_mask, attn_mask=attn_mask, dropout_p=dropout_p):
            out, probs = softmax_with_weights(q, k, v, query_offset=query_offset, causal=right_active,
                                              rel_bias=rel_bias, key_padding_mask=key_padding_mask,
                                              attn_mask=attn_mask, average_heads=average_heads)
        elif long_input:
            # the output from its own path (SDPA or a banded one), the weights in tiles inside the band, recomputed
            # in backward if a loss uses them (see band_weights): no (B, H, Lq, Lk) probabilities kept for backward
            out, _ = band_attention(
                q, k, v, query_offset=query_offset, left=left, right=right, rel_bias=rel_bias,
                key_padding_mask=key_padding_mask, attn_mask=attn_mask, dropout_p=dropout_p,
                block_size=block_size,
            )
            probs = band_weights(q, k, query_offset=query_offset, left=left, right=right, rel_bias=rel_bias,
                                 key_padding_mask=key_padding_mask, attn_mask=attn_mask, average_heads=average_heads)
        else:
            out, probs = dense_attention(
                q, k, v, query_offset=query_offset, left=left, right=right, rel_bias=rel_bias,
                key_padding_mask=key_padding_mask, attn_mask=attn_mask, dropout_p=dropout_p, need_weights=True,
            )
            if average_heads:
                probs = probs.mean(dim=1, keepdim=True)
        if cut is not None:
            probs = F.pad(probs, (cut[0], cut[2] - cut[1]))
        return out, probs
    if not left_active and (not right_active or right == 0):
        causal = right_active  # right == 0 here
        if blocked_softmax_dropout_applies(q, k, dropout_p=dropout_p, causal=causal, query_offset=query_offset,
                                           key_padding_mask=key_padding_mask) and not _bias_needs_grad(
                                               rel_bias, attn_mask, q.device):
            # attention dropout on the CPU: the fused kernels have none, the math path keeps several (Lq, Lk) tensors
            return blocked_softmax_dropout(q, k, v, dropout_p=dropout_p, causal=causal, query_offset=query_offset,
                                           key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                           bias=rel_bias), None
        if rel_bias is None:
            return _sdpa(q, k, v, query_offset=query_offset, causal=causal, key_padding_mask=key_padding_mask,
                         attn_mask=attn_mask, dropout_p=dropout_p), None
        bias = rel_bias(relative_positions(tgt_len, src_len, query_offset, q.device))
        if not bias.requires_grad:  # a fixed bias over every key (ALiBi): one fused kernel with it as the mask
            bias = bias.to(q.dtype).unsqueeze(0)
            return _sdpa(q, k, v, query_offset=query_offset, causal=causal, key_padding_mask=key_padding_mask,
                         attn_mask=bias if attn_mask is None else attn_mask + bias, dropout_p=dropout_p), None
    band_left = left if left_active else max(0, max_rel)
    band_right = right if right_active else max(0, -min_rel)
    span = band_left + band_right
    if block_size is None and span <= q.size(-1) and long_input:
        # narrow band: one batched op over all blocks, probabilities kept for backward (kb / head_dim of a
        # query tensor, at most 2x)
        return narrow_band_attention(
            q, k, v, query_offset=query_offset, left=band_left, right=band_right, rel_bias=rel_bias,
            key_padding_mask=key_padding_mask, attn_mask=attn_mask, dropout_p=dropout_p,
            block_size=_narrow_block(span, q.size(-1)), reuse_buffers=reuse_buffers,
        ), None
    if block_size is None:
        # 64-query blocks were fastest on CPU for spans of 64 and more; shorter spans waste less with smaller blocks
        block_size = max(16, min(64, 1 << max(0, int(span + 1).bit_length() - 1)))
    if tgt_len <= block_size or not long_input:
        out, _ = dense_attention(
            q, k, v, query_offset=query_offset, left=left, right=right, rel_bias=rel_bias,
            key_padding_mask=key_padding_mask, attn_mask=attn_mask, dropout_p=dropout_p,
        )
        return out, None
    out = blocked_band_attention(
        q, k, v, query_offset=query_offset, left=band_left, right=band_right,
        rel_bias=rel_bias, key_padding_mask=key_padding_mask, attn_mask=attn_mask, dropout_p=dropout_p,
        block_size=block_size,
    )
    return out, None
