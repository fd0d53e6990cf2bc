"""α-entmax normalisers (sparsemax α=2, 1.5-entmax, any α > 1 with a learnable α), safe for attention.

``α-entmax(z)_i = [(α-1) z_i - τ]_+ ^ (1/(α-1))`` with the threshold τ that makes the output sum to one
(Peters et al. 2019; Correia et al. 2019). The ``entmax`` package finds τ by sorting (sparsemax, entmax15) or by
50 bisection steps (any α). Here τ comes from Newton's method on

    g(τ) = ||[u - τ]_+||_β - 1,      u = (α-1) (z - max z),  β = 1/(α-1),

started below the root. For 1 < α <= 2 (β >= 1) g is a norm of a componentwise convex, decreasing map, so it is
convex and decreasing: from below, Newton's iterates rise monotonically to the root and never overshoot (up to
rounding). τ = -1 is below the root of every row (g(-1) >= 0: the row max is 0); long rows start higher, at the
root of the same equation over their group maxima (the largest entry of every :data:`START_GROUP` consecutive
ones): dropping entries can only lower the sum, so that root is below the row's, and it *is* the row's when no
group holds two entries of the support, as with the few keys a trained attention row keeps. It costs a pass over
the rows' maxima (a 32nd of the rows) and cut the full-row steps on the need_weights benchmark's scores at
L=4096 from about 7 to 1-3 (``python -m benchmarks.entmax_search``; rows whose support is much of the row gain
less; for a general α, chunks whose support is most of the row start at the bound the mean of their entries
gives instead, :func:`_mean_start`). Where few groups have their maximum above the start (any α), the search
runs on those groups' entries alone, before the rows are shifted at all (:func:`_gathered_unshifted`); a general
α's other chunks still run it on the entries above the start when they are few (:func:`_gathered_threshold`).
Taking the β-norm rather than the sum of powers keeps g nearly linear far from the
root, so a row dominated by one logit converges in one step whatever α is (the plain sum behaves like t^β and
would need about β steps). For sparsemax (β=1) g is piecewise linear and Newton is Michelot's exact algorithm: it
stops when the support is found. Rows of 64 N(0,1) logits need 3-6 steps; the loop stops when no row moved (a
general α's row may stop a step before, when its next step is predicted far below the tolerance:
:data:`SETTLE`). For α > 2 (β < 1) g is not convex, and τ is found by bisection with the corrected bracket
update of entmax >= 1.2.

Where the ``entmax`` package is wrong for attention, these functions are not:

* a row whose entries are all masked (``-inf``, or ``mask`` True everywhere) gives zeros, not NaN or an index
  error (issues #17 and #19 of the entmax package on GitHub);
* inputs are normalised in float32 (float64 stays float64) and the result cast back, so bf16/fp16 never produce
  NaN (issue #30 of the entmax package): the row max is subtracted *before* the (α-1) scaling;
* peaked rows with large α give a one-hot, not NaN (the bisection bug fixed upstream in 1.2).

Backward is analytic (the entmax Jacobian, :func:`_entmax_backward`), including the gradient with respect to α
(Correia et al. 2019, Proposition 1), reduced to α's shape so a per-head α of shape ``(1, H, 1, 1)`` works.
"""
import math
import time
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

