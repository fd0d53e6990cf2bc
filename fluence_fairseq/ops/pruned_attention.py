"""Softmax attention under a global keep mask whose pruned entries are never computed (data-informed attention
pruning, Rugina et al. 2020; the masks come from :mod:`fluence_fairseq.pruning.policy`).

``keep`` (H, Lq, Lk) is the same for every input: row ``(b, h, i)`` is a softmax over the keys ``j`` with
``keep[h, i, j]`` and not ``key_padding_mask[b, j]``; a row with no such key gives output 0, weights 0 and zero
gradients (not a uniform row, not NaN).

Two paths give the same numbers:

* dense: the full (Lq, Lk) problem under the mask as an additive bias (cached in the :class:`PrunedPlan`), through
  the CPU flash kernel (with ``is_causal`` as well when the mask lies in the causal triangle, so the kernel skips
  the blocks above the diagonal) or ``F.scaled_dot_product_attention``; explicit scores and softmax for
  ``need_weights``. On the CPU a long padded batch goes through the kernel item by item, each on its unpadded
  keys (:func:`_dense_per_item`), rather than with its padding in a (B, H, Lq, Lk) bias. Used for
  ``need_weights``, for sequences that fit in one block, and wherever it is cheaper;
* block-sparse: queries are cut into blocks of ``q_block`` and keys into blocks of ``block``; a (head, query block,
  key block) triple is *kept* when any of its entries is kept (pruned entries inside a kept block are masked
  exactly by the bias). Only kept triples are computed. Rows (head, query block) keep different numbers of key
  blocks (heads differ a lot under a per-layer threshold), so rows are grouped into *buckets* by that count (exact
  for counts up to 8, then rounded up to a geometric grid of ratio 1.25: at most 25% padding, a handful of
  buckets). A bucket of ``n`` rows with ``c`` key blocks is one dense attention problem: queries
  (B, n, q_block, D), its rows' key and value blocks gathered into (B, n, c * block, D), the element mask as an
  additive (n, q_block, c * block) bias, solved by the fused flash kernel (buckets with many rows in row chunks of
  at most :data:`_CHUNK_ELEMENTS` gathered keys, which bounds the transient memory). Rows whose kept keys lie in
  a window that moves with the diagonal (the bands data-informed masks are mostly made of) are taken out of the
  buckets where that is cheaper: a *band* of consecutive query blocks of one head reads its keys and values as
  overlapping strided views of the keys and its queries as a slice, so nothing is gathered (:class:`_Band`;
  on an Intel Xeon the 90% masks' block-sparse step took 0.83-0.87x the time of buckets alone, paired with the
  old side always first, which alone read 0.92-0.94x); its window is a number of keys, not of key blocks (a band
  a few tokens wide computes a little more than a query block's keys, not three key blocks), wide bands merge
  consecutive rows into larger problems and a head's first and last rows share one window moved inside the keys
  (together 0.91-0.93x noncausal, 1.0x causal, paired in alternating order). Each
  bucket's output is written into its rows of one output buffer; queries with no kept key (and rows with no kept
  block) give 0. On CPU
  without dropout, :class:`_BucketsFlashCPU` calls the kernel's forward and backward directly and gathers the
  key/value blocks again in backward (a band's are views), so only the blocks of q, k and v (views of contiguous
  heads, forward's copies of strided ones) and the log-sum-exps are kept beyond the output itself; otherwise
  (dropout, other devices) autograd runs around ``F.scaled_dot_product_attention``.

Which path, and which query block, is a matter of cost (:class:`PrunedPlan`): the CPU flash kernel runs 32-query
problems at about half its dense speed per entry (one thread, L=1024, D=64) and 256-query ones within 10-15%, so
a coarser query block that keeps more entries can still be cheaper; the masked dense kernel costs about 1.2x the
unmasked one. How much each costs differs between CPUs (a data-informed 90% mask at 32x32 blocks took 0.27x dense
SDPA on an AMD EPYC and 0.61x on an Intel Xeon), so the modules' plans measure the candidates at their first call
and keep the fastest. ``python -m benchmarks.pruning`` reports the choice, the timings that made it, and the
resulting time and memory.

Earlier designs, measured on one CPU thread at L=1024, 4 heads, D=64, batch 2, a data-informed 90% mask, relative to
dense SDPA: a segmented softmax over all kept triples at once (``scatter_reduce`` row maxima, ``index_add`` row
sums, custom backward keeping the probabilities) 0.39-0.50x; buckets with autograd around SDPA 0.33-0.38x (40 MiB
peak vs 4.9 MiB for SDPA).
"""
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import FLASH_CPU, FLASH_CPU_BACKWARD, accumulation_dtype as _acc, cpu_flash_applies, cpu_flash_attention

#: rows keeping at most this many key blocks are bucketed by their exact count, longer ones on a geometric grid
_EXACT_COUNTS = 8
_GRID_RATIO = 1.25


