"""α-entmax attention in query blocks that keeps no (Lq, Lk) tensor for backward, or only what sparse rows need.

``out = entmax_α(q k^T / sqrt(D)) v`` with a causal and a key-padding mask, computed a block of queries at a time.
The autograd graph of the plain computation keeps every block's probabilities (B, H, Lq, Lk) for backward: 512 MiB
at L=4096 with 8 heads, 2 GiB at 8192. Here forward keeps only q, k, v and three numbers per query row (the row's
shift, its threshold τ and its normaliser; :func:`~fluence_fairseq.ops.entmax.entmax_with_stats`), and backward
recomputes each block's scores (one more product) and rebuilds its probabilities from those numbers in a few
elementwise passes, without the threshold search; or, with ``keep_probabilities`` (passes short enough to afford
the memory), keeps each block's probabilities as the plain computation does. Transient memory is one block's
scores, probabilities and their gradients.

On the CPU, each (batch, head) pair of a block whose support is at most
:data:`SPARSE_BACKWARD_BELOW` of its entries keeps the support instead (two int32 per entry), found while the
forward searched its thresholds (:func:`~fluence_fairseq.ops.entmax.entmax_with_stats` with ``support_rows``),
and takes ``p @ v`` and its whole backward on it with sparse (CSR) kernels: the entries' scores and the output's
gradient at them as sampled products, the Jacobian on the entries, the query gradient as one sparse product per
block and the key and value gradients as one transposed product for the whole pass
(:func:`_support_block_backward`, :class:`_Flat`). Pairs of the same block that keep more (a head of α near 1
beside sparse ones) run the dense computation apart (:func:`_dense_pairs_backward`). Gradients flow to q, k, v,
a per-head α (Correia et al. 2019, Proposition 1, as in :mod:`fluence_fairseq.ops.entmax`) and, with
``need_weights``, through the returned head-averaged weights.

Attention dropout zeroes probabilities with a mask drawn block by block from a generator seeded with ``seed`` plus
the block's index, and backward draws the same masks again, so they are never kept either; a block on its support
draws one number for each entry of its sparse pairs and, after them, the masks of its dense pairs' rows
(:func:`_support_dropout`), not one for each of its probabilities. A fixed relative bias
(ALiBi: ``rel_bias(query - key offsets) -> (H, rows, keys)``, no gradient of its own) is added to each block's
scores in both directions. No additive mask: callers take the plain computation for that.
"""
import warnings
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .common import dropout_keep_mask, query_block_scores
from .entmax import (GATHER_DEVICES, START_GROUP, entmax_backward, entmax_from_stats, entmax_with_stats,
                     nonnegative_power, support_backward)

__all__ = ["blocked_entmax_attention", "lists_support"]

#: a (batch, head) pair of a block whose support is at most this share of its entries keeps the support (two
#: int32 per entry: half a byte per entry of the pair at most) instead of its probabilities, and takes ``p @ v``
#: and its backward on it alone (:func:`_support_block_backward`, sparse kernels). The weight-free step of
#: (1, 8, 2048, 64) blocks against the dense path (``python -m benchmarks.entmax_support --below 0.5``, AMD EPYC,
#: one thread): 1.5-entmax keeping 3.0% / 8.7% / 30% of its entries 0.59x / 0.93x / 2.20x, sparsemax at 2.6%
#: 0.60x; with the default weights at L=4096 (noncausal, a random α per head from 1.15 to 1.81, heads keeping
#: 0.3-24% and one 99.7%) 1/16 took 0.844x the plain pass, 1/8 0.866x, 1/4 1.012x, 1/64 0.866x
SPARSE_BACKWARD_BELOW = 1 / 16
#: a block works on the support of its sparse pairs and on its other pairs apart (copies of their rows of q, k, v
#: and p) only when those are at most this share of its pairs; with more, the block stays dense. α-entmax's
#: weight-free step of 512-token causal blocks (batch 4, a random α per head: 4-8 of 32 pairs sparse in 3 of 8
#: blocks) took 1.076x the plain pass with every such block split, 0.996x with none
MIXED_DENSE_AT_MOST = 1 / 2


