"""Softmax attention under attention dropout, in query blocks, keeping no (Lq, Lk) tensor for backward.

On the CPU ``F.scaled_dot_product_attention`` has no fused kernel with dropout: with ``dropout_p > 0`` it takes its
math path, which forms the (B, H, Lq, Lk) scores, probabilities and dropout mask and keeps them for backward
(10.5 GB for the base language model on one 4096-token block, every layer's at once). Here queries go in blocks of
at most :data:`BLOCK_ELEMENTS` scores: forward keeps q, k, v and each query row's log-sum-exp; each block's mask is
drawn from a generator seeded with ``seed`` plus the block's index and drawn again in backward, which recomputes
the block's scores and rebuilds its probabilities from the log-sum-exp (flash attention's backward, the mask
applied). A causal block scores only the keys its last query sees, so causal attention does little more than
half of the full products' work on long inputs.

``out = (softmax(q k^T / sqrt(D) + bias) * mask) @ v``, mask 0 or 1 / (1 - dropout_p) per probability, with the
same additive form of causality and padding as the fused kernel's callers give it (disallowed entries at the most
negative float), so a row's probabilities are those of ``F.scaled_dot_product_attention``.
"""
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from .common import LOG2_E, dropout_keep_mask, element_blocks, query_block_scores

__all__ = ["blocked_softmax_dropout", "blocked_softmax_dropout_applies"]

#: from this many probabilities per causal call (B x H x Lq x Lk; 2^25 float32 = 128 MiB, which the math path
#: keeps several times over) the blocks take over; below, the math path's single pass is kept. Causal blocks do
#: 56% of the products: a layer's training step at L=4096, 8 heads, one thread, took 0.77x the math path's time
FROM_ELEMENTS = 1 << 25
#: the same for noncausal calls, where the blocks do every product once more (the scores in backward) and draw each
#: mask twice: the layer step above took 1.20x the math path's time (and a tenth of its memory), so the blocks take
#: over only where the math path's memory grows large (2^27 float32 = 512 MiB per tensor)
NONCAUSAL_FROM_ELEMENTS = 1 << 27

#: scores per query block (B x H x rows x keys; 2^23 float32 = 32 MiB, 256 rows at L=4096 with 8 heads): those
#: took 0.91x (causal) and 1.01x (noncausal) the time of 512-row blocks (one thread, a scratch script); the
#: transient memory is a few such blocks whatever the length
BLOCK_ELEMENTS = 1 << 23


class _Problem:
    """What forward and backward share: the query blocks, the keys each sees, and each block's scores."""

    def __init__(self, q: Tensor, k: Tensor, causal: bool, query_offset: int, key_padding_mask: Optional[Tensor],
                 attn_mask: Optional[Tensor], bias: Optional[Callable[[Tensor], Tensor]]):
        bsz, heads, tgt_len, _ = q.shape
        src_len = k.size(2)
        self.causal, self.query_offset = causal, query_offset
        self.key_padding_mask, self.attn_mask, self.bias = key_padding_mask, attn_mask, bias
        self.scale = q.size(-1) ** -0.5
        self.blocks: List[Tuple[int, int, int]] = [  # (start, end, keys)
            (start, end, min(src_len, query_offset + end) if causal else src_len)
            for start, end in element_blocks(bsz * heads, tgt_len, src_len, causal=causal, query_offset=query_offset,
                                             elements=BLOCK_ELEMENTS)]

    def scores(self, q_scaled: Tensor, k: Tensor, start: int, end: int, keys: int) -> Tensor:
        """(B, H, rows, keys) scores of queries ``start..end-1`` (``q_scaled``: those rows, already scaled), the
        bias and additive mask added, disallowed entries (the causal future, padding) at the most negative float."""
        scores, disallowed = query_block_scores(q_scaled, k, start, end, keys, self.query_offset, self.causal,
                                                self.key_padding_mask, self.bias)
        if self.attn_mask is not None:
            scores += self.attn_mask[..., start:end, :keys].to(scores.dtype)
        if disallowed is not None:
            scores.masked_fill_(disallowed, torch.finfo(scores.dtype).min)
        return scores


def _exp_shifted(scores: Tensor, shift: Tensor) -> Tensor:
    """``exp(scores - shift)`` in place, as ``exp2((scores - shift) log2 e)``: the disallowed entries sit at the
    most negative float, and ``torch.exp`` of numbers that underflow takes a slow path on the CPU (a (1024, 512)
    float32 tensor with 70% of its entries at -300: 7.7 ms against 0.17 ms all finite, one thread, Intel Xeon,
    AVX-512) where ``exp2`` of them takes 0.17; ``exp2`` of a chunk of probabilities was also 4.5x faster than
    ``exp`` on an AMD EPYC. The product rounds the exponent: relative errors up to 16 ulps for exponents down to
    -40 (``exp``: 0.5), at most 0.45 ulp of 1 in absolute terms (``exp``: 0.27), where normalised rows are
    measured."""
    return torch.sub(scores, shift, out=scores).mul_(LOG2_E).exp2_()


