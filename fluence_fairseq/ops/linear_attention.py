"""Linear attention with nonnegative feature maps, shared by Performer and cosFormer.

Given feature maps ``phi_q`` (B, H, L, m) and ``phi_k`` (B, H, S, m) (nonnegative) and values ``v`` (B, H, S, d),
query ``i`` attends key ``j`` with weight ``w_ij = phi_q_i . phi_k_j * exp(c_j)``:

    out_i = sum_j w_ij v_j / sum_j w_ij

where ``c`` (B, H, S) is an optional per-key *log scale* (``key_log_scale``). Performer factors each key's
features as ``exp(c_j) * phi_k_j`` with ``max(phi_k_j) ~ 1`` because ``exp(c_j)`` alone can overflow or underflow;
cosFormer passes no scale. Padded keys get weight zero.

* Noncausal: ``out = phi_q (phi_k^T v) / (phi_q . sum_j phi_k_j)``; the scales are taken relative to their
  maximum over the (real) keys, which cancels exactly.
* Causal: query ``i`` sees keys ``j <= i + query_offset``. Keys are processed in chunks: the intra-chunk part is a
  masked (chunk x chunk) product, the earlier chunks enter through a carried state ``sum phi_k v^T`` (m x d) and
  ``sum phi_k`` (m). Per-position (L, m, d) prefix states are never formed. The scales are taken relative to
  their *running* maximum up to the query's position (never a later key), and every carried quantity is
  rescaled when the maximum grows, so the result is exact and causal even for keys whose scales differ by far
  more than the floating-point range. A custom autograd function recomputes the states in backward, so
  training memory is O(L (m + d)) besides the inputs.
* Decoding: the same causal function continues from a :class:`LinearState` (``kv``, ``k``, ``max``) and returns
  the updated state; its cost does not grow with the number of tokens already seen.
* Cross decoding of noncausal attention: :func:`linear_summary` reduces the source to ``(kv, k)`` once and
  :func:`attend_linear_summary` reuses it for every query.

The denominator is a sum of nonnegative terms. It is clamped below by ``eps`` only to make rows with no visible
key (fully padded) give 0 instead of 0/0; callers choose ``eps`` far below any real denominator, so the result
is exactly ``num / den`` wherever there is a key to attend.

Half-precision inputs are computed in float32 (sums over thousands of positions) and cast back.
"""
import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .common import add_matmul_, matvec

__all__ = ["LinearState", "linear_attention", "causal_linear_attention", "linear_summary",
           "attend_linear_summary"]

DEFAULT_CHUNK = 64
#: positions per group of the causal function (and per block of the noncausal one): bounds their temporaries
#: (forward and backward). 512 rather than 256 halves the Python work per step (a tenth of a causal step at 2
#: threads): paired at L=8192, 0.967x cosFormer and 0.946x Performer causal, 0.972x Performer noncausal, the same
#: peak memory; 1024 was faster still but took cosFormer's causal peak from 1.45x to 1.57x the projections'
GROUP = 512
#: a causal group's chunk-sized temporaries per batch row and head, in elements: ``group x C`` intra-chunk weights
#: and ``group / C`` carried states of ``M x d``. :data:`GROUP` fills it at cosFormer's 2 x 64 mixed features
#: (M d / C = 128 per position); narrower states (Performer's 16 features: C = 64 per position) take
#: proportionally longer groups, up to :data:`MAX_GROUP`: fewer, larger calls for the same temporaries
#: (Performer's causal step at L=8192, paired: see docs/benchmarks.md)
GROUP_ELEMENTS = GROUP * 128
MAX_GROUP = 4 * GROUP
#: the same off the CPU (GPUs), where a group is a round of small kernel launches: on an H200 (L=4096, batch 4,
#: width 512, ``python -m benchmarks.group_sizes``) groups of 2,048 took causal cosFormer's step to 0.58x and
#: Performer's to 0.66x those of 512, at 2.05x and 1.49x their peak memory (1.37x and 0.90x fairseq's attention's)
DEVICE_GROUP = 2048
#: carried states of at most this many elements per batch row and head (the denominators' key sums, M values) are
#: scanned over a group's chunks by one ``cumsum``: the loop's T small additions cost more in calls than in data
#: (8 chunks of (1, 8, 128): 14 against 40 us on an AMD EPYC); the numerators' (M x d) states keep the loop
CUMSUM_STATE_ELEMENTS = 1024