def _kept(p: Tensor, dropout_p: float, seed: int, block: int) -> Tensor:
    """The dropout of block ``block``: 1 / (1 - dropout_p) where a probability is kept, 0 where dropped (the same
    numbers whenever it is drawn again with the same seed)."""
    return dropout_keep_mask(p.shape, dropout_p, seed + block, p)


class _BlockedEntmaxAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, alpha, blocks, visible, causal, query_offset, key_padding_mask, dropout_p, seed,
                rel_bias, keep_probabilities, with_weights):
        scale = q.size(-1) ** -0.5
        heads = q.size(1)
        out = q.new_empty(q.shape[:-1] + (v.size(-1),))
        # the probabilities' mean over the heads, zeros right of each block's keys (the causal future)
        weights = q.new_zeros(q.size(0), 1, q.size(2), k.size(2)) if with_weights else q.new_empty(0)
        stats, supports, kept_probabilities = [], [], []
        listed = lists_support(q)
        v_rows = None
        for block, ((start, end), keys) in enumerate(zip(blocks, visible)):
            scores, mask = query_block_scores(q[:, :, start:end] * scale, k, start, end, keys, query_offset, causal,
                                         key_padding_mask, rel_bias)
            # each (batch, head) pair of the block judged on its own: a head of α near 1 beside sparse ones; the
            # listed pairs' probabilities are read from the support alone (their rows of p are not written)
            p, row_stats, found = entmax_with_stats(
                scores, alpha, mask, with_support=SPARSE_BACKWARD_BELOW, support_rows=end - start,
                support_groups_at_least=1 - MIXED_DENSE_AT_MOST, dense_listed=False) if listed else entmax_with_stats(
                scores, alpha, mask) + (None,)
            support = None if found is None else _BlockSupport(*found[:3], heads=heads)
            supports.append(support)
            del scores
            if with_weights and support is None:  # before dropout, as the plain computation returns them
                weights[:, :, start:end, :keys] = p.mean(dim=1, keepdim=True)
            if support is not None:  # p @ v on the support alone, and on the dense pairs apart
                entry_kept, dense_kept = _support_dropout(support, end - start, keys, dropout_p, seed, block,
                                                          p) if dropout_p > 0 else (None, None)
                if v_rows is None:  # the values as rows of (B H Lk, D), copied once if strided
                    v_rows = v.reshape(-1, v.size(-1))
                pattern = _Pattern(support.entries, end - start, p.size(0) * heads, v.size(2))
                out_block = _support_values(found[3], pattern, p.shape, v_rows, entry_kept)
                p_kept = None
                if support.dense is not None:
                    # (dense pairs, rows, keys), as rows of p's (B H) view: indexing by (b, h) took 8.9 ms on
                    # (1, 8, 512, 4096) where this takes 1.0
                    p_kept = _of_pairs(p, support)
                    p_used = p_kept if dense_kept is None else p_kept * dense_kept
                    _into_pairs(out_block, support,
                                torch.matmul(p_used.to(v.dtype), _of_pairs(v[:, :, :keys], support)),
                                accumulate=False)
                    del p_used, dense_kept
                if with_weights:
                    _add_head_mean(weights, start, keys, pattern, found[3], support, p_kept, heads)
                out[:, :, start:end] = out_block
            else:
                if dropout_p > 0:
                    p_kept = p.clone() if keep_probabilities else None
                    p.mul_(_kept(p, dropout_p, seed, block))
                else:
                    p_kept = p
                out[:, :, start:end] = torch.matmul(p.to(v.dtype), v[:, :, :keys])
            kept_probabilities.append(p_kept if keep_probabilities else None)
            stats.append(row_stats)
        ctx.blocks, ctx.visible, ctx.causal, ctx.query_offset = blocks, visible, causal, query_offset
        ctx.supports, ctx.kept_probabilities = supports, kept_probabilities
        ctx.dropout_p, ctx.seed, ctx.rel_bias = dropout_p, seed, rel_bias
        ctx.alpha_is_tensor = isinstance(alpha, Tensor)
        ctx.alpha_value = None if ctx.alpha_is_tensor else alpha
        ctx.save_for_backward(q, k, v, alpha if ctx.alpha_is_tensor else None, key_padding_mask,
                              torch.cat(stats, dim=2))
        if not with_weights:
            ctx.mark_non_differentiable(weights)
        # an output no loss used gets None in backward, not a zero tensor: returned weights are mostly unused,
        # and a zero gradient of (B, Lq, Lk) would be added to every block's
        ctx.set_materialize_grads(False)
        return out, weights

    @staticmethod
    def backward(ctx, grad_out, grad_weights):
        q, k, v, alpha_t, key_padding_mask, stats = ctx.saved_tensors
        alpha = alpha_t if ctx.alpha_is_tensor else ctx.alpha_value
        scale = q.size(-1) ** -0.5
        heads = q.size(1)
        if grad_out is None:  # a loss on the weights alone
            grad_out = torch.zeros_like(q[..., :1]).expand(q.shape[:-1] + (v.size(-1),))
        if grad_weights is not None and grad_weights.numel() == 0:
            grad_weights = None
        want_alpha = ctx.alpha_is_tensor and ctx.needs_input_grad[3]
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        grad_alpha = None
        flat = None  # the inputs and gradient buffers of the blocks backward on their support
        if any(support is not None for support in ctx.supports):
            flat = _Flat(q * scale, k, v, grad_out, grad_weights)
        for block, ((start, end), keys) in enumerate(zip(ctx.blocks, ctx.visible)):
            support = ctx.supports[block]
            if support is not None:
                # the forward's dropout, drawn again from the block's seed
                entry_kept, dense_kept = _support_dropout(support, end - start, keys, ctx.dropout_p, ctx.seed, block,
                                                          stats) if ctx.dropout_p > 0 else (None, None)
                grad_q, alpha_rows = _support_block_backward(flat, support.entries, start, end,
                                                             stats[:, :, start:end], alpha, want_alpha,
                                                             ctx.query_offset, ctx.rel_bias, entry_kept)
                dq[:, :, start:end] = grad_q.mul_(scale)
                block_alpha = None if alpha_rows is None else alpha_rows.sum(dim=2, keepdim=True)
                if support.dense is not None:
                    p = ctx.kept_probabilities[block]
                    ctx.kept_probabilities[block] = None
                    dense_alpha = _dense_pairs_backward(ctx, support, p, q, k, v, grad_out, grad_weights,
                                                        alpha, want_alpha, stats, key_padding_mask, start, end,
                                                        keys, dq, dk, dv, dense_kept)
                    if dense_alpha is not None:
                        block_alpha[support.dense] += dense_alpha
                if block_alpha is not None:
                    grad_alpha = block_alpha if grad_alpha is None else grad_alpha + block_alpha
                continue
            q_b = q[:, :, start:end] * scale
            k_b, v_b = k[:, :, :keys], v[:, :, :keys]
            g = grad_out[:, :, start:end]
            p, support = ctx.kept_probabilities[block], None
            if p is None:
                scores, mask = query_block_scores(q_b, k, start, end, keys, ctx.query_offset, ctx.causal,
                                             key_padding_mask, ctx.rel_bias)
                p, support = entmax_from_stats(scores, alpha, mask, stats[:, :, start:end], with_support=True)
                del scores
            else:
                ctx.kept_probabilities[block] = None  # freed once used
            grad_p = torch.matmul(g, v_b.transpose(-1, -2)).to(p.dtype)
            if ctx.dropout_p > 0:  # out = (p * kept) @ v
                kept = _kept(p, ctx.dropout_p, ctx.seed, block)
                dv[:, :, :keys] += torch.matmul((p * kept).to(v.dtype).transpose(-1, -2), g)
                grad_p.mul_(kept)
                del kept
            else:
                dv[:, :, :keys] += torch.matmul(p.to(v.dtype).transpose(-1, -2), g)
            if grad_weights is not None:  # the weights are the probabilities' mean over the heads
                grad_p.add_(grad_weights[:, :, start:end, :keys].to(p.dtype), alpha=1.0 / heads)
            grad_s, alpha_rows = entmax_backward(p, grad_p, alpha, with_alpha=want_alpha, support=support)
            del p, grad_p, support
            if alpha_rows is not None:  # this block's rows' parts, summed over them
                block_alpha = alpha_rows.sum(dim=2, keepdim=True)
                grad_alpha = block_alpha if grad_alpha is None else grad_alpha + block_alpha
            grad_s = grad_s.to(q.dtype)
            dq[:, :, start:end] = torch.matmul(grad_s, k_b).mul_(scale)
            dk[:, :, :keys] += torch.matmul(grad_s.transpose(-1, -2), q_b)
        if flat is not None:
            flat_dk, flat_dv = flat.key_value_gradients()
            dk.add_(flat_dk.view(k.shape))
            dv.add_(flat_dv.view(v.shape))
        if grad_alpha is not None:
            grad_alpha = grad_alpha.sum_to_size(alpha_t.shape).to(alpha_t.dtype)
        return dq, dk, dv, grad_alpha, None, None, None, None, None, None, None, None, None, None


