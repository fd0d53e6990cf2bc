"""α-entmax attention in query blocks that keeps no (Lq, Lk) tensor for backward.

``out = entmax_α(q k^T / sqrt(D)) v`` with a causal and a key-padding mask, computed a block of queries at a time.
The autograd graph of the plain computation keeps every block's probabilities (B, H, Lq, Lk) for backward: 512 MiB
at L=4096 with 8 heads, 2 GiB at 8192. Here forward keeps only q, k, v and three numbers per query row (the row's
shift, its threshold τ and its normaliser; :func:`~fluence_fairseq.ops.entmax.entmax_with_stats`), and backward
recomputes each block's scores (one more product) and rebuilds its probabilities from those numbers in a few
elementwise passes, without the threshold search. Transient memory is one block's scores, probabilities and their
gradients. Gradients flow to q, k, v and a per-head α (Correia et al. 2019, Proposition 1, as in
:mod:`fluence_fairseq.ops.entmax`).

Attention dropout zeroes probabilities with a mask drawn block by block from a generator seeded with ``seed`` plus
the block's index, and backward draws the same masks again, so they are never kept either. A fixed relative bias
(ALiBi: ``rel_bias(query - key offsets) -> (H, rows, keys)``, no gradient of its own) is added to each block's
scores in both directions. No additive mask: callers take the plain computation for that.
"""
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .common import relative_positions
from .entmax import entmax_backward, entmax_from_stats, entmax_with_stats

__all__ = ["blocked_entmax_attention"]


def _kept(p: Tensor, dropout_p: float, seed: int, block: int) -> Tensor:
    """The dropout of block ``block``: 1 / (1 - dropout_p) where a probability is kept, 0 where dropped (the same
    numbers whenever it is drawn again with the same seed)."""
    generator = torch.Generator(p.device).manual_seed(seed + block)
    return torch.empty_like(p).bernoulli_(1.0 - dropout_p, generator=generator).div_(1.0 - dropout_p)


def _block_scores(q_block: Tensor, k: Tensor, start: int, end: int, keys: int, query_offset: int, causal: bool,
                  key_padding_mask: Optional[Tensor], rel_bias) -> Tuple[Tensor, Optional[Tensor]]:
    """Scores of queries ``start..end-1`` (``q_block``, scaled) against keys ``0..keys-1`` with the relative bias,
    and the mask of what they may not see (the causal future, padding); forward and backward make them alike."""
    scores = torch.matmul(q_block, k[:, :, :keys].transpose(-1, -2))
    rel = None
    if causal or rel_bias is not None:
        rel = relative_positions(end - start, keys, query_offset + start, scores.device)
    if rel_bias is not None:
        scores += rel_bias(rel).to(scores.dtype)
    mask = (rel < 0).view(1, 1, end - start, keys) if causal else None
    if key_padding_mask is not None:
        padded = key_padding_mask[:, :keys].view(-1, 1, 1, keys)
        mask = padded if mask is None else mask | padded
    return scores, mask