def _bucket_cap(count: int, limit: int) -> int:
    """Key blocks of the bucket a row with ``count`` kept key blocks goes to (``count`` <= cap <= ``limit``)."""
    if count <= _EXACT_COUNTS:
        return count
    cap = float(_EXACT_COUNTS)
    while cap < count:
        cap *= _GRID_RATIO
    return min(limit, int(-(-cap // 1)))


class _Bucket:
    """Rows with the same number ``cap`` of (padded) key blocks: ``rows`` (n,) their ``head * q_blocks + query
    block``, ``cols`` (n * cap,) their key blocks as ``head * k_blocks + key block`` (padding slots repeat a real
    block and are masked), ``mask`` (n, q_block, cap * k_block) bool (True = kept), ``key_block`` (n * cap,) the key
    block index of every slot (for key padding). ``keys``: the keys each row's problem has (``cap * k_block``)."""

    #: row chunks may hold this many times :data:`_CHUNK_ELEMENTS` keys (a bucket gathers them)
    chunk_factor = 1

    def __init__(self, rows, cols, key_block, mask, cap):
        self.rows, self.cols, self.key_block, self.mask, self.cap = rows, cols, key_block, mask, cap
        self.items, self.keys = mask.size(0), mask.size(-1)  # problems (one per row here) and keys of each
        self.has_key = mask.any(dim=-1, keepdim=True)  # (n, q_block, 1): queries with a kept key
        self.all_have_keys = bool(self.has_key.all())
        self._bias: Dict[tuple, Tensor] = {}

    def bias(self, dtype) -> Tensor:
        """(n, q_block, keys) additive mask: 0 where kept, the most negative ``dtype`` value elsewhere."""
        key = (dtype, self.mask.device)
        if key not in self._bias:
            self._bias[key] = _additive(self.mask, dtype)
        return self._bias[key]

    def to(self, device) -> "_Bucket":
        return _Bucket(self.rows.to(device), self.cols.to(device), self.key_block.to(device), self.mask.to(device),
                       self.cap)

    def item_rows(self, lo: int, hi: int) -> Tensor:
        """The layout rows of items ``lo:hi`` (a bucket's items are its rows)."""
        return self.rows[lo:hi]

    def take(self, x: Tensor, lo: int, hi: int) -> Tensor:
        """Rows ``lo:hi`` of the bucket from a (B, H * q_blocks, q_block, D) tensor (gathered)."""
        return x.index_select(1, self.rows[lo:hi])

    def put_(self, x: Tensor, lo: int, hi: int, value: Tensor) -> None:
        """Write ``value`` (B, hi - lo, q_block, D) into the bucket's rows ``lo:hi`` of ``x``."""
        x.index_copy_(1, self.rows[lo:hi], value)

    def blocks(self, x: Tensor, lo: int, hi: int, gather: bool = True) -> Tensor:
        """The keys (or values) of rows ``lo:hi`` from the key blocks (B, H * k_blocks, k_block, D): (B, n, keys,
        D), gathered (a band's are a view unless ``gather``)."""
        bsz, _, b, head_dim = x.shape
        return x.index_select(1, self.cols[lo * self.cap : hi * self.cap]).view(bsz, hi - lo, self.cap * b, head_dim)

    def key_padding(self, pad: Tensor, lo: int, hi: int) -> Tensor:
        """(B, n, 1, keys) bool: which keys of rows ``lo:hi`` are padding, from ``pad`` (B, k_blocks, k_block)."""
        return pad.index_select(1, self.key_block[lo * self.cap : hi * self.cap]).view(pad.size(0), hi - lo, 1,
                                                                                         self.keys)

    def add_key_grads_(self, grad: Tensor, g: Tensor, lo: int, hi: int) -> None:
        """Add the key (or value) gradient ``g`` (B, n, keys, D) of rows ``lo:hi`` into ``grad`` (B, H * k_blocks,
        k_block, D) (a key block kept by several rows collects each row's part)."""
        bsz, _, b, head_dim = grad.shape
        grad.index_add_(1, self.cols[lo * self.cap : hi * self.cap], g.reshape(bsz, -1, b, head_dim))


class _Band(_Bucket):
    """Consecutive rows (query blocks ``first .. first + n - 1`` of one head) whose kept keys all lie in a window of
    ``width`` keys that moves with the diagonal: the diagonal bands data-informed masks are made of. The band is
    computed as *items* of ``merge`` consecutive rows (``q_block`` = merge x the layout's query block queries
    each), item ``i``'s window starting at key ``start + i * step`` of the head: ``step`` = ``q_block`` along the
    diagonal, 0 for a head's first (last) items, whose windows would reach before its first (after its last) key
    and are moved inside the keys, all to the same place. The window is in keys, not key blocks (a band of a few
    tokens around the diagonal computes a little more than a query block's keys, not three key blocks); merged
    rows make fewer, larger problems, which the CPU flash kernel runs faster per entry (wide bands). Its queries,
    outputs and gradients are slices and its keys and values *overlapping strided views* of the keys, so nothing
    is gathered (a bucket copies every key block once per row that keeps it, in forward and again in backward);
    its key gradients are added back ``step`` keys of every item at a time (strided views again, no index), or
    summed over the items where they share one window. ``mask`` (items, q_block, width)."""

    #: nothing gathered: a call's transient memory is the kernel's own key and value gradients, half a bucket's
    #: (its gathered keys and values besides) for as many keys
    chunk_factor = 2

    def __init__(self, rows, mask, head, start, q_block, head_keys, merge=1, step=None):
        items, width = mask.size(0), mask.size(-1)
        step = q_block if step is None else step
        if rows.numel() != items * merge or q_block % merge or step not in (0, q_block):
            raise ValueError(f"a band of {items} items of {merge} rows needs {items * merge} rows, got "
                             f"{rows.numel()}, a query block that is a multiple of {merge}, got {q_block}, and a "
                             f"step of 0 or the query block, got {step}")
        keys = (head * head_keys + start + step * torch.arange(items, device=rows.device)).unsqueeze(1)
        keys = (keys + torch.arange(width, device=rows.device)).flatten()  # every item's keys (for gathers)
        super().__init__(rows, keys, keys, mask, 1)
        self.head, self.start, self.q_block, self.head_keys = head, start, q_block, head_keys
        self.merge, self.step = merge, step
        self.first = int(rows[0])

    def to(self, device) -> "_Band":
        return _Band(self.rows.to(device), self.mask.to(device), self.head, self.start, self.q_block,
                     self.head_keys, self.merge, self.step)

    def item_rows(self, lo: int, hi: int) -> Tensor:
        return self.rows[lo * self.merge : hi * self.merge]

    def take(self, x: Tensor, lo: int, hi: int) -> Tensor:
        """Items ``lo:hi`` from (B, H * q_blocks, layout query block, D): (B, hi - lo, q_block, D), a view."""
        rows = x[:, self.first + lo * self.merge : self.first + hi * self.merge]
        return rows if self.merge == 1 else rows.reshape(x.size(0), hi - lo, self.q_block, x.size(-1))

    def put_(self, x: Tensor, lo: int, hi: int, value: Tensor) -> None:
        x[:, self.first + lo * self.merge : self.first + hi * self.merge] = value.reshape(
            x.size(0), (hi - lo) * self.merge, x.size(2), x.size(-1))

    def _window(self, x: Tensor, first: int, items: int, keys: int) -> Tensor:
        """``items`` windows of ``keys`` positions of ``x`` (B, positions, ...), the first starting at position
        ``first`` and each the band's ``step`` positions after the one before: (B, items, keys, ...), one strided
        view (windows overlap where ``keys`` > ``step``)."""
        stride = x.stride()
        return x.as_strided((x.size(0), items, keys) + tuple(x.shape[2:]),
                            (stride[0], self.step * stride[1]) + tuple(stride[1:]),
                            x.storage_offset() + first * stride[1])

    def _first(self, lo: int) -> int:
        """Position of item ``lo``'s first key among all heads' keys."""
        return self.head * self.head_keys + self.start + lo * self.step

    def blocks(self, x: Tensor, lo: int, hi: int, gather: bool = False) -> Tensor:
        bsz, _, b, head_dim = x.shape
        if gather or x.stride(1) != b * x.stride(2):  # asked to, or keys not evenly spaced (never from _to_blocks)
            keys = x.reshape(bsz, -1, head_dim).index_select(1, self.cols[lo * self.keys : hi * self.keys])
            return keys.view(bsz, hi - lo, self.keys, head_dim)
        return self._window(x.view(bsz, -1, head_dim), self._first(lo), hi - lo, self.keys)

    def key_padding(self, pad: Tensor, lo: int, hi: int) -> Tensor:
        flat = pad.reshape(pad.size(0), -1)  # (B, head_keys): the same for every head
        return self._window(flat, self.start + lo * self.step, hi - lo, self.keys).unsqueeze(2)

    def add_key_grads_(self, grad: Tensor, g: Tensor, lo: int, hi: int) -> None:
        bsz, _, b, head_dim = grad.shape
        flat = grad.view(bsz, -1, head_dim)
        if self.step == 0:  # one window for every item
            flat[:, self._first(lo) : self._first(lo) + self.keys] += g.sum(1)
            return
        # the windows' keys in runs of step: run j0 of every item lands on distinct keys (items step that many),
        # so each run is one strided view of the gradient, added without an index
        for j0 in range(0, self.keys, self.step):
            j1 = min(self.keys, j0 + self.step)
            self._window(flat, self._first(lo) + j0, hi - lo, j1 - j0).add_(g[:, :, j0:j1])


#: rows may be computed as :class:`_Band`\ s (strided windows, nothing gathered) where that is cheaper
_BANDS = True
#: a bucket row's cost per computed key block relative to a band row's (its keys and values are gathered in forward
#: and again in backward, its queries, outputs and gradients too)
_GATHER_COST = 1.25
#: window starts (and ends) tried per head: the rows' own first (last) kept keys relative to their first query,
#: spread over their distribution where there are more
_BAND_CANDIDATES = 24
#: band windows are whole multiples of this many keys, or of the key block if shorter (the CPU flash kernel ran
#: 48-key problems faster than 44-key ones, 144 faster than 138: its inner loops are vectorised in such multiples)
_WIDTH_MULTIPLE = 16
#: a band's fused call costs about as much as this many of its rows' blocks (its fixed work: the call, its
#: views and slices), and runs of fewer than :data:`_MIN_BAND_ROWS` rows stay in buckets (which group rows of
#: every head): otherwise a ragged band breaks into one call per row
_BAND_CALL_COST = 4.0
_MIN_BAND_ROWS = 2
#: the CPU flash kernel's time per computed entry of a problem of ``q`` queries is about ``1 + _ITEM_OVERHEAD / q``
#: (fixed work per problem: 20, 15.5 and 11 ns per entry for 32, 64 and 128 queries over 128-384 keys, one thread,
#: Intel Xeon), so a band may merge consecutive rows into items of up to :data:`_MAX_ITEM_QUERIES` queries: more
#: keys per item (the window grows by a query block per merged row) at a lower cost per entry
_ITEM_OVERHEAD = 48.0
_MAX_ITEM_QUERIES = 256


def _entry_cost(queries: int) -> float:
    """Relative time per computed entry of a fused problem of ``queries`` queries (see :data:`_ITEM_OVERHEAD`)."""
    return 1.0 + _ITEM_OVERHEAD / queries


def _candidates(values: Tensor, limit: int) -> Tensor:
    """Up to ``limit`` distinct values among ``values`` (1-d long): all of them, or where there are more, those at
    evenly spaced ranks of the sorted values (so that the candidates follow the values' distribution)."""
    ordered = values.sort().values
    if torch.unique(ordered).numel() <= limit:
        return torch.unique(ordered)
    ranks = torch.linspace(0, ordered.numel() - 1, limit, device=values.device).round().long()
    return torch.unique(ordered[ranks])


def _run_count(x: Tensor) -> Tensor:
    """Runs of True along the last dimension of ``x`` (bool)."""
    return (x & ~F.pad(x[..., :-1], (1, 0), value=False)).sum(-1)


def _runs(rows: List[int]) -> List[List[int]]:
    """Sorted ints -> maximal runs of consecutive ones."""
    runs: List[List[int]] = []
    for r in rows:
        if runs and runs[-1][-1] + 1 == r:
            runs[-1].append(r)
        else:
            runs.append([r])
    return runs


class BlockLayout:
    """Kept blocks of a keep mask (H, Lq, Lk) with query blocks of ``q_block`` and key blocks of ``k_block``.

    Attributes (tensors on ``keep.device``): ``heads``, ``tgt_len``, ``src_len``, ``q_block``, ``k_block``;
    ``q_blocks``, ``k_blocks`` (query / key blocks once the lengths are padded up to multiples of the block sizes);
    ``row`` (T,) long: ``head * q_blocks + query block`` of every kept triple, sorted; ``col`` (T,) long: its
    ``head * k_blocks + key block``; ``key_block`` (T,) long: its key block; ``mask`` (T, q_block, k_block) bool:
    the keep mask inside it (False on padding); ``counts`` (H * q_blocks,) long: kept key blocks per row; ``buckets``: the
    rows grouped by (rounded-up) count, what the block-sparse path computes; ``density``: kept triples / all
    triples (over heads); ``computed_density``: the same with the buckets' padding slots."""

    def __init__(self, heads, tgt_len, src_len, q_block, k_block, row, col, key_block, mask):
        self.heads, self.tgt_len, self.src_len = heads, tgt_len, src_len
        self.q_block, self.k_block = q_block, k_block
        self.q_blocks = -(-tgt_len // q_block)
        self.k_blocks = -(-src_len // k_block)
        self.row, self.col, self.key_block, self.mask = row, col, key_block, mask
        total = heads * self.q_blocks * self.k_blocks
        self.density = float(row.numel()) / total if total else 0.0
        self.counts = torch.bincount(row, minlength=heads * self.q_blocks)
        self.buckets = self._make_buckets()
        self.bucket_rows = (torch.cat([bk.rows for bk in self.buckets]) if self.buckets
                            else row.new_zeros(0))
        computed = sum(bk.rows.numel() * bk.keys for bk in self.buckets) / k_block
        self.computed_density = computed / total if total else 0.0

    def _make_buckets(self) -> List[_Bucket]:
        """The bands (:meth:`_make_bands`), then the other rows grouped by their (rounded-up) count."""
        counts, bq, bk = self.counts, self.q_block, self.k_block
        starts = torch.cumsum(counts, 0) - counts  # first triple of every row (triples are sorted by row)
        caps = torch.tensor([_bucket_cap(c, self.k_blocks) for c in counts.tolist()], dtype=torch.long,
                            device=counts.device)
        buckets: List[_Bucket] = self._make_bands(starts, caps) if _BANDS else []
        for band in buckets:
            caps[band.rows] = 0
        for cap in sorted(set(caps.tolist()) - {0}):
            rows = (caps == cap).nonzero().flatten()
            n, c = rows.numel(), counts[rows].unsqueeze(1)
            slot = torch.arange(cap, device=rows.device).unsqueeze(0)
            tri = starts[rows].unsqueeze(1) + torch.minimum(slot, c - 1)  # padding slots repeat the last block
            mask = self.mask[tri] & (slot < c).view(n, cap, 1, 1)  # (n, cap, bq, bk), padding slots masked
            mask = mask.permute(0, 2, 1, 3).reshape(n, bq, cap * bk)
            buckets.append(_Bucket(rows, self.col[tri].flatten(), self.key_block[tri].flatten(), mask, cap))
        return buckets

    def _make_bands(self, starts: Tensor, caps: Tensor) -> List["_Band"]:
        """Per head, the cheapest way to compute its rows as :class:`_Band`\ s instead of buckets: items of ``m``
        consecutive rows (``m`` = 1, 2, 4, ... up to :data:`_MAX_ITEM_QUERIES` queries, aligned at multiples of
        ``m``), each over the window of keys ``m q_block i + a .. m q_block i + a + width - 1``, for the runs of
        consecutive items whose rows' kept keys all lie in their window; windows that would reach before the
        head's first key (after its last) are moved inside, and those items share one window (a band of step 0)
        where that costs less than their buckets. Cost, in entries weighted by :func:`_entry_cost`: an item
        computes its queries times ``width``, a bucket row
        its queries times its cap's keys times :data:`_GATHER_COST`, and each run of items adds
        :data:`_BAND_CALL_COST` blocks; ``a`` and the window's end are tried among the items' own first and last
        kept keys relative to their first query (:func:`_candidates`), widths rounded up to
        :data:`_WIDTH_MULTIPLE` keys (or the key block)."""
        bq, bk, nq, nk = self.q_block, self.k_block, self.q_blocks, self.k_blocks
        if not self.triples:
            return []
        head_keys, multiple = nk * bk, min(_WIDTH_MULTIPLE, bk)
        counts = self.counts.view(self.heads, nq)
        has = counts > 0
        # a row's first kept key is in its first triple, its last in its last one (triples are sorted by key block)
        columns = self.mask.any(dim=1)  # (T, bk): the keys of each triple kept by any of its queries
        first_col = columns.to(torch.uint8).argmax(-1)
        last_col = bk - 1 - columns.flip(-1).to(torch.uint8).argmax(-1)
        t_first = starts.clamp_max(self.triples - 1)
        t_last = (starts + counts.flatten() - 1).clamp_min(0)
        first_key = (self.key_block[t_first] * bk + first_col[t_first]).view(self.heads, nq)
        last_key = (self.key_block[t_last] * bk + last_col[t_last]).view(self.heads, nq)
        row_cost = caps.view(self.heads, nq).to(torch.float64) * (bk * bq * _entry_cost(bq) * _GATHER_COST)
        call_cost = _BAND_CALL_COST * bk * bq * _entry_cost(bq)
        merges = [m for m in (1, 2, 4, 8, 16) if m == 1 or (m * bq <= _MAX_ITEM_QUERIES and m <= nq)]
        bands = []
        for h in range(self.heads):
            if not bool(has[h].any()):
                continue
            best = (float(row_cost[h].sum()), None)  # every row in buckets
            for m in merges:
                items = nq // m
                # an item's rows (its first m * items rows of the head; the rest stay in buckets)
                item_has = has[h, : items * m].view(items, m)
                lo = torch.where(item_has, first_key[h, : items * m].view(items, m), head_keys).amin(-1)
                hi = torch.where(item_has, last_key[h, : items * m].view(items, m), -1).amax(-1)
                real = item_has.any(-1)
                if not bool(real.any()):  # the head's kept rows all lie after its whole items: none to band
                    continue
                start = m * bq * torch.arange(items, device=counts.device)  # each item's first query
                rel_lo, rel_hi = lo - start, hi - start
                lo_c = _candidates(rel_lo[real], _BAND_CANDIDATES)
                hi_c = _candidates(rel_hi[real], _BAND_CANDIDATES)
                a = lo_c.view(-1, 1, 1)
                span = hi_c.view(1, -1, 1) - a + 1  # (a candidates, end candidates, 1)
                width = (span.clamp_min(1) + multiple - 1) // multiple * multiple
                # windows reaching before the head's first key (after its last) are moved inside: those items
                # share one window (a band of their own); a row fits when its kept keys lie in its window
                fits = real & (rel_lo >= a) & (rel_hi < a + width) & (width <= head_keys)
                before, after = (start + a < 0).expand_as(fits), start + a + width > head_keys
                item_cost = (width * (m * bq * _entry_cost(m * bq))).to(torch.float64)
                in_buckets = row_cost[h, : items * m].view(items, m).sum(-1)
                # an edge item's moved window may hold far more keys than its rows keep (a causal head's first
                # rows): it joins its band only where that is cheaper than buckets
                fits &= ~((before | after) & (item_cost >= in_buckets))
                cost = torch.where(fits, item_cost, in_buckets).sum(-1) + float(row_cost[h, items * m :].sum())
                calls = sum(_run_count(fits & part) for part in (before, after, ~before & ~after))  # one per run
                cost = (cost + call_cost * calls).masked_fill(span.squeeze(-1) <= 0, float("inf"))
                at = int(cost.argmin())
                if float(cost.flatten()[at]) < best[0]:
                    ia, ib = divmod(at, hi_c.numel())
                    a_best, w_best = int(lo_c[ia]), int(width[ia, ib])
                    best = (float(cost.flatten()[at]), (m, a_best, w_best, fits[ia, ib], before[ia, ib],
                                                        after[ia, ib]))
            if best[1] is None:
                continue
            m, a, width, fits, before, after = best[1]
            for part, step in ((fits & before, 0), (fits & ~before & ~after, m * bq), (fits & after, 0)):
                for run in _runs(part.nonzero().flatten().tolist()):
                    if len(run) * m < _MIN_BAND_ROWS:  # a lone row is a call of its own: it joins a bucket
                        continue
                    first = m * bq * run[0] + a
                    first = 0 if first < 0 else (head_keys - width if first + width > head_keys else first)
                    bands.append(self._band(h, run, m, first, width, step, starts))
        return bands

    def _band(self, head: int, items: List[int], merge: int, first: int, width: int, step: int,
              starts: Tensor) -> "_Band":
        """The :class:`_Band` of ``items`` (consecutive) of ``merge`` rows each of ``head``, over windows of
        ``width`` keys, the first item's starting at key ``first`` of the head, each next one ``step`` keys on."""
        bq, bk, nq, nk = self.q_block, self.k_block, self.q_blocks, self.k_blocks
        device = self.counts.device
        item = torch.tensor(items, dtype=torch.long, device=device)
        r = (merge * item.unsqueeze(1) + torch.arange(merge, device=device)).flatten()  # the rows, in order
        rows, n = head * nq + r, r.numel()
        window = (first + step * (item - items[0])).repeat_interleave(merge)  # each row's item's first key
        keys = window.unsqueeze(1) + torch.arange(width, device=device)  # (n, width), inside the head's keys
        # the triple of every (row, key block), -1 where the block is not kept
        table = torch.full((n, nk), -1, dtype=torch.long, device=device)
        c = self.counts[rows].unsqueeze(1)
        slot = torch.arange(max(1, int(c.max())), device=device).unsqueeze(0)
        which, j = (slot < c).nonzero(as_tuple=True)
        tri = starts[rows][which] + j
        table[which, self.key_block[tri]] = tri
        tri = table.gather(1, keys // bk)  # (n, width)
        # mask[r, i, w] = the triple's mask at query i and the key's column: read from the flat triple masks
        flat = (tri.clamp_min(0) * (bq * bk) + keys % bk).unsqueeze(1) + bk * torch.arange(bq, device=device).view(
            1, bq, 1)
        mask = self.mask.view(-1)[flat] & (tri >= 0).unsqueeze(1)  # (n, bq, width): rows of an item consecutive
        return _Band(rows, mask.view(len(items), merge * bq, width), head, first, merge * bq, nk * bk, merge, step)

    @classmethod
    def build(cls, keep: Tensor, block: int, q_block: Optional[int] = None) -> "BlockLayout":
        """The layout of ``keep`` with key blocks of ``block`` positions and query blocks of ``q_block``
        (default ``block``)."""
        if keep.dim() != 3 or keep.dtype != torch.bool:
            raise ValueError(f"keep must be a bool (heads, Lq, Lk) tensor, got {keep.dtype} {tuple(keep.shape)}")
        q_block = block if q_block is None else q_block
        if block < 1 or q_block < 1:
            raise ValueError(f"block sizes must be >= 1, got block={block}, q_block={q_block}")
        heads, tgt_len, src_len = keep.shape
        nq, nk = -(-tgt_len // q_block), -(-src_len // block)
        padded = F.pad(keep, (0, nk * block - src_len, 0, nq * q_block - tgt_len))  # pads with False
        blocks = padded.view(heads, nq, q_block, nk, block).transpose(2, 3)  # (H, nq, nk, bq, bk)
        kept = blocks.any(dim=-1).any(dim=-1)  # (H, nq, nk)
        h, qb, kb = kept.nonzero(as_tuple=True)  # row-major: sorted by (head, query block)
        return cls(heads, tgt_len, src_len, q_block, block, h * nq + qb, h * nk + kb, kb,
                   blocks[h, qb, kb].contiguous())

    @property
    def triples(self) -> int:
        return int(self.row.numel())

    def to(self, device) -> "BlockLayout":
        return BlockLayout(self.heads, self.tgt_len, self.src_len, self.q_block, self.k_block, self.row.to(device),
                           self.col.to(device), self.key_block.to(device), self.mask.to(device))

    def __repr__(self):
        return (f"BlockLayout(heads={self.heads}, tgt_len={self.tgt_len}, src_len={self.src_len}, "
                f"blocks={self.q_block}x{self.k_block}, triples={self.triples}, density={self.density:.3f}, "
                f"buckets={[(bk.keys, bk.rows.numel()) for bk in self.buckets]})")


def _check(q, k, v, keep, key_padding_mask):
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.size(3) != k.size(3):
        raise ValueError(f"q (B,H,Lq,D), k and v (B,H,Lk,D) expected, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    bsz, heads, tgt_len, _ = q.shape
    src_len = k.size(2)
    if keep.shape != (heads, tgt_len, src_len) or keep.dtype != torch.bool:
        raise ValueError(f"keep must be bool {(heads, tgt_len, src_len)}, got {keep.dtype} {tuple(keep.shape)}")
    if key_padding_mask is not None and key_padding_mask.shape != (bsz, src_len):
        raise ValueError(f"key_padding_mask must be {(bsz, src_len)}, got {tuple(key_padding_mask.shape)}")


def _allowed(keep, key_padding_mask, src_len):
    allowed = keep.unsqueeze(0)  # (1|B, H, Lq, Lk)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask.view(-1, 1, 1, src_len)
    return allowed


def _dense_weights(q, k, v, allowed, dropout_p):
    """Explicit scores and softmax under ``allowed``: (out, probabilities)."""
    acc = _acc(q.dtype)
    scores = torch.matmul(q * (q.size(-1) ** -0.5), k.transpose(-1, -2)).to(acc)
    scores = scores.masked_fill(~allowed, torch.finfo(acc).min)
    # rows with no allowed key would be uniform: zero them (and their gradients) instead
    probs = torch.softmax(scores, dim=-1).masked_fill(~allowed, 0.0).to(q.dtype)
    dropped = F.dropout(probs, p=dropout_p) if dropout_p > 0 else probs
    return torch.matmul(dropped, v), probs


def _dense_path(q, k, v, keep, key_padding_mask, dropout_p, need_weights, plan: Optional["PrunedPlan"] = None):
    """The full (Lq, Lk) problem under the mask (the reference computation); the additive mask is cached in
    ``plan``."""
    src_len = k.size(2)
    if need_weights:
        return _dense_weights(q, k, v, _allowed(keep, key_padding_mask, src_len), dropout_p)
    if plan is not None:
        bias, has_key = plan.dense_bias(q.dtype, q.device), plan.dense_has_key(q.device)
    else:
        bias, has_key = _additive(keep.unsqueeze(0), q.dtype), _rows_with_a_key(keep.unsqueeze(0))
    causal = plan is not None and plan.causal
    if key_padding_mask is not None and cpu_flash_applies(q, dropout_p) and keep.numel() >= PER_ITEM_FROM:
        return _dense_per_item(q, k, v, keep, key_padding_mask, bias, plan, has_key), None
    if key_padding_mask is not None:
        bias = bias.masked_fill(key_padding_mask.view(-1, 1, 1, src_len), torch.finfo(q.dtype).min)
        has_key = _rows_with_a_key(_allowed(keep, key_padding_mask, src_len))
    if cpu_flash_applies(q, dropout_p):
        # with ``is_causal`` when the mask lies in the causal triangle: the kernel then skips the blocks above the
        # diagonal (1.5x faster than the mask alone at L=1024)
        # rows without a key zeroed in the kernel's output: a zeroed copy held beside the output the kernel keeps
        # for backward took the random 90% causal mask's peak to 1.76x dense SDPA's (``make bench-pruning``)
        return cpu_flash_attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=causal, bias=bias,
                                   zero_rows=None if has_key is None else ~has_key), None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    return (out if has_key is None else out.masked_fill(~has_key, 0.0)), None


#: from this many entries per batch item (H x Lq x Lk) a padded batch's dense path runs item by item (see
#: :func:`_dense_per_item`); shorter problems keep one call with the padding in a (B, H, Lq, Lk) bias
PER_ITEM_FROM = 1 << 18


def _key_extent(keep: Tensor) -> Tuple[Tensor, Tensor]:
    """(first, last) (H, Lq): each query row's first and last kept key (Lk and -1 for a row without one)."""
    src_len = keep.size(-1)
    columns = torch.arange(src_len, device=keep.device)
    first = torch.where(keep, columns, src_len).amin(-1)
    last = torch.where(keep, columns, -1).amax(-1)
    return first, last


def _rows_with_a_key_in(keep: Tensor, lo: int, hi: int, extent: Callable[[], Tuple[Tensor, Tensor]],
                        whole: Optional[Tensor]) -> Optional[Tensor]:
    """(1, H, Lq, 1) bool of the rows of ``keep`` with a kept key among keys ``lo:hi``, None when all have one:
    ``whole`` (the same for all keys) for the whole span, from the rows' first and last kept keys (``extent()``)
    when the span reaches either end (a pass over the (H, Lq, n) mask took 7 ms at H=4, L=1024, a tenth of the
    step), else from the mask."""
    src_len = keep.size(-1)
    if lo == 0 and hi == src_len:
        return whole
    if lo == 0:
        rows = extent()[0] < hi
    elif hi == src_len:
        rows = extent()[1] >= lo
    else:
        rows = keep[:, :, lo:hi].any(-1)
    return None if bool(rows.all()) else rows.view(1, *rows.shape, 1)


def _dense_per_item(q, k, v, keep, key_padding_mask, bias, plan: Optional["PrunedPlan"], whole_has_key):
    """The dense path of a padded batch through the CPU flash kernel, one call per item: an item whose unpadded
    keys are one run (fairseq pads on one side) takes only those keys, with the shared (1, H, Lq, Lk) bias sliced
    to them, so neither the padded keys' scores nor a (B, H, Lq, Lk) bias with the padding in it are made (at
    L=1024, B=2, H=4 with 128 keys of one item padded, such a bias took 1.28-1.37x the unpadded step and 32 MiB,
    item by item 1.03-1.08x: ``python -m benchmarks.pruning --padding``); other items get a bias of their own with
    their padding in it. ``causal`` stays exact with keys sliced from ``lo > 0``:
    the kernel's own causal mask then covers a subset of the future entries the bias already masks, and every
    block it skips lies beyond each of its queries' last allowed key. ``whole_has_key``: the rows with a kept key
    among all keys (None if all have one)."""
    causal = plan is not None and plan.causal
    found: List[Tuple[Tensor, Tensor]] = []

    def extent():  # the rows' first and last kept keys: found once per call without a plan, kept by a plan
        if not found:
            found.append(plan.key_extent(q.device) if plan is not None else _key_extent(keep.to(q.device)))
        return found[0]

    outs = []
    for b in range(q.size(0)):
        valid = ~key_padding_mask[b]
        where = valid.nonzero().view(-1)
        if where.numel() == 0:  # every key padded: output 0, no gradient
            outs.append(q[b : b + 1] * 0.0)
            continue
        lo, hi = int(where[0]), int(where[-1]) + 1
        if hi - lo == where.numel():
            has_key = _rows_with_a_key_in(keep, lo, hi, extent, whole_has_key)
            item_bias = bias[..., lo:hi]
            kb, vb = k[b : b + 1, :, lo:hi], v[b : b + 1, :, lo:hi]
        else:
            has_key = _rows_with_a_key((keep & valid).unsqueeze(0))
            item_bias = bias.masked_fill(~valid, torch.finfo(q.dtype).min)
            kb, vb = k[b : b + 1], v[b : b + 1]
        outs.append(cpu_flash_attention(q[b : b + 1].contiguous(), kb.contiguous(), vb.contiguous(),
                                        causal=causal, bias=item_bias,
                                        zero_rows=None if has_key is None else ~has_key))
    return torch.cat(outs)


def _rows_with_a_key(allowed: Tensor) -> Optional[Tensor]:
    """(..., Lq, 1) bool of the query rows with an allowed key; None when every row has one."""
    has_key = allowed.any(dim=-1, keepdim=True)
    return None if bool(has_key.all()) else has_key


def _additive(allowed: Tensor, dtype) -> Tensor:
    """0 where allowed, the most negative ``dtype`` value elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


#: gathered key (and value) elements per fused call: a bucket with more rows is split into row chunks, which bounds
#: the transient memory (0.5 MiB per float32 tensor) whatever the length and density; 4x this cost no measurable time
#: at L=1024 and cut the peak from 3.3x to 1.3x dense SDPA
_CHUNK_ELEMENTS = 1 << 17


def _to_blocks(x: Tensor, n: int, b: int) -> Tensor:
    """(B, H, L, D) -> (B, H * n, b, D), zero padded (a view when L is a multiple of b)."""
    bsz, heads, length, head_dim = x.shape
    if n * b != length:
        x = F.pad(x, (0, 0, 0, n * b - length))
    return x.reshape(bsz, heads * n, b, head_dim)


def _chunks(layout: BlockLayout, bsz: int, head_dim: int):
    """(bucket, first item, end item) of every fused call, in the order of ``layout.bucket_rows`` (a bucket's items
    are its rows, a band's its items of merged rows)."""
    for bucket in layout.buckets:
        n = bucket.items
        step = max(1, _CHUNK_ELEMENTS * bucket.chunk_factor // (bsz * bucket.keys * head_dim))
        for lo in range(0, n, step):
            yield bucket, lo, min(n, lo + step)


def _bucket_problem(bucket: _Bucket, lo: int, hi: int, kp: Tensor, vp: Tensor, pad: Optional[Tensor], dtype,
                    gather: bool = False):
    """Keys and values (B, n, keys, D), additive mask (1|B, n, b, keys) and queries-with-a-key mask (None if all
    have one) of rows ``lo:hi`` of a bucket. The keys and values of a band are views of ``kp`` and ``vp`` unless
    ``gather`` (for autograd, whose backward of overlapping views is slow)."""
    kb, vb = bucket.blocks(kp, lo, hi, gather=gather), bucket.blocks(vp, lo, hi, gather=gather)
    bias = bucket.bias(dtype)[lo:hi].unsqueeze(0)
    has_key = None if bucket.all_have_keys else bucket.has_key[lo:hi]
    if pad is not None:
        padded = bucket.key_padding(pad, lo, hi)  # (B, n, 1, keys)
        bias = bias.masked_fill(padded, torch.finfo(dtype).min)  # (B, n, b, keys)
        has_key = (bucket.mask[lo:hi] & ~padded).any(dim=-1, keepdim=True)
        has_key = None if bool(has_key.all()) else has_key
    return kb, vb, bias, has_key


def _output(layout: BlockLayout, like: Tensor) -> Tensor:
    """(B, H * q_blocks, q_block, D) output buffer the buckets are written into; rows in no bucket stay 0."""
    bsz, _, _, head_dim = like.shape
    shape = (bsz, layout.heads * layout.q_blocks, layout.q_block, head_dim)
    if layout.bucket_rows.numel() < layout.heads * layout.q_blocks:
        return like.new_zeros(shape)
    return like.new_empty(shape)


def _rows_first(q: Tensor, k: Tensor, v: Tensor, bias: Tensor):
    """A bucket's problem with the kernel's batch and head dims swapped: rows as the batch, the real batch as heads
    (views). The kernel's key and value gradients are transposed views of (batch, keys, heads, D) buffers; with the
    rows as the batch, a row's key blocks stay adjacent in them, so the gradients reshape to (B, n * cap, b, D)
    without a copy."""
    return q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), bias.transpose(0, 1)


class _BucketsFlashCPU(torch.autograd.Function):
    """The buckets through the CPU flash kernel with a backward that gathers the key/value blocks again: autograd
    around ``F.scaled_dot_product_attention`` would keep every bucket's gathered keys, values and mask alive
    until backward (each kept key block once per row that keeps it: 8x the memory of dense SDPA at L=1024, 90%
    pruning); here only the blocks of q, k and v (views of contiguous heads, forward's one copy of strided ones),
    the bucket outputs and the log-sum-exps are kept."""

    @staticmethod
    def forward(ctx, q, k, v, layout, pad):
        bq, bk, nq, nk = layout.q_block, layout.k_block, layout.q_blocks, layout.k_blocks
        qp, kp, vp = _to_blocks(q, nq, bq), _to_blocks(k, nk, bk), _to_blocks(v, nk, bk)
        out, lses = _output(layout, q), []
        for bucket, lo, hi in _chunks(layout, q.size(0), q.size(3)):
            kb, vb, bias, has_key = _bucket_problem(bucket, lo, hi, kp, vp, pad, q.dtype)
            q_r, k_r, v_r, bias_r = _rows_first(bucket.take(qp, lo, hi), kb, vb, bias)
            o, lse = FLASH_CPU(q_r, k_r, v_r, attn_mask=bias_r)
            o = o.transpose(0, 1)
            lses.append(lse)
            bucket.put_(out, lo, hi, o if has_key is None else o.masked_fill(~has_key, 0.0))
        # backward reads the outputs back from ``out`` (the returned tensor's storage: no copy is kept); rows with
        # no key are 0 there, which is harmless as their incoming gradient is zeroed. The blocks of q, k and v are
        # kept rather than the inputs: views of them for contiguous heads, and for strided heads (an attention
        # module's views of (L, B, H, D) memory) the copies forward made, which backward would make again
        ctx.save_for_backward(qp, kp, vp, pad, out, *lses)
        ctx.layout, ctx.shapes = layout, (tuple(q.shape), k.size(2))
        return out.view(q.size(0), q.size(1), nq * bq, q.size(3))[:, :, : q.size(2)]

    @staticmethod
    def backward(ctx, grad_out):
        qp, kp, vp, pad, out, *lses = ctx.saved_tensors
        layout = ctx.layout
        (bsz, heads, tgt_len, head_dim), src_len = ctx.shapes
        bq, bk, nq, nk = layout.q_block, layout.k_block, layout.q_blocks, layout.k_blocks
        # contiguous once: every bucket gathers rows of it, and index_select copies a strided input whole at each
        # call (an expanded gradient, from a sum straight over the output, stays a strided view through the
        # reshape: 0.47x -> 0.44x dense at 90% noncausal in that case; a permuted one is copied by the reshape)
        go = _to_blocks(grad_out.contiguous(), nq, bq)
        # a (head, query block) row lies in one bucket at most: its query gradient is written once, not added
        grad_q = _output(layout, qp)
        grad_k, grad_v = torch.zeros_like(kp), torch.zeros_like(vp)
        for (bucket, lo, hi), lse in zip(_chunks(layout, bsz, head_dim), lses):
            kb, vb, bias, has_key = _bucket_problem(bucket, lo, hi, kp, vp, pad, qp.dtype)
            o = bucket.take(out, lo, hi)
            gob = bucket.take(go, lo, hi)
            if has_key is not None:
                gob = gob.masked_fill(~has_key, 0.0)
            q_r, k_r, v_r, bias_r = _rows_first(bucket.take(qp, lo, hi), kb, vb, bias)
            gq, gk, gv = FLASH_CPU_BACKWARD(gob.transpose(0, 1), q_r, k_r, v_r, o.transpose(0, 1), lse, 0.0, False,
                                            attn_mask=bias_r)
            del kb, vb, q_r, k_r, v_r
            bucket.put_(grad_q, lo, hi, gq.transpose(0, 1))
            bucket.add_key_grads_(grad_k, gk.transpose(0, 1), lo, hi)
            bucket.add_key_grads_(grad_v, gv.transpose(0, 1), lo, hi)

        def unblock(x, n, b, length):
            return x.view(bsz, heads, n * b, head_dim)[:, :, :length]

        return (unblock(grad_q, nq, bq, tgt_len), unblock(grad_k, nk, bk, src_len), unblock(grad_v, nk, bk, src_len),
                None, None)


def _sparse_path(q, k, v, layout: BlockLayout, key_padding_mask, dropout_p, lean: Optional[bool] = None):
    """One fused attention per bucket of rows (see the module docstring). ``lean`` (default: on CPU without
    dropout) takes :class:`_BucketsFlashCPU`, else autograd around ``F.scaled_dot_product_attention``."""
    if layout.mask.device != q.device:
        layout = layout.to(q.device)
    bsz, heads, tgt_len, head_dim = q.shape
    src_len = k.size(2)
    bq, bk, nq, nk = layout.q_block, layout.k_block, layout.q_blocks, layout.k_blocks
    if not layout.buckets:  # every entry pruned
        return q * 0.0
    pad = None
    if key_padding_mask is not None:
        pad = F.pad(key_padding_mask, (0, nk * bk - src_len), value=True).view(bsz, nk, bk)
    if lean is None:
        lean = cpu_flash_applies(q, dropout_p)
    if lean:
        return _BucketsFlashCPU.apply(q, k, v, layout, pad)
    qp, kp, vp = _to_blocks(q, nq, bq), _to_blocks(k, nk, bk), _to_blocks(v, nk, bk)
    out = _output(layout, q)
    for bucket, lo, hi in _chunks(layout, bsz, head_dim):
        rows = bucket.item_rows(lo, hi)
        kb, vb, bias, has_key = _bucket_problem(bucket, lo, hi, kp, vp, pad, q.dtype, gather=True)
        o = F.scaled_dot_product_attention(bucket.take(qp, lo, hi), kb, vb, attn_mask=bias, dropout_p=dropout_p)
        # queries with no kept key would average every masked key: 0 instead (and no gradient)
        o = o if has_key is None else o.masked_fill(~has_key, 0.0)
        out = out.index_copy(1, rows, o.reshape(bsz, rows.numel(), bq, head_dim))
    return out.view(bsz, heads, nq * bq, head_dim)[:, :, :tgt_len]


#: a block layout whose round-robin median is this much below the dense path's is taken at once
_CLEAR = 0.15
#: a layout faster than dense by less than :data:`_CLEAR` is timed again against it in this many pairs (the order
#: alternating) and taken when the median of the pairs' ratios is at least :data:`_MARGIN` below 1. A plain margin
#: of 10% on three round-robin rounds (on an AMD EPYC, an older kernel, a layout measured 8-12% faster ran 5-7%
#: slower in the benchmark's loop) left the causal 50% mask of ``make bench-pruning`` on the dense path at 1.17x
#: dense SDPA on an Intel Xeon, where its 128x32 layout measured 0.92x the dense path's time; confirmed in pairs
#: (0.94x), it is taken now (1.08x dense SDPA)
_CONFIRM_PAIRS = 7
_MARGIN = 0.05

#: query blocks the planner considers, as multiples of the key block: the CPU flash kernel runs short query blocks
#: at a fraction of its dense speed (32 queries: about half; 256: within 10-15%), so coarser query blocks often win
#: although they keep more entries
Q_BLOCK_FACTORS = (1, 2, 4, 8)


def _predicted_cost(layout: Optional[BlockLayout], dense_elements: float) -> float:
    """Static estimate of a path's time as a multiple of the *unmasked* dense kernel's: per computed element, the
    masked dense kernel costs about 1.2x and a bucket of ``bq``-query blocks about ``1.1 + 25 / bq`` (fitted on one
    CPU thread at L=1024, D=64; errors up to about 30%, hence the measured choice, see :class:`PrunedPlan`)."""
    if layout is None:
        return 1.2
    total = layout.heads * layout.q_blocks * layout.k_blocks * layout.q_block * layout.k_block
    return layout.computed_density * total * (1.1 + 25.0 / layout.q_block) / dense_elements


def _causal_elements(heads: int, length: int, split: int = 256) -> float:
    """Entries the flash kernel computes with ``is_causal`` (whole key splits up to each query split's end)."""
    return heads * sum(min(length, i + split) * min(split, length - i) for i in range(0, length, split))


class PrunedPlan:
    """How :func:`pruned_attention` computes one keep mask (H, Lq, Lk): candidate block layouts (key blocks of
    ``block``, query blocks of ``block`` times :data:`Q_BLOCK_FACTORS`), the cached additive mask of the dense path,
    and the chosen path.

    The choice is by cost, never by a density threshold. ``tune=False``: the static estimate of
    :func:`_predicted_cost`. ``tune=True`` (what the attention modules use; they keep one plan per mask and length):
    the candidates within 1.5x of the best estimate, and always the dense path, are each run once to warm up and
    then three times round-robin (forward+backward when gradients are on, detached copies of the call's inputs, no
    random numbers drawn) at the first call of each (device, dtype, head dim, grad mode); the lowest median wins if
    it is dense or :data:`_CLEAR` below dense's, a layout closer to dense only if alternating pairs with dense
    confirm it at least :data:`_MARGIN` faster. So on any machine the block-sparse path is taken only where it
    measured faster than dense. ``choice(...)`` gives ``(path, layout, reason)``; ``decisions`` keeps every choice
    with its reason and timings (the benchmark prints them)."""

    def __init__(self, keep: Tensor, block: int = 32, *, tune: bool = False,
                 layouts: Optional[List[BlockLayout]] = None):
        heads, tgt_len, src_len = keep.shape
        self.keep, self.block, self.tune = keep, block, tune
        self.causal = tgt_len == src_len and not bool(torch.triu(keep, diagonal=1).any())
        self.dense_elements = (_causal_elements(heads, tgt_len) if self.causal
                               else float(heads * tgt_len * src_len))
        if layouts is None:
            layouts = []
            for factor in Q_BLOCK_FACTORS:
                q_block = block * factor
                if factor > 1 and q_block >= 2 * tgt_len:
                    break
                layouts.append(BlockLayout.build(keep, block, q_block))
        self.layouts = layouts
        self.decisions: Dict[tuple, Tuple[str, Optional[BlockLayout], str]] = {}
        self._bias: Dict[tuple, Tensor] = {}
        self._has_key: Dict[object, Optional[Tensor]] = {}
        self._extent: Dict[object, Tuple[Tensor, Tensor]] = {}

    def dense_bias(self, dtype, device) -> Tensor:
        """(1, H, Lq, Lk) additive mask of the dense path (built once per dtype and device)."""
        key = (dtype, torch.device(device))
        if key not in self._bias:
            self._bias[key] = _additive(self.keep.to(device).unsqueeze(0), dtype)
        return self._bias[key]

    def dense_has_key(self, device) -> Optional[Tensor]:
        """(1, H, Lq, 1) rows of the mask with a kept key, None when all have one (found once per device)."""
        device = torch.device(device)
        if device not in self._has_key:
            self._has_key[device] = _rows_with_a_key(self.keep.to(device).unsqueeze(0))
        return self._has_key[device]

    def key_extent(self, device) -> Tuple[Tensor, Tensor]:
        """Each query row's first and last kept key (H, Lq) (found once per device): which rows of a padded item
        keep a key (:func:`_dense_per_item`)."""
        device = torch.device(device)
        if device not in self._extent:
            self._extent[device] = _key_extent(self.keep.to(device))
        return self._extent[device]

    def estimates(self) -> List[Tuple[Optional[BlockLayout], float]]:
        """(layout or None for dense, predicted cost) of every candidate, cheapest first."""
        out = [(None, _predicted_cost(None, self.dense_elements))]
        out += [(lay, _predicted_cost(lay, self.dense_elements)) for lay in self.layouts if lay.buckets]
        return sorted(out, key=lambda c: c[1])

    def choice(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], dropout_p: float):
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        key = (q.device.type, q.dtype, q.size(-1), grad)
        if key not in self.decisions:
            self.decisions[key] = self._decide(q, k, v, key_padding_mask, grad)
            self._release_unchosen()
        return self.decisions[key]

    def _release_unchosen(self):
        """Drop the cached additive masks of the paths no decision took (timing filled them; the dense one alone
        is H * Lq * Lk values)."""
        chosen = [layout for _, layout, _ in self.decisions.values()]
        if all(layout is not None for layout in chosen):
            self._bias.clear()
        for layout in self.layouts:
            if all(layout is not c for c in chosen):
                for bucket in layout.buckets:
                    bucket._bias.clear()

    def cached_bytes(self) -> int:
        """Bytes this plan keeps between calls: its layouts' masks, the cached additive masks and key extents."""
        total = self.keep.numel() + sum(t.numel() * t.element_size() for t in self._bias.values())
        total += sum(t.numel() * t.element_size() for pair in self._extent.values() for t in pair)
        for layout in self.layouts:
            total += layout.mask.numel() + sum(bucket.mask.numel() for bucket in layout.buckets)
            total += sum(t.numel() * t.element_size() for bucket in layout.buckets for t in bucket._bias.values())
        return total

    def _decide(self, q, k, v, key_padding_mask, grad):
        ranked = self.estimates()
        best = ranked[0][1]
        shown = ", ".join(f"{_label(lay)} {cost:.2f}" for lay, cost in ranked)
        if not self.tune:
            layout = ranked[0][0]
            return _path(layout), layout, f"estimated cost vs unmasked dense: {shown}"
        trials = [lay for lay, cost in ranked if cost <= 1.5 * best or lay is None]
        times = self._time(trials, q, k, v, key_padding_mask, grad)
        timings = {_label(lay): (lay, ms) for lay, ms in zip(trials, times)}
        dense_ms = timings["dense"][1]
        layout, ms = min(timings.values(), key=lambda item: item[1])
        confirmed = ""
        if layout is not None and ms > (1 - _CLEAR) * dense_ms:
            ratio = self._paired_ratio(layout, q, k, v, key_padding_mask, grad)
            confirmed = f"; {_label(layout)} / dense in {_CONFIRM_PAIRS} pairs: {ratio:.3f}"
            if ratio > 1 - _MARGIN:
                layout = None
        measured = ", ".join(f"{name} {t:.2f} ms" for name, (_, t) in timings.items())
        return _path(layout), layout, (f"measured ({'fwd+bwd' if grad else 'fwd'}, B={q.size(0)}): {measured}"
                                        f"{confirmed}; estimated: {shown}")

    def _time(self, layouts, q, k, v, key_padding_mask, grad, rounds: int = 3) -> List[float]:
        """Median milliseconds of each candidate (None: dense), after one warm-up each, timed round-robin (round
        r of every candidate, then round r + 1) so that a change of load hits them alike."""
        timed = self._timed_run(q, k, v, key_padding_mask, grad)
        for layout in layouts:
            timed(layout)
        times = [[] for _ in layouts]
        for _ in range(rounds):
            for layout, series in zip(layouts, times):
                series.append(timed(layout))
        return [statistics.median(series) for series in times]

    def _paired_ratio(self, layout, q, k, v, key_padding_mask, grad) -> float:
        """The median over :data:`_CONFIRM_PAIRS` pairs of ``layout``'s time over the dense path's, each pair run
        back to back, which side first alternating (the second of two runs is often a few percent faster)."""
        timed = self._timed_run(q, k, v, key_padding_mask, grad)
        ratios = []
        for i in range(_CONFIRM_PAIRS):
            if i % 2 == 0:
                sparse_ms, dense_ms = timed(layout), timed(None)
            else:
                dense_ms, sparse_ms = timed(None), timed(layout)
            ratios.append(sparse_ms / dense_ms)
        return statistics.median(ratios)

    def _timed_run(self, q, k, v, key_padding_mask, grad):
        """A function of a candidate (None: dense) that runs it once on detached copies of the inputs and returns
        its milliseconds."""
        def run(layout):
            with torch.enable_grad() if grad else torch.no_grad():
                inputs = [x.detach().requires_grad_(grad) for x in (q, k, v)]
                if layout is None:
                    out = _dense_path(*inputs, self.keep.to(q.device), key_padding_mask, 0.0, False, self)[0]
                else:
                    out = _sparse_path(*inputs, layout, key_padding_mask, 0.0)
                if grad:
                    out.backward(torch.ones_like(out))

        def synchronize():
            if q.device.type == "cuda":
                torch.cuda.synchronize(q.device)

        def timed(layout) -> float:
            synchronize()
            started = time.perf_counter()
            run(layout)
            synchronize()
            return (time.perf_counter() - started) * 1e3

        return timed


def _label(layout: Optional[BlockLayout]) -> str:
    return "dense" if layout is None else f"block-sparse {layout.q_block}x{layout.k_block}"


def _path(layout: Optional[BlockLayout]) -> str:
    return "dense" if layout is None else "block-sparse"


def choose_path(tgt_len: int, src_len: int, plan: Optional[PrunedPlan], *, need_weights: bool = False,
                block: int = 32) -> str:
    """``"dense"`` or ``"block-sparse"``: the path :func:`pruned_attention` takes with the static estimate
    (``plan=None``: no plan)."""
    if need_weights or plan is None or (tgt_len <= block and src_len <= block):
        return "dense"
    return _path(plan.estimates()[0][0])


def pruned_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    keep: Tensor,
    *,
    key_padding_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    plan: Optional[PrunedPlan] = None,
    layout: Optional[BlockLayout] = None,
    block: int = 32,
    path: str = "auto",
) -> Tuple[Tensor, Optional[Tensor]]:
    """Softmax attention restricted to a global keep mask.

    Args:
        q: (B, H, Lq, D) queries, unscaled (scaled by ``D ** -0.5`` here); k, v: (B, H, Lk, D).
        keep: bool (H, Lq, Lk), True = the entry is computed; shared by the batch.
        key_padding_mask: bool (B, Lk), True = padding.
        dropout_p: dropout on the probabilities, as ``F.dropout`` (only applied when > 0: callers pass 0 in eval).
        need_weights: also return the (B, H, Lq, Lk) probabilities (dense path).
        plan: the :class:`PrunedPlan` of ``keep`` (callers cache it per length, with ``tune=True``); built here
            (static estimate) when None.
        layout: a :class:`BlockLayout` of ``keep`` to use as the only block-sparse candidate (tests, benchmarks).
        block: key block size when the plan is built here (else the plan's).
        path: ``"auto"`` (by cost), or force ``"dense"`` / ``"block-sparse"``.

    Returns (out (B, H, Lq, D), weights (B, H, Lq, Lk) or None). A row with no kept, unpadded key gives output 0,
    weights 0 and zero gradients.
    """
    _check(q, k, v, keep, key_padding_mask)
    if path not in ("auto", "dense", "block-sparse"):
        raise ValueError(f"path must be 'auto', 'dense' or 'block-sparse', got {path!r}")
    bsz, heads, tgt_len, _ = q.shape
    src_len = k.size(2)
    block = plan.block if plan is not None else block
    for lay in ([layout] if layout is not None else []) + (plan.layouts if plan is not None else []):
        if (lay.heads, lay.tgt_len, lay.src_len) != (heads, tgt_len, src_len):
            raise ValueError(f"layout is for (heads, Lq, Lk) = {(lay.heads, lay.tgt_len, lay.src_len)}, "
                             f"inputs are {(heads, tgt_len, src_len)}")
    short = tgt_len <= block and src_len <= block
    if need_weights or path == "dense" or (short and path == "auto"):
        return _dense_path(q, k, v, keep, key_padding_mask, dropout_p, need_weights, plan)
    if plan is None:
        plan = PrunedPlan(keep, block, layouts=None if layout is None else [layout])
    if path == "block-sparse":
        chosen = layout if layout is not None else min(plan.layouts, key=lambda lay: _predicted_cost(lay, 1.0))
    else:
        chosen = plan.choice(q, k, v, key_padding_mask, dropout_p)[1]
    if chosen is None:
        return _dense_path(q, k, v, keep, key_padding_mask, dropout_p, False, plan)
    return _sparse_path(q, k, v, chosen, key_padding_mask, dropout_p), None