class _BlockSupport:
    """What a block keeps of its probabilities when some of its (batch, head) pairs are sparse: their support,
    ``entries`` (rows over (B H rows), columns; int32), and the other pairs, ``dense`` (their batch and head
    indices, or None when every pair is sparse), whose probabilities are kept or recomputed as a dense block's."""

    def __init__(self, rows: Tensor, columns: Tensor, listed: Tensor, heads: int):
        self.entries = (rows.to(torch.int32), columns.to(torch.int32))
        self.pairs = (~listed).nonzero().view(-1)  # over B H
        self.dense = (torch.div(self.pairs, heads, rounding_mode="floor"), self.pairs % heads) if (
            self.pairs.numel()) else None


def _pair_view(x: Tensor) -> Optional[Tensor]:
    """``x`` (B, H, ...) as (B H, ...) without a copy (writes through it reach ``x``), or None where its batch and
    head dimensions do not merge."""
    bsz, heads = x.shape[:2]
    if bsz == 1 or heads == 1 or x.stride(0) == heads * x.stride(1):
        return x.view((-1,) + tuple(x.shape[2:]))
    return None


def _of_pairs(x: Tensor, support: "_BlockSupport") -> Tensor:
    """The dense pairs of ``support`` of ``x`` (B, H, ...) as (pairs, ...): one ``index_select`` of its (B H) view
    (indexing by the batch and head tensors took 2-4x as long)."""
    view = _pair_view(x)
    return x[support.dense] if view is None else view.index_select(0, support.pairs)


