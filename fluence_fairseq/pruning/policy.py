"""Global attention masks from average attention patterns (data-informed attention pruning, Rugina et al. 2020).

Given the average attention probability of every (layer, head, query position, key position) over a data set,
:func:`pruning_mask` keeps the entries that received the most attention and prunes a share ``tau`` (percent) of
the *allowed* entries, i.e. of those the model could attend to at all: structural zeros (the causal triangle of a
decoder self attention, positions beyond the collected length) are neither counted nor kept. The reference
implementation takes a percentile over the whole box, structural zeros included, so its ``tau`` means something
else for causal attention; and its percentile threshold prunes every entry tied with it. Here exactly
``round(tau / 100 * allowed)`` entries are pruned in every group (ties are broken by position), so the share is
what was asked.

Groups (``scope``): ``"layer"`` (the paper: one threshold per layer, heads compete), ``"head"`` (every head keeps
the same share) or ``"model"`` (one threshold over all layers). :func:`random_pruning_mask` is the baseline: the
same number of entries per group, chosen uniformly at random with a seed.
"""
from typing import Optional

import torch
from torch import Tensor

SCOPES = ("layer", "head", "model")


def _check(patterns: Tensor, allowed: Optional[Tensor], tau: float, scope: str) -> Tensor:
    if patterns.dim() != 4:
        raise ValueError(f"patterns must be (layers, heads, query positions, key positions), got {tuple(patterns.shape)}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if not 0.0 <= float(tau) < 100.0:
        raise ValueError(f"tau is the percent of allowed entries to prune and must be in [0, 100), got {tau}")
    if allowed is None:
        return torch.ones(patterns.shape, dtype=torch.bool, device=patterns.device)
    try:
        return allowed.to(torch.bool).expand(patterns.shape)
    except RuntimeError:
        raise ValueError(f"allowed {tuple(allowed.shape)} does not broadcast to the patterns "
                         f"{tuple(patterns.shape)}") from None


def _groups(x: Tensor, scope: str) -> Tensor:
    """(layers, heads, Lq, Lk) -> (groups, entries per group)."""
    layers, heads = x.shape[:2]
    if scope == "model":
        return x.reshape(1, -1)
    if scope == "layer":
        return x.reshape(layers, -1)
    return x.reshape(layers * heads, -1)


def _keep_top(scores: Tensor, allowed: Tensor, tau: float, scope: str) -> Tensor:
    """Keep, in every group, all allowed entries but the ``round(tau% of allowed)`` with the lowest score."""
    flat_scores = _groups(scores, scope).to(torch.float64)
    flat_allowed = _groups(allowed, scope)
    # disallowed entries sort first (they are "pruned" anyway and must not take a kept slot)
    keyed = flat_scores.masked_fill(~flat_allowed, float("-inf"))
    order = torch.sort(keyed, dim=1, stable=True).indices  # ascending; ties keep positional order
    n_allowed = flat_allowed.sum(dim=1)
    n_pruned = torch.round(n_allowed.to(torch.float64) * (float(tau) / 100.0)).to(torch.long)
    n_disallowed = flat_allowed.size(1) - n_allowed
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.size(1), device=order.device).expand_as(order))
    keep = (ranks >= (n_disallowed + n_pruned).unsqueeze(1)) & flat_allowed
    return keep.view(scores.shape)


def pruning_mask(patterns: Tensor, tau: float, scope: str = "layer", allowed: Optional[Tensor] = None) -> Tensor:
    """Bool keep-mask of shape ``patterns.shape`` (True = computed): the allowed entries minus the ``tau`` percent
    of them with the lowest average attention in each ``scope`` group.

    Args:
        patterns: average attention probabilities (layers, heads, Lq, Lk); non-finite values are refused.
        tau: percent of the allowed entries of each group to prune, in [0, 100).
        scope: ``"layer"``, ``"head"`` or ``"model"``.
        allowed: bool, broadcastable to ``patterns``: the entries the attention can use at all (False for the
            causal triangle and for positions the patterns were not collected at). Default: every entry.
    """
    allowed = _check(patterns, allowed, tau, scope)
    if not bool(torch.isfinite(patterns[allowed]).all()):
        raise ValueError("patterns contain NaN or infinite values at allowed positions; recollect them")
    return _keep_top(patterns, allowed, tau, scope)


def random_pruning_mask(shape, tau: float, scope: str = "layer", allowed: Optional[Tensor] = None,
                        seed: int = 0) -> Tensor:
    """The random-pruning baseline: as many pruned entries per group as :func:`pruning_mask` prunes, chosen
    uniformly among the allowed entries with ``torch.Generator().manual_seed(seed)`` (reproducible)."""
    generator = torch.Generator().manual_seed(int(seed))
    scores = torch.rand(tuple(shape), generator=generator, dtype=torch.float64)
    allowed = _check(scores, allowed, tau, scope)
    return _keep_top(scores, allowed.to(scores.device), tau, scope)
