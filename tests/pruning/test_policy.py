"""Global pruning masks from average attention patterns (fluence_fairseq.pruning.policy)."""
import pytest
import torch

from fluence_fairseq.pruning.policy import pruning_mask, random_pruning_mask

L, H, N = 3, 4, 12


def _patterns(seed=0):
    return torch.rand(L, H, N, N, generator=torch.Generator().manual_seed(seed))


def _causal():
    return torch.ones(N, N, dtype=torch.bool).tril()


@pytest.mark.parametrize("scope", ["layer", "head", "model"])
@pytest.mark.parametrize("tau", [0.0, 12.5, 50.0, 90.0])
def test_exactly_the_requested_share_of_allowed_entries_is_pruned(scope, tau):
    allowed = _causal()
    keep = pruning_mask(_patterns(), tau, scope, allowed=allowed)
    assert not bool(keep[:, :, ~allowed].any())  # structural zeros are never kept ...
    groups = {"layer": keep.reshape(L, -1), "head": keep.reshape(L * H, -1), "model": keep.reshape(1, -1)}[scope]
    per_group_allowed = int(allowed.sum()) * {"layer": H, "head": 1, "model": L * H}[scope]
    pruned = per_group_allowed - groups.sum(dim=1)
    # ... and do not count toward tau: the share is of the allowed entries of each group
    assert torch.equal(pruned, torch.full_like(pruned, round(per_group_allowed * tau / 100)))


def test_the_lowest_average_attention_is_pruned_first():
    patterns = _patterns(1)
    keep = pruning_mask(patterns, 50.0, "layer")
    for layer in range(L):
        kept, dropped = patterns[layer][keep[layer]], patterns[layer][~keep[layer]]
        assert kept.min() >= dropped.max()


def test_ties_are_broken_by_position_so_the_share_stays_exact():
    patterns = torch.zeros(1, 2, 4, 4)  # everything tied: a percentile threshold would prune all or nothing
    keep = pruning_mask(patterns, 25.0, "model")
    assert int((~keep).sum()) == 8
    assert torch.equal(keep, pruning_mask(patterns, 25.0, "model"))


def test_head_scope_gives_every_head_the_same_share_and_layer_scope_lets_heads_compete():
    patterns = _patterns(2)
    patterns[0, 0] += 10  # head 0 of layer 0 attends much more strongly everywhere
    per_head = pruning_mask(patterns, 50.0, "head").reshape(L, H, -1).sum(-1)
    assert torch.equal(per_head, torch.full_like(per_head, N * N // 2))
    per_layer = pruning_mask(patterns, 50.0, "layer").reshape(L, H, -1).sum(-1)
    assert per_layer[0, 0] == N * N and per_layer[0].sum() == H * N * N // 2


def test_random_baseline_is_reproducible_with_its_seed_and_prunes_the_same_count():
    allowed = _causal()
    a = random_pruning_mask((L, H, N, N), 90.0, "layer", allowed=allowed, seed=7)
    b = random_pruning_mask((L, H, N, N), 90.0, "layer", allowed=allowed, seed=7)
    c = random_pruning_mask((L, H, N, N), 90.0, "layer", allowed=allowed, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a.reshape(L, -1).sum(1), pruning_mask(_patterns(), 90.0, "layer", allowed=allowed)
                       .reshape(L, -1).sum(1))
    assert not bool(a[:, :, ~allowed].any())


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="tau is the percent"):
        pruning_mask(_patterns(), 100.0)
    with pytest.raises(ValueError, match="scope must be one of"):
        pruning_mask(_patterns(), 10.0, "row")
    with pytest.raises(ValueError, match=r"\(layers, heads, query positions, key positions\)"):
        pruning_mask(torch.rand(4, N, N), 10.0)
    with pytest.raises(ValueError, match="does not broadcast"):
        pruning_mask(_patterns(), 10.0, allowed=torch.ones(N + 1, N, dtype=torch.bool))
    bad = _patterns()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pruning_mask(bad, 10.0)