def _into_pairs(x: Tensor, support: "_BlockSupport", values: Tensor, accumulate: bool) -> None:
    """Writes (or adds, ``accumulate``) ``values`` (pairs, ...) into the dense pairs of ``support`` of ``x``."""
    view = _pair_view(x)
    if view is None:
        x.index_put_(support.dense, values, accumulate=accumulate)
    elif accumulate:
        view.index_add_(0, support.pairs, values)
    else:
        view.index_copy_(0, support.pairs, values)


def _dense_pairs_backward(ctx, support: "_BlockSupport", p: Optional[Tensor], q, k, v, grad_out, grad_weights,
                          alpha, want_alpha: bool, stats: Tensor, key_padding_mask, start: int, end: int, keys: int,
                          dq: Tensor, dk: Tensor, dv: Tensor, kept: Optional[Tensor] = None) -> Optional[Tensor]:
    """Backward of a block's dense (batch, head) pairs (``support.dense``; their kept probabilities ``p`` (pairs,
    rows, keys), or None: rebuilt from the row statistics), as a dense block's, written into their rows of ``dq``
    and added to ``dk`` and ``dv``; returns their part of α's gradient (pairs, 1, 1) when ``want_alpha``.
    ``kept``: their dropout (pairs, rows, keys), 0 or 1 / (1 - dropout_p) for each probability."""
    b, h = support.dense
    heads, scale = q.size(1), q.size(-1) ** -0.5
    q_d = _of_pairs(q[:, :, start:end], support) * scale
    k_d, v_d = _of_pairs(k[:, :, :keys], support), _of_pairs(v[:, :, :keys], support)
    g = _of_pairs(grad_out[:, :, start:end], support)
    pair_alpha = alpha if not isinstance(alpha, Tensor) else alpha.expand(q.size(0), heads, 1, 1)[b, h]
    entmax_support = None
    if p is None:
        scores, mask = query_block_scores(q_d, k_d, start, end, keys, ctx.query_offset, ctx.causal, key_padding_mask,
                                     ctx.rel_bias, pairs=support.dense)
        p, entmax_support = entmax_from_stats(scores, pair_alpha, mask, _of_pairs(stats[:, :, start:end], support),
                                              with_support=True)
        del scores
    grad_p = torch.matmul(g, v_d.transpose(-1, -2)).to(p.dtype)
    p_used = p if kept is None else p * kept  # out = (p * kept) @ v
    _into_pairs(dv[:, :, :keys], support, torch.matmul(p_used.to(v.dtype).transpose(-1, -2), g), accumulate=True)
    del p_used
    if kept is not None:
        grad_p.mul_(kept)
    if grad_weights is not None:
        grad_p.add_(grad_weights[:, 0, start:end, :keys].index_select(0, b).to(p.dtype), alpha=1.0 / heads)
    grad_s, alpha_rows = entmax_backward(p, grad_p, pair_alpha, with_alpha=want_alpha, support=entmax_support)
    del p, grad_p, entmax_support
    grad_s = grad_s.to(q.dtype)
    _into_pairs(dq[:, :, start:end], support, torch.matmul(grad_s, k_d).mul_(scale), accumulate=False)
    _into_pairs(dk[:, :, :keys], support, torch.matmul(grad_s.transpose(-1, -2), q_d), accumulate=True)
    return None if alpha_rows is None else alpha_rows.sum(dim=1, keepdim=True)