def group_size(device: torch.device, chunk: int = 0, state_width: int = 0, value_width: int = 0) -> int:
    """Positions per group on ``device``: :data:`DEVICE_GROUP` off the CPU; on the CPU :data:`GROUP`, or for a
    causal pass with chunks of ``chunk`` positions and carried states of ``state_width`` x ``value_width`` the
    most positions (a multiple of :data:`GROUP`, at most :data:`MAX_GROUP`) whose temporaries fit
    :data:`GROUP_ELEMENTS`."""
    if device.type != "cpu":
        return DEVICE_GROUP
    if chunk < 1:
        return GROUP
    per_position = max(chunk, state_width * value_width // chunk, 1)
    return min(MAX_GROUP, max(GROUP, GROUP_ELEMENTS // per_position // GROUP * GROUP))


class LinearState(NamedTuple):
    """Carried state of causal linear attention (batch on dim 0 of every tensor).

    ``kv`` (B, H, m, d) = sum_j exp(c_j - max) phi_k_j v_j^T, ``k`` (B, H, m) = sum_j exp(c_j - max) phi_k_j,
    ``max`` (B, H) = running maximum of the key log scales (zeros when there are none).
    """

    kv: Tensor
    k: Tensor
    max: Tensor


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _masked_log_scale(c: Optional[Tensor], key_padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    """Padded keys must not raise the maximum: their scale becomes the lowest finite value."""
    if c is None or key_padding_mask is None:
        return c
    return c.masked_fill(key_padding_mask[:, None, :], torch.finfo(c.dtype).min)


def _keep(key_padding_mask: Optional[Tensor], dtype) -> Optional[Tensor]:
    """(B, S) bool padding -> (B, 1, S) float weights, 1 for real keys."""
    return None if key_padding_mask is None else (~key_padding_mask).to(dtype)[:, None, :]


def _check(phi_q: Tensor, phi_k: Tensor, v: Tensor, c: Optional[Tensor], key_padding_mask: Optional[Tensor]):
    if phi_q.dim() != 4 or phi_k.dim() != 4 or v.dim() != 4:
        raise ValueError("phi_q, phi_k and v must be (batch, heads, length, features)")
    if phi_q.shape[:2] != phi_k.shape[:2] or phi_q.size(-1) != phi_k.size(-1):
        raise ValueError(f"phi_q {tuple(phi_q.shape)} and phi_k {tuple(phi_k.shape)} need the same batch, heads "
                         "and feature size")
    if v.shape[:3] != phi_k.shape[:3]:
        raise ValueError(f"v {tuple(v.shape)} must match phi_k {tuple(phi_k.shape)} in batch, heads and length")
    if c is not None and tuple(c.shape) != tuple(phi_k.shape[:3]):
        raise ValueError(f"key_log_scale must be (batch, heads, keys) = {tuple(phi_k.shape[:3])}, got {tuple(c.shape)}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (phi_k.size(0), phi_k.size(2)):
        raise ValueError(f"key_padding_mask must be (batch, keys) = {(phi_k.size(0), phi_k.size(2))}, "
                         f"got {tuple(key_padding_mask.shape)}")


def _check_mix(phi_q: Tensor, phi_k: Tensor, query_mix: Optional[Tensor], key_mix: Optional[Tensor]):
    if (query_mix is None) != (key_mix is None):
        raise ValueError("query_mix and key_mix go together")
    if query_mix is None:
        return
    for name, mix, phi in (("query_mix", query_mix, phi_q), ("key_mix", key_mix, phi_k)):
        if mix.dim() != 4 or mix.size(1) != 1 or mix.size(2) != phi.size(2) or mix.size(0) not in (1, phi.size(0)):
            raise ValueError(f"{name} must be (batch or 1, 1, length, r) for features {tuple(phi.shape)}, "
                             f"got {tuple(mix.shape)}")
    if query_mix.size(-1) != key_mix.size(-1):
        raise ValueError("query_mix and key_mix need the same number of multipliers r")


# ------------------------------------------------------------------------------------------------ noncausal
def linear_summary(
    phi_k: Tensor, v: Tensor, *, key_log_scale: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Noncausal source summary: ``(sum_j w_j phi_k_j v_j^T (B,H,m,d), sum_j w_j phi_k_j (B,H,m))`` with
    ``w_j = exp(c_j - max c)`` (1 without scales) and 0 for padded keys."""
    work = _work_dtype(phi_k.dtype)
    phi_k, v = phi_k.to(work), v.to(work)
    c = _masked_log_scale(None if key_log_scale is None else key_log_scale.to(work), key_padding_mask)
    weight = _keep(key_padding_mask, work)  # (B, 1, S) or None
    if c is not None:
        # the maximum only stabilises: every weight is relative to it and the ratio num/den does not depend on it
        scale = torch.exp(c - c.amax(-1, keepdim=True).detach())
        weight = scale if weight is None else scale * weight
    if weight is None:
        kv = torch.matmul(phi_k.transpose(-1, -2), v)
        ksum = phi_k.sum(-2)
    else:
        # weight the (narrower) values rather than copying the features
        kv = torch.matmul(phi_k.transpose(-1, -2), v * weight.unsqueeze(-1))
        ksum = torch.matmul(weight.unsqueeze(-2), phi_k).squeeze(-2)
    return kv, ksum


def attend_linear_summary(phi_q: Tensor, kv: Tensor, ksum: Tensor, *, eps: float) -> Tensor:
    """``phi_q kv / max(phi_q . ksum, eps)`` for queries (B, H, L, m) and a :func:`linear_summary`."""
    phi_q = phi_q.to(kv.dtype)
    num = torch.matmul(phi_q, kv)
    den = matvec(phi_q, ksum).unsqueeze(-1)
    return num / den.clamp_min(eps)


# --------------------------------------------------------------------------------------------------- causal
class _Geometry:
    """Where the queries sit among the keys: query ``i`` sees keys ``j <= i + offset``.

    Queries whose last visible key exists (``0 <= i + offset < S``) are *aligned*: placed at row ``i + offset``
    of a (B, H, Sp, .) tensor, Sp = S rounded up to whole chunks, so that chunk ``t`` of the keys and chunk ``t``
    of the aligned queries face each other. Queries with ``i + offset >= S`` (the *tail*) see every key; queries
    with ``i + offset < 0`` see none.
    """

    def __init__(self, length_q: int, length_k: int, offset: int, chunk: int):
        self.chunk = max(1, min(chunk, length_k))
        self.chunks = -(-length_k // self.chunk)
        self.padded = self.chunks * self.chunk
        self.length_q, self.length_k, self.offset = length_q, length_k, offset
        self.q_lo = min(length_q, max(0, -offset))  # first aligned query
        self.q_hi = min(length_q, max(self.q_lo, length_k - offset))  # end of the aligned queries = tail start
        self.identity = offset == 0 and length_q == length_k == self.padded

    def align(self, x: Tensor) -> Tensor:
        """Query-indexed (B, H, L, .) -> key-aligned (B, H, Sp, .), zeros where no query sits."""
        if self.identity:
            return x
        out = x.new_zeros(*x.shape[:2], self.padded, *x.shape[3:])
        out[:, :, self.q_lo + self.offset : self.q_hi + self.offset] = x[:, :, self.q_lo : self.q_hi]
        return out

    def unalign(self, aligned: Tensor, out: Tensor) -> Tensor:
        """Copy the aligned rows back into the query-indexed ``out`` (which holds the tail and zeros)."""
        if self.identity:
            return aligned
        out[:, :, self.q_lo : self.q_hi] = aligned[:, :, self.q_lo + self.offset : self.q_hi + self.offset]
        return out

    def pad_keys(self, x: Optional[Tensor], value: float = 0.0) -> Optional[Tensor]:
        """Pad keys (B, H, S, ...) to Sp with ``value``: padded keys carry zero features, so they add nothing."""
        if x is None or x.size(2) == self.padded:
            return x
        pad = x.new_full((*x.shape[:2], self.padded - x.size(2), *x.shape[3:]), value)
        return torch.cat([x, pad], dim=2)

    def chunked(self, x: Tensor) -> Tensor:
        """(B, H, Sp, ...) -> (B, H, T, C, ...) (a view)."""
        return x.view(*x.shape[:2], self.chunks, self.chunk, *x.shape[3:])


class _Scales:
    """The key log scales of the chunks and the stabilisers derived from them, all without looking ahead.

    ``running_before`` R_t: maximum of the scales before chunk t (the incoming state's maximum included);
    ``running_after`` R_{t+1}; ``at_query`` M_i: maximum up to and including aligned position i. Every factor
    below is exp(smaller - larger) <= 1.
    """

    def __init__(self, c: Tensor, m0: Tensor):
        self.c = c  # (B, H, T, C)
        within = torch.cummax(c, dim=-1).values
        ends = torch.cummax(torch.cat([m0.unsqueeze(-1), within[..., -1]], dim=-1), dim=-1).values
        self.running_before, self.running_after = ends[..., :-1], ends[..., 1:]
        self.at_query = torch.maximum(within, self.running_before.unsqueeze(-1))
        self.final = ends[..., -1]

    def intra(self, tril: Tensor) -> Tensor:
        """exp(c_j - M_i) on allowed pairs (j <= i within a chunk), 0 elsewhere: (B, H, T, C, C). On an allowed
        pair c_j <= M_i, so the clamp at 0 changes only the others (which it keeps finite), and the mask's product
        zeroes them: ``exp`` of -inf takes a slow path on the CPU (0.41 against 0.06 ms for (1, 8, 8, 64, 64) with
        half its entries -inf, two threads, Intel Xeon), and the masked fill with -inf, ``exp`` and two new
        tensors took 7.5x the clamp, ``exp`` and product in place."""
        log_w = self.c.unsqueeze(-2) - self.at_query.unsqueeze(-1)
        return log_w.clamp_(max=0.0).exp_().mul_(tril)

    def key_weights(self) -> Tensor:
        """exp(c_j - R_{t+1}): a key's weight in the state after its chunk (B, H, T, C)."""
        return torch.exp(self.c - self.running_after.unsqueeze(-1))

    def query_weights(self) -> Tensor:
        """exp(R_t - M_i): how much of the state before its chunk a query sees (B, H, T, C)."""
        return torch.exp(self.running_before.unsqueeze(-1) - self.at_query)

    def decay(self) -> Tensor:
        """exp(R_t - R_{t+1}) (B, H, T): rescales a state when chunk t raises the maximum."""
        return torch.exp(self.running_before - self.running_after)


def _mix(x: Tensor, w: Optional[Tensor]) -> Tensor:
    """Features ``x`` (..., n, m) and per-position multipliers ``w`` (..., n, r) -> (..., n, r * m) =
    ``[x * w_0, ..., x * w_{r-1}]`` (``x`` itself without multipliers). Differentiable where autograd records
    (a decoding step's :func:`_single_step`); inside the autograd functions, slices written in place."""
    if w is None:
        return x
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return (w.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)
    m = x.size(-1)
    shape = torch.broadcast_shapes(x.shape[:-1], w.shape[:-1])
    out = x.new_empty(*shape, w.size(-1) * m)
    for i in range(w.size(-1)):  # one product per multiplier into its slice: 2-5x faster than one broadcast product
        torch.mul(x, w[..., i : i + 1], out=out[..., i * m : (i + 1) * m])
    return out


def _features(x: Tensor, relu: bool) -> Tensor:
    """The features of raw inputs when the op applies relu itself (``relu``), else the inputs (already features)."""
    return torch.relu(x) if relu else x


def _contiguous_features(x: Tensor, relu: bool) -> Tensor:
    """:func:`_features` in contiguous memory of its own, made in one pass (a group's slice of strided heads)."""
    if not relu:
        return x.contiguous()
    return torch.clamp_min(x, 0.0, out=torch.empty(x.shape, dtype=x.dtype, device=x.device))


def _raw_grad(g: Tensor, x: Tensor, relu: bool, out: Optional[Tensor] = None) -> Tensor:
    """``g`` = dL/d features -> dL/d raw input, written into ``out`` (in place over ``g`` without it): 0 where relu
    cut, i.e. where the raw input ``x`` (or its features: relu(x) = 0 exactly where x <= 0) is <= 0 (torch's
    convention at 0). relu's own backward kernel: one pass (a product with ``sign(relu(x))`` took three, 180
    against 56-67 us for (1, 8, 512, 64) on an Intel Xeon; a boolean ``masked_fill_`` ten times as long), which
    also writes the caller's (strided) rows of the input gradient, so they are not copied there afterwards."""
    if not relu:
        return g if out is None else out.copy_(g)
    return torch.ops.aten.threshold_backward(g, x, 0.0, grad_input=g if out is None else out)


def _check_reuse(q: Tensor, k: Tensor, v: Tensor, reuse_inputs: bool, c: Optional[Tensor]):
    if not reuse_inputs:
        return
    if c is not None:
        raise ValueError("reuse_inputs cannot be combined with key_log_scale (its gradient needs the keys after "
                         "theirs is written)")
    ptrs = {t.untyped_storage().data_ptr() for t in (q, k, v)}
    if len(ptrs) != 3:
        raise ValueError("reuse_inputs needs q, k and v in three separate memories (their gradients are written "
                         "over them)")


def _unmix(g: Tensor, w: Optional[Tensor]) -> Tensor:
    """Gradient of :func:`_mix` with respect to ``x``: (..., n, r * m) -> (..., n, m)."""
    if w is None:
        return g
    m = g.size(-1) // w.size(-1)
    out = g[..., :m] * w[..., :1]
    for i in range(1, w.size(-1)):
        out.addcmul_(g[..., i * m : (i + 1) * m], w[..., i : i + 1])
    return out


class _Group:
    """One group of consecutive chunks, continuing from the carried numerator state ``kv0`` (B, H, M, d) and
    denominator state ``ks0`` (B, H, M) at maximum ``m_run``.

    Numerator and denominator are kept apart (rather than extending the values by a ones column): the batched
    products then stay d wide, which the CPU kernels run 15-30% faster than d + 1 (d = 64), and the denominator
    terms are row sums and matrix-vector products."""

    def __init__(self, qa, qm, kc, km, vc, c, kv0, ks0, m_run, tril, relu=False):
        # the group's slices in their own contiguous memory: the inputs are often views of fairseq's (L, B, H, d)
        # heads, and products of such views keep that layout, so every batched matmul over their transposes
        # would copy them with a poor stride (about 40% of the op's time at L=8192)
        qa = _contiguous_features(qa, relu)
        self._key_states(kc, km, vc, c, kv0, ks0, m_run, relu)
        self.qa, self.qm = qa, qm
        self.q = _mix(qa, qm)  # (B, H, g, C, M)
        self.intra = tril.to(qa.dtype) if self.scales is None else self.scales.intra(tril)
        if qm is not None:  # (q (x) mq) . (k (x) mk) = (q . k)(mq . mk): intra-chunk products stay m wide
            self.intra = self.intra * torch.matmul(qm, km.transpose(-1, -2))
        self.qw = None if self.scales is None else self.scales.query_weights()  # (B, H, g, C)

    def _key_states(self, kc, km, vc, c, kv0, ks0, m_run, relu):
        kc, vc = _contiguous_features(kc, relu), vc.contiguous()
        self.kc, self.vc, self.km = kc, vc, km
        self.k = _mix(kc, km)
        self.scales = None if c is None else _Scales(c, m_run)
        self.decay = None if self.scales is None else self.scales.decay()
        if self.scales is None:
            self.kweight = None
            kw = self.k
        else:
            self.kweight = self.scales.key_weights().unsqueeze(-1)
            kw = self.k * self.kweight
        self.before_kv, self.kv = _scan_states(torch.matmul(kw.transpose(-1, -2), vc), kv0, self.decay)
        self.before_ks, self.ks = _scan_states(kw.sum(-2), ks0, self.decay)
        del kw
        self.m_run = m_run if self.scales is None else self.scales.final

    def scores(self) -> Tensor:
        return torch.matmul(self.qa, self.kc.transpose(-1, -2)).mul_(self.intra)

    def attend(self):
        """(numerator (B, H, g, C, d), denominator (B, H, g, C))."""
        scores = self.scores()
        num = torch.matmul(scores, self.vc)
        if self.qw is None:
            add_matmul_(num, self.q, self.before_kv)
        else:
            num.add_(torch.matmul(self.q, self.before_kv).mul_(self.qw.unsqueeze(-1)))
        return num, self.denominator(scores)

    def denominator(self, scores: Tensor) -> Tensor:
        """(B, H, g, C): the intra-chunk scores' row sums plus what the queries see of the carried key sum."""
        carried_den = matvec(self.q, self.before_ks)
        if self.qw is not None:
            carried_den.mul_(self.qw)
        return scores.sum(-1).add_(carried_den)

    def output_grads(self, g: Tensor, den: Tensor, eps: float):
        """The gradients of the numerator and the denominator for ``out = num / max(den, eps)`` given ``g`` =
        dL/d out (B, H, g, C, d) and the denominators ``den`` (B, H, g, C) forward made, without the numerator:
        ``g_den = -(g_num . num) / den`` and ``g_num . num`` is read off the two products backward needs anyway,
        ``g_num v^T`` (intra-chunk) and ``g_num kv^T`` (carried state), so the forward's two value products are
        not run again (an eighth of the op's matrix work).

        Returns ``(g_num, g_den, scores, g_values, g_state)``: ``g_values`` = ``g_num v^T + g_den`` (C x C per
        chunk, the gradient of the intra-chunk scores before their mask and mixing), ``g_state`` = ``g_num kv^T +
        g_den ks^T`` (C x M, the gradient of the mixed queries through the carried state, before their scale)."""
        scores = self.scores()
        den_c = den.clamp_min(eps)
        # a contiguous quotient of its own (``g`` may be a strided view of the caller's gradient)
        g_num = torch.div(g, den_c.unsqueeze(-1), out=torch.empty(g.shape, dtype=g.dtype, device=g.device))
        g_values = torch.matmul(g_num, self.vc.transpose(-1, -2))
        g_state = torch.matmul(g_num, self.before_kv.transpose(-1, -2))
        seen = (scores * g_values).sum(-1)  # sum_j w_ij (g_num_i . v_j)
        from_state = (self.q * g_state).sum(-1)  # q_i . (kv^T g_num_i)
        if self.qw is not None:
            from_state.mul_(self.qw)
        g_den = seen.add_(from_state).div_(den_c).neg_().masked_fill_(den < eps, 0.0)
        g_values.add_(g_den.unsqueeze(-1))
        g_state.addcmul_(g_den.unsqueeze(-1), self.before_ks.unsqueeze(-2))
        return g_num, g_den, scores, g_values, g_state


def _scan_states(per_chunk: Tensor, initial: Tensor, decay: Optional[Tensor], reverse: bool = False):
    """The state entering each chunk (B, H, T, ...) and the final one, for ``S_{t+1} = decay_t S_t + per_chunk_t``
    (``reverse``: ``P_{t-1} = decay_t P_t + per_chunk_t`` from ``P_{T-1} = initial``, the keys' reverse state).

    A loop over chunks, each state written in place into the next slot: cheap (T additions of one state) and much
    faster on CPU than ``cumsum`` over a non-innermost dimension; except for the small states of the denominators
    (see :data:`CUMSUM_STATE_ELEMENTS`)."""
    if decay is None and math.prod(per_chunk.shape[3:]) <= CUMSUM_STATE_ELEMENTS:
        return _scan_by_cumsum(per_chunk, initial, reverse)
    states = torch.empty_like(per_chunk)
    # every chunk's views made once (a view per call cost more than the additions' data at 8 chunks)
    slots, terms = states.unbind(2), per_chunk.unbind(2)
    factors = None if decay is None else decay.view(decay.shape + (1,) * (per_chunk.dim() - 3)).unbind(2)
    order = list(range(per_chunk.size(2)))
    if reverse:
        order.reverse()
    slots[order[0]].copy_(initial)
    for i, t in enumerate(order):
        state = slots[t] if factors is None else slots[t] * factors[t]
        if i + 1 < len(order):
            torch.add(state, terms[t], out=slots[order[i + 1]])
        else:
            state = state + terms[t]
    return states, state


def _scan_by_cumsum(per_chunk: Tensor, initial: Tensor, reverse: bool):
    """:func:`_scan_states` without decay as one ``cumsum`` (and a flip for ``reverse``)."""
    ordered = per_chunk.flip(2) if reverse else per_chunk
    sums = torch.cumsum(ordered, dim=2)
    final = sums[:, :, -1] + initial
    states = torch.cat([initial.unsqueeze(2), sums[:, :, :-1].add_(initial.unsqueeze(2))], dim=2)
    return (states.flip(2) if reverse else states), final


def _normalised_grads(g: Tensor, out: Tensor, den: Tensor, eps: float):
    """For ``out = num / max(den, eps)``: the gradients of ``num`` (g / den, (..., d)) and of ``den``
    (-(g . out) / den, (...)); the latter is 0 where the floor applies (``den < eps``)."""
    den_c = den.clamp_min(eps)
    g_num = g / den_c.unsqueeze(-1)
    g_den = (g_num * out).sum(-1).neg_().masked_fill_(den < eps, 0.0)
    return g_num, g_den


class _CausalLinearAttention(torch.autograd.Function):
    """Chunked causal linear attention, vectorised over the chunks of a group of ~:func:`group_size` positions.

    The intra-chunk products of a group's chunks are batched (B, H, g, C, C); the carried states exist once per
    chunk of the group (B, H, g, M, d) and (B, H, g, M), never per position, and temporaries never span the whole
    length. Only the inputs and the (small) states entering each group are kept for backward, which recomputes
    the rest group by group (in reverse, carrying the keys' reverse state); neither the output nor the numerator is
    needed there (:meth:`_Group.output_grads`).
    """

    @staticmethod
    def _views(q, qmix, k, kmix, v, c, geo: _Geometry):
        def keys(x, value=0.0):
            return None if x is None else geo.chunked(geo.pad_keys(x, value))

        def queries(x):
            return None if x is None else geo.chunked(geo.pad_keys(geo.align(x)) if not geo.identity else x)

        cc = None if c is None else keys(c, torch.finfo(c.dtype).min)
        return queries(q), queries(qmix), keys(k), keys(kmix), keys(v), cc

    @staticmethod
    def _group(views, sl, start, tril, relu):
        qa, qm, kc, km, vc, cc = views
        kv0, ks0, m_run = start
        return _Group(qa[:, :, sl], None if qm is None else qm[:, :, sl], kc[:, :, sl],
                      None if km is None else km[:, :, sl], vc[:, :, sl], None if cc is None else cc[:, :, sl],
                      kv0, ks0, m_run, tril, relu)

    @staticmethod
    def _tril(geo: _Geometry, device) -> Tensor:
        steps = torch.arange(geo.chunk, device=device)
        return steps.unsqueeze(1) >= steps  # (torch.tril on bool can be very slow on a busy CPU)

    @staticmethod
    def forward(ctx, q, k, v, c, qmix, kmix, kv0, ks0, m0, offset: int, chunk: int, eps: float, group: int,
                relu: bool, reuse: bool):
        # the work dtype is float32 or wider (sums over thousands of positions): autocast must not lower it
        ctx.relu, ctx.reuse = relu, reuse
        with torch.autocast(q.device.type, enabled=False):
            return _CausalLinearAttention._forward(ctx, q, k, v, c, qmix, kmix, kv0, ks0, m0, offset, chunk, eps,
                                                   group)

    @staticmethod
    def backward(ctx, g_out, _g_kv, _g_ks, _g_max):
        with torch.autocast(g_out.device.type, enabled=False):
            return _CausalLinearAttention._backward(ctx, g_out.to(ctx.saved_tensors[0].dtype))

    @staticmethod
    def _forward(ctx, q, k, v, c, qmix, kmix, kv0, ks0, m0, offset: int, chunk: int, eps: float, group: int):
        geo = _Geometry(q.size(2), k.size(2), offset, chunk)
        views = _CausalLinearAttention._views(q, qmix, k, kmix, v, c, geo)
        tril = _CausalLinearAttention._tril(geo, q.device)
        per = max(1, group // geo.chunk)
        d = v.size(-1)
        # in the identity geometry the output takes the layout of v (for fairseq's (L, B, H, d) heads views, the
        # caller's permute + reshape back to (L, B, D) is then a view, not a full-length copy)
        out_a = torch.empty_like(v) if geo.identity and v.shape[:3] == q.shape[:3] else q.new_empty(
            *q.shape[:2], geo.padded, d)
        den_a = q.new_empty(*q.shape[:2], geo.padded)
        start = (kv0, ks0, m0)
        starts = []
        for t0 in range(0, geo.chunks, per):
            sl = slice(t0, min(geo.chunks, t0 + per))
            # every group's entering state is kept (M x d per head: a quarter of one input's rows in the group at
            # cosFormer's 2 x 64 features): recomputing most of them in backward from the keys cost 3.4% of
            # cosFormer's causal step at L=8192 (paired) to save 2 MiB of its 87 MiB peak
            starts.append(start)
            grp = _CausalLinearAttention._group(views, sl, start, tril, ctx.relu)
            num, den = grp.attend()
            rows = slice(sl.start * geo.chunk, sl.stop * geo.chunk)
            den = den.flatten(2, 3)
            den_a[:, :, rows] = den
            torch.div(num.flatten(2, 3), den.clamp_min(eps).unsqueeze(-1), out=out_a[:, :, rows])
            start = (grp.kv, grp.ks, grp.m_run)
            del grp, num, den
        kv, ks, m_run = start
        # the aligned denominators (B, H, padded: a 64th of the output at d = 64) for backward, which would
        # otherwise recompute them from the carried key sums
        ctx.den = den_a
        if geo.identity:
            out, den = out_a, den_a
        else:
            out = geo.unalign(out_a, q.new_zeros(*q.shape[:3], d))
            den = geo.unalign(den_a, q.new_zeros(q.shape[:3]))
            del out_a
            if geo.q_hi < geo.length_q:  # the tail sees every key, at the final maximum
                qt = _mix(_features(q[:, :, geo.q_hi :], ctx.relu), None if qmix is None else qmix[:, :, geo.q_hi :])
                den[:, :, geo.q_hi :] = matvec(qt, ks)
                out[:, :, geo.q_hi :] = torch.matmul(qt, kv).div_(den[:, :, geo.q_hi :].clamp_min(eps).unsqueeze(-1))
        ctx.offset, ctx.chunk, ctx.eps, ctx.group = offset, chunk, eps, group
        ctx.starts, ctx.final = starts, (kv, ks)
        ctx.save_for_backward(q, k, v, c, qmix, kmix)
        kv, ks = kv.contiguous(), ks.contiguous()
        m_final = m0.clone() if c is None else m_run
        ctx.mark_non_differentiable(kv, ks, m_final)
        return out, kv, ks, m_final

    @staticmethod
    def _backward(ctx, g_out):
        q, k, v, c, qmix, kmix = ctx.saved_tensors
        eps, d, relu = ctx.eps, v.size(-1), ctx.relu
        geo = _Geometry(q.size(2), k.size(2), ctx.offset, ctx.chunk)
        views = _CausalLinearAttention._views(q, qmix, k, kmix, v, c, geo)
        tril = _CausalLinearAttention._tril(geo, q.device)
        per = max(1, ctx.group // geo.chunk)
        final_kv, final_ks = ctx.final
        rev_kv, rev_ks = final_kv.new_zeros(final_kv.shape), final_ks.new_zeros(final_ks.shape)
        dq = torch.zeros_like(q) if not geo.identity else None
        if geo.q_hi < geo.length_q:  # the tail sees every key: it enters the keys' reverse state at the end
            tail = slice(geo.q_hi, None)
            tm = None if qmix is None else qmix[:, :, tail]
            qt = _mix(_features(q[:, :, tail], relu), tm)
            den_t = matvec(qt, final_ks)
            out_t = torch.matmul(qt, final_kv).div_(den_t.clamp_min(eps).unsqueeze(-1))
            g_num, g_den = _normalised_grads(g_out[:, :, tail], out_t, den_t, eps)
            del out_t, den_t
            rev_kv = torch.matmul(qt.transpose(-1, -2), g_num)
            rev_ks = matvec(qt.transpose(-1, -2), g_den)
            del qt
            carried = torch.matmul(g_num, final_kv.transpose(-1, -2)).addcmul_(g_den.unsqueeze(-1), final_ks.unsqueeze(-2))
            dq[:, :, tail] = _raw_grad(_unmix(carried, tm), q[:, :, tail], relu)
            del g_num, g_den, carried
        if geo.identity and ctx.reuse:  # each group's gradients over its rows once it has read them (in reverse)
            ga = g_out
            dq_a, dk_a, dv_a = q, k, v
        elif geo.identity:  # gradients in the layout of the inputs (no copies when they go back through the heads view)
            ga = g_out
            dq_a, dk_a, dv_a = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        else:
            ga = geo.pad_keys(geo.align(g_out))
            dq_a = q.new_empty(*q.shape[:2], geo.padded, q.size(-1))
            dk_a = k.new_empty(*k.shape[:2], geo.padded, k.size(-1))
            dv_a = v.new_empty(*v.shape[:2], geo.padded, d)
        group_starts = list(range(0, geo.chunks, per))
        starts = list(ctx.starts)
        for i in range(len(group_starts) - 1, -1, -1):
            t0 = group_starts[i]
            sl = slice(t0, min(geo.chunks, t0 + per))
            rows = slice(sl.start * geo.chunk, sl.stop * geo.chunk)
            qm_g = None if views[1] is None else views[1][:, :, sl]
            km_g = None if views[3] is None else views[3][:, :, sl]
            grp = _CausalLinearAttention._group(views, sl, starts[i], tril, relu)
            starts[i] = None
            # neither the output nor the numerator is kept or recomputed (keeping the output would hold an L x D
            # tensor through this backward that the output projection has released by now)
            g_num, g_den, scores, weights, carried = grp.output_grads(ga[:, :, rows].unflatten(2, (-1, geo.chunk)),
                                                                      ctx.den[:, :, rows].unflatten(2, (-1, geo.chunk)),
                                                                      eps)
            # intra-chunk pairs: w_ij = (q_i . k_j) intra_ij, entering num_i through v_j and den_i through 1
            weights.mul_(grp.intra)
            # the state before each chunk, seen by its queries; then the intra-chunk pairs (m wide: the mixing is
            # inside intra), added by the product itself
            if grp.qw is not None:
                carried.mul_(grp.qw.unsqueeze(-1))
            dq_i = add_matmul_(_unmix(carried, qm_g), weights, grp.kc)
            del carried
            # keys see the queries of later chunks through a reverse state sum exp(R - M_i) q_i [g_num_i, g_den_i]
            qf = grp.q if grp.qw is None else grp.q * grp.qw.unsqueeze(-1)
            after_kv, rev_kv = _scan_states(torch.matmul(qf.transpose(-1, -2), g_num), rev_kv, grp.decay, reverse=True)
            after_ks, rev_ks = _scan_states(matvec(qf.transpose(-1, -2), g_den),
                                            rev_ks, grp.decay, reverse=True)
            del qf
            dk_c = torch.matmul(grp.vc, after_kv.transpose(-1, -2)).add_(after_ks.unsqueeze(-2))
            if grp.kweight is not None:
                dk_c.mul_(grp.kweight)
            dk_i = add_matmul_(_unmix(dk_c, km_g), weights.transpose(-1, -2), grp.qa)
            del weights, dk_c
            dv_g = torch.matmul(grp.k, after_kv)
            if grp.kweight is not None:
                dv_g.mul_(grp.kweight)
            add_matmul_(dv_g, scores.transpose(-1, -2), g_num)
            del scores, after_kv, after_ks, g_num, g_den
            # relu's mask from the group's own contiguous features, not the strided inputs
            _raw_grad(dq_i.flatten(2, 3), grp.qa.flatten(2, 3), relu, out=dq_a[:, :, rows])
            _raw_grad(dk_i.flatten(2, 3), grp.kc.flatten(2, 3), relu, out=dk_a[:, :, rows])
            dv_a[:, :, rows] = dv_g.flatten(2, 3)
            del grp, dq_i, dk_i, dv_g
        if geo.identity:
            dq = dq_a
        else:
            dq = geo.unalign(dq_a, dq)
        dk, dv = dk_a[:, :, : geo.length_k], dv_a[:, :, : geo.length_k]
        # w_ij is linear in both k_j and exp(c_j): dL/dc_j = k_j . dL/dk_j
        dc = (k * dk).sum(-1) if c is not None else None
        return dq, dk, dv, dc, None, None, None, None, None, None, None, None, None, None, None


def _add_outer_(acc: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``acc += a @ b`` for a thin inner dimension (``a`` (..., n, r), ``b`` (..., r, m), r small) as r broadcast
    products added in place: as fast as one batched product for r = 2 and much faster for r = 1 (see
    :func:`~fluence_fairseq.ops.common.thin_matmul`), and it adds a 16-bit product of autocast's backward into
    ``acc`` in any dtype."""
    for f in range(a.size(-1)):
        acc.addcmul_(a[..., f : f + 1], b[..., f : f + 1, :])
    return acc


class _LinearAttention(torch.autograd.Function):
    """Noncausal linear attention ``out = phi_q KV / (phi_q . ksum)`` with per-key weights ``w`` (B, H, S)
    (``None``: all 1), computed a block of :func:`group_size` positions at a time. Keeps only the inputs, the
    weights, the summary (KV (M, d) and ksum (M)) and the denominators for backward; neither the output, the
    numerator nor the mixed query features are formed there (see ``backward``). ``relu``: q and k are raw and the
    features are their relu, made a block at a time; ``reuse``: each block's gradients are written over its rows
    of q, k and v once they are no longer needed, and with ``relu`` the features over q and k in forward (see
    :func:`linear_attention`)."""

    @staticmethod
    def forward(ctx, q, k, v, c, w, qmix, kmix, eps: float, relu: bool, reuse: bool):
        group = group_size(q.device)
        # with ``reuse`` the inputs are the op's: relu is applied to them in place, a block at a time, so backward
        # reads the features instead of making them again (relu's gradient mask is the same: relu(x) > 0 exactly
        # where x > 0)
        in_place = relu and reuse

        def own_features(x: Tensor) -> Tensor:
            return x.clamp_min_(0.0) if in_place else _features(x, relu)

        kv = ksum = None
        for lo in range(0, k.size(2), group):
            rows = slice(lo, lo + group)
            ke = _mix(own_features(k[:, :, rows]), None if kmix is None else kmix[:, :, rows])
            if w is not None:
                ke = ke * w[:, :, rows].unsqueeze(-1)
            ke_t = ke.transpose(-1, -2)
            # summed with ``+=`` rather than accumulated in place by the product (``add_matmul_``): under autocast
            # the products are 16-bit and the sums stay float32
            if kv is None:
                kv, ksum = torch.matmul(ke_t, v[:, :, rows]).to(v.dtype), ke.sum(-2)
            else:
                kv += torch.matmul(ke_t, v[:, :, rows])
                ksum += ke.sum(-2)
        d = v.size(-1)
        out = torch.empty_like(v) if v.shape[:3] == q.shape[:3] else q.new_empty(*q.shape[:3], d)
        # the denominators are kept for backward (a d-th of the output)
        den_all = q.new_empty(q.shape[:3])
        for lo in range(0, q.size(2), group):
            rows = slice(lo, lo + group)
            qe = _mix(own_features(q[:, :, rows]), None if qmix is None else qmix[:, :, rows])
            den = matvec(qe, ksum)
            den_all[:, :, rows] = den
            torch.div(torch.matmul(qe, kv), den.clamp_min_(eps).unsqueeze(-1), out=out[:, :, rows])
        ctx.eps, ctx.relu, ctx.reuse, ctx.in_place = eps, relu, reuse, in_place
        ctx.save_for_backward(q, k, v, c, w, qmix, kmix, kv, ksum, den_all)
        return out

    @staticmethod
    def backward(ctx, g_out):
        q, k, v, c, w, qmix, kmix, kv, ksum, den_all = ctx.saved_tensors
        eps, relu = ctx.eps, ctx.relu
        group = group_size(q.device)
        m, d = q.size(-1), v.size(-1)
        r = 1 if qmix is None else qmix.size(-1)
        # the summary's r blocks side by side: KV as (d r, m) with rows f d + e = KV[f m + i, e] over i, and the key
        # sum as (r, m); the queries' multipliers then act on the (d wide) output gradient instead of the (r m
        # wide) features, so backward never forms the mixed query features (see below)
        kv_rows = kv.unflatten(-2, (r, m)).transpose(-1, -2).flatten(-3, -2)  # (B, H, r d, m)
        ksum_rows = ksum.unflatten(-1, (r, m))  # (B, H, r, m)
        # with ``reuse`` a block's rows are read for the last time before its gradient lands on them
        dq = q if ctx.reuse else torch.empty_like(q)
        dkv_rows = kv.new_zeros(*kv.shape[:2], m, r * d)  # dKV with the same blocks side by side: (m, r d)
        dksum_rows = torch.zeros_like(ksum_rows)
        for lo in range(0, q.size(2), group):
            rows = slice(lo, lo + group)
            qr = q[:, :, rows]
            fq = qr if ctx.in_place else _features(qr, relu)  # (B, H, n, m): the features before their multipliers
            den = den_all[:, :, rows].unsqueeze(-1)
            den_c = den.clamp_min(eps)
            # the output's gradient g reaches the numerator as g_num = g / den and the denominator as
            # -(g . out) / den (0 under the floor). With the mixed features qe = [fq x_1, ..., fq x_r]:
            # dKV = qeᵀ g_num is fqᵀ [g_num x_1, ..., g_num x_r] (gm below, d r wide), and the gradient of the
            # features before mixing, sum_f x_f (g_num KVᵀ)_f, is gm times the stacked KV (u, m wide); then
            # g . out = qe . (g_num KVᵀ) = fq . u, so neither the numerator nor qe is formed
            scale = den_c.reciprocal() if qmix is None else qmix[:, :, rows] / den_c
            gm = _mix(g_out[:, :, rows], scale)
            u = torch.matmul(gm, kv_rows)
            g_den = (fq * u).sum(-1, keepdim=True).div_(den_c).neg_().masked_fill_(den < eps, 0.0)
            g_mix = g_den if qmix is None else g_den * qmix[:, :, rows]  # (B, H, n, r)
            dkv_rows += torch.matmul(fq.transpose(-1, -2), gm)
            dksum_rows += torch.matmul(g_mix.transpose(-1, -2), fq)
            del gm
            _raw_grad(_add_outer_(u, g_mix, ksum_rows), qr, relu, out=dq[:, :, rows])
            del u, fq
        dk, dv = (k, v) if ctx.reuse else (torch.empty_like(k), torch.empty_like(v))
        dkv = dkv_rows.unflatten(-1, (r, d)).transpose(-3, -2).flatten(-3, -2)  # back to (r m, d)
        dksum = dksum_rows.flatten(-2)
        for lo in range(0, k.size(2), group):
            rows = slice(lo, lo + group)
            km = None if kmix is None else kmix[:, :, rows]
            kr = k[:, :, rows]
            fk = kr if ctx.in_place else _features(kr, relu)
            vb = v[:, :, rows]
            wb = None if w is None else w[:, :, rows].unsqueeze(-1)
            if km is None:
                dfk = torch.matmul(vb, dkv.transpose(-1, -2)).add_(dksum.unsqueeze(-2))
                if wb is not None:
                    dfk.mul_(wb)
            else:
                # sum_f x_f (v dKV_fᵀ + dksum_f): the multipliers (and weights) on the values, one m wide product
                kw = km if wb is None else km * wb
                dfk = _add_outer_(torch.matmul(_mix(vb, kw), dkv_rows.transpose(-1, -2)), kw, dksum_rows)
            dvb = torch.matmul(_mix(fk, km), dkv)
            del fk
            if wb is not None:
                dvb.mul_(wb)
            _raw_grad(dfk, kr, relu, out=dk[:, :, rows])
            dv[:, :, rows] = dvb
        # the weights exp(c_j - max) (max detached) are linear in exp(c_j): dL/dc_j = k_j . dL/dk_j
        dc = (k * dk).sum(-1) if c is not None and ctx.needs_input_grad[3] else None
        return dq, dk, dv, dc, None, None, None, None, None, None


def _single_step_applies(q: Tensor, k: Tensor, query_offset: int) -> bool:
    """A decoding step, one query with its own key and no offset: :func:`_single_step`."""
    return q.size(2) == 1 and k.size(2) == 1 and query_offset == 0


def _single_step(q, k, v, c, query_mix, key_mix, kv0, ks0, m0, eps):
    """One query attending the state and its own key, and the state updated by that key: the chunked function's
    arithmetic for a chunk of one position in a few products (its group machinery, built for whole passes, was
    the whole cost of a decoding step: 150 tensor calls). With log scales ``c`` the state is rescaled to the new
    running maximum, as there; the maximum cancels in the quotient, so gradients (to q, k, v and ``c``) are those
    of the unscaled weights. Returns ``(out, kv, ks, max)``, the state not differentiable (a constant of the
    next step, as the chunked function's)."""
    qf, kf = _mix(q, query_mix), _mix(k, key_mix)  # (B, H, 1, M)
    # the state plus the key's outer product with its value, in one pass over the state (a batched product with
    # one inner dimension first copied the state into its output and then added to it: for beam search's 40 rows
    # of cosFormer's 128 x 64 states per head, 10 MiB a layer, 0.67 against 0.28 ms, one thread; see benchmarks.md)
    kf_t, v_rows = kf.transpose(-1, -2), v  # (B, H, M, 1), (B, H, 1, d)
    if c is None:
        kv = torch.addcmul(kv0, kf_t, v_rows)
        ks = ks0 + kf.squeeze(2)
        m_run = m0.clone()
    else:
        m_run = torch.maximum(m0, c[:, :, 0])
        decay, weight = torch.exp(m0 - m_run), torch.exp(c[:, :, 0] - m_run)  # (B, H)
        kv = torch.mul(kv0, decay[..., None, None]).addcmul_(kf_t * weight[..., None, None], v_rows)
        ks = ks0 * decay[..., None] + kf.squeeze(2) * weight[..., None]
    num = torch.matmul(qf, kv)  # (B, H, 1, d)
    den = matvec(qf, ks).unsqueeze(-1)  # (B, H, 1, 1)
    return num / den.clamp_min(eps), kv.detach(), ks.detach(), m_run.detach()


def causal_linear_attention(
    phi_q: Tensor,
    phi_k: Tensor,
    v: Tensor,
    *,
    query_offset: int = 0,
    key_log_scale: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    state: Optional[LinearState] = None,
    eps: float,
    chunk_size: int = DEFAULT_CHUNK,
    query_mix: Optional[Tensor] = None,
    key_mix: Optional[Tensor] = None,
    relu: bool = False,
    reuse_inputs: bool = False,
) -> Tuple[Tensor, LinearState]:
    """Causal linear attention: query ``i`` sees keys ``j <= i + query_offset`` (and the keys summarised in
    ``state``). Returns ``(out (B, H, L, d), state after all keys)``. The incoming ``state`` is a constant
    (decoding); gradients flow to ``phi_q``, ``phi_k``, ``v`` and ``key_log_scale``.

    ``query_mix`` (B or 1, 1, L, r) and ``key_mix`` (B or 1, 1, S, r), constants given together, make the
    features ``[phi * mix_0, ..., phi * mix_{r-1}]`` (r m wide) without materialising them over the whole
    length (cosFormer's sin/cos re-weighting); the state is then r m wide. ``relu`` and ``reuse_inputs``: see
    :func:`linear_attention`."""
    _check(phi_q, phi_k, v, key_log_scale, key_padding_mask)
    _check_mix(phi_q, phi_k, query_mix, key_mix)
    if phi_k.size(2) == 0:
        raise ValueError("causal linear attention needs at least one key")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    work = _work_dtype(torch.promote_types(phi_q.dtype, v.dtype))
    q, k, vv = phi_q.to(work), phi_k.to(work), v.to(work)
    _check_reuse(q, k, vv, reuse_inputs, key_log_scale)
    c = _masked_log_scale(None if key_log_scale is None else key_log_scale.to(work), key_padding_mask)
    if key_padding_mask is not None:  # padded keys get zero features (relu(0) = 0 too): no weight anywhere
        k = k * _keep(key_padding_mask, work).unsqueeze(-1)
    bsz, heads, _, m = q.shape
    if query_mix is not None:
        query_mix, key_mix = query_mix.detach().to(work), key_mix.detach().to(work)
        m *= query_mix.size(-1)
    if state is None:
        kv0 = q.new_zeros(bsz, heads, m, v.size(-1))
        ks0 = q.new_zeros(bsz, heads, m)
        m0 = q.new_full((bsz, heads), torch.finfo(work).min if c is not None else 0.0)
    else:
        kv0, ks0, m0 = (t.detach().to(work) for t in state)
    if _single_step_applies(q, k, query_offset):
        out, kv, ks, m_run = _single_step(_features(q, relu), _features(k, relu), vv, c, query_mix, key_mix, kv0,
                                          ks0, m0, eps)
        return out.to(phi_q.dtype), LinearState(kv, ks, m_run)
    out, kv, ks, m_run = _CausalLinearAttention.apply(q, k, vv, c, query_mix, key_mix, kv0, ks0, m0,
                                                      int(query_offset), int(chunk_size), float(eps),
                                                      group_size(q.device, min(int(chunk_size), k.size(2)), m,
                                                                 v.size(-1)),
                                                      bool(relu), bool(reuse_inputs))
    return out.to(phi_q.dtype), LinearState(kv, ks, m_run)


def linear_attention(
    phi_q: Tensor,
    phi_k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    query_offset: int = 0,
    key_log_scale: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    eps: float,
    chunk_size: int = DEFAULT_CHUNK,
    query_mix: Optional[Tensor] = None,
    key_mix: Optional[Tensor] = None,
    relu: bool = False,
    reuse_inputs: bool = False,
) -> Tensor:
    """Normalised linear attention (B, H, L, d); see the module docstring (and :func:`causal_linear_attention`
    for ``query_mix`` / ``key_mix``).

    ``relu``: ``phi_q`` and ``phi_k`` are raw and the features are their relu, made a block at a time, so no
    full-length feature tensor exists besides the inputs (cosFormer). ``reuse_inputs``: the caller gives up
    ``phi_q``, ``phi_k`` and ``v`` (three separate memories that nothing reads after this call): backward writes
    their gradients over them, a block at a time once the block is no longer needed, instead of allocating three
    more L x d tensors (causal: only when queries and keys are the same whole chunks, else it allocates as
    usual); noncausal with ``relu``, forward also writes the features over ``phi_q`` and ``phi_k`` (relu in place), so
    backward does not make them again. A second backward through the same graph then fails with autograd's in-place
    error, as it must."""
    if causal:
        return causal_linear_attention(phi_q, phi_k, v, query_offset=query_offset, key_log_scale=key_log_scale,
                                       key_padding_mask=key_padding_mask, eps=eps, chunk_size=chunk_size,
                                       query_mix=query_mix, key_mix=key_mix, relu=relu,
                                       reuse_inputs=reuse_inputs)[0]
    _check(phi_q, phi_k, v, key_log_scale, key_padding_mask)
    _check_mix(phi_q, phi_k, query_mix, key_mix)
    work = _work_dtype(torch.promote_types(phi_q.dtype, v.dtype))
    q, k, vv = phi_q.to(work), phi_k.to(work), v.to(work)
    _check_reuse(q, k, vv, reuse_inputs, key_log_scale)
    if query_mix is not None:
        query_mix, key_mix = query_mix.detach().to(work), key_mix.detach().to(work)
    c = _masked_log_scale(None if key_log_scale is None else key_log_scale.to(work), key_padding_mask)
    weight = None if key_padding_mask is None else _keep(key_padding_mask, work).expand(-1, k.size(1), -1)
    if c is not None:
        # the maximum only stabilises: every weight is relative to it and the ratio num/den does not depend on it
        scale = torch.exp(c - c.amax(-1, keepdim=True)).detach()
        weight = scale if weight is None else scale * weight
    out = _LinearAttention.apply(q, k, vv, c, weight, query_mix, key_mix, float(eps), bool(relu), bool(reuse_inputs))
    return out.to(phi_q.dtype)
