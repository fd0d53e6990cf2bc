"""ABC (Attention with Bounded-memory Control, Peng et al. 2021) as pure tensor functions.

Notation, per batch item and head: queries ``q_i``, keys ``k_j``, values ``v_j`` in R^d, and slot scores
``a_j = k_j W_k``, ``b_j = v_j W_v`` in R^r (r memory slots). Padded keys carry ``finfo.min`` in ``a``/``b``.

Noncausal (and cross): each slot is a softmax-weighted average over the whole sequence,
``K~ = softmax_j(a)^T K``, ``V~ = softmax_j(b)^T V`` (r x d), and ``o_i = softmax(q_i K~^T / sqrt d) V~``.

Causal: the memory seen by query ``t`` holds only the keys ``j <= t``::

    K~_t[r] = sum_{j<=t} exp(a_{j,r}) k_j / sum_{j<=t} exp(a_{j,r})      (V~_t likewise with b and v)
    o_t     = sum_r softmax_r(q_t . K~_t[r] / sqrt d) V~_t[r]

:func:`causal_abc` computes this in chunks of ``chunk_size`` positions without ever forming the per-position
states ``K~_t`` (L x r x d). With ``E_j = exp(a_j - M)`` for a per-chunk reference ``M``:

* ``q_t . K~_t[r] = (q_t . N_c[r] + sum_{j<=t in chunk} E_{j,r} (q_t . k_j)) / (Z_c[r] + sum_{j<=t} E_{j,r})``,
  where ``N_c``, ``Z_c`` are the numerator and denominator carried in from earlier chunks: one masked
  (C x C) score matrix per chunk plus a (C x d) @ (d x r) product;
* ``o_t = w_t N^v_c + sum_{j<=t} (w_t . E^v_j) v_j`` with ``w_t = p_t / Z^v_t`` (p = slot probabilities),
  again a masked (C x C) matrix per chunk.

Stability: ``M`` is the running maximum of the scores up to the end of the chunk, so no exponential exceeds 1.
A row whose own running maximum lies far below its chunk's (a jump of > ~60 nats inside one chunk, in float32)
would lose every term to underflow; such blocks are redone with smaller chunks, down to one position per chunk
where the reference is the row's own maximum, so the result stays exact and finite for any scores.

The decoding state is the carried numerator/denominator/maximum for keys and for values (:class:`ABCState`),
O(r d) per head whatever the length. Training runs the whole sequence through one autograd function
(:class:`_ChunkedCausalABC`) whose hand-written backward saves only the inputs, the (L, r) slot scores and the
state entering each group of chunks, and recomputes the rest. Forward and backward walk the chunks in groups of ``block_chunks``
(the state carried from group to group, its gradient carried back), so their temporaries are those of one group
whatever the length; the output and the gradients are written straight into tensors laid out like the inputs.
The exact fallback for jumping scores uses plain autograd over checkpointed blocks of ``block_chunks`` chunks.
"""
import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .common import add_matmul_, dropout_keep_mask, matmul_in_projection_layout, without_autocast

__all__ = [
    "ABCState", "empty_state", "slot_memory", "compressed_slots", "attend_slots", "attend_slots_in_layout",
    "noncausal_abc", "causal_abc", "causal_abc_dense",
]


class ABCState(NamedTuple):
    """Constant-size causal state, batch on dim 0. ``*_num``: (B, H, r, d) numerators, ``*_den``: (B, H, r)
    denominators, both scaled by ``exp(-*_max)``; ``*_max``: (B, H, r) running maximum of the slot scores."""

    k_num: Tensor
    k_den: Tensor
    k_max: Tensor
    v_num: Tensor
    v_den: Tensor
    v_max: Tensor


def empty_state(batch: int, heads: int, slots: int, dim: int, dtype, device) -> ABCState:
    low = torch.finfo(dtype).min
    num = torch.zeros(batch, heads, slots, dim, dtype=dtype, device=device)
    den = torch.zeros(batch, heads, slots, dtype=dtype, device=device)
    mx = torch.full((batch, heads, slots), low, dtype=dtype, device=device)
    return ABCState(num, den, mx, num.clone(), den.clone(), mx.clone())


def _compute_dtype(dtype):
    # half precision has too little exponent range for the carried sums
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _max_gap(dtype, autograd: bool = False) -> float:
    """Largest drop (in nats) of a row's maximum below its chunk reference that keeps the row's largest term a
    normal number, with margin. ``autograd``: for the plain-autograd path, whose division backward squares the
    row denominators (``-g num / den^2``): half the range, or a drop of 45-60 nats in float32 turns the slot
    gradients into inf - inf = NaN. The fused backward divides once and takes the full range."""
    return 0.7 * -math.log(torch.finfo(dtype).tiny) / (2 if autograd else 1)


# --------------------------------------------------------------------------------------------- noncausal
def slot_memory(k: Tensor, v: Tensor, alpha_k: Tensor, alpha_v: Tensor) -> Tuple[Tensor, Tensor]:
    """The r memory slots of a whole sequence: (K~, V~), each (B, H, r, d)."""
    k_slots = torch.matmul(torch.softmax(alpha_k, dim=-2).transpose(-1, -2), k)
    v_slots = torch.matmul(torch.softmax(alpha_v, dim=-2).transpose(-1, -2), v)
    return k_slots, v_slots


def attend_slots(q: Tensor, k_slots: Tensor, v_slots: Tensor, *, dropout_p: float = 0.0) -> Tuple[Tensor, Tensor]:
    """Softmax attention of q (B, H, L, d) over the r slots. Returns (out (B, H, L, d), slot probs (B, H, L, r))."""
    probs = torch.softmax(torch.matmul(q, k_slots.transpose(-1, -2)) * q.size(-1) ** -0.5, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p, training=True)
    return torch.matmul(probs, v_slots), probs