def lists_support(q: Tensor) -> bool:
    """Whether the blocks may keep their support: where the forward lists it anyway (the CPU, float32 or
    float64)."""
    return q.device.type in GATHER_DEVICES and q.dtype in (torch.float32, torch.float64)


def _support_dropout(support: "_BlockSupport", rows: int, keys: int, dropout_p: float, seed: int, block: int,
                     like: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """The dropout of a block that keeps its support, 0 or 1 / (1 - ``dropout_p``) for each entry of its sparse
    pairs (in their order) and, when it has dense pairs, for each probability of their rows (pairs, rows, keys):
    drawn from the block's seed (two streams), so backward draws the same. Only the entries are drawn where a
    dense block draws all its probabilities (a fraction of its random numbers)."""
    entries = dropout_keep_mask(support.entries[0].numel(), dropout_p, seed + block, like)
    dense = None
    if support.dense is not None:
        dense = dropout_keep_mask((support.pairs.numel(), rows, keys), dropout_p, seed + block, like, stream=1)
    return entries, dense


def _csr(rows: Tensor, columns: Tensor, values: Tensor, shape: Tuple[int, int]) -> Tensor:
    """A (shape) CSR matrix of ``values`` at ``(rows, columns)`` (sorted by row, each row's columns in order), with
    int32 indices. Its products run the CPU's sparse kernels (MKL): ``p @ v`` on a support of 287k entries of a
    (8 x 512, 8 x 4096) block took 1.5 ms where gathering the value rows and ``index_add_`` took 40 (AMD EPYC, one
    thread); with int64 indices the transposed product of a (32 x 64, 32 x 512) block's 32k entries took 1.5 ms
    against 0.33 with int32 (the int64 path is not always MKL's)."""
    counts = torch.bincount(rows, minlength=shape[0])
    crow = torch.zeros(shape[0] + 1, dtype=torch.int32, device=rows.device)
    torch.cumsum(counts, 0, out=crow[1:])
    with warnings.catch_warnings():  # torch calls its CSR tensors beta, once per process
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, columns.to(torch.int32), values, size=shape, check_invariants=False)