class _BlockedEntmaxAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, alpha, blocks, visible, causal, query_offset, key_padding_mask, dropout_p, seed,
                rel_bias):
        scale = q.size(-1) ** -0.5
        out = q.new_empty(q.shape[:-1] + (v.size(-1),))
        stats = []
        for block, ((start, end), keys) in enumerate(zip(blocks, visible)):
            scores, mask = _block_scores(q[:, :, start:end] * scale, k, start, end, keys, query_offset, causal,
                                         key_padding_mask, rel_bias)
            p, row_stats = entmax_with_stats(scores, alpha, mask)
            del scores
            if dropout_p > 0:
                p.mul_(_kept(p, dropout_p, seed, block))
            out[:, :, start:end] = torch.matmul(p.to(v.dtype), v[:, :, :keys])
            stats.append(row_stats)
        ctx.blocks, ctx.visible, ctx.causal, ctx.query_offset = blocks, visible, causal, query_offset
        ctx.dropout_p, ctx.seed, ctx.rel_bias = dropout_p, seed, rel_bias
        ctx.alpha_is_tensor = isinstance(alpha, Tensor)
        ctx.alpha_value = None if ctx.alpha_is_tensor else alpha
        ctx.save_for_backward(q, k, v, alpha if ctx.alpha_is_tensor else None, key_padding_mask,
                              torch.cat(stats, dim=2))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, alpha_t, key_padding_mask, stats = ctx.saved_tensors
        alpha = alpha_t if ctx.alpha_is_tensor else ctx.alpha_value
        scale = q.size(-1) ** -0.5
        want_alpha = ctx.alpha_is_tensor and ctx.needs_input_grad[3]
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        grad_alpha = None
        for block, ((start, end), keys) in enumerate(zip(ctx.blocks, ctx.visible)):
            q_b = q[:, :, start:end] * scale
            k_b, v_b = k[:, :, :keys], v[:, :, :keys]
            g = grad_out[:, :, start:end]
            scores, mask = _block_scores(q_b, k, start, end, keys, ctx.query_offset, ctx.causal, key_padding_mask,
                                         ctx.rel_bias)
            p, support = entmax_from_stats(scores, alpha, mask, stats[:, :, start:end], with_support=True)
            del scores
            grad_p = torch.matmul(g, v_b.transpose(-1, -2)).to(p.dtype)
            if ctx.dropout_p > 0:  # out = (p * kept) @ v
                kept = _kept(p, ctx.dropout_p, ctx.seed, block)
                dv[:, :, :keys] += torch.matmul((p * kept).to(v.dtype).transpose(-1, -2), g)
                grad_p.mul_(kept)
                del kept
            else:
                dv[:, :, :keys] += torch.matmul(p.to(v.dtype).transpose(-1, -2), g)
            grad_s, alpha_rows = entmax_backward(p, grad_p, alpha, with_alpha=want_alpha, support=support)
            del p, grad_p, support
            if alpha_rows is not None:  # this block's rows' parts, summed over them
                block_alpha = alpha_rows.sum(dim=2, keepdim=True)
                grad_alpha = block_alpha if grad_alpha is None else grad_alpha + block_alpha
            grad_s = grad_s.to(q.dtype)
            dq[:, :, start:end] = torch.matmul(grad_s, k_b).mul_(scale)
            dk[:, :, :keys] += torch.matmul(grad_s.transpose(-1, -2), q_b)
        if grad_alpha is not None:
            grad_alpha = grad_alpha.sum_to_size(alpha_t.shape).to(alpha_t.dtype)
        return dq, dk, dv, grad_alpha, None, None, None, None, None, None, None, None


def blocked_entmax_attention(q: Tensor, k: Tensor, v: Tensor, alpha: Union[float, Tensor], *,
                             blocks: Sequence[Tuple[int, int]], causal: bool, query_offset: int = 0,
                             key_padding_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                             seed: Optional[int] = None,
                             rel_bias: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """α-entmax attention of q (B, H, Lq, D) over k, v (B, H, Lk, D) in the query ``blocks`` ([start, end) ranges
    covering 0..Lq in order), keeping no (Lq, Lk) tensor for backward.

    ``alpha``: a float in (1, 2] or a tensor in that range broadcastable to (B, H, 1, 1) (one α per head; it gets a
    gradient). ``causal``: query ``i`` sees keys ``j <= i + query_offset`` (each block's scores stop at its last
    query's keys). ``key_padding_mask`` (B, Lk) bool, True = padding. A query with no key gives 0.
    ``dropout_p``: attention dropout on the probabilities, its masks drawn from ``seed`` (default: a number drawn
    from torch's default generator, so runs seeded with ``torch.manual_seed`` repeat). ``rel_bias``: a fixed bias
    of the query-minus-key offsets (``rel (rows, keys) -> (H, rows, keys)``, e.g. ALiBi) added to the scores; it
    gets no gradient."""
    visible: List[int] = [min(k.size(2), query_offset + end) if causal else k.size(2) for _, end in blocks]
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
    return _BlockedEntmaxAttention.apply(q, k, v, alpha, list(blocks), visible, causal, query_offset,
                                         key_padding_mask, float(dropout_p), seed or 0, rel_bias)