# Newton steps are capped here; they stop as soon as no row moves by more than the dtype's resolution.
MAX_NEWTON_STEPS = 50
BISECTION_STEPS = 60
#: Newton steps run on a gathered copy of the rows that still move once fewer than this share of them do
COMPACT_BELOW = 0.75
#: rows are normalised (and differentiated) in chunks of about this many elements: 2 MiB per float32 buffer, so a
#: chunk and the search's buffers stay in cache (a whole (1, 8, 2048, 2048) matrix streamed through memory at
#: every pass). On an Intel Xeon chunks of 2^16-2^18 elements measured alike and 2^15 (16 rows of 2048) was slower,
#: its calls costing more than the cache saves; on an AMD EPYC, one thread, L=4096, noncausal, four steps each
#: alternated in one process, 2^18 against 2^17 took 0.980x (1.5-entmax) and 0.965x (alpha-entmax) the step, 2^19
#: 0.965x and 0.963x. Since the search starts at the group maxima (fewer steps, so each chunk's fixed cost weighs
#: more), 2^19 against 2^18 (``python -m benchmarks.ab NAME --ops entmax,entmax_attention``, AMD EPYC, L=4096):
#: 0.976x / 0.981x sparsemax / 1.5-entmax noncausal with the default weights (one thread), 0.976x / 0.989x causal
#: weight-free (two threads). On an Intel Xeon (``python -m benchmarks.ab NAME --ops entmax,entmax_attention``, one
#: thread, L=4096) 2^20 gained α-entmax 1-2% noncausal but cost its causal step with weights 3% and 1.5-entmax's
#: 1.4%, the same with 2^20 for a general α's chunks alone; 2^17 or 2^18 slow a general α's search (more chunks'
#: fixed costs; at 2^18 a chunk skips compaction and settling): kept at 2^19
ROW_CHUNK_ELEMENTS = 1 << 19
#: the backward's chunks on the CPU: its passes (s, s * grad, the row sums, the product written out) take no
#: search's fixed costs per chunk, so smaller chunks only keep more of them in cache. Against 2^19 on an Intel
#: Xeon, one thread (``benchmarks/results/entmax_search_backward_chunks_s37.md``): the backward of one (1, 8, 512,
#: 4096) block 0.78x for sparsemax, 0.76x for 1.5-entmax, unchanged for α-entmax (2^16 took its 1.04-1.09x); a
#: training step of the attention, paired (``ab_backward_chunks_s37.md``): α-entmax 0.985-0.995x, the others
#: 0.990-0.998x (their long passes' backward runs on the support, not through these chunks)
BACKWARD_ROW_CHUNK_ELEMENTS = 1 << 17
#: the same on other devices (GPUs), where every pass is a kernel launch and every Newton step waits for its row
#: count: chunks of 2^26 elements (256 MiB float32 buffers). With the CPU's chunks the first GPU run spent 4.1 s
#: on causal 1.5-entmax at L=4096, batch 4, 8 heads (4,096 chunks; fairseq's attention: 19 ms)
DEVICE_ROW_CHUNK_ELEMENTS = 1 << 26
#: rows of at least this many entries start their search at the threshold of their group maxima (shorter rows
#: start at -1: a handful of groups would bound τ barely better)
GROUP_START_FROM = 256
#: entries per group for that start: smaller groups bound τ better but make the maxima's own search longer. The
#: forward on the scores of a (1, 8, 512, 4096) query block of the need_weights benchmark with groups of 16 / 32 /
#: 64 (``python -m benchmarks.entmax_search --start-group N --scales 1 0.1``, AMD EPYC, one thread,
#: benchmarks/results/entmax_search_groups_s20.md): sparsemax 36 / 26 / 27 ms,
#: 1.5-entmax 42 / 30 / 35 ms, one α per head 123 / 116 / 123 ms
START_GROUP = 32
#: Newton steps of the start's own search (on the group maxima), or None for as many as it takes to converge. Every
#: iterate from below is a start at or below the row's τ: the search over the maxima needs no precision of its own
#: (its root only bounds the row's τ from below), and on short rows its last steps were calls on a few thousand
#: numbers each. The language-model benchmark's 512-token causal α-entmax blocks (``python -m benchmarks.ab
#: alpha_entmax --ops entmax,entmax_attention --against c3d6c71 --pattern causal --length 512 --batch 4 --threads
#: 1``, Intel Xeon) took 0.993x the step with 3 steps, 0.994x with 2; the need_weights benchmark's (1, 8, 512, 4096)
#: block the same number of full-row steps (``python -m benchmarks.entmax_search --against c3d6c71 --listed``)
START_STEPS = 3
#: a chunk whose groups above the start are too many to search before its shift (:func:`_sparse_runs`) is judged
#: again on groups of this many entries, the halves of the :data:`START_GROUP` ones: a support of a few dozen
#: entries a row, scattered over half of its 32-entry groups, lies in a quarter of its 16-entry ones. Their maxima
#: are taken from the chunk only then, by a max pool (torch's amax over groups of 16 runs several times slower than
#: over 32 on CPUs); the start stays the coarse maxima's (groups of 16 throughout, ``--start-group 16``, cost the
#: sparser and denser rows more than they saved)
FINE_GROUP = 16
#: ... and searched through them when they hold less than this share of its entries, their maxima taken only where
#: the share the groups' predicts passes: each chosen group holds one or two chosen halves, two more often the more
#: groups are chosen, taken as ``share * (0.5 + 0.25 * share)`` for the groups' ``share``. 1.5-entmax on the
#: need_weights benchmark's block, support listed, scaled by 0.7 / 0.85 / 1 / 1.2 (``python -m
#: benchmarks.entmax_search --against 1204bf9 --listed --halves-below X``, Intel Xeon,
#: benchmarks/results/entmax_search_halves_listed_s34.md): 0.35 took 1.01 / 0.90 / 0.67 / 0.58x the search without
#: halves, 0.25 1.00 / 1.00 / 1.00 / 0.59x, 0.5 1.09x at 0.7
HALVES_BELOW = 0.35
#: the same without the support asked for (nothing to list: the search through the shifted chunk costs less): the
#: same block unlisted (``python -m benchmarks.entmax_search --against 1204bf9``,
#: benchmarks/results/entmax_search_halves_s34.md) with 0.25: 1.00 / 0.98 / 1.00 / 0.88x; with 0.35, 1.12x at 0.85
UNLISTED_HALVES_BELOW = 0.25
#: a chunk whose search takes powers (α other than 1.5 and 2) runs it on a gathered copy of the entries above
#: each row's start when no row has more than this share of its entries there (:func:`_gathered_threshold`).
#: One α per head from 1.1 to 1.9 on the need_weights benchmark's (1, 8, 512, 4096) block (``python -m
#: benchmarks.entmax_search``, AMD EPYC, one thread), forward at scales 1 / 0.1 / 3 with 1/16: 85.7 / 132.8 /
#: 61.0 ms, 1/4: 84.7 / 125.1 / 57.1, 1/2: 78.8 / 120.7 / 56.0, 3/4: alike, 1 (always): 151.3 / 284.5 / 96.3,
#: never: 113.2 / 135.5 / 83.7. Gathering after the shift for 1.5-entmax, whose steps take no power, took 28.9 ->
#: 40.4 ms (listing the entries of a chunk by comparing all of them costs more than its steps); the unshifted
#: search of sparse chunks (:func:`_sparse_runs`) gathers for every α, and never a row wider than this share
GATHER_BELOW = 1 / 2
#: rows of fewer than 1,024 entries (fewer than 64 sampled columns) refuse their chunk's gathered search when a row
#: has more than this share of its samples above its start. On the language-model benchmark's 512-token causal
#: blocks (α-entmax at its initial α) every chunk's gathered search was refused after listing its entries: the
#: mean share of the samples was a third, the widest row's all of them
WIDE_ROW_SAMPLES = 3 / 4
#: a general α's chunk with more than this share of its entries above its start starts from their mean's bound
#: (:func:`_mean_start`)
DENSE_ABOVE = 1 / 2
#: the entries above the start are found among those of the groups whose maxima are above it when these groups
#: hold less than this share of a chunk's entries (:func:`_entries_above`), else by comparing every entry; and a
#: chunk whose groups above the start hold less than this share is searched before its shift
#: (:func:`_sparse_runs`). On the need_weights benchmark's block (the first version of that search), 1/2 instead
#: took 1.5-entmax's forward at scale 1 from 28.1 to 36.1 ms (57 of 128 groups a row above the start: listing 45%
#: of the entries cost more than the three full-row steps it spared), sparsemax's at scale 0.1 from 34.5 to 32.7;
#: 3/4 alike
SCAN_GROUPS_BELOW = 1 / 4
#: a run of sparse chunks searched together (:func:`_sparse_runs`) holds at most this many entries of chosen groups
#: counted at its widest row (rows x widest x START_GROUP), which bounds the copies and buffers of its search (16 MiB
#: each in float32) whatever the length; the need_weights benchmark's sparse (1, 8, 512, 4096) blocks are one run
RUN_ELEMENTS = 1 << 22
#: a search whose steps take powers settles a row without its confirming step when the next step is predicted far
#: below the tolerance (:func:`_newton_threshold`)
SETTLE = True
#: a search on at most this many entries takes every step on all its rows and settles none: the bookkeeping of
#: settled and compacted rows is some 45 calls a step on (rows, 1) tensors, which on a small chunk cost more than
#: the work they spare (on the 512-token blocks' chunks of 256 keys and fewer; chunks of 384-512 keys, 2^19
#: entries, keep the full loop, which spares them more work). Paired against the search without it (``python -m
#: benchmarks.ab NAME --ops entmax,entmax_attention --against d27ca68 --pattern causal --length 512 --batch 4
#: --threads 1``, Intel Xeon): 0.986x the α-entmax step, 1.5-entmax 1.003x, sparsemax 0.995x
LEAN_AT_MOST = 1 << 18
#: the backward of a general α takes its logarithms, exponentials and sums on the gathered support of a chunk of
#: rows when it is at most this share of the chunk's entries (:func:`_sparse_support`). Per (128, 4096) chunk of
#: the need_weights benchmark's scores (AMD EPYC, one thread): finding the support costs 0.54 ms, the backward
#: on it about 24 ns per entry, the full-row backward 1.5 ms (α = 1.9: 0.64 against 1.5 ms; α = 1.33 at 12%
#: density: 2.7 against 1.5). Rebuilding the probabilities on the support was no faster than the full-row power
#: (powers of zeros are cheap): it is not done
SUPPORT_BELOW = 1 / 32
#: the devices where both gather: measured on CPUs only; on a GPU the full-row passes are cheap and every gather
#: synchronises, and it was not measured there
GATHER_DEVICES = ("cpu",)
#: a whole problem of at most this many scores (a decoding step: beam x heads x keys) is normalised by
#: :func:`_small_entmax_with_stats`: a few passes over all its rows at once, where the search above spends its
#: calls on bookkeeping that pays only on large inputs (a (5, 8, 1, 40) decoding step's 1.5-entmax took 215 us
#: there, 130 calls, against softmax's 2)
SMALL_ELEMENTS = 1 << 14
#: and sparsemax's or 1.5-entmax's problems of at most this many scores take their threshold from the sorted rows
#: (:func:`_sorted_threshold`), larger ones plain Newton steps: torch's CPU sort took 30-45 us on (40, 64),
#: (40, 128) and (8, 512) float32 rows but 170-290 on (40, 192), (200, 64) and (400, 40), where the steps take
#: 90-135 (AMD EPYC, one thread)
SORTED_ELEMENTS = 1 << 12
#: a general α's powers d^β (β >= 1) are taken as ``exp2(β log2 d)`` where that is faster than ``torch.pow``
#: (:func:`nonnegative_power`): True / False decide; None measures it once per device type and dtype
#: (:func:`_logarithms_pay`). On an Intel Xeon (AVX-512, torch 2.13, one thread) a (1024, 512) float32 chunk,
#: 70% zeros, took 0.64 ms that way against 1.33 for ``torch.pow``; on an AMD EPYC ``log2`` alone took half the
#: power's time and ``exp2`` of underflowing numbers as long as the power (see :func:`_support_weights`)
POWERS_BY_LOGARITHMS: Optional[bool] = None
#: the measured way is taken when it takes at most this share of the power's time (a margin against noise, so
#: that a machine decides the same way every run)
LOGARITHMS_BELOW = 0.75
#: and only for tensors of at least this many elements: below, the logarithms' three extra calls cost more than
#: the power saves (Intel Xeon, one thread, 60% zeros: 6.0 against 1.7 us at 256 elements, 6.2 / 3.5 at 1,024,
#: 9.2 / 11.1 at 4,096, 19.4 / 41.6 at 16,384), as in a decoding step's normaliser
LOGARITHMS_FROM = 1 << 12
_LN2 = math.log(2.0)
_POWER_PATHS: Dict[Tuple[str, torch.dtype], bool] = {}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _group_maxima(x: Tensor, size: int) -> Tensor:
    """The largest entry of every ``size`` consecutive ones along the last dim (the last group may be shorter)."""
    n = x.size(-1)
    whole = n - n % size
    maxima = x[..., :whole].unflatten(-1, (whole // size, size)).amax(dim=-1)
    if whole < n:
        maxima = torch.cat([maxima, x[..., whole:].amax(dim=-1, keepdim=True)], dim=-1)
    return maxima


def _row_shifts(x: Tensor, mask: Optional[Tensor], group_size: int = 0):
    """What shifting the rows of ``x`` takes: ``(base, has_entries, shift, groups)``, where ``base`` is ``x`` or,
    with a ``mask``, a copy in the compute dtype with masked entries at -inf (ours to overwrite), ``has_entries``
    which rows have any entry at all, ``shift`` each row's maximum (0 for rows without entries) and, for
    ``group_size`` > 0, the group maxima of ``base`` (:func:`_group_maxima`; else None)."""
    compute = _compute_dtype(x.dtype)
    if mask is not None:
        x = x.to(compute).masked_fill(mask, float("-inf"))
    groups = _group_maxima(x, group_size) if group_size else None
    top = (x if groups is None else groups).amax(dim=-1, keepdim=True).to(compute)
    has_entries = top > float("-inf")
    # rows with nothing to attend to: shift by 0 so no NaN appears (-inf - -inf); they give zeros
    shift = torch.where(has_entries, top, torch.zeros_like(top))
    return x, has_entries, shift, groups


def _shifted(x: Tensor, mask: Optional[Tensor], scale: Union[float, Tensor]):
    """``u = (x - max(x)) * scale`` in the compute dtype with masked entries at -inf (a new contiguous tensor) and
    which rows have any entry at all."""
    base, has_entries, shift, _ = _row_shifts(x, mask)
    u = (base.sub_(shift) if mask is not None else torch.sub(base, shift)).contiguous()
    if not (isinstance(scale, float) and scale == 1.0):
        u.mul_(scale)
    return u, has_entries


def _newton_step(u: Tensor, tau: Tensor, beta: Union[float, Tensor], d: Tensor,
                 powers: Tensor, exponent: Union[None, float, Tensor] = None) -> Tuple[Tensor, Tensor]:
    """One Newton step on g(τ) = ||[u - τ]_+||_β - 1 for rows ``u`` (R, n) at ``tau`` (R, 1), using the buffers
    ``d`` and ``powers`` (R, n). Returns the step and the sums of the powers (R, 1), and leaves ``powers`` holding
    ``[u - τ]_+ ^ β``, the unnormalised output if τ is the root (for a float β = 2, ``[u - τ]_+`` itself: see
    :func:`_normalise`). Rows without entries (slope 0) get step 0; the caller zeroes them. ``exponent``: ``1 -
    1/β`` if the caller has it (a general β's step takes it)."""
    if isinstance(beta, float) and beta == 1.0:  # sparsemax: g = sum(d) - 1, g' = -|support|
        torch.sub(u, tau, out=powers).clamp_(min=0)
        total = powers.sum(-1, keepdim=True)
        slope = torch.sign(powers, out=d).sum(-1, keepdim=True)  # powers >= 0: their signs count the support
        step = (total - 1) / slope
    elif isinstance(beta, float) and beta == 2.0:  # 1.5-entmax: g = ||d||_2 - 1, g' = -sum(d) / ||d||_2
        # ``powers`` keeps d itself, whose squares the output is (:func:`_normalise` squares them): the norm is one
        # read (0.53x a product and a sum), and squaring once after the search spares writing squares every step
        torch.sub(u, tau, out=powers).clamp_(min=0)
        slope = powers.sum(-1, keepdim=True)
        norm = torch.linalg.vector_norm(powers, dim=-1, keepdim=True)
        total = norm.square()
        step = (total - norm) / slope
    else:  # N = sum d^β, Q = sum d^(β-1): step = (N - N^(1 - 1/β)) / Q
        # the one transcendental pass; d^(β-1) = d^β / d, with d clamped to tiny (0 where d was 0)
        tiny = torch.finfo(u.dtype).tiny
        if _powers_by_logarithms(u):  # d clamped at once, as the logarithms need it (the zeros' powers stay 0)
            _log_powers(torch.sub(u, tau, out=d).clamp_(min=tiny), beta, powers, clamped=True)
        else:
            torch.pow(torch.sub(u, tau, out=d).clamp_(min=0), beta, out=powers)
            d.clamp_(min=tiny)
        total = powers.sum(-1, keepdim=True)
        slope = torch.div(powers, d, out=d).sum(-1, keepdim=True)
        step = (total - total.pow(1 - 1 / beta if exponent is None else exponent)) / slope
    return torch.nan_to_num(step, nan=0.0, posinf=0.0, neginf=0.0), total


def _newton_threshold(u: Tensor, beta: Union[float, Tensor], start: Optional[Tensor] = None,
                      steps: Optional[int] = None) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """τ with ``sum([u - τ]_+ ^ β) = 1`` for β >= 1, by Newton's method on the β-norm (see the module docstring),
    from ``start`` (one τ per row, at or below the root) or -1. ``u`` has its row max at 0 (or is all -inf).

    Returns τ and, if every row converged (else None, None), ``[u - τ]_+ ^ β`` (a fresh tensor shaped like ``u``;
    ``[u - τ]_+`` for a float β = 2, see :func:`_newton_step`) and the powers' row sums: a row stops at the τ whose
    step fell below the tolerance, and that step's powers are the output, so the output is one division away
    (:func:`_normalise`); with :data:`SETTLE`, a row whose steps take powers may instead stop one step earlier,
    at the τ its last step reached, with its powers moved there to first order (see the loop).

    Rows converge after different numbers of steps (most within one or two of each other); once fewer than
    :data:`COMPACT_BELOW` of the rows still move, the steps run on a gathered copy of those rows only, so the last
    steps (including the one that only confirms convergence) cost a fraction of a full pass. A search on at most
    :data:`LEAN_AT_MOST` entries neither compacts nor settles. ``steps``: at most this many steps (a start's
    search, whose every iterate is a lower bound), after which τ is returned unconverged (with None, None)."""
    n = u.size(-1)
    rows = u.reshape(-1, n)
    if start is None:
        tau = torch.full((rows.size(0), 1), -1.0, dtype=u.dtype, device=u.device)
    else:
        tau = start.reshape(-1, 1).to(u.dtype, copy=True)
    beta = _per_row(beta, u.shape)
    # a per-row β's 1 - 1/β, taken by every step: made once (three calls a step on a few thousand numbers, which on
    # short rows cost about what a step's passes over the entries do)
    exponent = None if isinstance(beta, float) else 1 - 1 / beta
    tol = 4 * torch.finfo(u.dtype).eps
    # two work buffers reused by every step: fresh full-size tensors would be page-faulted in at every step
    d_buffer, powers_buffer = torch.empty_like(rows), torch.empty_like(rows)
    totals = rows.new_zeros(rows.size(0), 1)
    # a step that takes powers (not sparsemax or 1.5-entmax) keeps each row's last step size, to settle rows whose
    # next step would be far below the tolerance without taking it (see below). 1.5-entmax settling its rows
    # exactly (d - δ, no power) took 2.35 against 3.02 full steps per row but 32.4 against 26.1 ms (``python -m
    # benchmarks.entmax_search``): its steps cost little more than the settling's own pass and checks
    # a small search (see :data:`LEAN_AT_MOST`) neither settles nor compacts its rows
    lean = rows.numel() <= LEAN_AT_MOST
    settles = SETTLE and not lean and not (isinstance(beta, float) and beta in (1.0, 2.0))
    last_steps = rows.new_zeros(rows.size(0), 1)
    active: Optional[Tensor] = None  # indices of the rows still iterated; None = all rows, in place
    compacted_powers: Optional[Tensor] = None  # powers_buffer keeps every stopped row's powers
    converged = False
    for _ in range(MAX_NEWTON_STEPS if steps is None else steps):
        if active is None:
            step, total = _newton_step(rows, tau, beta, d_buffer, powers_buffer, exponent)
            current, row_beta = tau, beta
        else:
            k = active.numel()
            row_beta = beta if isinstance(beta, float) else beta.index_select(0, active)
            current = tau.index_select(0, active)
            if compacted_powers is None:
                compacted_powers = torch.empty_like(d_buffer[:k])
            powers = compacted_powers[:k]
            step, total = _newton_step(rows.index_select(0, active), current, row_beta, d_buffer[:k], powers,
                                       None if exponent is None else exponent.index_select(0, active))
        size, bound = step.abs(), current.abs().add_(1).mul_(tol)
        moving = size > bound
        if settles:
            # Newton's steps shrink quadratically (δ' ≈ K δ², K estimated as δ / δ_prev²): a row whose next step
            # would be below a 16th of the tolerance takes this step without a confirming one, its powers moved to
            # first order, (d - δ)^β ≈ d^β - β δ d^(β-1) (``d_buffer`` holds d^(β-1)), when the second-order error
            # of its largest entry (d = -τ, as the row max of u is 0), (β δ / d)² / 2, is at most half the
            # tolerance's first-order one, β tol / d: δ² <= tol d / β. Smaller entries' errors are no larger in
            # absolute terms for β >= 2; for β < 2 an entry with d < β δ is set to 0 where (d - δ)_+^β is below
            # ((β - 1) δ)^β. It spares a power of every entry: one of 3-4 full-row steps per row for α near 1
            previous = last_steps if active is None else last_steps.index_select(0, active)
            settled = (moving & (size.pow(3).mul_(16) <= previous.square().mul_(bound))
                       & (size.square() <= bound * current.neg().clamp_(min=0) / row_beta))
            if active is None:
                last_steps = size
            else:
                last_steps.index_copy_(0, active, size)
            if bool(settled.any()):
                step_powers = powers_buffer if active is None else powers
                step_powers.addcmul_(d_buffer[:step_powers.size(0)], step * settled * -row_beta).clamp_(min=0)
                total = torch.where(settled, step_powers.sum(-1, keepdim=True), total)
        current.add_(step.mul_(moving))  # a row that stops keeps the τ its powers were taken at
        if settles:
            moving &= ~settled
        if active is None:
            totals = total
        else:
            tau.index_copy_(0, active, current)
            stopped = ~moving.view(-1)
            if bool(stopped.any()):
                powers_buffer.index_copy_(0, active[stopped], powers[stopped])
                totals.index_copy_(0, active[stopped], total[stopped])
        moving = moving.view(-1)
        count = int(moving.sum())
        if count == 0:
            converged = True
            break
        if not lean and count < COMPACT_BELOW * moving.numel():
            positions = moving.nonzero().view(-1)
            active = positions if active is None else active.index_select(0, positions)
    tau = tau.view(u.shape[:-1] + (1,))
    if not converged:
        return tau, None, None
    return tau, powers_buffer.view(u.shape), totals.view(u.shape[:-1] + (1,))


def _bisection_threshold(u: Tensor, alpha_minus_one: Union[float, Tensor], beta: Union[float, Tensor]) -> Tensor:
    """τ for α > 2 by bisection on ``sum([u - τ]_+ ^ β) - 1`` over [-1, -(1/n)^(α-1)], moving the lower end to the
    midpoint whenever the sum there is still >= 1 (the rule of entmax >= 1.2; the older rule gave NaN)."""
    n = (u > float("-inf")).sum(-1, keepdim=True).clamp_(min=1).to(u.dtype)
    lo = torch.full_like(u[..., :1], -1.0)
    width = -(1.0 / n) ** alpha_minus_one - lo
    for _ in range(BISECTION_STEPS):
        width = width / 2
        mid = lo + width
        total = (u - mid).clamp_(min=0).pow(beta).sum(-1, keepdim=True)
        lo = torch.where(total >= 1, mid, lo)
    return lo + width / 2


def _entmax_forward(x: Tensor, alpha: Union[float, Tensor], mask: Optional[Tensor]) -> Tensor:
    """Probabilities along the last dim in the compute dtype (float32/float64)."""
    if isinstance(alpha, Tensor):
        alpha = alpha.to(_compute_dtype(x.dtype))
        lowest, highest = torch.stack(torch.aminmax(alpha)).tolist() if alpha.device.type != "cpu" else (
            float(bound) for bound in torch.aminmax(alpha))  # off the CPU: one read of the device for both
        if not lowest > 1:
            raise ValueError("entmax needs alpha > 1 (alpha = 1 is softmax: use torch.softmax)")
        large = highest > 2
    else:
        if not alpha > 1:
            raise ValueError(f"entmax needs alpha > 1, got {alpha} (alpha = 1 is softmax: use torch.softmax)")
        alpha = float(alpha)
        large = alpha > 2
    if not large or x.numel() == 0:
        if 0 < x.numel() <= SMALL_ELEMENTS:  # no row statistics needed here
            return _small_entmax_with_stats(x, _in_compute_dtype(x, alpha), mask, stats=False)[0]
        return entmax_with_stats(x, alpha, mask)[0]
    alpha_minus_one = alpha - 1
    beta = 1 / alpha_minus_one
    u, has_entries = _shifted(x, mask, alpha_minus_one)
    _normalise(u, _bisection_threshold(u, alpha_minus_one, beta), None, None, beta)
    return u.mul_(has_entries)


def _flat_positions(rows: Tensor, columns: Tensor, width: int) -> Tensor:
    """The positions ``rows * width + columns`` (int64) of entries of a contiguous (R, ``width``) tensor."""
    return torch.add(columns.long(), rows.long(), alpha=width)


def take_entries(x: Tensor, rows: Tensor, columns: Tensor) -> Tensor:
    """``x[rows, columns]`` for a 2-D ``x``, as one ``index_select`` of its flat view where it is contiguous: on
    the CPU indexing by two tensors took 4x as long (11 against 2.5 ms for 0.5M entries of a (4096, 4096) tensor,
    AMD EPYC, one thread)."""
    if not x.is_contiguous():
        return x[rows, columns]
    return x.view(-1).index_select(0, _flat_positions(rows, columns, x.size(1)))


def put_entries(x: Tensor, rows: Tensor, columns: Tensor, values: Tensor) -> Tensor:
    """``x[rows, columns] = values`` for a 2-D ``x`` and distinct entries, in place (one ``index_copy_`` of its
    flat view where it is contiguous: 2.3 against 6.6 ms for the 0.5M entries of :func:`take_entries`)."""
    if not x.is_contiguous():
        return x.index_put_((rows, columns), values)
    x.view(-1).index_copy_(0, _flat_positions(rows, columns, x.size(1)), values)
    return x


def _entries_above(u: Tensor, start: Tensor, groups: Optional[Tensor],
                   widest: Optional[float] = None) -> Optional[Tuple[Tensor, Tensor]]:
    """(row, column) indices of the entries of ``u`` (R, n) above each row's ``start`` (R, 1), each row's in a
    run: through their groups (:func:`_entries_above_in_groups`) when ``groups`` are given, the rows split into
    whole groups, and the groups above the start hold less than :data:`SCAN_GROUPS_BELOW` of the entries; else by
    comparing every entry. ``widest``: when every entry is compared, None (nothing listed) if a row has more than
    this many entries above its start, counted before listing them (a row sum of the comparison against the
    listing's ``nonzero``: the listing of a refused (1024, 512) chunk cost five times the comparison)."""
    if groups is not None and u.size(-1) % START_GROUP == 0 and u.is_contiguous():
        chosen = groups > start
        if int(chosen.sum()) * START_GROUP < SCAN_GROUPS_BELOW * u.numel():
            return _entries_above_in_groups(u, start, chosen)
    above = u > start
    # counted in int32: a sum of booleans casts them to int64 first (a pass writing 8 bytes an entry), which took
    # longer than the comparison itself
    if widest is not None and u.size(0) and int(above.sum(-1, dtype=torch.int32).max()) > widest:
        return None
    return above.nonzero().unbind(1)


def _entries_above_in_groups(u: Tensor, start: Tensor, chosen: Tensor,
                             shifted: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                             group: Optional[int] = None):
    """:func:`_entries_above` compared only in the groups of ``group`` (default :data:`START_GROUP`, read at the
    call) consecutive entries marked in ``chosen`` (R, n / group): those whose maxima are above the start, the only
    ones that hold such entries. ``u`` is contiguous,
    so the chosen groups are rows of its (R n / group, group) view (copied by one ``index_select``: a
    two-dimensional index took 2-4x as long).

    ``shifted``: ``u`` holds the scores, not yet shifted, and ``shifted(entries, rows)`` shifts the chosen groups'
    entries of the given rows the way the whole chunk would have been; then the entries' shifted values are
    returned too, ``(rows, columns, values)``."""
    group = START_GROUP if group is None else group
    per_row = chosen.size(-1)
    flat = chosen.view(-1).nonzero().view(-1)  # group ids, row-major
    group_rows = torch.div(flat, per_row, rounding_mode="floor")
    candidates = u.view(-1, group).index_select(0, flat)
    if shifted is not None:
        candidates = shifted(candidates, group_rows)
    above = candidates > start.view(-1).index_select(0, group_rows).unsqueeze(1)
    group_of, position = above.nonzero().unbind(1)
    columns = (flat - group_rows * per_row).index_select(0, group_of).mul_(group).add_(position)
    rows = group_rows.index_select(0, group_of)
    return (rows, columns) if shifted is None else (rows, columns, take_entries(candidates, group_of, position))


def _gathered_threshold(u: Tensor, beta: Union[float, Tensor], start: Tensor, groups: Optional[Tensor],
                        output: bool = True, sampled: bool = False, support: Optional[list] = None,
                        steps: Optional[int] = None, write: bool = True) -> Optional[Tuple[Tensor, Optional[Tensor]]]:
    """The search of :func:`_newton_threshold` on rows ``u`` (R, n) from ``start`` (R, 1), run on a gathered copy
    of the entries above the start only, and (``output``) the output written over ``u``; returns (τ, the sums
    divided by, or None without ``output``), or None (``u`` untouched) when some row has more than
    :data:`GATHER_BELOW` of its entries there. τ only rises from the start, so an entry at or below it is 0 in the
    output and adds nothing to any sum the search takes. ``groups``: the rows' group maxima, if known. A chunk is
    refused first when every 16th column says a row would be too wide (:func:`_too_wide`; listing the entries of
    a dense chunk cost as much as a search step; ``sampled``: the caller has checked), then by the widest row of
    the entries found. ``support``: a list to which the output's support is added (:func:`_search_listed`).
    ``steps``: without ``output`` (a start's search), at most this many Newton steps. ``write``: see
    :func:`_search_listed`."""
    n = u.size(-1)
    if not sampled and _too_wide(*_sampled_shares(u, start), n):
        return None
    listed = _entries_above(u, start, groups, widest=GATHER_BELOW * n)
    if listed is None:
        return None
    row_of, col_of = listed
    counts = torch.bincount(row_of, minlength=u.size(0))
    if u.size(0) and int(counts.max()) > GATHER_BELOW * n:
        return None
    return _search_listed(take_entries(u, row_of, col_of), row_of, col_of, counts, u, beta, start, output,
                          support, steps, write)


def _search_listed(values: Tensor, row_of: Tensor, col_of: Tensor, counts: Tensor, out: Tensor,
                   beta: Union[float, Tensor], start: Tensor, output: bool = True,
                   support: Optional[list] = None, steps: Optional[int] = None,
                   write: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """The search of :func:`_gathered_threshold` on the listed entries above the start of the rows of ``out`` (R,
    n), ``values`` at ``(row_of, col_of)`` (each row's in a run; ``counts`` of each row), and
    (``output``) the output written over ``out``; ``support``: a list to which the (rows, columns) of the
    output's positive entries are added, in row order. Without ``write`` (with ``support``) the output is not
    written (``out`` is left as it is): the support's part carries the probabilities, (rows, columns, values),
    and whoever reads the output densely writes it from them (:func:`entmax_with_stats`, ``dense_listed``)."""
    rows = out.size(0)
    widest = int(counts.max()) if rows else 0
    slot = torch.arange(row_of.numel(), device=out.device) - (counts.cumsum(0) - counts).index_select(0, row_of)
    gathered = put_entries(values.new_full((rows, max(1, widest)), float("-inf")), row_of, slot, values)
    tau, powers, totals = _newton_threshold(gathered, beta, start, None if output else steps)
    if not output:
        return tau, None
    total = _normalise(gathered, tau, powers, totals, beta)
    probabilities = take_entries(gathered, row_of, slot)
    if not write and support is not None:
        positive = probabilities > 0
        support.append((row_of[positive], col_of[positive], probabilities[positive]))
        return tau, total
    put_entries(out.zero_(), row_of, col_of, probabilities)
    if support is not None:
        positive = probabilities > 0
        support.append((row_of[positive], col_of[positive]))
    return tau, total


def _shift_scores(x: Tensor, shift: Tensor, scale: Union[float, Tensor], fused: bool,
                  out: Optional[Tensor] = None) -> Tensor:
    """``u = (x - shift) * scale`` for rows ``x`` and their ``shift`` and ``scale`` (floats or (R, 1)), as
    ``x * scale - shift * scale`` in one pass when ``fused`` (the same numbers for a power of two, 1.5-entmax's
    1/2, whose products are exact; otherwise the two may differ in the last bit, and the row maximum must stay
    exactly 0). Whole rows and any of their entries alone get the same numbers from it."""
    if fused:
        return torch.add(shift * -scale, x, alpha=scale, out=out)
    u = torch.sub(x, shift, out=out)
    if not (isinstance(scale, float) and scale == 1.0):
        u.mul_(scale)
    return u


def _gathered_unshifted(x: Tensor, shift: Tensor, scale: Union[float, Tensor], fused: bool, start: Tensor,
                        groups: Tensor, beta: Union[float, Tensor], out: Tensor, support: Optional[list] = None,
                        group: Optional[int] = None, write: bool = True):
    """:func:`_gathered_threshold` on the rows ``x`` (R, n) *before* their shift (:func:`_shift_scores`), output
    written into ``out``, through the groups of ``group`` entries (default :data:`START_GROUP`) whose shifted
    maxima ``groups`` (R, n / group) are above the ``start``: only their entries are shifted, and the rows are never shifted as a whole (a read and a
    write of every entry, the largest pass of a sparse chunk's forward). The maxima decide exactly: the shift's
    rounding is monotone, so a group's largest shifted entry is its largest entry shifted. Returns (τ, the sums
    divided by).
    The caller has checked that no row is too wide (:func:`_sparse_runs`: its chosen groups hold at most
    :data:`GATHER_BELOW` of its entries). ``support``, ``write``: see :func:`_search_listed`."""

    def shifted(entries: Tensor, rows: Tensor) -> Tensor:
        row_scale = scale if isinstance(scale, float) else scale.index_select(0, rows)
        return _shift_scores(entries, shift.index_select(0, rows), row_scale, fused)

    row_of, col_of, values = _entries_above_in_groups(x, start, groups > start, shifted, group)
    counts = torch.bincount(row_of, minlength=out.size(0))
    return _search_listed(values, row_of, col_of, counts, out, beta, start, support=support, write=write)


def _sampled_shares(u: Tensor, start: Union[float, Tensor]) -> Tuple[float, float]:
    """The share of the entries of ``u`` (R, n) above ``start`` (a float or (R, 1)) and the largest share of one
    row, judged on every 16th column."""
    above = (u[:, ::16] > start).sum(-1)
    columns = -(-u.size(-1) // 16)  # len(range(0, n, 16))
    return float(above.sum()) / (columns * u.size(0)), float(above.max()) / columns


def _too_wide(share: float, row_share: float, n: int) -> bool:
    """Whether a chunk's gathered copy would have a row wider than :data:`GATHER_BELOW` of its ``n`` entries,
    from :func:`_sampled_shares`: the widest sampled row where rows give 64 samples or more, else the mean, or a
    sampled row more than :data:`WIDE_ROW_SAMPLES` above the start (a few samples of a row judge it poorly, but
    not a row nearly all of whose samples are above)."""
    if n >= 1024:
        return row_share > GATHER_BELOW
    return share > GATHER_BELOW or row_share > WIDE_ROW_SAMPLES


def _mean_start(u: Tensor, beta: Union[float, Tensor], start: Optional[Tensor]) -> Tensor:
    """A start for the search on rows ``u`` (R, n) (row max 0) at or below each row's τ: the larger of ``start``
    (or -1) and the bound from the mean of the row's entries above -1. For those entries S (only they can count:
    τ >= -1), Jensen's inequality for the convex x^β (β >= 1) gives Σ [u - τ]_+^β >= |S| [mean_S u - τ]_+^β, which
    is 1 at τ = mean_S u - |S|^(-1/β): the sum there is at least 1, so that τ is at or below the root. It is the
    root itself when the entries are equal, and close to it when the support is most of a row of similar entries,
    where the group maxima's root lies far below (they leave 31 of every 32 entries out). Lowered by a few ulps
    against rounding."""
    shifted = torch.clamp(u, min=-1.0).add_(1.0)  # u + 1 on S, 0 elsewhere
    total = shifted.sum(-1, keepdim=True)
    count = torch.sign(shifted, out=shifted).sum(-1, keepdim=True).clamp_(min=1.0)
    bound = total.div_(count).sub_(1.0).sub_(count.pow_(-1 / beta))
    bound.sub_(bound.abs().add_(1.0).mul_(8 * torch.finfo(u.dtype).eps))
    return bound.clamp_(min=-1.0) if start is None else torch.maximum(start, bound)


def _row_chunks(rows: Tensor, cpu_elements: Optional[int] = None):
    """Slices of the rows of ``rows`` (R, n), :data:`ROW_CHUNK_ELEMENTS` elements (``cpu_elements`` if given) on the
    CPU, else :data:`DEVICE_ROW_CHUNK_ELEMENTS`, or one row at a time."""
    if rows.device.type != "cpu":
        elements = DEVICE_ROW_CHUNK_ELEMENTS
    else:
        elements = ROW_CHUNK_ELEMENTS if cpu_elements is None else cpu_elements
    step = max(1, elements // max(1, rows.size(-1)))
    return [slice(start, start + step) for start in range(0, rows.size(0), step)]


def _in_compute_dtype(x: Tensor, alpha: Union[float, Tensor]) -> Union[float, Tensor]:
    """α as a float, or as a tensor in the compute dtype of scores ``x``."""
    if isinstance(alpha, Tensor):
        return alpha.to(_compute_dtype(x.dtype))
    return float(alpha)


def _sorted_threshold(u: Tensor, beta: float) -> Tensor:
    """The exact τ (R, 1) of sparsemax (``beta`` 1) or 1.5-entmax (``beta`` 2) for rows ``u`` (R, n) whose maximum
    is 0 (rows without entries, all -inf, get -inf or NaN: the caller replaces them). With the row sorted in
    decreasing order, the support is the first k entries for the largest k whose own threshold τ_k (the root
    over those k entries alone) lies at or below the k-th entry; counting the k that pass gives it, as the
    condition holds exactly for a prefix. Sparsemax: τ_k = (sum of the k largest - 1) / k (Michelot's
    threshold); 1.5-entmax: τ_k = mean_k - sqrt((1 - k var_k) / k), the root of ``sum (s_i - τ)^2 = 1`` over the
    k entries. -inf entries make NaN conditions, which count as false."""
    ordered = u.sort(dim=-1, descending=True).values
    inverse, neg_inverse = _inverse_counts(u.size(-1), u)  # 1 / k and -1 / k
    sums = ordered.cumsum(-1)
    if beta == 1.0:
        taus = torch.addcmul(neg_inverse, sums, inverse)  # (sum of the k largest - 1) / k
        size = (taus < ordered).sum(-1, keepdim=True).clamp_(min=1)
        return taus.gather(-1, size - 1)
    means = sums * inverse
    spread = (ordered * ordered).cumsum_(-1).addcmul_(sums, means, value=-1)  # k times the variance of the k largest
    # (1 - spread) / k in one call: every call is a few microseconds of a decoding step's
    taus = means.sub_(torch.addcmul(inverse, spread, inverse, value=-1).clamp_(min=0).sqrt_())
    size = (taus <= ordered).sum(-1, keepdim=True).clamp_(min=1)
    return taus.gather(-1, size - 1)


def _plain_newton(u: Tensor, beta: Union[float, Tensor]) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """:func:`_newton_threshold` from -1 without its bookkeeping for large inputs (no gathered rows, no settling):
    every row takes every step until none moves, those already within the tolerance too (their steps are below
    it, and from below the root Newton's iterates only rise to it). Returns τ and, if it converged, the powers
    taken at that τ and their sums. A general β takes :func:`_small_newton_step`. ``u`` is (..., n), β a float or
    broadcast against its rows."""
    tau = u.new_full(u.shape[:-1] + (1,), -1.0)
    tol = 4 * torch.finfo(u.dtype).eps
    d, powers = torch.empty_like(u), torch.empty_like(u)
    general = not (isinstance(beta, float) and beta in (1.0, 2.0))
    if general:  # the step's exponents, taken once: every call is a few microseconds of a decoding step
        # β - 1 kept above 0: 0^0 would be 1 where a row's β is 1 (α = 2), and d^(1e-30) is 1 for every positive d
        beta_minus_one = beta - 1 if isinstance(beta, float) else (beta - 1).clamp_(min=1e-30)
        exponent = 1 - 1 / beta
    for _ in range(MAX_NEWTON_STEPS):
        if general:
            step, total = _small_newton_step(u, tau, beta_minus_one, exponent, d, powers)
        else:
            step, total = _newton_step(u, tau, beta, d, powers)
        # τ lies in [-1, 0) (the row max is 0 and τ rises from -1 to the root), so the tolerance tol (1 + |τ|) is
        # tol (1 - τ): |step| > tol (1 - τ) as |step| + tol τ > tol, one maximum for all rows (three calls, not six)
        if not float(torch.add(step.abs(), tau, alpha=tol).amax()) > tol:
            if general:  # d^β = d^(β-1) d, taken once at the end rather than at every step
                powers.mul_(d)
            return tau, powers, total
        tau.add_(step)
    return tau, None, None


def _small_newton_step(u: Tensor, tau: Tensor, beta_minus_one: Union[float, Tensor], exponent: Union[float, Tensor],
                       d: Tensor, lower: Tensor) -> Tuple[Tensor, Tensor]:
    """:func:`_newton_step` for a general β in the fewest calls, for :func:`_plain_newton`: ``lower`` takes
    d^(β-1) (0 off the support: ``beta_minus_one`` > 0), whose sum is the slope and whose dot product with d the
    sum of the powers; ``d`` keeps [u - τ]_+. Returns the step (0 for rows without entries) and the sums of the
    powers."""
    torch.sub(u, tau, out=d).clamp_(min=0)
    torch.pow(d, beta_minus_one, out=lower)
    total = torch.linalg.vecdot(lower, d).unsqueeze_(-1)
    step = torch.sub(total, total.pow(exponent)).div_(lower.sum(-1, keepdim=True))
    return torch.nan_to_num_(step, nan=0.0, posinf=0.0, neginf=0.0), total


#: ``(1/k, -1/k)`` for k = 1, 2, ... per ``(dtype, device)``, as long as the longest rows seen (a call takes the first
#: n: the factors do not depend on the length)
_INVERSE_COUNTS: Dict[Tuple[torch.dtype, torch.device], Tuple[Tensor, Tensor]] = {}


def _inverse_counts(n: int, like: Tensor) -> Tuple[Tensor, Tensor]:
    """``1/k`` and ``-1/k`` for k = 1..n in the dtype and on the device of ``like``."""
    key = (like.dtype, like.device)
    cached = _INVERSE_COUNTS.get(key)
    if cached is None or cached[0].numel() < n:
        with torch.inference_mode(False):  # kept for later calls: never an inference tensor
            inverse = torch.arange(1, max(n, 64) + 1, dtype=like.dtype, device=like.device).reciprocal_()
            cached = _INVERSE_COUNTS[key] = (inverse, -inverse)
    return cached[0][:n], cached[1][:n]


def _log_powers(d: Tensor, beta: Union[float, Tensor], out: Tensor, clamped: bool = False) -> Tensor:
    """``d ^ β`` as ``exp2(β log2 d)`` for ``d >= 0`` and β >= 1, into ``out`` (may be ``d``). ``d`` is clamped
    to the smallest normal float first (``log2`` of zeros and of denormals takes a slow path), and products at or
    below its logarithm, -126 in float32, are sent to -inf: every power at or below the smallest normal float is
    0 (not a denormal), so zeros stay exactly 0 for every β >= 1 (``exp2(β log2(tiny))`` would not underflow to 0
    for β < 150/126). The absolute error is at most about 0.6 ulp of 1 (``torch.pow``: 0.3), where the entries of
    a row summing to one are measured. ``clamped``: ``d`` is at least tiny already."""
    tiny = torch.finfo(d.dtype).tiny
    logs = (torch.log2(d, out=out) if clamped else torch.clamp(d, min=tiny, out=out).log2_()).mul_(beta)
    return torch.threshold_(logs, math.log2(tiny), float("-inf")).exp2_()


def _logarithms_pay(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`_log_powers` takes at most :data:`LOGARITHMS_BELOW` of ``torch.pow``'s time on a chunk of
    attention-like rows (128 x 512, 70% zeros, one β per row), the fastest of five alternated timings each;
    measured once per device type and dtype (a few milliseconds), never off the CPU (the GPUs' power is one
    kernel like the others)."""
    key = (device.type, dtype)
    if key not in _POWER_PATHS:
        pays = False
        if device.type == "cpu":
            with torch.inference_mode(False), torch.no_grad():
                gen = torch.Generator().manual_seed(0)
                d = torch.rand(128, 512, generator=gen, dtype=dtype)
                d.masked_fill_(torch.rand(128, 512, generator=gen) < 0.7, 0.0)
                beta = 1.1 + torch.rand(128, 1, generator=gen, dtype=dtype) * 8
                out = torch.empty_like(d)
                times = {True: [], False: []}
                for _ in range(5):
                    for by_logs in (True, False):
                        started = time.perf_counter()
                        _log_powers(d, beta, out) if by_logs else torch.pow(d, beta, out=out)
                        times[by_logs].append(time.perf_counter() - started)
                pays = min(times[True]) <= LOGARITHMS_BELOW * min(times[False])
        _POWER_PATHS[key] = pays
    return _POWER_PATHS[key]


def _powers_by_logarithms(d: Tensor) -> bool:
    """Whether powers of ``d`` are taken by :func:`_log_powers`: :data:`POWERS_BY_LOGARITHMS`, or measured, for
    tensors of at least :data:`LOGARITHMS_FROM` elements."""
    by_logs = POWERS_BY_LOGARITHMS
    if by_logs is None:
        return d.numel() >= LOGARITHMS_FROM and _logarithms_pay(d.device, d.dtype)
    return by_logs


def nonnegative_power(d: Tensor, beta: Union[float, Tensor], out: Tensor) -> Tensor:
    """``d ^ β`` for ``d >= 0`` and β >= 1 (a float or broadcast against ``d``), into ``out`` (may be ``d``):
    by :func:`_log_powers` or ``torch.pow``, as :data:`POWERS_BY_LOGARITHMS` says (or measures)."""
    return _log_powers(d, beta, out) if _powers_by_logarithms(d) else torch.pow(d, beta, out=out)


def _small_sorted_entmax(x: Tensor, beta: float) -> Tensor:
    """Sparsemax (``beta`` 1) or 1.5-entmax (``beta`` 2) of the rows of a small unmasked ``x`` (float32/float64;
    entries finite or -inf) in the fewest calls, for a decoding step's 40 rows of a few dozen scores, where every
    call costs several microseconds and the data nothing: the rows shifted as the search shifts them, τ from the
    sorted rows (:func:`_sorted_threshold`), and the output divided by its sums. A row without entries (all -inf)
    becomes NaN on the way and 0 at the end."""
    top = x.amax(dim=-1, keepdim=True)
    # (x - top) (α-1), in one pass for 1.5-entmax's exact halving (as the search shifts its rows)
    u = _shift_scores(x, top, 1.0 / beta, fused=beta == 2.0)
    if beta == 1.0:
        p = u.sub_(_sorted_threshold(u, beta)).clamp_(min=0)
    else:  # the root in float64 (see _small_entmax_with_stats)
        p = u.sub_(_sorted_threshold(u.double(), beta).to(u.dtype)).clamp_(min=0).square_()
    return p.div_(p.sum(-1, keepdim=True)).nan_to_num_(nan=0.0)


def _small_general_entmax(x: Tensor, alpha: Union[float, Tensor], mask: Optional[Tensor]) -> Tensor:
    """α-entmax (a general α: not 1.5 or 2) of a small problem without row statistics, in the fewest calls (a
    decoding step's 40 rows of a few dozen scores, where every call costs microseconds and the data nothing): the
    rows shifted as the search shifts them, in their own shape (α broadcasts as given), τ by
    :func:`_plain_newton`. A row without entries (all -inf or masked) becomes NaN on the way and 0 at the end."""
    compute = _compute_dtype(x.dtype)
    base = x.to(compute) if mask is None else x.to(compute).masked_fill(mask, float("-inf"))
    alpha_minus_one = alpha - 1
    beta = 1 / alpha_minus_one
    u = torch.sub(base, base.amax(dim=-1, keepdim=True)).mul_(alpha_minus_one)
    tau, powers, totals = _plain_newton(u, beta)
    if powers is None:  # no convergence within MAX_NEWTON_STEPS: from the τ reached, as the statistics' path does
        _normalise(u, tau, None, None, beta)
        return u.nan_to_num_(nan=0.0)
    return powers.div_(totals).nan_to_num_(nan=0.0)


def _small_entmax_with_stats(x: Tensor, alpha: Union[float, Tensor], mask: Optional[Tensor],
                             stats: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """:func:`entmax_with_stats` (without the support) for a small problem (:data:`SMALL_ELEMENTS`): the rows
    shifted as the search shifts them, τ exactly from the sorted rows for sparsemax and 1.5-entmax
    (:func:`_sorted_threshold`: no loop, no synchronisation; up to :data:`SORTED_ELEMENTS`) and by plain Newton
    steps otherwise. Without ``stats`` the row statistics are not assembled (None)."""
    n = x.size(-1)
    if not stats and mask is None and isinstance(alpha, float) and alpha in (1.5, 2.0) and x.numel() <= SORTED_ELEMENTS:
        return _small_sorted_entmax(x.to(_compute_dtype(x.dtype)), 1.0 / (alpha - 1.0)), None
    if not stats and not (isinstance(alpha, float) and alpha in (1.5, 2.0)):
        return _small_general_entmax(x, alpha, mask), None
    alpha_minus_one = alpha - 1
    base, has_entries, shift, _ = _row_shifts(x, mask)
    row_scale, row_beta = _per_row(alpha_minus_one, x.shape), _per_row(1 / alpha_minus_one, x.shape)
    shift_rows, has_rows = shift.reshape(-1, 1), has_entries.reshape(-1, 1)
    fused = isinstance(row_scale, float) and math.frexp(row_scale)[0] == 0.5 and row_scale != 1.0
    u = _shift_scores(base.reshape(-1, n).to(shift.dtype), shift_rows, row_scale, fused).contiguous()
    if isinstance(row_beta, float) and row_beta in (1.0, 2.0) and u.numel() <= SORTED_ELEMENTS:
        # 1.5-entmax in float64: its root subtracts squares (float32 left its outputs 1e-6 from the search's)
        tau = _sorted_threshold(u if row_beta == 1.0 else u.double(), row_beta).to(u.dtype)
        # a row without entries got -inf or NaN: 0, as the search gives it (its output is 0 either way)
        tau.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        total = _normalise(u, tau, None, None, row_beta)
    else:
        tau, powers, totals = _plain_newton(u, row_beta)
        total = _normalise(u, tau, powers, totals, row_beta)
    if not stats:
        return u.view(x.shape), None
    row_stats = torch.cat([shift_rows, tau, total.reciprocal().mul_(has_rows)], dim=1)
    return u.view(x.shape), row_stats.view(x.shape[:-1] + (3,))


def entmax_with_stats(x: Tensor, alpha: Union[float, Tensor], mask: Optional[Tensor],
                      with_support: Optional[float] = None, support_rows: Optional[int] = None,
                      support_groups_at_least: float = 0.0, dense_listed: bool = True):
    """α-entmax of the rows of ``x`` for 1 < α <= 2 (float32/float64 probabilities, no autograd) and, per row,
    ``(shift, τ, scale)`` (..., 3): what :func:`entmax_from_stats` rebuilds the probabilities from,
    ``[(α-1)(x - shift) - τ]_+ ^ (1/(α-1)) * scale`` (``scale`` 0 for rows with nothing to attend to). So a
    caller may keep 3 numbers per row for backward instead of the probabilities.

    ``with_support`` (a share of the entries): also returns the support, ``(rows, columns)`` of the positive
    probabilities (rows counted over ``x.reshape(-1, n)``, in row order, each row's columns in order), or None
    when it is more than that share of the entries. The searches through sparse groups list it anyway
    (:func:`_gathered_unshifted`); the other chunks list their output's (:func:`_listed_support`).

    ``support_rows``: the rows form groups of this many consecutive ones (an attention's (batch, head) pairs),
    each judged on its own: the support is then ``(rows, columns, listed)`` with ``listed`` (groups,) bool, the
    groups whose entries are listed, those at most ``with_support`` of their entries (the others' are not listed
    at all); None when no group is. ``support_groups_at_least`` (a share of the groups): None also when the groups
    that may be listed, judged on their samples after the search (:func:`_sampled_listing`), are fewer, before
    any chunk's output is listed: a caller that keeps the support only for that many groups (an attention block
    works on its support when at least half its pairs are sparse) never pays for listing the others (the
    language-model benchmark's 512-token α-entmax blocks listed fewer than half of their 32 pairs in every block,
    only to drop them; ``python -m benchmarks.ab alpha_entmax --ops entmax,entmax_attention --against 9c2b139
    --pattern causal --length 512 --batch 4 --threads 1`` at c3d6c71: 0.965x the step).

    ``dense_listed`` False (with ``support_rows``): the caller reads the probabilities of the listed groups from
    the support alone, so their rows of the dense output are left unwritten wherever the search had their entries
    listed anyway (garbage there: zeroing a sparse chunk and scattering its entries into it was a pass over every
    entry); the support is then ``(rows, columns, listed, values)``, ``values`` the probabilities at its entries,
    and it is None whenever fewer groups than ``support_groups_at_least`` are listed in the end (then every row is
    written)."""
    alpha = _in_compute_dtype(x, alpha)
    if 0 < x.numel() <= SMALL_ELEMENTS and with_support is None:
        return _small_entmax_with_stats(x, alpha, mask)
    if x.numel() == 0:  # no rows, or rows without entries (zero probabilities, scale 0)
        compute = _compute_dtype(x.dtype)
        empty = x.new_zeros(x.shape, dtype=compute), x.new_zeros(x.shape[:-1] + (3,), dtype=compute)
        return empty + (None,) if with_support is not None else empty
    grouped = with_support is not None and support_rows is not None
    alpha_minus_one = alpha - 1
    beta = 1 / alpha_minus_one
    n = x.size(-1)
    base, has_entries, shift, groups = _row_shifts(x, mask, START_GROUP if n >= GROUP_START_FROM else 0)
    base_rows = base.reshape(-1, n)
    # u = (x - shift) * (α-1), made a chunk at a time inside the loop below (in place over our masked copy): a
    # separate pass over the whole matrix wrote it out to memory only for the loop to read it back
    in_place = mask is not None and base_rows.is_contiguous()
    rows = base_rows if in_place else torch.empty(base_rows.shape, dtype=shift.dtype, device=x.device)
    shift_rows = shift.reshape(-1, 1)
    row_scale, row_beta = _per_row(alpha_minus_one, x.shape), _per_row(beta, x.shape)
    powered = not (isinstance(row_beta, float) and row_beta in (1.0, 2.0))  # a power of every entry in every step
    gathers = rows.device.type in GATHER_DEVICES and powered
    starts = None
    if groups is not None:
        groups = groups.to(shift.dtype).sub_(shift).mul_(alpha_minus_one).view(rows.size(0), -1)
        # the start's own search begins at -1: with a power per step, on the maxima above -1 alone if few are
        minus_one = groups.new_full((groups.size(0), 1), -1.0)
        found = _gathered_threshold(groups, row_beta, minus_one, None, output=False,
                                    steps=START_STEPS) if gathers else None
        starts = (found[0] if found is not None else _newton_threshold(groups, row_beta,
                                                                        steps=START_STEPS)[0]).view(-1, 1)
    stats = rows.new_empty(rows.size(0), 3)
    stats[:, 0] = shift_rows.view(-1)
    # (x - shift) (α-1) as x (α-1) - shift (α-1) in one pass where that gives the same numbers (:func:`_shift_scores`)
    fused_shift = isinstance(row_scale, float) and math.frexp(row_scale)[0] == 0.5 and row_scale != 1.0
    # the rows a chunk at a time, every Newton step and the output of one chunk before the next: a chunk's rows
    # stay in cache through the search's passes (the whole matrix streamed through memory at every pass)
    chunks = _row_chunks(rows)
    # except where few groups are above the start: runs of such chunks are searched, and their output written,
    # together and without being shifted as a whole (:func:`_gathered_unshifted`)
    runs = [(part, 0, [part]) for part in chunks]
    if (rows.device.type in GATHER_DEVICES and groups is not None and n % START_GROUP == 0
            and base_rows.is_contiguous()):
        # each row's groups above its start, counted as the signs of their differences (a comparison and a sum of
        # booleans took 1.8x as long)
        def halves_above(part: slice) -> Tensor:
            """Each row's groups of FINE_GROUP above its start, for a chunk too dense through the coarse ones (their
            maxima shifted as the coarse ones are, kept in ``fine`` for the chunk's search)."""
            # a max pool (see FINE_GROUP)
            maxima = F.max_pool1d(base_rows[part].unsqueeze(1), FINE_GROUP, FINE_GROUP).squeeze(1).to(shift.dtype)
            fine[part.start] = maxima.sub_(shift_rows[part]).mul_(_rows_of(row_scale, part))
            return torch.sub(fine[part.start], starts[part]).sign_().clamp_(min=0).sum(-1)

        fine: Dict[int, Tensor] = {}
        runs = _sparse_runs(chunks, torch.sub(groups, starts).sign_().clamp_(min=0).sum(-1), n, halves_above,
                            HALVES_BELOW if with_support is not None else UNLISTED_HALVES_BELOW)
    support = [] if with_support is not None else None
    spans = []  # the rows [first, stop) of every part of ``support``
    # grouped with a floor on the listed groups: the chunks listed from their output, with the rows their samples
    # chose, listed only once the floor is known to be reachable (after every chunk's search)
    deferred = grouped and support_groups_at_least > 0
    pending: list = []
    # grouped: which rows had their entries listed (a group is listed when all its rows are)
    listed_rows = torch.zeros(rows.size(0), dtype=torch.bool, device=x.device) if grouped else None
    # the searches that listed their support leave their output unwritten (``dense_listed``): (rows, entries)
    write = not (grouped and not dense_listed)
    unwritten: list = []
    for part, group, members in runs:
        if group:
            listed = None if support is None else []
            maxima = groups[part] if group == START_GROUP else torch.cat([fine[sub.start] for sub in members])
            searched = [(part, _gathered_unshifted(base_rows[part], shift_rows[part], _rows_of(row_scale, part),
                                                   fused_shift, starts[part], maxima, _rows_of(row_beta, part),
                                                   rows[part], listed, group, write=write))]
            if listed:
                support.append((listed[0][0] + part.start,) + listed[0][1:])
                spans.append((part.start, min(part.stop, rows.size(0))))
                if not write:
                    unwritten.append((part, listed[0]))
                if grouped:
                    listed_rows[part] = True
        else:
            # a general α's search on the entries above the start lists the chunk's support for free
            found = {sub.start: [] if support is not None else None for sub in members}
            searched = [(sub, _shifted_search(base_rows[sub], shift_rows[sub], _rows_of(row_scale, sub), fused_shift,
                                              _rows_of(starts, sub), _rows_of(groups, sub), _rows_of(row_beta, sub),
                                              rows[sub], found[sub.start], write=write))
                        for sub in members]
            for sub in members if support is not None else ():
                if found[sub.start]:
                    support.append((found[sub.start][0][0] + sub.start,) + found[sub.start][0][1:])
                    spans.append((sub.start, min(sub.stop, rows.size(0))))
                    if not write:
                        unwritten.append((sub, found[sub.start][0]))
                    if grouped:
                        listed_rows[sub] = True
                    continue
                if deferred:
                    chosen = _sampled_listing(rows[sub], with_support, support_rows, sub.start)
                    if chosen is not None:
                        pending.append((sub, chosen))
                    continue
                listed = _listed_support(rows[sub], with_support, support_rows if grouped else None, sub.start)
                if listed is None:
                    if grouped:
                        continue
                    support = None
                    break
                support.append((listed[0] + sub.start, listed[1]))
                spans.append((sub.start, min(sub.stop, rows.size(0))))
                if grouped:
                    listed_rows[sub] |= listed[2]
        for sub, (tau, total) in searched:
            stats[sub, 1:2] = tau
            stats[sub, 2:3] = total.reciprocal_()
    # rows without entries are zeros already ([-inf - τ]_+ = 0, divided by the smallest float); their scale is 0
    stats[:, 2:3].mul_(has_entries.reshape(-1, 1))
    out = rows.view(x.shape), stats.view(x.shape[:-1] + (3,))
    if with_support is None:
        return out
    if deferred:
        possible = listed_rows.clone()
        for sub, chosen in pending:
            possible[sub] |= chosen
        if int(possible.view(-1, support_rows).all(dim=1).sum()) < support_groups_at_least * (
                possible.numel() // support_rows):
            _write_listed(rows, unwritten, None, support_rows)
            return out + (None,)
        for sub, chosen in pending:
            row_of, col_of = _listed_rows(rows[sub], chosen)
            support.append((row_of + sub.start, col_of))
            spans.append((sub.start, min(sub.stop, rows.size(0))))
            listed_rows[sub] |= chosen
        # the parts in row order, as they are joined
        order = sorted(range(len(spans)), key=lambda i: spans[i][0])
        support, spans = [support[i] for i in order], [spans[i] for i in order]
    if support is not None:
        most = with_support * support_rows * n if grouped else None
        if grouped:  # the groups over their budget dropped before their entries are joined and counted again
            support = _parts_within_budget(support, spans, listed_rows, support_rows, most)
        values = None
        if not write:  # the probabilities at the entries: the searches' own, the written rows' read back
            values = torch.cat([part[2] if len(part) > 2 else take_entries(rows, part[0], part[1])
                                for part in support]) if support else rows.new_zeros(0)
        support = tuple(torch.cat([part[i] for part in support]) for i in range(2)) if support else (
            torch.zeros(0, dtype=torch.long, device=x.device),) * 2
        if grouped:
            found = _listed_groups(support, listed_rows, support_rows, most, values)
            if not write:
                if found is not None and int(found[2].sum()) < support_groups_at_least * found[2].numel():
                    found = None
                _write_listed(rows, unwritten, None if found is None else found[2], support_rows)
            return out + (found,)
        if support[0].numel() > with_support * x.numel():
            support = None
    return out + (support,)


def _parts_within_budget(parts: list, spans: list, listed_rows: Tensor, group_rows: int, most: float) -> list:
    """The support's parts ``(rows, columns)``, listed for the rows ``[first, stop)`` of ``spans``, without those of
    the groups of ``group_rows`` rows that hold more than ``most`` entries (their rows unmarked in ``listed_rows``):
    a general α's search lists every chunk's support, which for a head keeping a fifth of its keys was joined and
    counted only to be dropped. A part within one group counts by its size, one across groups by its rows."""
    counts: Dict[int, int] = {}
    owners = []
    for (first, stop), (rows, *_) in zip(spans, parts):
        if first // group_rows == (stop - 1) // group_rows:
            owners.append(first // group_rows)
            counts[owners[-1]] = counts.get(owners[-1], 0) + rows.numel()
        else:
            owners.append(None)
            per_group = torch.bincount(torch.div(rows, group_rows, rounding_mode="floor"))
            for g, c in enumerate(per_group.tolist()):
                counts[g] = counts.get(g, 0) + c
    over = {g for g, c in counts.items() if c > most}
    if not over:
        return parts
    for g in over:
        listed_rows[g * group_rows:(g + 1) * group_rows] = False
    # a part across groups is kept whole (:func:`_listed_groups` drops the entries of its unlisted groups)
    return [part for g, part in zip(owners, parts) if g is None or g not in over]


def _listed_groups(support: Tuple[Tensor, Tensor], listed_rows: Tensor, group_rows: int,
                   most: float, values: Optional[Tensor] = None) -> Optional[Tuple[Tensor, ...]]:
    """The entries of the groups of ``group_rows`` consecutive rows whose rows were all listed and that hold at
    most ``most`` entries, and which groups those are (and ``values``, the entries' probabilities, if given,
    kept alike); None when none is."""
    row_of, col_of = support
    group_of = torch.div(row_of, group_rows, rounding_mode="floor")
    counts = torch.bincount(group_of, minlength=listed_rows.numel() // group_rows)
    listed = listed_rows.view(-1, group_rows).all(dim=1) & (counts <= most)
    if not bool(listed.any()):
        return None
    if not bool(listed.all()):
        keep = listed.index_select(0, group_of)
        row_of, col_of = row_of[keep], col_of[keep]
        values = None if values is None else values[keep]
    return (row_of, col_of, listed) if values is None else (row_of, col_of, listed, values)


def _write_listed(rows: Tensor, unwritten: list, listed: Optional[Tensor], group_rows: int) -> None:
    """Write into ``rows`` (R, n) the output that searches left unwritten (``unwritten``: (rows slice, (rows,
    columns, values) of its positive entries, rows counted within the slice)) for every row outside the groups
    ``listed`` ((groups,) bool, or None: every row): zeros and the entries."""
    for part, (row_of, col_of, values) in unwritten:
        out = rows[part]
        if listed is None:
            put_entries(out.zero_(), row_of, col_of, values)
            continue
        first = part.start
        group_of = torch.div(torch.arange(first, first + out.size(0), device=rows.device), group_rows,
                             rounding_mode="floor")
        missing = ~listed.index_select(0, group_of)
        if not bool(missing.any()):
            continue
        put_entries(out.index_fill_(0, missing.nonzero().view(-1), 0.0), row_of[missing.index_select(0, row_of)],
                    col_of[missing.index_select(0, row_of)], values[missing.index_select(0, row_of)])


def _listed_support(p: Tensor, limit: float, group_rows: Optional[int] = None, first_row: int = 0):
    """(rows, columns) of the positive entries of probabilities ``p`` (R, n), or None when every 16th column says
    they are more than ``limit`` of the entries (not worth listing). Listed through the groups holding any
    where those are few (:func:`_entries_above`). ``group_rows``: the rows form groups of this many, counted from
    row 0 of the whole of which ``p`` starts at row ``first_row`` (a chunk may hold parts of groups), each part
    judged on its own sample: ``(rows, columns, listed)`` with ``listed`` (R,) the rows of the parts whose entries
    are listed; None when none is."""
    sample = p[:, ::16] > 0
    if group_rows is None:
        if int(sample.sum()) > limit * sample.numel():
            return None
        groups = _group_maxima(p, START_GROUP) if p.size(-1) % START_GROUP == 0 else None
        return _entries_above(p, p.new_zeros(p.size(0), 1), groups)
    listed = _sampled_listing(p, limit, group_rows, first_row, sample)
    if listed is None:
        return None
    return _listed_rows(p, listed) + (listed,)


def _sampled_listing(p: Tensor, limit: float, group_rows: int, first_row: int = 0,
                     sample: Optional[Tensor] = None) -> Optional[Tensor]:
    """Which rows of probabilities ``p`` (R, n) :func:`_listed_support` lists with ``group_rows``: (R,) bool, the
    rows of the parts of groups whose every 16th column holds at most ``limit`` of their entries; None when none
    does. ``sample``: ``p[:, ::16] > 0`` if the caller has it."""
    if sample is None:
        sample = p[:, ::16] > 0
    group_of = torch.div(torch.arange(p.size(0), device=p.device) + first_row % group_rows, group_rows,
                         rounding_mode="floor")
    counts = torch.zeros(int(group_of[-1]) + 1, dtype=torch.long, device=p.device).index_add_(
        0, group_of, sample.sum(dim=1))
    listed = (counts <= limit * sample.size(1) * torch.bincount(group_of)).index_select(0, group_of)
    return listed if bool(listed.any()) else None


def _listed_rows(p: Tensor, listed: Tensor) -> Tuple[Tensor, Tensor]:
    """(rows, columns) of the positive entries of the rows ``listed`` ((R,) bool) of ``p`` (R, n), rows counted
    over ``p``, in row order."""
    chosen = None if bool(listed.all()) else listed.nonzero().view(-1)
    part = p if chosen is None else p.index_select(0, chosen)
    groups = _group_maxima(part, START_GROUP) if part.size(-1) % START_GROUP == 0 else None
    row_of, col_of = _entries_above(part, part.new_zeros(part.size(0), 1), groups)
    if chosen is not None:
        row_of = chosen.index_select(0, row_of)
    return row_of, col_of


def _rows_of(value, part: slice):
    """The rows ``part`` of a per-row tensor (R, ...); a float or None as it is."""
    return value if value is None or isinstance(value, float) else value[part]


def _sparse_runs(chunks, chosen_per_row: Tensor, n: int,
                 halves_above: Optional[Callable[[slice], Tensor]] = None, halves_below: Optional[float] = None):
    """``(rows, group, chunks)``: the row ``chunks`` (equal slices, the last one possibly reaching past the rows)
    merged into runs of consecutive ones searched alike, each with the chunks it covers: through their groups of
    ``group`` entries above the start (sparse), or shifted as a whole (``group`` 0). A chunk is sparse when its
    groups above the start (``chosen_per_row`` of each row, groups of :data:`START_GROUP`) hold less than
    :data:`SCAN_GROUPS_BELOW` of its entries and none of its rows has more than :data:`GATHER_BELOW` of its entries
    in them (so no row can be too wide to gather: a chunk with a dense row, a head of α near 1 beside sparse ones,
    is shifted and judged as a whole, where a row too wide refuses it before anything is listed); failing that, on
    the same terms through its groups of :data:`FINE_GROUP`, whose count per row ``halves_above(chunk)`` gives (if
    given; called for those chunks only), when they hold less than ``halves_below`` of its entries. A run of sparse
    chunks stops before its rows times its widest row's chosen entries would pass :data:`RUN_ELEMENTS`."""
    halves_below = HALVES_BELOW if halves_below is None else halves_below
    size = chunks[0].stop - chunks[0].start
    counts = torch.zeros(len(chunks) * size, dtype=chosen_per_row.dtype, device=chosen_per_row.device)
    counts[: chosen_per_row.numel()] = chosen_per_row
    counts = counts.view(len(chunks), size)
    totals, widest = counts.sum(1).tolist(), counts.amax(1).tolist()

    def sparse(total: int, wide: int, rows: int, group: int, share: float = SCAN_GROUPS_BELOW) -> bool:
        return total * group < share * rows * n and wide * group <= GATHER_BELOW * n

    runs, run_wide = [], 0
    for part, total, wide in zip(chunks, totals, widest):
        rows = min(part.stop, chosen_per_row.numel()) - part.start
        group = START_GROUP if sparse(total, wide, rows, START_GROUP) else 0
        # the halves asked for where their share predicted from the groups' passes (see HALVES_BELOW)
        share = total * START_GROUP / max(1, rows * n)
        if (not group and halves_above is not None and rows > 0 and total > 0
                and share * (0.5 + 0.25 * share) < halves_below and wide * START_GROUP <= 2 * GATHER_BELOW * n):
            fine = halves_above(slice(part.start, part.start + rows))
            total, wide = int(fine.sum()), int(fine.max())
            group = FINE_GROUP if sparse(total, wide, rows, FINE_GROUP, halves_below) else 0
        wide *= group  # entries of the widest row's chosen groups
        if runs and runs[-1][1] == group and (not group or (
                runs[-1][0].stop - runs[-1][0].start + rows) * max(run_wide, wide) <= RUN_ELEMENTS):
            runs[-1] = (slice(runs[-1][0].start, part.stop), group, runs[-1][2] + [part])
            run_wide = max(run_wide, wide)
        else:
            runs.append((part, group, [part]))
            run_wide = wide
    return runs


def _shifted_search(x: Tensor, shift: Tensor, scale: Union[float, Tensor], fused: bool, start: Optional[Tensor],
                    groups: Optional[Tensor], beta: Union[float, Tensor], out: Tensor,
                    support: Optional[list] = None, write: bool = True) -> Tuple[Tensor, Tensor]:
    """The search on a chunk of rows ``x`` shifted as a whole into ``out`` (:func:`_shift_scores`), the output
    written there; returns (τ, the sums divided by). ``support``: a list to which the output's support is added
    when the search ran on the listed entries above the start (which hold it), left empty otherwise; ``write``:
    see :func:`_search_listed` (the output is written whenever the support is not listed)."""
    n = x.size(-1)
    chunk = _shift_scores(x, shift, scale, fused, out=out)
    powered = not (isinstance(beta, float) and beta in (1.0, 2.0))
    # a search with powers on a chunk most of whose entries are above the start (or -1): the group maxima bound
    # τ poorly there, the mean well; on the others, one on the entries above the start pays for gathering them.
    # Not for 1.5-entmax: the mean's start took its forward from 33.3 to 36.2 ms at scale 0.1 (5 -> 4 steps per
    # row, each costing about what the start's passes do), and the sampled check sparsemax's up by 4%
    shares = _sampled_shares(chunk, -1.0 if start is None else start) if powered else (0.0, 0.0)
    dense = shares[0] > DENSE_ABOVE
    if powered and out.device.type in GATHER_DEVICES and start is not None and not dense and not _too_wide(*shares, n):
        found = _gathered_threshold(chunk, beta, start, groups, sampled=True, support=support, write=write)
        if found is not None:
            return found
    if dense:
        start = _mean_start(chunk, beta, start)
    tau, powers, totals = _newton_threshold(chunk, beta, start)
    return tau, _normalise(chunk, tau, powers, totals, beta)


def entmax_from_stats(x: Tensor, alpha: Union[float, Tensor], mask: Optional[Tensor], stats: Tensor,
                      with_support: bool = False):
    """The probabilities :func:`entmax_with_stats` gave for the same ``x``, rebuilt from its row statistics
    without a threshold search; equal to them up to rounding. ``with_support``: returns ``(p, support)``, where
    ``support`` is ``p ^ (2 - α)`` on the support when it falls out of the rebuild for free (1.5-entmax: the
    clamped values before their square, which spares backward a square root) and None otherwise.

    ``[(α-1)(x - shift) - τ]_+ ^ β * scale`` is taken as ``[m x - b]_+ ^ β`` with ``r = scale^(α-1)``,
    ``m = (α-1) r`` and ``b = ((α-1) shift + τ) r`` per row (``r >= 0``): one fused multiply-add, a clamp and the
    power (a fill for masked entries), where the plain formula took seven passes."""
    alpha = _in_compute_dtype(x, alpha)
    alpha_minus_one = alpha - 1
    compute = _compute_dtype(x.dtype)
    shift, tau, scale = (stats[..., i:i + 1] for i in range(3))
    r = scale if isinstance(alpha, float) and alpha == 2.0 else scale.pow(alpha_minus_one)
    slope = r * alpha_minus_one
    offset = torch.addcmul(tau, shift, torch.as_tensor(alpha_minus_one, dtype=compute)).mul_(r)
    u = torch.addcmul(offset.neg_(), x.to(compute), slope).clamp_(min=0)
    if mask is not None:
        u.masked_fill_(mask, 0.0)
    support = None
    if isinstance(alpha, float) and alpha == 1.5:
        if with_support:
            support, u = u, u.square()
        else:
            u.square_()
    elif not (isinstance(alpha, float) and alpha == 2.0):
        nonnegative_power(u, 1 / alpha_minus_one, out=u)
    return (u, support) if with_support else u


def _per_row(value: Union[float, Tensor], shape) -> Union[float, Tensor]:
    """A float as it is; a tensor broadcast against the rows of ``shape`` as one value per row, (R, 1)."""
    return value if isinstance(value, float) else value.expand(tuple(shape[:-1]) + (1,)).reshape(-1, 1)


def _normalise(u: Tensor, tau: Tensor, powers: Optional[Tensor], totals: Optional[Tensor],
               beta: Union[float, Tensor]) -> Tensor:
    """Overwrite ``u`` (ours to overwrite) with ``[u - τ]_+ ^ β`` normalised to sum to one
    along the last dim (from ``powers`` and their row sums ``totals`` if the search has them); returns the sums
    it divided by."""
    tiny = torch.finfo(u.dtype).tiny
    if powers is not None:
        # τ is exact up to rounding; dividing by the powers' own sums removes the last ulps (rows without entries:
        # 0 / tiny = 0)
        total = totals.clamp(min=tiny)
        if isinstance(beta, float) and beta == 2.0:  # the search kept d, not d^2: (d / sqrt(total))^2
            torch.div(powers, total.sqrt(), out=u).square_()
        else:
            torch.div(powers, total, out=u)
        return total
    u.sub_(tau).clamp_(min=0)
    if isinstance(beta, float) and beta == 2.0:
        u.square_()
    elif not (isinstance(beta, float) and beta == 1.0):
        u.pow_(beta)
    total = u.sum(-1, keepdim=True).clamp_(min=tiny)
    u.div_(total)
    return total


def _support_weights(p: Tensor, alpha: Union[float, Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """``s = p^(2-α)`` on the support and 0 elsewhere (a new tensor): the Jacobian of α-entmax is
    ``diag(s) - s sᵀ / sum(s)``; and, for α other than 1.5 and 2, the ``log2 p`` (p clamped to the smallest
    normal float; a new tensor) it took ``s`` from, which α's gradient needs too (else None)."""
    if isinstance(alpha, float) and alpha == 2.0:
        return torch.sign(p), None  # p >= 0: the support indicator
    if isinstance(alpha, float) and alpha == 1.5:
        # sqrt(p) as p / sqrt(p) with exact zeros off the support (0 * 1/sqrt(tiny) = 0): sqrt on zeros takes a slow
        # path (4.6x its time on positive numbers, AVX-512), and the reciprocal root of p clamped to the smallest
        # normal float, times p, took 0.62x the clamp, root, sign and product this replaced (a (64, 4096) chunk
        # of 1.5-entmax probabilities, 98% zeros)
        return p.clamp(min=torch.finfo(p.dtype).tiny).rsqrt_().mul_(p), None
    # p^(2-α) as exp2((2-α) log2 p), zeroed off the support: on the AMD EPYC (torch 2.13, one thread, a (128,
    # 4096) float32 chunk) ``exp2`` takes 68 us where ``exp`` takes 307 and ``torch.pow`` 816 (``log2`` 404, ``log``
    # 382). The clamp is to the smallest *normal* float: ``log2`` of zeros takes 8x as long (3.6 ms), xlogy or a
    # denormal clamp run slow paths too. The forward's powers stay ``torch.pow``: there most entries are 0, whose
    # exponent underflows, and ``exp2`` of underflowing numbers is as slow as the power
    log_p = p.clamp(min=torch.finfo(p.dtype).tiny).log2_()
    s = torch.mul(log_p, 2 - alpha).exp2_()
    if bool(torch.as_tensor(alpha > 2).any()):  # off the support exp2(+large) may be inf: set, not multiplied
        s.masked_fill_(p <= 0, 0.0)
    else:
        s.mul_(torch.sign(p))
    return s, log_p


class _Entmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, mask):
        p = _entmax_forward(x, alpha, mask)
        ctx.alpha_is_tensor = isinstance(alpha, Tensor)
        # saving p itself shares memory with the attention's p @ v, which keeps p for its own backward
        ctx.save_for_backward(p, alpha if ctx.alpha_is_tensor else None)
        ctx.alpha_value = None if ctx.alpha_is_tensor else alpha
        ctx.input_dtype = x.dtype
        return p.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_p):
        p, alpha_t = ctx.saved_tensors
        alpha = alpha_t if ctx.alpha_is_tensor else float(ctx.alpha_value)
        grad_x, grad_alpha_rows = entmax_backward(p, grad_p, alpha,
                                                  with_alpha=ctx.alpha_is_tensor and ctx.needs_input_grad[1])
        grad_alpha = None
        if grad_alpha_rows is not None:
            grad_alpha = grad_alpha_rows.sum_to_size(alpha_t.shape).to(alpha_t.dtype)
        return grad_x.to(ctx.input_dtype), grad_alpha, None


def entmax_backward(p: Tensor, grad_p: Tensor, alpha: Union[float, Tensor], with_alpha: bool = False,
                    support: Optional[Tensor] = None):
    """The α-entmax Jacobian-vector product for probabilities ``p`` (..., n) (float32/float64) and their gradient
    ``grad_p``: the scores' gradient (shaped like ``p``, in its dtype) and, ``with_alpha``, each row's part of α's
    gradient (..., 1) (summing it over α's broadcast dims is the caller's); otherwise None. ``support``: ``p ^
    (2 - α)`` on the support and 0 elsewhere if the caller has it (:func:`entmax_from_stats`)."""
    if isinstance(alpha, Tensor):
        alpha = alpha.to(p.dtype)
    if p.numel() == 0:  # no rows, or rows without entries
        return torch.zeros_like(p), p.new_zeros(p.shape[:-1] + (1,)) if with_alpha else None
    n = p.size(-1)
    p_rows, grad_rows = p.reshape(-1, n), grad_p.to(p.dtype).reshape(-1, n)
    row_alpha = _per_row(alpha, p.shape)
    grad_x = torch.empty_like(p_rows)
    grad_alpha_rows = p.new_empty(p_rows.size(0), 1) if with_alpha else None
    support_rows = None if support is None else support.reshape(-1, n)
    for rows in _row_chunks(p_rows, BACKWARD_ROW_CHUNK_ELEMENTS):  # a chunk's rows stay in cache
        alpha_part = row_alpha if isinstance(row_alpha, float) else row_alpha[rows]
        _backward_rows(p_rows[rows], grad_rows[rows], alpha_part, grad_x[rows],
                       None if grad_alpha_rows is None else grad_alpha_rows[rows],
                       None if support_rows is None else support_rows[rows])
    return grad_x.view(p.shape), None if grad_alpha_rows is None else grad_alpha_rows.view(p.shape[:-1] + (1,))


def _backward_rows(p: Tensor, grad: Tensor, alpha: Union[float, Tensor], grad_x: Tensor,
                   grad_alpha: Optional[Tensor], support: Optional[Tensor] = None) -> None:
    """The entmax Jacobian-vector product for rows ``p`` (R, n) and ``grad`` (R, n), written into ``grad_x``, and
    each row's part of α's gradient into ``grad_alpha`` (R, 1) when given (α a float or (R, 1)). ``support``:
    the rows' :func:`_support_weights` if the caller has them."""
    if support is None and p.device.type in GATHER_DEVICES and not (isinstance(alpha, float) and alpha in (1.5, 2.0)):
        found = _sparse_support(p)
        if found is not None:
            _sparse_backward_rows(p, grad, alpha, grad_x, grad_alpha, found)
            return
    # a general α's s comes from log p, which α's gradient reuses: a power would take its own logarithm and
    # exponential (0.80-0.82x the backward of one α per head from 1.1 to 1.9, ``python -m benchmarks.entmax_search``)
    s, log2_p = (support, None) if support is not None else _support_weights(p, alpha)
    s_sum = s.sum(-1, keepdim=True).clamp_(min=torch.finfo(p.dtype).tiny)
    # row dots are a product and a sum: torch.linalg.vecdot takes 2-4x as long on CPU for these shapes
    torch.mul(s, grad, out=grad_x)  # s * grad, then minus s * <grad, s> / sum(s) below
    gs_sum = grad_x.sum(-1, keepdim=True)
    if grad_alpha is not None:
        # Proposition 1 of Correia et al. (2019): dp/dα = (p - p̃)/(α-1)² - (p log p - p̃ Σ p log p)/(α-1)
        # with the skewed distribution p̃ = s / Σ s, reduced against grad row by row; p log p is 0 where p = 0,
        # and ln 2 p log2 p (the factor taken on the row sums)
        if log2_p is None:
            log2_p = p.clamp(min=torch.finfo(p.dtype).tiny).log2_()
        p_log_p = log2_p.mul_(p)
        p_log_p_sum = p_log_p.sum(-1, keepdim=True).mul_(_LN2)
        scratch = p_log_p  # its last use is the first product below
        g_p_log_p = torch.mul(grad, p_log_p, out=scratch).sum(-1, keepdim=True).mul_(_LN2)
        g_p = torch.mul(grad, p, out=scratch).sum(-1, keepdim=True)
        grad_alpha.copy_(_alpha_gradient(alpha, g_p, g_p_log_p, p_log_p_sum, gs_sum / s_sum,
                                         p.sum(-1, keepdim=True)))
    grad_x.addcmul_(s, gs_sum.div_(s_sum).neg_())


def _alpha_gradient(alpha: Union[float, Tensor], g_p: Tensor, g_p_log_p: Tensor, p_log_p_sum: Tensor,
                    g_skewed: Tensor, total: Tensor) -> Tensor:
    """Each row's part of α's gradient from its sums ``<grad, p>``, ``<grad, p log p>``, ``Σ p log p`` and
    ``<grad, p̃>`` (p̃ = s / Σ s): Proposition 1 of Correia et al. (2019), dp/dα = (p - p̃)/(α-1)² -
    (p log p - p̃ Σ p log p)/(α-1), reduced against grad, taken for the probabilities divided by their row sums
    ``total`` (``Σ p``; p̃ does not change).

    The first term is the difference of two nearly equal distributions over (α-1)², so a row whose ``p`` sums to
    1 + δ adds about δ / (α-1)² of error. Probabilities rebuilt from row statistics (the blocked attention's
    backward, :func:`entmax_from_stats`) sum to 1 only within about 6e-6 in float32, as their power 1/(α-1)
    scales the rounding of its base: near α = 1 their α-gradient was up to 27x further from float64's than the
    plain computation's, and is no further once normalised here (one sum over each row;
    ``tests/ops/test_entmax_attention.py::test_alpha_gradient_near_one_is_as_accurate_as_the_plain_computation``)."""
    total = torch.where(total > 0, total, torch.ones_like(total))  # rows without entries: all their sums are 0
    log_total = total.log()
    g_p = g_p / total
    g_p_log_p = (g_p_log_p / total).sub_(g_p * log_total)
    p_log_p_sum = (p_log_p_sum / total).sub_(log_total)
    am1 = alpha - 1
    return (g_p - g_skewed) / am1**2 - (g_p_log_p - g_skewed * p_log_p_sum) / am1


def _sparse_support(rows: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
    """(row, column) indices of the positive entries of ``rows`` (R, n), when they are at most
    :data:`SUPPORT_BELOW` of its entries, judged on every 16th column (a sixteenth of the cost of counting all:
    counting refused chunks made the backward of dense rows slower); else None."""
    sample = rows[:, ::16]
    if int((sample > 0).sum()) > SUPPORT_BELOW * sample.numel():
        return None
    # found through the groups holding any (:func:`_entries_above`): a support of a few keys per row lies in a
    # few of its groups, and a pass for their maxima costs a third of comparing and listing every entry
    groups = _group_maxima(rows, START_GROUP) if rows.size(-1) % START_GROUP == 0 else None
    return _entries_above(rows, rows.new_zeros(rows.size(0), 1), groups)


def _sparse_backward_rows(p: Tensor, grad: Tensor, alpha: Union[float, Tensor], grad_x: Tensor,
                          grad_alpha: Optional[Tensor], support: Tuple[Tensor, Tensor]) -> None:
    """:func:`_backward_rows` on the gathered support ``(rows, columns)`` of ``p`` only: off it ``s``, ``p`` and
    ``p log p`` are 0, so are the gradient and every term of the row sums."""
    row_of, col_of = support
    grad_s = support_backward(take_entries(p, row_of, col_of), take_entries(grad, row_of, col_of), alpha, row_of,
                              p.size(0), grad_alpha)
    put_entries(grad_x.zero_(), row_of, col_of, grad_s)


def support_backward(p_s: Tensor, g_s: Tensor, alpha: Union[float, Tensor], row_of: Tensor, rows: int,
                     grad_alpha: Optional[Tensor] = None) -> Tensor:
    """The entmax Jacobian-vector product on the support alone: the positive probabilities ``p_s`` (k,) of ``rows``
    rows, each entry's row in ``row_of`` (k,), and their gradient ``g_s`` (k,) (which it overwrites) -> the scores'
    gradient at those entries (k,); off the support it is 0. With ``grad_alpha`` (rows, 1), each row's part of α's
    gradient is written there (α a float or one value per row, (rows, 1))."""

    def row_sums(values: Tensor) -> Tensor:
        return values.new_zeros(rows).index_add_(0, row_of, values).unsqueeze(-1)

    log2_p = p_s.log2()
    a_s = alpha if isinstance(alpha, float) else alpha.reshape(-1).index_select(0, row_of)
    s = torch.mul(log2_p, 2 - a_s).exp2_()
    s_sum = row_sums(s).clamp_(min=torch.finfo(p_s.dtype).tiny)
    gs_sum = row_sums(s * g_s)
    if grad_alpha is not None:
        p_log_p = log2_p.mul_(p_s)  # p log p / ln 2
        grad_alpha.copy_(_alpha_gradient(alpha, row_sums(g_s * p_s), row_sums(g_s * p_log_p).mul_(_LN2),
                                         row_sums(p_log_p).mul_(_LN2), gs_sum / s_sum, row_sums(p_s)))
    return g_s.sub_(gs_sum.div_(s_sum).view(-1).index_select(0, row_of)).mul_(s)


def _check_alpha_shape(x: Tensor, alpha: Tensor) -> None:
    if alpha.dim() > x.dim() or (alpha.dim() == x.dim() and alpha.size(-1) != 1):
        raise ValueError(
            f"alpha of shape {tuple(alpha.shape)} must broadcast against the rows of x {tuple(x.shape)} with size 1 "
            "along the normalised (last) dim, e.g. (1, H, 1, 1) for one alpha per head of (B, H, Lq, Lk) scores"
        )
    # α must broadcast *to* x's rows (an α wider than x failed later with an error about expanding); checked by
    # hand: ``torch.broadcast_shapes`` runs Python reference code, several calls' worth of a decoding step
    rows = x.shape[:-1] + (1,)
    if any(a != r and a != 1 for a, r in zip(reversed(alpha.shape), reversed(rows))):
        raise ValueError(f"alpha of shape {tuple(alpha.shape)} does not broadcast against x {tuple(x.shape)}")


def entmax(x: Tensor, alpha: Union[float, Tensor] = 1.5, dim: int = -1, mask: Optional[Tensor] = None) -> Tensor:
    """α-entmax of ``x`` along ``dim``.

    Args:
        x: scores of any float dtype (normalised in float32, or float64 for float64; returned in ``x.dtype``).
            ``-inf`` entries get probability 0; a row with no finite entry gives all zeros.
        alpha: a float > 1, or a tensor (broadcastable to ``x`` with size 1 along ``dim``) that may require grad.
        mask: optional bool tensor broadcastable to ``x``; True entries are left out (probability 0).
    """
    if not x.dtype.is_floating_point:
        raise TypeError(f"entmax expects floating-point scores, got {x.dtype}")
    moved = dim not in (-1, x.dim() - 1)
    if moved:
        x = x.movedim(dim, -1)
        mask = None if mask is None else mask.movedim(dim, -1)
        if isinstance(alpha, Tensor) and alpha.dim() == x.dim():
            alpha = alpha.movedim(dim, -1)
    if isinstance(alpha, Tensor):
        _check_alpha_shape(x, alpha)
    if torch.is_grad_enabled() and (x.requires_grad or isinstance(alpha, Tensor) and alpha.requires_grad):
        p = _Entmax.apply(x, alpha, mask)
    else:  # no graph to record (a decoding step): the autograd node's own cost is a tenth of a small call's
        p = _entmax_forward(x, alpha, mask).to(x.dtype)
    return p.movedim(-1, dim) if moved else p


def sparsemax(x: Tensor, dim: int = -1, mask: Optional[Tensor] = None) -> Tensor:
    """Sparsemax (α = 2): the Euclidean projection of ``x`` onto the simplex. See :func:`entmax`."""
    return entmax(x, 2.0, dim=dim, mask=mask)


def entmax15(x: Tensor, dim: int = -1, mask: Optional[Tensor] = None) -> Tensor:
    """1.5-entmax. See :func:`entmax`."""
    return entmax(x, 1.5, dim=dim, mask=mask)