class _Pattern:
    """The support of a block's probabilities as a block-diagonal sparse matrix: rows over (B H rows), columns over
    (B H Lk) (each query's keys among its own (batch, head)'s), entries in row order."""

    def __init__(self, support: Tuple[Tensor, Tensor], rows: int, pairs: int, src_len: int):
        self.row, col = (t.long() for t in support)
        self.pair = torch.div(self.row, rows, rounding_mode="floor")  # batch * heads + head
        self.position = self.row - self.pair * rows
        self.col, self.column = col, (self.pair * src_len + col).to(torch.int32)
        self.shape = (pairs * rows, pairs * src_len)

    def times(self, values: Tensor, dense: Tensor) -> Tensor:
        """(the entries ``values`` as a matrix) @ ``dense`` (B H Lk, D) -> (B H rows, D)."""
        return _csr(self.row, self.column, values, self.shape) @ dense

    def sampled(self, a: Tensor, b: Tensor) -> Tensor:
        """``(a @ b^T)`` at the entries, for ``a`` (B H rows, D) and ``b`` (B H Lk, D): one dot product each."""
        pattern = _csr(self.row, self.column, a.new_zeros(self.row.numel()), self.shape)
        return torch.sparse.sampled_addmm(pattern, a, b.t(), beta=0.0).values()


def _support_values(values: Tensor, pattern: "_Pattern", shape, v_rows: Tensor,
                    kept: Optional[Tensor] = None) -> Tensor:
    """``p @ v`` (B, H, rows, D) for a block's probabilities of ``shape`` (B, H, rows, keys) that are 0 off their
    support ``pattern``, ``values`` there, with the values as rows ``v_rows`` (B H src_len, D); ``kept``: the
    entries' dropout (0 or 1 / (1 - dropout_p) each)."""
    bsz, heads, rows, _ = shape
    weights = values if kept is None else values * kept
    return pattern.times(weights.to(v_rows.dtype), v_rows).view(bsz, heads, rows, -1)


def _add_head_mean(weights: Tensor, start: int, keys: int, pattern: "_Pattern", values: Tensor,
                   support: "_BlockSupport", p_dense: Optional[Tensor], heads: int) -> None:
    """Add a block's probabilities averaged over the ``heads`` to its rows of ``weights`` (B, 1, Lq, Lk; zeros
    there): the listed pairs' from their support (``pattern``, ``values``) alone, the dense pairs' ``p_dense``
    (pairs, rows, keys) as rows (their p is all that was written)."""
    batch = torch.div(pattern.pair, heads, rounding_mode="floor")
    flat = (batch * weights.size(2) + start + pattern.position) * weights.size(3) + pattern.col
    weights.view(-1).index_add_(0, flat, values.to(weights.dtype), alpha=1.0 / heads)
    if p_dense is not None:
        rows = p_dense.size(1)
        weights[:, 0, start:start + rows, :keys].index_add_(0, support.dense[0], p_dense.to(weights.dtype),
                                                             alpha=1.0 / heads)


class _Flat:
    """The keys and values as rows of (B H Lk, D) (copied once per backward where they are strided), the scaled
    queries and the output's gradient (B, H, Lq, D), the weights' gradient flat (B Lq Lk,) if a loss used them, and
    the entries of every block that backwards on its support, whose key and value gradients are taken at the end
    by one transposed product each (:meth:`key_value_gradients`)."""

    def __init__(self, q_scaled: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, grad_weights: Optional[Tensor]):
        self.shape = q_scaled.shape[:3] + (k.size(2),)  # B, H, Lq, Lk
        self.q, self.g = q_scaled, grad_out
        self.k, self.v = k.reshape(-1, k.size(-1)), v.reshape(-1, v.size(-1))
        self.grad_weights = None if grad_weights is None else grad_weights.reshape(-1)
        self.entries: List[Tuple[Tensor, Tensor, Tensor, Tensor]] = []

    def add(self, query_rows: Tensor, key_rows: Tensor, p: Tensor, grad_s: Tensor) -> None:
        """A block's entries: their query rows over (B H Lq), key rows over (B H Lk), probabilities and the
        scores' gradients."""
        self.entries.append((query_rows, key_rows, p, grad_s))

    def key_value_gradients(self) -> Tuple[Tensor, Tensor]:
        """The gradients of the keys and the values (B H Lk, D) from every block's entries: ``dS^T @ q`` and
        ``p^T @ g`` with the entries sorted by key row (one sort and one sparse matrix for the whole backward; per
        block, each transposed product wrote and added a (B H Lk, D) result)."""
        bsz, heads, tgt_len, src_len = self.shape
        query_rows, key_rows, p, grad_s = (torch.cat(parts) for parts in zip(*self.entries))
        self.entries = []
        n_queries = bsz * heads * tgt_len
        # by key row, then query row: the blocks came in order, each with its entries in query-row order, so a
        # stable sort by key row alone leaves every key row's entries in query-row order; on 32-bit keys it took
        # half the time of an argsort of the 64-bit (key row, query row) keys (1.8M entries, Intel Xeon)
        narrow = torch.int32 if bsz * heads * src_len < 2**31 else torch.int64
        order = torch.sort(key_rows.to(narrow), stable=True).indices
        key_rows, query_rows = key_rows.index_select(0, order), query_rows.index_select(0, order).to(torch.int32)
        shape = (bsz * heads * src_len, n_queries)
        q_rows, g_rows = self.q.reshape(n_queries, -1), self.g.reshape(n_queries, -1)
        dk = _csr(key_rows, query_rows, grad_s.index_select(0, order), shape) @ q_rows
        dv = _csr(key_rows, query_rows, p.index_select(0, order).to(g_rows.dtype), shape) @ g_rows
        return dk, dv


