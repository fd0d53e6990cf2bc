"""ProbSparse attention (Informer; Zhou et al., 2021) as pure tensor functions.

Per head, with queries ``q_i``, keys ``k_j`` and values ``v_j`` of a row holding ``n`` real keys and ``m`` real
queries:

1. ``U = factor * ceil(ln n)`` keys are sampled (capped at ``n``, at least 1) -- :func:`sample_keys`;
2. each query gets the sparsity score ``M(q_i) = max_s q_i.k_s - mean_s q_i.k_s`` over the sampled keys;
3. the ``u = factor * ceil(ln m)`` queries (capped at ``m``, at least 1) with the largest ``M`` get exact
   ``softmax(q_i K^T / sqrt(d)) V`` over all real keys; every other query outputs the mean of the real values.

Design choices (see :class:`fluence_fairseq.modules.probsparse.ProbSparseAttention` for the comparison with the reference):

* one key sample per (sentence, head), shared by all queries, so step 2 is a ``(L, U)`` matmul instead of a
  gather of ``(L, U, d)`` sampled keys; the sample is drawn without replacement among the real keys;
* in training the sample is random (global RNG); in eval it is deterministic: ``U`` keys evenly strided over the
  real keys, counted among the real keys only, so left, right and no padding pick the same keys;
* the mean in ``M`` divides by the number of sampled keys ``U`` (a sample mean);
* ``U`` and ``u`` come from each row's own real lengths, so padding never changes a sentence's outputs.

No ``(L, S)`` matrix is formed (unless weights are requested): the work is O(L * U * d + u * S * d) per head.
"""
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import accumulation_dtype as _acc

__all__ = ["sample_count", "sample_keys", "probsparse_attention", "real_value_mean"]


def sample_count(n: int, factor: int) -> int:
    """``factor * ceil(ln n)`` capped at ``n`` and at least 1 (0 for an empty row)."""
    if n <= 0:
        return 0
    return max(1, min(n, factor * math.ceil(math.log(n))))


# Elements of one block of sampled scores (queries x sampled keys, all heads) formed at a time (4 MiB in float32).
_SCORE_ELEMENTS = 1 << 20


def sample_keys(
    key_padding_mask: Optional[Tensor], bsz: int, heads: int, src_len: int, factor: int, *, random: bool,
    device: torch.device,
) -> Tuple[Tensor, Tensor]:
    """The keys each (sentence, head) scores its queries against.

    Returns ``(index (B, H, Umax) long, count (B,) long)``: ``index[b, h, :count[b]]`` are distinct positions
    of real keys; entries beyond ``count[b]`` are a valid position (so gathers stay in range) to be ignored.
    ``random=False`` gives the eval sample: ranks ``floor((t + 1/2) n / U)`` among the real keys, t < U.
    """
    if key_padding_mask is None:
        real = [src_len] * bsz
    else:
        real = (~key_padding_mask).sum(1).tolist()
    counts = [sample_count(n, factor) for n in real]
    u_max = max(max(counts), 1)
    count = torch.tensor(counts, dtype=torch.long, device=device)
    if random:
        # U smallest of uniform draws among the real keys = U distinct real keys uniformly without replacement
        draws = torch.rand(bsz, heads, src_len, device=device)
        if key_padding_mask is not None:
            draws = draws.masked_fill(key_padding_mask.unsqueeze(1), 2.0)
        return draws.topk(u_max, dim=-1, largest=False, sorted=False).indices, count
    n = torch.tensor(real, dtype=torch.long, device=device).unsqueeze(1)
    t = torch.arange(u_max, device=device).unsqueeze(0)
    rank = torch.div((2 * t + 1) * n, 2 * count.clamp(min=1).unsqueeze(1), rounding_mode="floor")
    rank = rank.clamp(max=max(src_len - 1, 0))
    if key_padding_mask is not None:
        # positions of the real keys in order, then the padding: rank r -> position of the r-th real key
        order = torch.argsort(key_padding_mask.to(torch.int8), dim=1, stable=True)
        index = order.gather(1, rank)
    else:
        index = rank
    return index.unsqueeze(1).expand(bsz, heads, u_max), count