class _CompressedSlots(torch.autograd.Function):
    """Slots ``softmax_j(x_j W)^T x`` (B, H, r, d) of x (B, H, L, d) for a shared W (d, r); padded keys (``pad``
    (B, L) True) get score ``finfo.min``. Keeps only x (a view of the projection's output, kept anyway), W and
    the mask: the (L, r) probabilities are recomputed in backward, and the gradient of x, which x reaches through
    both the scores and the average, is written once, in the layout of the projections (L, B, H, d), instead of
    as two full-size pieces and their sum."""

    BLOCK = 1024

    @staticmethod
    def _probs(x, weight, pad):
        # in (L, B, H, d) order, where the projected heads are contiguous: no copy of x
        scores = torch.matmul(x.permute(2, 0, 1, 3), weight).permute(1, 2, 0, 3)
        if pad is not None:
            scores = scores.masked_fill(pad.view(pad.size(0), 1, -1, 1), torch.finfo(scores.dtype).min)
        return torch.softmax(scores, dim=-2)

    @staticmethod
    def forward(ctx, x, weight, pad):
        probs = _CompressedSlots._probs(x, weight, pad)
        ctx.save_for_backward(x, weight, pad)
        return torch.matmul(probs.transpose(-1, -2), x)

    @staticmethod
    @without_autocast
    def backward(ctx, g_slots):
        x, weight, pad = ctx.saved_tensors
        probs = _CompressedSlots._probs(x, weight, pad)
        g_probs = torch.matmul(x, g_slots.transpose(-1, -2))  # (B, H, L, r)
        g_scores = g_probs.sub_((probs * g_probs).sum(-2, keepdim=True)).mul_(probs)  # softmax over the keys
        if pad is not None:
            g_scores.masked_fill_(pad.view(pad.size(0), 1, -1, 1), 0.0)
        g_scores = g_scores.permute(2, 0, 1, 3).contiguous()  # (L, B, H, r)
        g_weight = None
        if ctx.needs_input_grad[1]:
            x_rows = x.permute(2, 0, 1, 3).reshape(-1, x.size(-1))  # a view for the projections' layout
            g_weight = torch.matmul(x_rows.t(), g_scores.view(-1, weight.size(1)))
        gx = None
        if ctx.needs_input_grad[0]:
            gx = torch.matmul(g_scores, weight.t().to(g_scores.dtype)).permute(1, 2, 0, 3)  # (L, B, H, d) storage
            for lo in range(0, x.size(2), _CompressedSlots.BLOCK):
                rows = slice(lo, lo + _CompressedSlots.BLOCK)
                gx[:, :, rows] += torch.matmul(probs[:, :, rows], g_slots)
        return gx, g_weight, None


class _AttendSlotsInLayout(torch.autograd.Function):
    """:func:`attend_slots` without dropout, whose output and query gradient are written straight into tensors
    laid out like the projections (L, B, H, d), so neither the output's way back to (L, B, D) nor the query
    gradient's needs a full-size copy. Keeps only q (a view of the projection's output) and the slots; the slot
    probabilities are recomputed in backward."""

    @staticmethod
    def _probs(q, k_slots):
        return torch.softmax(torch.matmul(q, k_slots.transpose(-1, -2)) * q.size(-1) ** -0.5, dim=-1)

    @staticmethod
    def forward(ctx, q, k_slots, v_slots):
        probs = _AttendSlotsInLayout._probs(q, k_slots)
        out = matmul_in_projection_layout(probs, v_slots)
        ctx.save_for_backward(q, k_slots, v_slots)
        return out

    @staticmethod
    @without_autocast
    def backward(ctx, g_out):
        q, k_slots, v_slots = ctx.saved_tensors
        probs = _AttendSlotsInLayout._probs(q, k_slots)  # (L, r): cheaper to recompute than to keep
        scale = q.size(-1) ** -0.5
        g_probs = torch.matmul(g_out, v_slots.transpose(-1, -2))
        g_v_slots = torch.matmul(probs.transpose(-1, -2), g_out)
        g_scores = g_probs.sub_((g_probs * probs).sum(-1, keepdim=True)).mul_(probs).mul_(scale)
        g_k_slots = torch.matmul(g_scores.transpose(-1, -2), q)
        g_q = matmul_in_projection_layout(g_scores, k_slots)
        return g_q, g_k_slots, g_v_slots


def attend_slots_in_layout(q: Tensor, k_slots: Tensor, v_slots: Tensor) -> Tensor:
    """:func:`attend_slots` without dropout or probabilities returned, output stored as (L, B, H, d)."""
    return _AttendSlotsInLayout.apply(q, k_slots, v_slots)