class _BlockedSoftmaxDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, problem: _Problem, dropout_p: float, seed: int):
        out = q.new_empty(q.shape[:-1] + (v.size(-1),))
        lse = q.new_empty(q.shape[:-1] + (1,))
        for block, (start, end, keys) in enumerate(problem.blocks):
            p = problem.scores(q[:, :, start:end] * problem.scale, k, start, end, keys)
            top = p.amax(dim=-1, keepdim=True)
            total = _exp_shifted(p, top).sum(dim=-1, keepdim=True)
            lse[:, :, start:end] = top + total.log()
            p.div_(total).mul_(dropout_keep_mask(p.shape, dropout_p, seed + block, p))
            out[:, :, start:end] = torch.matmul(p, v[:, :, :keys])
        ctx.save_for_backward(q, k, v, lse)
        ctx.problem, ctx.dropout_p, ctx.seed = problem, dropout_p, seed
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, lse = ctx.saved_tensors
        problem = ctx.problem
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for block, (start, end, keys) in enumerate(problem.blocks):
            q_block = q[:, :, start:end] * problem.scale
            p = _exp_shifted(problem.scores(q_block, k, start, end, keys), lse[:, :, start:end])
            kept = dropout_keep_mask(p.shape, ctx.dropout_p, ctx.seed + block, p)
            g = grad_out[:, :, start:end]
            dv[:, :, :keys] += torch.matmul((p * kept).transpose(-1, -2), g)
            grad_p = torch.matmul(g, v[:, :, :keys].transpose(-1, -2)).mul_(kept)
            del kept
            # softmax's Jacobian: dS = p * (dP - sum_j p_j dP_j)
            grad_s = grad_p.sub_((grad_p * p).sum(dim=-1, keepdim=True)).mul_(p)
            del p
            dq[:, :, start:end] = torch.matmul(grad_s, k[:, :, :keys]).mul_(problem.scale)
            dk[:, :, :keys] += torch.matmul(grad_s.transpose(-1, -2), q_block)
        return dq, dk, dv, None, None, None


def blocked_softmax_dropout_applies(q: Tensor, k: Tensor, *, dropout_p: float, causal: bool, query_offset: int,
                                    key_padding_mask: Optional[Tensor]) -> bool:
    """Whether a call of softmax attention with no band but causality takes :func:`blocked_softmax_dropout`: on the
    CPU (other devices have fused kernels with dropout), in float32 or float64, with dropout, from
    :data:`FROM_ELEMENTS` probabilities (noncausal: :data:`NONCAUSAL_FROM_ELEMENTS`), and unless a causal query sees
    only padding (the fused kernel spreads such a row over every key, a block over the keys it scores)."""
    if dropout_p <= 0 or q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float64):
        return False
    if q.size(0) * q.size(1) * q.size(2) * k.size(2) < (FROM_ELEMENTS if causal else NONCAUSAL_FROM_ELEMENTS):
        return False
    if causal and (query_offset < 0 or (key_padding_mask is not None
                                        and bool(key_padding_mask[:, : query_offset + 1].all(-1).any()))):
        return False
    return True


def blocked_softmax_dropout(q: Tensor, k: Tensor, v: Tensor, *, dropout_p: float, causal: bool,
                            query_offset: int = 0, key_padding_mask: Optional[Tensor] = None,
                            attn_mask: Optional[Tensor] = None, bias: Optional[Callable[[Tensor], Tensor]] = None,
                            seed: Optional[int] = None) -> Tensor:
    """Softmax attention of q (B, H, Lq, D) over k, v (B, H, Lk, D) under attention dropout ``dropout_p`` in
    [0, 1), in query blocks (see the module docstring). ``causal``: query ``i`` sees keys ``j <= i +
    query_offset``. ``key_padding_mask`` (B, Lk) bool, True = padding. ``attn_mask``: an additive float mask
    broadcastable to (B, H, Lq, Lk). ``bias``: a fixed bias of the query-minus-key offsets (``rel (rows, keys) ->
    (H, rows, keys)``, ALiBi); neither gets a gradient. ``seed``: of the masks (default: a number drawn from
    torch's default generator, so runs seeded with ``torch.manual_seed`` repeat)."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if query_offset < 0:
        raise ValueError(f"query_offset must be >= 0, got {query_offset}")
    if attn_mask is not None and attn_mask.requires_grad:
        raise ValueError("blocked_softmax_dropout: attn_mask gets no gradient here")
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    problem = _Problem(q, k, causal, query_offset, key_padding_mask, attn_mask, bias)
    return _BlockedSoftmaxDropout.apply(q, k, v, problem, float(dropout_p), seed)