def _top_queries(
    q: Tensor, k: Tensor, sample: Tensor, sample_size: Tensor, query_counts: List[int],
    query_padding_mask: Optional[Tensor], factor: int,
) -> Tuple[Tensor, Tensor]:
    """Indices (B, H, u_max) of the queries with the largest sparsity score and whether each is selected
    (B, 1, u_max) (rows with fewer real queries select fewer)."""
    bsz, heads, tgt_len, dim = q.shape
    with torch.no_grad():  # the selection is discrete: no gradient flows through the scores
        sampled = k.gather(2, sample.unsqueeze(-1).expand(-1, -1, -1, dim)).transpose(-1, -2)
        u_keys = sample.size(-1)
        unused = torch.arange(u_keys, device=q.device).view(1, 1, 1, -1) >= sample_size.view(-1, 1, 1, 1)
        if not unused.any():
            unused = None  # every row samples u_max keys: no masking needed
        divisor = sample_size.clamp(min=1).view(-1, 1, 1).to(_acc(q.dtype))
        # queries in chunks: the (chunk, U) score block stays small whatever the length
        chunk = max(1, _SCORE_ELEMENTS // max(1, bsz * heads * u_keys))
        parts = []
        for start in range(0, tgt_len, chunk):
            scores = torch.matmul(q[:, :, start : start + chunk], sampled).to(_acc(q.dtype))  # unscaled
            if unused is None:
                peak, total = scores.amax(-1), scores.sum(-1)
            else:
                total = scores.masked_fill(unused, 0.0).sum(-1)
                peak = scores.masked_fill_(unused, float("-inf")).amax(-1)
            parts.append(peak - total / divisor)
        sparsity = torch.cat(parts, -1)
        if query_padding_mask is not None:
            sparsity = sparsity.masked_fill(query_padding_mask.unsqueeze(1), float("-inf"))
        u_counts = [sample_count(m, factor) for m in query_counts]
        u_max = max(max(u_counts), 1)
        top = sparsity.topk(u_max, dim=-1, sorted=True).indices
        chosen = torch.arange(u_max, device=q.device).view(1, 1, -1) < torch.tensor(
            u_counts, device=q.device).view(-1, 1, 1)
        chosen = chosen & (sample_size > 0).view(-1, 1, 1)  # no real key: nothing to attend, output the mean (0)
    return top, chosen


def probsparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    sample: Tensor,
    sample_size: Tensor,
    key_padding_mask: Optional[Tensor],
    query_padding_mask: Optional[Tensor],
    factor: int,
    value_mean: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """ProbSparse attention of ``q`` (B, H, L, D) to ``k``, ``v`` (B, H, S, D).

    Args:
        sample, sample_size: the key sample and its size per row from :func:`sample_keys`.
        key_padding_mask: bool (B, S), True = padding: never sampled, attended or averaged.
        query_padding_mask: bool (B, L), True = padding: never selected (their output is the mean; the caller
            zeroes it). None = every query is real.
        value_mean: the mean of the real values (B, H, 1, D) if already known (decoding cache).
        dropout_p: dropout on the selected queries' attention probabilities.
    Returns:
        (out (B, H, L, D), weights (B, H, L, S) or None)
    """
    bsz, heads, tgt_len, dim = q.shape
    src_len = k.size(2)
    if query_padding_mask is None:
        query_counts = [tgt_len] * bsz
    else:
        query_counts = (~query_padding_mask).sum(1).tolist()
    if value_mean is None:
        value_mean = real_value_mean(v, key_padding_mask)
    if query_padding_mask is None and sample_count(tgt_len, factor) == tgt_len:
        # every query is selected (a decoding step's one, or a handful): nothing to rank them by, and nothing to
        # gather or scatter back; a row with no real key still outputs the mean
        top, chosen = None, (sample_size > 0).view(-1, 1, 1).expand(bsz, 1, tgt_len)
        q_top = q
    else:
        top, chosen = _top_queries(q, k, sample, sample_size, query_counts, query_padding_mask, factor)
        q_top = q.gather(2, top.unsqueeze(-1).expand(-1, -1, -1, dim))
    if need_weights or dropout_p > 0 or q.dtype != _acc(q.dtype):
        scores = torch.matmul(q_top * dim ** -0.5, k.transpose(-1, -2))  # (B, H, u, S)
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask.view(bsz, 1, 1, src_len), torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=_acc(q.dtype)).to(q.dtype)
        dropped = F.dropout(probs, p=dropout_p) if dropout_p > 0 else probs
        top_out = torch.matmul(dropped, v)
    else:
        # the same attention through the fused kernel, which keeps no (u, S) probabilities for backward
        mask = None
        if key_padding_mask is not None:
            mask = torch.zeros(bsz, 1, 1, src_len, dtype=q.dtype, device=q.device).masked_fill(
                key_padding_mask.view(bsz, 1, 1, src_len), torch.finfo(q.dtype).min)
        top_out = F.scaled_dot_product_attention(q_top, k, v, attn_mask=mask)
    # queries picked only to fill the batch's u_max keep the mean, like every unselected query
    top_out = torch.where(chosen.unsqueeze(-1), top_out, value_mean)
    out = top_out if top is None else value_mean.expand(bsz, heads, tgt_len, dim).scatter(
        2, top.unsqueeze(-1).expand(-1, -1, -1, dim), top_out)

    weights = None
    if need_weights:
        real = torch.ones(bsz, src_len, dtype=q.dtype, device=q.device)
        if key_padding_mask is not None:
            real = real.masked_fill(key_padding_mask, 0.0)
        uniform = (real / real.sum(1, keepdim=True).clamp(min=1)).view(bsz, 1, 1, src_len)
        top_probs = torch.where(chosen.unsqueeze(-1), probs, uniform)
        weights = top_probs if top is None else uniform.expand(bsz, heads, tgt_len, src_len).scatter(
            2, top.unsqueeze(-1).expand(-1, -1, -1, src_len), top_probs)
    return out, weights


def real_value_mean(v: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
    """Mean of the real values (B, H, 1, D); zeros for a row without real keys."""
    if key_padding_mask is None:
        return v.mean(2, keepdim=True)
    real = (~key_padding_mask).to(v.dtype).view(v.size(0), 1, 1, -1)
    return torch.matmul(real, v) / real.sum(-1, keepdim=True).clamp(min=1)