def _support_block_backward(flat: _Flat, support: Tuple[Tensor, Tensor], start: int, end: int, stats: Tensor,
                            alpha: Union[float, Tensor], want_alpha: bool, query_offset: int,
                            rel_bias, kept: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """Backward of one query block on its support alone: the support ``(rows, columns)`` of its probabilities
    (rows over (B, H, end - start)) as a sparse matrix, each entry's score recomputed as a dot product, its
    probability rebuilt from the row statistics as :func:`entmax_from_stats` does, the entmax Jacobian taken on
    the entries, and the products with q, k, v and the output's gradient done by sparse kernels: O(support x D)
    work where the dense backward takes four (rows x keys x D) products and the rebuild. Hands its entries to
    ``flat`` for the key and value gradients; returns the block's query gradient (B, H, rows, D), of the scaled
    queries, and α's gradient per row (B, H, rows, 1) when ``want_alpha``."""
    bsz, heads, tgt_len, src_len = flat.shape
    rows = end - start
    pattern = _Pattern(support, rows, bsz * heads, src_len)
    row, pair, position, col = pattern.row, pattern.pair, pattern.position, pattern.col
    q_block = flat.q[:, :, start:end].reshape(-1, flat.q.size(-1))
    g_block = flat.g[:, :, start:end].reshape(-1, flat.g.size(-1))
    scores = pattern.sampled(q_block, flat.k)
    if rel_bias is not None:
        rel = position + (query_offset + start) - col
        scores += rel_bias(rel).to(scores.dtype).gather(0, (pair % heads).view(1, -1)).view(-1)
    row_alpha = alpha if not isinstance(alpha, Tensor) else alpha.to(scores.dtype).expand(
        bsz, heads, rows, 1).reshape(-1, 1)
    entry_alpha = row_alpha if not isinstance(row_alpha, Tensor) else row_alpha.view(-1).index_select(0, row)
    shift, tau, scale = (stats.reshape(-1, 3)[:, i].index_select(0, row) for i in range(3))
    # [(α-1) r x - ((α-1) shift + τ) r]_+ ^ (1/(α-1)) with r = scale^(α-1), as the dense rebuild takes it
    r = scale if isinstance(alpha, float) and alpha == 2.0 else scale.pow(entry_alpha - 1)
    u = (scores * (entry_alpha - 1) - shift * (entry_alpha - 1) - tau).mul_(r).clamp_(min=0)
    p = u if isinstance(alpha, float) and alpha == 2.0 else (
        u.square() if isinstance(alpha, float) and alpha == 1.5 else nonnegative_power(u, 1 / (entry_alpha - 1),
                                                                                       out=u))
    grad_p = pattern.sampled(g_block, flat.v)
    p_used = p  # what multiplied the values: out = (p * kept) @ v
    if kept is not None:
        grad_p.mul_(kept)
        p_used = p * kept
    if flat.grad_weights is not None:  # each entry's place in the weights (B, 1, Lq, Lk), its mean over heads
        w_index = (torch.div(pair, heads, rounding_mode="floor") * tgt_len + start + position) * src_len + col
        grad_p.add_(flat.grad_weights.index_select(0, w_index).to(grad_p.dtype), alpha=1.0 / heads)
    grad_alpha = p.new_empty(bsz * heads * rows, 1) if want_alpha else None
    # an entry rounded onto the threshold adds nothing, and its log would not be finite: the Jacobian on the others
    positive = p > 0
    if bool(positive.all()):
        grad_s = support_backward(p, grad_p, row_alpha, row, bsz * heads * rows, grad_alpha)
    else:
        grad_s = torch.zeros_like(p)
        grad_s[positive] = support_backward(p[positive], grad_p[positive], row_alpha, row[positive],
                                            bsz * heads * rows, grad_alpha)
    grad_s = grad_s.to(q_block.dtype)
    flat.add(pair * tgt_len + start + position, pattern.pair * src_len + col, p_used, grad_s)
    grad_q = pattern.times(grad_s, flat.k).view(bsz, heads, rows, -1)
    return grad_q, None if grad_alpha is None else grad_alpha.view(bsz, heads, rows, 1)


def blocked_entmax_attention(q: Tensor, k: Tensor, v: Tensor, alpha: Union[float, Tensor], *,
                             blocks: Sequence[Tuple[int, int]], causal: bool, query_offset: int = 0,
                             key_padding_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                             seed: Optional[int] = None,
                             rel_bias: Optional[Callable[[Tensor], Tensor]] = None,
                             keep_probabilities: bool = False, need_weights: bool = False):
    """α-entmax attention of q (B, H, Lq, D) over k, v (B, H, Lk, D) in the query ``blocks`` ([start, end) ranges
    covering 0..Lq in order), keeping no (Lq, Lk) tensor for backward unless ``keep_probabilities``.

    ``alpha``: a float in (1, 2] or a tensor in that range broadcastable to (B, H, 1, 1) (one α per head; it gets a
    gradient). ``causal``: query ``i`` sees keys ``j <= i + query_offset`` (each block's scores stop at its last
    query's keys). ``key_padding_mask`` (B, Lk) bool, True = padding. A query with no key gives 0.
    ``dropout_p``: attention dropout on the probabilities, its masks drawn from ``seed`` (default: a number drawn
    from torch's default generator, so runs seeded with ``torch.manual_seed`` repeat). ``rel_bias``: a fixed bias
    of the query-minus-key offsets (``rel (rows, keys) -> (H, rows, keys)``, e.g. ALiBi) added to the scores; it
    gets no gradient.

    ``keep_probabilities``: a block that does not keep its support keeps its probabilities for backward instead of
    recomputing them (the plain computation's memory and work, for passes short enough to afford it), so only the
    blocks sparse enough to work on their support differ from it. ``need_weights``: returns ``(out, weights)``,
    the probabilities' mean over the heads (B, 1, Lq, Lk) before dropout, differentiable (an alignment loss
    trains through them); otherwise ``out`` alone."""
    visible: List[int] = [min(k.size(2), query_offset + end) if causal else k.size(2) for _, end in blocks]
    if causal and lists_support(q):
        # whole groups of keys: the keys up to the next multiple of START_GROUP are in every row's future, masked
        # (0 in the output, nothing in any gradient), and a block of whole groups can be searched through them
        # and keep its support (at most 31 more columns)
        visible = [min(k.size(2), -(-keys // START_GROUP) * START_GROUP) for keys in visible]
    if isinstance(alpha, Tensor):
        if bool((alpha <= 1).any()) or bool((alpha > 2).any()):
            raise ValueError("blocked_entmax_attention needs 1 < alpha <= 2")
    elif not 1 < float(alpha) <= 2:
        raise ValueError(f"blocked_entmax_attention needs 1 < alpha <= 2, got {alpha}")
    if query_offset < 0:
        raise ValueError(f"query_offset must be >= 0 (query i sits at key position i + query_offset), got "
                         f"{query_offset}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0 and seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    out, weights = _BlockedEntmaxAttention.apply(q, k, v, alpha, list(blocks), visible, causal, query_offset,
                                                 key_padding_mask, float(dropout_p), seed or 0, rel_bias,
                                                 bool(keep_probabilities), bool(need_weights))
    return (out, weights) if need_weights else out