def compressed_slots(x: Tensor, weight: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """The r noncausal memory slots of x (B, H, L, d) scored by ``x W`` (W (d, r), shared by the heads):
    ``softmax_j(x_j W)^T x`` (B, H, r, d), padded keys left out. Equal to :func:`slot_memory` with the scores
    ``x W``, at the memory cost of x alone (see :class:`_CompressedSlots`)."""
    return _CompressedSlots.apply(x, weight.to(x.dtype), key_padding_mask)


def noncausal_abc(
    q: Tensor, k: Tensor, v: Tensor, alpha_k: Tensor, alpha_v: Tensor, *, dropout_p: float = 0.0,
    need_weights: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Noncausal ABC. Weights, if asked, are the equivalent attention over keys,
    ``W[i, j] = sum_r p[i, r] softmax_j(b)[j, r]`` (rows sum to 1): what each value contributes to ``o_i``."""
    k_slots, v_slots = slot_memory(k, v, alpha_k, alpha_v)
    out, probs = attend_slots(q, k_slots, v_slots, dropout_p=dropout_p)
    weights = torch.matmul(probs, torch.softmax(alpha_v, dim=-2).transpose(-1, -2)) if need_weights else None
    return out, weights


# ------------------------------------------------------------------------------------------------ causal
def _chunk_maxima(alpha: Tensor, m0: Tensor, limit: Optional[float] = None) -> Tuple[Tensor, Tensor, float]:
    """alpha (B, H, N, C, r), m0 (B, H, r) -> (running max at each chunk's end (B, H, N, r), the same entering
    each chunk, largest drop of a row's own running max below its chunk's end max).

    A row's own running max is at least the max entering its chunk, so ``ends - starts`` bounds its drop: the
    rows themselves are looked at only in the chunks where that bound exceeds ``limit`` (default :func:`_max_gap`;
    the first chunk of a fresh state, jumps), elsewhere the bound (no larger than the limit) stands in for the
    exact drop. Every comparison with the limit comes out as with the exact drops."""
    limit = _max_gap(alpha.dtype) if limit is None else limit
    ends = torch.cummax(torch.maximum(alpha.amax(dim=3), m0.unsqueeze(2)), dim=2).values
    starts = torch.cat([m0.unsqueeze(2), ends[:, :, :-1]], dim=2)
    if not alpha.numel():
        return ends, starts, 0.0
    bound = (ends - starts).amax(dim=(0, 1, 3))  # (N,)
    check = (bound > limit).nonzero().squeeze(-1)
    gap = bound.max().item()
    if check.numel():
        ends_c, starts_c = ends.index_select(2, check), starts.index_select(2, check)
        rows = torch.maximum(torch.cummax(alpha.index_select(2, check), dim=3).values, starts_c.unsqueeze(3))
        # rows that have seen only padded keys have no output to protect (they give zeros)
        rows = torch.where(rows > torch.finfo(alpha.dtype).min / 2, rows, ends_c.unsqueeze(3))
        exact = (ends_c.unsqueeze(3) - rows).amax().item()
        rest = bound.index_fill(0, check, float("-inf")).max().item() if check.numel() < bound.numel() else exact
        gap = max(exact, rest)
    return ends, starts, gap


def _carried(exps: Tensor, x: Tensor, ends: Tensor, num0: Tensor, den0: Tensor, m0: Tensor):
    """Numerator and denominator entering each chunk, at that chunk's end reference.

    exps (B, H, N, C, r) = exp(alpha - ends), x (B, H, N, C, d). Returns (carried num (B, H, N, r, d),
    carried den (B, H, N, r), chunk sums num (B, H, N, r, d), chunk sums den (B, H, N, r))."""
    sum_num = torch.matmul(exps.transpose(-1, -2), x)
    sum_den = exps.sum(dim=3)
    n = ends.size(2)
    # weight of chunk e's sums in the state entering chunk c (e < c), rescaled to chunk c's reference: <= 1
    earlier = torch.ones(n, n, dtype=torch.bool, device=ends.device).tril(-1).view(1, 1, n, n, 1)
    gaps = ends.unsqueeze(2) - ends.unsqueeze(3)  # [c, e] = ends[e] - ends[c]
    decay = torch.exp(torch.where(earlier, gaps, torch.full_like(gaps, float("-inf"))))  # (B, H, N, N, r)
    from_state = torch.exp(m0.unsqueeze(2) - ends)  # (B, H, N, r)
    carried_num = torch.einsum("bhcer,bherd->bhcrd", decay, sum_num) + from_state.unsqueeze(-1) * num0.unsqueeze(2)
    carried_den = torch.einsum("bhcer,bher->bhcr", decay, sum_den) + from_state * den0.unsqueeze(2)
    return carried_num, carried_den, sum_num, sum_den


def _nonzero(den: Tensor) -> Tensor:
    """Denominators are exactly 0 only in rows that have seen nothing but padded keys (every numerator is 0
    there too): use 1, so those rows give zeros with finite gradients."""
    return torch.where(den > 0, den, torch.ones_like(den))


def _causal_block(q, k, v, alpha_k, alpha_v, k_num, k_den, k_max, v_num, v_den, v_max, chunk: int,
                  dropout_p: float):
    """One block of positions, vectorised over its chunks. Returns (out, *new state)."""
    length = q.size(2)
    if length == 1:
        return _causal_step(q, k, v, alpha_k, alpha_v, k_num, k_den, k_max, v_num, v_den, v_max, dropout_p)
    chunk = max(1, min(chunk, length))
    pad = (-length) % chunk
    if pad:  # tail positions that no key-side sum may count: score -inf
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        alpha_k, alpha_v = (F.pad(t, (0, 0, 0, pad), value=float("-inf")) for t in (alpha_k, alpha_v))
    bsz, heads, padded, dim = q.shape
    n = padded // chunk

    def chunks(t):
        return t.contiguous().view(bsz, heads, n, chunk, t.size(-1))

    ak, av = chunks(alpha_k), chunks(alpha_v)
    limit = _max_gap(q.dtype, autograd=True)
    with torch.no_grad():  # the result does not depend on the references: no gradient through them
        k_ends, _, k_gap = _chunk_maxima(ak, k_max, limit)
        v_ends, _, v_gap = _chunk_maxima(av, v_max, limit)
    if chunk > 1 and max(k_gap, v_gap) > limit:
        return _redo_in_smaller_chunks(q[:, :, :length], k[:, :, :length], v[:, :, :length],
                                       alpha_k[:, :, :length], alpha_v[:, :, :length],
                                       (k_num, k_den, k_max, v_num, v_den, v_max), chunk, dropout_p)
    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()

    # keys: slot scores s[t, r] = q_t . K~_t[r]
    k_exps = torch.exp(ak - k_ends.unsqueeze(3))
    k_in_num, k_in_den, k_sum_num, k_sum_den = _carried(k_exps, kc, k_ends, k_num, k_den, k_max)
    row_den = _nonzero(k_in_den.unsqueeze(3) + k_exps.cumsum(dim=3))
    qk = torch.matmul(qc, kc.transpose(-1, -2)).masked_fill(~causal, 0.0)
    row_num = torch.matmul(qk, k_exps) + torch.matmul(qc, k_in_num.transpose(-1, -2))
    probs = torch.softmax(row_num / row_den * dim ** -0.5, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p, training=True)

    # values: o_t = sum_r p[t, r] V~_t[r]
    v_exps = torch.exp(av - v_ends.unsqueeze(3))
    v_in_num, v_in_den, v_sum_num, v_sum_den = _carried(v_exps, vc, v_ends, v_num, v_den, v_max)
    w = probs / _nonzero(v_in_den.unsqueeze(3) + v_exps.cumsum(dim=3))
    mix = torch.matmul(w, v_exps.transpose(-1, -2)).masked_fill(~causal, 0.0)
    out = torch.matmul(mix, vc) + torch.matmul(w, v_in_num)
    out = out.view(bsz, heads, padded, dim)[:, :, :length]
    return (out,
            k_in_num[:, :, -1] + k_sum_num[:, :, -1], k_in_den[:, :, -1] + k_sum_den[:, :, -1], k_ends[:, :, -1],
            v_in_num[:, :, -1] + v_sum_num[:, :, -1], v_in_den[:, :, -1] + v_sum_den[:, :, -1], v_ends[:, :, -1])


def _causal_step(q, k, v, alpha_k, alpha_v, k_num, k_den, k_max, v_num, v_den, v_max, dropout_p: float):
    """The recurrence for a single position (decoding): the reference is the new running maximum itself."""
    def update(alpha, x, num, den, old_max):
        new_max = torch.maximum(old_max, alpha.squeeze(2)).detach()
        keep, add = torch.exp(old_max - new_max), torch.exp(alpha.squeeze(2) - new_max)
        # one pass over the (r x d) state after the rescaling one (x (B, H, 1, d) broadcasts over the slots)
        num = torch.mul(num, keep.unsqueeze(-1)).addcmul_(add.unsqueeze(-1), x)
        return num, den * keep + add, new_max

    k_num, k_den, k_max = update(alpha_k, k, k_num, k_den, k_max)
    v_num, v_den, v_max = update(alpha_v, v, v_num, v_den, v_max)
    # the slots are num / den (den >= 1: the term at the running maximum contributes exp(0)), divided where they
    # meet the query and the probabilities, r numbers each, instead of in two (r x d) passes: scores q . num_r /
    # den_r, output sum_r (p_r / den_r) num_r (:func:`attend_slots` on the quotients, to rounding)
    scores = torch.matmul(q, k_num.transpose(-1, -2)).div_(k_den.unsqueeze(-2))
    probs = torch.softmax(scores * q.size(-1) ** -0.5, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p, training=True)
    out = torch.matmul(probs / v_den.unsqueeze(-2), v_num)
    return out, k_num, k_den, k_max, v_num, v_den, v_max


def _redo_in_smaller_chunks(q, k, v, alpha_k, alpha_v, state, chunk, dropout_p):
    """A block whose scores jump too far inside a chunk: the same positions, one chunk at a time, each with
    chunks 8x smaller (one position per chunk at worst, where no jump is possible)."""
    outs = []
    for start in range(0, q.size(2), chunk):
        part = slice(start, start + chunk)
        out, *state = _causal_block(q[:, :, part], k[:, :, part], v[:, :, part], alpha_k[:, :, part],
                                    alpha_v[:, :, part], *state, max(1, chunk // 8), dropout_p)
        outs.append(out)
    return (torch.cat(outs, dim=2), *state)


def _decay_matrix(ends: Tensor) -> Tensor:
    """(B, H, r, N, N): weight of chunk e's sums in the state entering chunk c (e < c), at chunk c's reference."""
    ends_t = ends.transpose(-1, -2)  # (B, H, r, N)
    n = ends_t.size(-1)
    gaps = ends_t.unsqueeze(-2) - ends_t.unsqueeze(-1)  # [c, e] = ends[e] - ends[c] <= 0 for e < c
    later = torch.ones(n, n, dtype=torch.bool, device=ends.device).triu()
    return gaps.masked_fill_(later, float("-inf")).exp_()


def _carry(decay, exps, x, ends, num0, den0, m0):
    """Chunk sums and the numerator/denominator entering each chunk (at its end reference), r-major matmuls."""
    sum_num = torch.matmul(exps.transpose(-1, -2), x)  # (B, H, N, r, d)
    sum_den = exps.sum(dim=3)  # (B, H, N, r)
    from_state = torch.exp(m0.unsqueeze(2) - ends)  # (B, H, N, r)
    in_num = torch.matmul(decay, sum_num.transpose(2, 3)).transpose(2, 3) + from_state.unsqueeze(-1) * num0.unsqueeze(2)
    in_den = torch.matmul(decay, sum_den.transpose(-1, -2).unsqueeze(-1)).squeeze(-1).transpose(-1, -2)
    in_den = in_den + from_state * den0.unsqueeze(2)
    return in_num, in_den, sum_num, sum_den


def _group_carry(alpha, x, ends, num0, den0, m0):
    """One group of chunks, its slot scores ``alpha`` (B, H, G, C, r), entering with state (num0, den0) at
    reference m0: the exponentials, the decay matrix, the carried numerators/denominators and chunk sums of
    :func:`_carry`, and each row's denominator. Forward and backward both call this, so backward rebuilds exactly
    forward's values."""
    exps = torch.sub(alpha, ends.unsqueeze(3)).exp_()
    decay = _decay_matrix(ends)
    in_num, in_den, sum_num, sum_den = _carry(decay, exps, x, ends, num0, den0, m0)
    row_den = _nonzero_(exps.cumsum(dim=3).add_(in_den.unsqueeze(3)))
    return exps, decay, in_num, in_den, sum_num, sum_den, row_den


def _nonzero_(den: Tensor) -> Tensor:
    """In-place :func:`_nonzero`."""
    return den.masked_fill_(~(den > 0), 1.0)


def _view_chunks(t: Tensor, start: int, stop: int, chunk: int) -> Tensor:
    """Positions [start, stop) of t (B, H, L, x) as (B, H, chunks, chunk, x), a view (no copy)."""
    return t[:, :, start:stop].unflatten(2, (-1, chunk))


def _reverse_cumsum(x: Tensor, dim: int) -> Tensor:
    """``out[j] = sum_{t >= j} x[t]``, summed from the end. Not ``total - cumsum + x``: the rows at a chunk's
    start can have denominators ~1e-7 (a slot score rising through the chunk, as ALiBi's decay makes it), so
    their entries of ``x`` are ~1e7 and the difference would lose every later row's sum to float32 rounding."""
    return x.flip(dim).cumsum(dim).flip(dim)


class _ChunkedCausalABC(torch.autograd.Function):
    """The chunked causal ABC of :func:`_causal_block` over a whole sequence (length a multiple of ``chunk``),
    with a hand-written backward that saves only the inputs, the (L, r) slot scores and the state entering each
    group, and recomputes the rest there: the (chunk x chunk) matrices, the slot probabilities, the row
    denominators and each chunk's carried numerators (from the group's entry state, exactly as forward made
    them; keeping those cost 20 MiB more at L = 8192, 8 heads, r = 16). Both directions walk the sequence in groups of ``group`` chunks (forward in order,
    carrying the state from group to group; backward in reverse, carrying the state's gradient), so the
    temporaries are bounded by one group whatever the length. The output and the input gradients are written
    group by group into tensors laid out like the inputs (the projections' (L, B, H, d) layout), so neither the
    caller's reshape nor the projections' backward copies them. The chunk references ``k_ends``/``v_ends`` are
    constants (the result does not depend on them); the initial state gets no gradient and the final state is
    not differentiable (decoding only)."""

    @staticmethod
    def _scores(alpha_k, alpha_v, kc, vc, w_k, w_v, shift, pad, s0, s1, g, chunk):
        """A group's slot scores (B, H, G, C, r): slices of the given ones, or made from the maps (projected)."""
        if w_k is None:
            return _view_chunks(alpha_k, s0, s1, chunk), _view_chunks(alpha_v, s0, s1, chunk)
        sh = None if shift is None else shift[:, s0:s1].unflatten(1, (g, chunk))
        pd = None if pad is None else pad[:, s0:s1].unflatten(1, (g, chunk))
        return _mapped_scores(kc, w_k, sh, pd), _mapped_scores(vc, w_v, sh, pd)

    @staticmethod
    def _slot_scores(qk, qc, k_exps, k_in_num, k_row_den):
        """Each query's slot scores (B, H, G, C, r): row_num / den with row_num = tril(Q K^T) E_k + Q N_k^T."""
        row_num = torch.matmul(qk, k_exps)
        add_matmul_(row_num, qc, k_in_num.transpose(-1, -2))
        return row_num.div_(k_row_den)

    @staticmethod
    def forward(ctx, q, k, v, alpha_k, alpha_v, k_ends, v_ends, k_num, k_den, k_max, v_num, v_den, v_max,
                chunk, group, dropout_p, seed, reuse_query, w_k=None, w_v=None, reuse_kv=False, shift=None, pad=None):
        bsz, heads, length, dim = q.shape
        projected = w_k is not None  # slot scores from the maps, group by group (alpha_k/alpha_v are None)
        n, slots = length // chunk, (w_k if projected else alpha_k).size(-1)
        out = torch.empty_like(q)  # keeps q's layout (dense strides are preserved)
        # backward recomputes everything else from these: the slot scores (the only (L, r) statistic that costs
        # chunk products) and the state entering each group (numerators, denominators, references)
        scores_all = None if projected else q.new_empty(bsz, heads, n, chunk, slots)
        n_groups = -(-n // group)
        entry_num = k_num.new_empty(n_groups, 2, bsz, heads, slots, dim)
        entry_den = k_den.new_empty(n_groups, 2, bsz, heads, slots)
        entry_max = k_max.new_empty(n_groups, 2, bsz, heads, slots)
        for c0 in range(0, n, group):
            c1 = min(n, c0 + group)
            g, s0, s1 = c1 - c0, c0 * chunk, c1 * chunk

            def chunks(t):
                return t[:, :, s0:s1].contiguous().view(bsz, heads, g, chunk, t.size(-1))

            qc, kc, vc = chunks(q), chunks(k), chunks(v)
            a_k, a_v = _ChunkedCausalABC._scores(alpha_k, alpha_v, kc, vc, w_k, w_v, shift, pad, s0, s1, g, chunk)
            k_e, v_e = k_ends[:, :, c0:c1], v_ends[:, :, c0:c1]
            e = c0 // group  # the state entering this group, for backward
            entry_num[e, 0], entry_num[e, 1] = k_num, v_num
            entry_den[e, 0], entry_den[e, 1] = k_den, v_den
            entry_max[e, 0], entry_max[e, 1] = k_max, v_max

            k_exps, _, k_in_num, k_in_den, k_sum_num, k_sum_den, k_row_den = _group_carry(
                a_k, kc, k_e, k_num, k_den, k_max)
            qk = torch.matmul(qc, kc.transpose(-1, -2)).tril_()
            slot_scores = _ChunkedCausalABC._slot_scores(qk, qc, k_exps, k_in_num, k_row_den)
            del qk
            probs = torch.softmax(slot_scores * dim ** -0.5, dim=-1)
            dropped = probs
            if dropout_p > 0.0:  # one mask per group, its stream the group's first chunk: backward draws it again
                dropped = probs * dropout_keep_mask(probs.shape, dropout_p, seed, probs, stream=c0)

            v_exps, _, v_in_num, v_in_den, v_sum_num, v_sum_den, v_row_den = _group_carry(
                a_v, vc, v_e, v_num, v_den, v_max)
            w = dropped / v_row_den
            mix = torch.matmul(w, v_exps.transpose(-1, -2)).tril_()
            out_g = torch.matmul(mix, vc)
            del mix
            add_matmul_(out_g, w, v_in_num)
            out[:, :, s0:s1] = out_g.view(bsz, heads, s1 - s0, dim)
            if scores_all is not None:
                scores_all[:, :, c0:c1] = slot_scores
            # the state leaving the group, at its last chunk's reference
            k_num, k_den, k_max = k_in_num[:, :, -1] + k_sum_num[:, :, -1], k_in_den[:, :, -1] + k_sum_den[:, :, -1], \
                k_e[:, :, -1]
            v_num, v_den, v_max = v_in_num[:, :, -1] + v_sum_num[:, :, -1], v_in_den[:, :, -1] + v_sum_den[:, :, -1], \
                v_e[:, :, -1]
        ctx.save_for_backward(q, k, v, alpha_k, alpha_v, k_ends, v_ends, scores_all, entry_num, entry_den,
                              entry_max, w_k, w_v, shift, pad)
        ctx.chunk, ctx.group, ctx.dropout_p, ctx.seed, ctx.reuse_query = chunk, group, dropout_p, seed, reuse_query
        ctx.reuse_kv = reuse_kv
        final = tuple(t.contiguous() for t in (k_num, k_den, k_max, v_num, v_den, v_max))
        ctx.mark_non_differentiable(*final)
        return (out, *final)

    @staticmethod
    @without_autocast
    def backward(ctx, grad_out, *unused):
        (q, k, v, alpha_k, alpha_v, k_ends, v_ends, scores_all, entry_num, entry_den, entry_max,
         w_k, w_v, shift, pad) = ctx.saved_tensors
        chunk, group, dropout_p = ctx.chunk, ctx.group, ctx.dropout_p
        bsz, heads, length, dim = q.shape
        n = length // chunk
        # with ``reuse_query`` / ``reuse_kv`` over q / k and v themselves: a group's rows are copied out (chunks)
        # before theirs is written
        g_q = q if ctx.reuse_query else torch.empty_like(q)
        g_k, g_v = (k, v) if ctx.reuse_kv else (torch.empty_like(k), torch.empty_like(v))
        # slot scores given as constants with their maps (alpha = x @ w + constants): their gradient goes into
        # x's and w's group by group, and no (L, r) gradient exists
        projected = w_k is not None
        if projected:
            g_w_k, g_w_v = torch.zeros_like(w_k), torch.zeros_like(w_v)
        else:
            g_alpha_k, g_alpha_v = torch.empty_like(alpha_k), torch.empty_like(alpha_v)
        g_k_state = g_v_state = None  # gradient of the state leaving the current group (from later groups)
        for c0 in reversed(range(0, n, group)):
            c1 = min(n, c0 + group)
            g, s0, s1 = c1 - c0, c0 * chunk, c1 * chunk

            def chunks(t):
                return t[:, :, s0:s1].contiguous().view(bsz, heads, g, chunk, t.size(-1))

            qc, kc, vc, g_out = chunks(q), chunks(k), chunks(v), chunks(grad_out)
            a_k, a_v = _ChunkedCausalABC._scores(alpha_k, alpha_v, kc, vc, w_k, w_v, shift, pad, s0, s1, g, chunk)
            k_e, v_e = k_ends[:, :, c0:c1], v_ends[:, :, c0:c1]
            k_m0 = k_ends[:, :, c0 - 1] if c0 > 0 else None
            v_m0 = v_ends[:, :, c0 - 1] if c0 > 0 else None
            # the group's carried state and row denominators, recomputed exactly as forward made them
            e = c0 // group
            k_exps, k_decay, k_in_num, _, _, _, k_row_den = _group_carry(
                a_k, kc, k_e, entry_num[e, 0], entry_den[e, 0], entry_max[e, 0])
            v_exps, v_decay, v_in_num, _, _, _, v_row_den = _group_carry(
                a_v, vc, v_e, entry_num[e, 1], entry_den[e, 1], entry_max[e, 1])
            qk = torch.matmul(qc, kc.transpose(-1, -2)).tril_()
            if scores_all is None:  # projected: the slot scores again, by forward's very operations
                slot_scores = _ChunkedCausalABC._slot_scores(qk, qc, k_exps, k_in_num, k_row_den)
            else:
                slot_scores = scores_all[:, :, c0:c1]
            probs = torch.softmax(slot_scores * dim ** -0.5, dim=-1)
            keep = None if dropout_p == 0.0 else dropout_keep_mask(probs.shape, dropout_p, ctx.seed, probs, stream=c0)
            dropped = probs if keep is None else probs * keep

            # values: out = tril(w E_v^T) V + w N_v,  w = dropped / den_v
            w = dropped / v_row_den
            mix = torch.matmul(w, v_exps.transpose(-1, -2)).tril_()
            g_vc = torch.matmul(mix.transpose(-1, -2), g_out)
            del mix
            g_mix = torch.matmul(g_out, vc.transpose(-1, -2)).tril_()
            g_w = torch.matmul(g_mix, v_exps)
            add_matmul_(g_w, g_out, v_in_num.transpose(-1, -2))
            g_v_exps = torch.matmul(g_mix.transpose(-1, -2), w)
            del g_mix
            g_v_in_num = torch.matmul(w.transpose(-1, -2), g_out)  # (B, H, G, r, d)
            g_dropped = g_w.div_(v_row_den)
            g_v_den = (g_dropped * w).neg_()
            g_v_exps += _reverse_cumsum(g_v_den, 3)
            g_v_state = _carry_backward(v_decay, v_exps, vc, v_e, v_m0, g_v_in_num, g_v_den.sum(3),
                                        g_v_exps, g_vc, g_v_state)
            g_v_exps.mul_(v_exps)  # the slot scores' gradient
            if projected:
                _project_back(g_v_exps, vc, w_v, g_vc, g_w_v)
            else:
                g_alpha_v[:, :, s0:s1] = g_v_exps.view(bsz, heads, s1 - s0, -1)
            g_v[:, :, s0:s1] = g_vc.view(bsz, heads, s1 - s0, dim)
            del v_exps, g_v_exps, g_vc, w

            # slot softmax (and dropout)
            g_probs = g_dropped if keep is None else g_dropped * keep
            g_scores = probs * (g_probs - (g_probs * probs).sum(-1, keepdim=True)) * dim ** -0.5
            g_row_num = g_scores.div_(k_row_den)
            g_k_den = (g_row_num * slot_scores).neg_()

            # keys: row_num = tril(Q K^T) E_k + Q N_k^T
            g_k_exps = torch.matmul(qk.transpose(-1, -2), g_row_num)
            del qk
            g_qk = torch.matmul(g_row_num, k_exps.transpose(-1, -2)).tril_()
            g_qc = torch.matmul(g_qk, kc)
            add_matmul_(g_qc, g_row_num, k_in_num)
            g_kc = torch.matmul(g_qk.transpose(-1, -2), qc)
            del g_qk
            g_k_in_num = torch.matmul(g_row_num.transpose(-1, -2), qc)
            g_k_exps += _reverse_cumsum(g_k_den, 3)
            g_k_state = _carry_backward(k_decay, k_exps, kc, k_e, k_m0, g_k_in_num, g_k_den.sum(3),
                                        g_k_exps, g_kc, g_k_state)
            g_k_exps.mul_(k_exps)
            if projected:
                _project_back(g_k_exps, kc, w_k, g_kc, g_w_k)
            else:
                g_alpha_k[:, :, s0:s1] = g_k_exps.view(bsz, heads, s1 - s0, -1)
            g_k[:, :, s0:s1] = g_kc.view(bsz, heads, s1 - s0, dim)
            g_q[:, :, s0:s1] = g_qc.view(bsz, heads, s1 - s0, dim)
        if projected:
            return (g_q, g_k, g_v, None, None, None, None, None, None, None, None, None, None, None, None, None, None,
                    None, g_w_k, g_w_v, None, None, None)
        return (g_q, g_k, g_v, g_alpha_k, g_alpha_v, None, None, None, None, None, None, None, None, None, None, None,
                None, None, None, None, None, None, None)


def _mapped_scores(x: Tensor, w: Tensor, shift: Optional[Tensor], pad: Optional[Tensor]) -> Tensor:
    """Slot scores ``x @ w + shift``, ``finfo.min`` where ``pad``: x (B, H, *P, d), w (d, r), shift (H, *P) or
    None, pad (B, *P) bool or None -> (B, H, *P, r). The same expression makes them for the chunk maxima, for
    forward and for backward, group by group."""
    a = torch.matmul(x, w)
    if shift is not None:
        a += shift.unsqueeze(0).unsqueeze(-1)
    if pad is not None:
        a.masked_fill_(pad.unsqueeze(1).unsqueeze(-1), torch.finfo(a.dtype).min)
    return a


def _project_back(g_alpha: Tensor, x: Tensor, w: Tensor, g_x: Tensor, g_w: Tensor) -> None:
    """For ``alpha = x @ w`` (+ constants), one group: ``g_x += g_alpha @ w^T``, ``g_w += x^T g_alpha`` (in place).
    ``g_alpha``, ``x``, ``g_x``: (B, H, G, C, .), ``w`` (d, r)."""
    # accumulated by the products themselves: no (G, C, d) temporary and no pass to add it (g_x is a product's
    # fresh output, so contiguous)
    rows = g_alpha.reshape(-1, g_alpha.size(-1))
    g_x.view(-1, g_x.size(-1)).addmm_(rows, w.t())
    g_w.addmm_(x.reshape(-1, x.size(-1)).t(), rows)


def _carry_backward(decay, exps, x, ends, m0, g_in_num, g_in_den, g_exps, g_x, g_state):
    """Gradients through :func:`_carry` for one group of chunks (sums of earlier chunks into each chunk's carried
    state), given ``g_state`` = (num, den) gradient of the state leaving the group (its last ``in + sum``), or
    None. Accumulates into ``g_exps`` and ``g_x``; returns the gradient of the state entering the group (at
    reference ``m0``), or None for the first group (the initial state gets no gradient)."""
    if g_state is not None:
        g_in_num[:, :, -1] += g_state[0]
        g_in_den[:, :, -1] += g_state[1]
    decay_t = decay.transpose(-1, -2)
    g_sum_num = torch.matmul(decay_t, g_in_num.transpose(2, 3)).transpose(2, 3)  # (B, H, G, r, d)
    g_sum_den = torch.matmul(decay_t, g_in_den.transpose(-1, -2).unsqueeze(-1)).squeeze(-1).transpose(-1, -2)
    if g_state is not None:
        g_sum_num[:, :, -1] += g_state[0]
        g_sum_den[:, :, -1] += g_state[1]
    add_matmul_(g_exps, x, g_sum_num.transpose(-1, -2))
    g_exps += g_sum_den.unsqueeze(3)
    add_matmul_(g_x, exps, g_sum_num)
    if m0 is None:
        return None
    from_state = torch.exp(m0.unsqueeze(2) - ends)  # (B, H, G, r)
    return (torch.matmul(from_state.transpose(-1, -2).unsqueeze(-2), g_in_num.transpose(2, 3)).squeeze(-2),
            (from_state * g_in_den).sum(2))


def causal_abc(
    q: Tensor, k: Tensor, v: Tensor, alpha_k: Optional[Tensor], alpha_v: Optional[Tensor],
    state: Optional[ABCState] = None, *,
    chunk_size: int = 64, block_chunks: int = 16, dropout_p: float = 0.0, checkpoint_blocks: bool = True,
    fused: bool = True, reuse_query: bool = False, slot_maps: Optional[Tuple[Tensor, Tensor]] = None,
    slot_shift: Optional[Tensor] = None, slot_pad: Optional[Tensor] = None, reuse_inputs: bool = False,
) -> Tuple[Tensor, ABCState]:
    """Causal ABC of the queries sitting on the key positions: q, k, v (B, H, L, d), alpha_k/alpha_v (B, H, L, r).

    ``state`` continues a sequence (decoding); the returned state covers it plus these L positions (it carries
    no gradient). The whole sequence normally goes through one chunked autograd function with a hand-written,
    recomputing backward (``fused``), both walking the chunks in groups of ``block_chunks``. Sequences whose
    scores jump by more than ~60 nats (float32) inside a chunk take the exact fallback instead: plain autograd
    over blocks of ``block_chunks * chunk_size`` positions, checkpointed when gradients are needed
    (``checkpoint_blocks``), offending blocks redone in smaller chunks. ``reuse_query``: the caller gives up q
    (nothing reads it after this call): the fused backward writes its gradient over it.

    ``slot_maps`` (w_k, w_v), each (d, r), instead of ``alpha_k``/``alpha_v`` (pass None): the slot scores are
    ``x @ w + slot_shift`` ((H, L) constants, e.g. ALiBi offsets) and ``finfo.min`` where ``slot_pad`` (B, L).
    The fused path makes them group by group in forward and again in backward, keeps neither them nor the slot
    scores of the queries, and takes their gradient into k, v, w_k and w_v itself, so no autograd node keeps k
    and v for the product; with ``reuse_inputs`` the caller gives up q, k and v, and their gradients are written
    over them.
    """
    if chunk_size < 1 or block_chunks < 1:
        raise ValueError(f"chunk_size ({chunk_size}) and block_chunks ({block_chunks}) must be positive")
    out_dtype = q.dtype
    dtype = _compute_dtype(q.dtype)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    maps = None
    if slot_maps is not None:
        if alpha_k is not None or alpha_v is not None:
            raise ValueError("causal_abc: give either the slot scores or slot_maps (which make them), not both")
        maps = tuple(w.to(dtype) for w in slot_maps)
        slot_shift = None if slot_shift is None else slot_shift.to(dtype)
    else:
        alpha_k, alpha_v = (t.to(dtype) for t in (alpha_k, alpha_v))
    bsz, heads, length, dim = q.shape
    if state is None:
        state = empty_state(bsz, heads, (alpha_k if maps is None else maps[0]).size(-1), dim, dtype, q.device)
    state = tuple(t.to(dtype) for t in state)
    if length > 1 and fused:
        chunk = min(chunk_size, length)
        pad = (-length) % chunk
        padded = [F.pad(t, (0, 0, 0, pad)) for t in (q, k, v)] if pad else [q, k, v]
        n = (length + pad) // chunk
        if maps is None:
            alphas = [F.pad(t, (0, 0, 0, pad), value=float("-inf")) if pad else t for t in (alpha_k, alpha_v)]
            extra = (None, None, False, None, None)
        else:
            shift = None if slot_shift is None else F.pad(slot_shift, (0, pad))
            mask = slot_pad
            if pad:  # the tail positions are padding for the maps' scores
                mask = F.pad(torch.zeros(bsz, length, dtype=torch.bool, device=q.device) if mask is None else mask,
                             (0, pad), value=True)
            with torch.no_grad():
                alphas = [_mapped_scores(x, w, shift, mask) for x, w in ((padded[1], maps[0]), (padded[2], maps[1]))]
            extra = (*maps, bool(reuse_inputs), shift, mask)
        with torch.no_grad():
            k_ends, _, k_gap = _chunk_maxima(alphas[0].reshape(bsz, heads, n, chunk, -1), state[2])
            v_ends, _, v_gap = _chunk_maxima(alphas[1].reshape(bsz, heads, n, chunk, -1), state[5])
        if max(k_gap, v_gap) <= _max_gap(dtype):
            if maps is not None:
                alphas = [None, None]  # made again group by group inside
            seed = int(torch.randint(0, 2**62, ())) if dropout_p > 0.0 else 0
            reuse = bool(reuse_query or (maps is not None and reuse_inputs))
            out, *state = _ChunkedCausalABC.apply(*padded, *alphas, k_ends, v_ends, *state, chunk, block_chunks,
                                                  dropout_p, seed, reuse, *extra)
            return out[:, :, :length].to(out_dtype), ABCState(*state)
    if maps is not None:  # the plain path takes the scores' gradient through autograd: the same values, and a
        # straight-through product for the gradient
        with torch.no_grad():
            alpha_k, alpha_v = (_mapped_scores(x, w, slot_shift, slot_pad) for x, w in ((k, maps[0]), (v, maps[1])))
        products = [torch.matmul(x, w) for x, w in ((k, maps[0]), (v, maps[1]))]
        alpha_k, alpha_v = (a + (p - p.detach()) for a, p in zip((alpha_k, alpha_v), products))
    # one position, or scores that jump too far inside a chunk: plain autograd, blocks redone in smaller chunks
    block = chunk_size * block_chunks
    save_memory = checkpoint_blocks and torch.is_grad_enabled() and length > chunk_size and any(
        t.requires_grad for t in (q, k, v, alpha_k, alpha_v, *state))
    outs = []
    for start in range(0, length, block):
        part = slice(start, start + block)
        args = (q[:, :, part], k[:, :, part], v[:, :, part], alpha_k[:, :, part], alpha_v[:, :, part], *state,
                chunk_size, dropout_p)
        if save_memory:
            out, *state = checkpoint(_causal_block, *args, use_reentrant=False)
        else:
            out, *state = _causal_block(*args)
        outs.append(out)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.to(out_dtype), ABCState(*state)


def causal_abc_dense(
    q: Tensor, k: Tensor, v: Tensor, alpha_k: Tensor, alpha_v: Tensor, *, query_offset: int = 0,
    dropout_p: float = 0.0,
) -> Tuple[Tensor, Tensor]:
    """Causal ABC from the prefix formula with (Lq, Lk, r) tensors: query ``i`` sees keys ``j <= i + query_offset``.

    For attention weights (``need_weights``): returns (out, W) with ``W[i, j] = sum_r p[i, r] softmax_{j'<=i}(b)[j, r]``
    the equivalent attention over keys. Queries that see no key get zeros.
    """
    tgt_len, src_len = q.size(2), k.size(2)
    pos = torch.arange(tgt_len, device=q.device) + query_offset
    sees = torch.arange(src_len, device=q.device).view(1, -1) <= pos.view(-1, 1)  # (Lq, Lk)
    last = pos.clamp(0, src_len - 1)

    def prefix_softmax(alpha):  # (B, H, Lq, Lk, r): softmax over j <= pos_i of alpha[j]
        lse = torch.logcumsumexp(alpha, dim=2)[:, :, last]  # (B, H, Lq, r)
        logits = alpha.unsqueeze(2) - lse.unsqueeze(3)
        return torch.exp(logits.masked_fill(~sees.view(1, 1, tgt_len, src_len, 1), float("-inf")))

    scores = torch.einsum("bhijr,bhij->bhir", prefix_softmax(alpha_k), torch.matmul(q, k.transpose(-1, -2)))
    probs = torch.softmax(scores * q.size(-1) ** -0.5, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p, training=True)
    weights = torch.einsum("bhir,bhijr->bhij", probs, prefix_softmax(alpha_v))
    weights = weights.masked_fill(~(pos >= 0).view(1, 1, -1, 1), 0.0)
    return torch.matmul(weights, v), weights
