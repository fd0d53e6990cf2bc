"""Sparse attention: the α-entmax normalisers (fluence_fairseq.ops.entmax) and the three attentions."""
import re

import entmax as entmax_pkg
import pytest
import torch

import randomized
from fluence_fairseq import FSAlphaEntmax, FSEntmax15, FSSparsemax
from fluence_fairseq.modules.entmax import (ALPHA_MAX, ALPHA_MIN, EntmaxAttentionBase, learned_alpha,
                                           parse_alpha_init)
from fluence_fairseq.ops.entmax import entmax, entmax15, sparsemax


def _scores(*shape, seed=0, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).to(dtype)


def _full_row_steps(ops, monkeypatch, width):
    """A list to which every Newton step of ``ops`` adds its number of rows if they are full rows of ``width``
    entries (0 for steps on gathered or compacted copies)."""
    steps = []
    step = ops._newton_step
    monkeypatch.setattr(ops, "_newton_step",
                        lambda u, *a: steps.append(u.size(0) * (u.size(-1) == width)) or step(u, *a))
    return steps


@pytest.fixture(params=["torch.pow", "powers by logarithms"])
def search_machinery(request, monkeypatch):
    """Small inputs through the search built for large ones (its chunks, starts, gathers, settling and compacted
    rows), not through the path for small problems (:func:`~fluence_fairseq.ops.entmax._small_entmax_with_stats`)
    nor the lean steps of small searches (``LEAN_AT_MOST``); a general α's powers each way
    :func:`~fluence_fairseq.ops.entmax.nonnegative_power` may take them, whichever this machine would choose."""
    import fluence_fairseq.ops.entmax as ops
    monkeypatch.setattr(ops, "SMALL_ELEMENTS", 0)
    monkeypatch.setattr(ops, "LEAN_AT_MOST", 0)
    monkeypatch.setattr(ops, "POWERS_BY_LOGARITHMS", request.param == "powers by logarithms")


@pytest.fixture(params=["small-problem path", "search", "search, powers by logarithms"])
def either_path(request, monkeypatch):
    """Each normaliser test on both paths a small input may take (the search's powers each way)."""
    import fluence_fairseq.ops.entmax as ops
    if request.param != "small-problem path":
        monkeypatch.setattr(ops, "SMALL_ELEMENTS", 0)
    monkeypatch.setattr(ops, "POWERS_BY_LOGARITHMS", request.param == "search, powers by logarithms")


# ------------------------------------------------------------------------------------------ normalisers
@pytest.mark.usefixtures("either_path")
@pytest.mark.parametrize("ours,reference", [(sparsemax, entmax_pkg.sparsemax), (entmax15, entmax_pkg.entmax15)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_exact_normalisers_match_the_entmax_package(ours, reference, dtype, tol):
    x = _scores(16, 8, 64, scale=2.0, dtype=dtype)
    p = ours(x)
    assert p.dtype == dtype
    torch.testing.assert_close(p, reference(x), atol=tol, rtol=0)
    torch.testing.assert_close(p.sum(-1), torch.ones(16, 8, dtype=dtype), atol=tol, rtol=0)
    assert (p == 0).any() and (p >= 0).all()


@pytest.mark.usefixtures("either_path")
@pytest.mark.parametrize("alpha", [1.01, 1.1, 1.3, 1.7, 2.0, 3.0])
def test_alpha_entmax_matches_bisection_in_float64(alpha):
    x = _scores(32, 50, scale=2.0, dtype=torch.float64)
    reference = entmax_pkg.entmax_bisect(x, alpha, n_iter=100)
    torch.testing.assert_close(entmax(x, alpha), reference, atol=1e-10, rtol=0)
    torch.testing.assert_close(entmax(x, torch.tensor(alpha, dtype=torch.float64)), reference, atol=1e-10, rtol=0)
    # float32: the package's float32 accuracy (1e-5 is what the issue asks)
    torch.testing.assert_close(entmax(x.float(), alpha).double(), reference, atol=1e-5, rtol=0)


@pytest.mark.usefixtures("either_path")
def test_per_head_alpha_broadcasts_like_separate_calls():
    x = _scores(2, 3, 5, 9)
    alpha = torch.tensor([1.2, 1.5, 1.9]).view(1, 3, 1, 1)
    p = entmax(x, alpha)
    for h, a in enumerate([1.2, 1.5, 1.9]):
        torch.testing.assert_close(p[:, h], entmax(x[:, h], a), atol=1e-6, rtol=0)


@pytest.mark.usefixtures("search_machinery")
@pytest.mark.parametrize("alpha", [2.0, 1.5, 1.3, "per-head"])
def test_rows_normalised_in_chunks_equal_one_pass(alpha, monkeypatch):
    """The threshold search and the output run a chunk of rows at a time (forced to 3 rows of 9, the backward to 2:
    chunks cut across heads, through a fully masked row and the masked half of a batch); probabilities and the
    gradients in x and alpha are those of one pass over all rows (to the last ulp: a row's sums may be vectorised from another
    alignment; α's gradient divides differences of those sums by (α-1)², 25 for α = 1.2, so its ulps are
    compared relative to its size)."""
    import fluence_fairseq.ops.entmax as ops

    x = _scores(2, 3, 5, 9, scale=2.0, dtype=torch.float64)
    mask = torch.zeros(2, 3, 5, 9, dtype=torch.bool)
    mask[0, 1, 2] = True
    mask[1, :, :, 4:] = True
    weight = _scores(2, 3, 5, 9, seed=1, dtype=torch.float64)
    a = torch.tensor([1.2, 1.5, 1.9], dtype=torch.float64).view(1, 3, 1, 1) if alpha == "per-head" else alpha

    def run():
        leaves = [x.clone().requires_grad_()] + ([a.clone().requires_grad_()] if alpha == "per-head" else [])
        p = entmax(leaves[0], leaves[1] if alpha == "per-head" else a, mask=mask)
        return [p.detach()] + list(torch.autograd.grad((p * weight).sum(), leaves))

    whole = run()
    searches = []
    search = ops._newton_threshold
    monkeypatch.setattr(ops, "_newton_threshold",
                        lambda u, beta, start=None, steps=None: searches.append(u.size(0)) or search(u, beta, start,
                                                                                               steps))
    monkeypatch.setattr(ops, "ROW_CHUNK_ELEMENTS", 3 * 9)
    monkeypatch.setattr(ops, "BACKWARD_ROW_CHUNK_ELEMENTS", 2 * 9)  # backward's chunks of their own: 2 rows
    chunked = run()
    assert searches == [3] * 10
    for got, want in zip(chunked[:2], whole[:2]):
        torch.testing.assert_close(got, want, atol=1e-15, rtol=0)
    if alpha == "per-head":
        torch.testing.assert_close(chunked[2], whole[2], atol=0, rtol=5e-14)
    assert bool((whole[0][0, 1, 2] == 0).all())


@pytest.mark.usefixtures("search_machinery")
@pytest.mark.parametrize("length", [300, 1024])  # 300: a last group of 12 entries
@pytest.mark.parametrize("scale", [0.2, 2.0, 20.0])  # supports of most of the row, tens of entries, one or two
def test_long_rows_searched_from_their_group_maxima_match_the_package(length, scale):
    """Rows of at least GROUP_START_FROM entries start their Newton search at the threshold of their group maxima;
    the result is the same normaliser: the package's sort-based sparsemax / 1.5-entmax and its bisection for
    other α, per-head α included, with masked entries, a row masked but for its last entry and a fully masked
    row."""
    import fluence_fairseq.ops.entmax as ops

    assert length >= ops.GROUP_START_FROM
    x = _scores(2, 3, 4, length, scale=scale, dtype=torch.float64)
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) < 0.2
    mask[0, 0, 0] = True
    mask[0, 0, 1] = True
    mask[0, 0, 1, -1] = False
    masked = x.masked_fill(mask, -1e6)  # the package fails on rows of -inf only: -1e6 gets probability 0 too
    live = ~mask.all(-1, keepdim=True)
    torch.testing.assert_close(sparsemax(x, mask=mask), entmax_pkg.sparsemax(masked) * live, atol=1e-12, rtol=0)
    torch.testing.assert_close(entmax15(x, mask=mask), entmax_pkg.entmax15(masked) * live, atol=1e-12, rtol=0)
    alpha = torch.tensor([1.1, 1.3, 1.8], dtype=torch.float64).view(1, 3, 1, 1)
    p = entmax(x, alpha, mask=mask)
    for h, a in enumerate([1.1, 1.3, 1.8]):
        reference = entmax_pkg.entmax_bisect(masked[:, h], a, n_iter=100) * live[:, h]
        torch.testing.assert_close(p[:, h], reference, atol=1e-10, rtol=0)
    assert torch.equal(p[0, 0, 0], torch.zeros(length)) and p[0, 0, 1, -1] == 1


@pytest.mark.usefixtures("search_machinery")
@pytest.mark.parametrize("alpha", [2.0, 1.5, 1.3])
def test_group_maxima_start_below_the_root_and_on_it_when_the_support_lies_in_separate_groups(alpha, monkeypatch):
    """The start is the threshold of the group maxima: at or below the row's (dropping entries only lowers the
    sum); when every entry of the support is its group's maximum it is the row's threshold, and the search
    takes one step (the one that confirms it) on the gathered support, never on the full row."""
    import fluence_fairseq.ops.entmax as ops

    size, groups = ops.START_GROUP, 32  # 4 of 32 groups hold the support: few enough to gather
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, size * groups, generator=gen, dtype=torch.float64) * 0.1
    x[:, [3, size + 5, 4 * size, 9 * size + 31]] += torch.tensor([4.0, 3.8, 3.7, 3.5], dtype=torch.float64)
    steps = []
    step = ops._newton_step
    monkeypatch.setattr(ops, "_newton_step", lambda u, *a: steps.append(u.size(-1)) or step(u, *a))
    p, stats = ops.entmax_with_stats(x, alpha, None)
    # the entries above the start are the support: the confirming step runs on those 4 alone (the start's on the
    # 32 group maxima, or on the 4 of them above -1)
    assert steps.count(size * groups) == 0 and steps[-1] == 4
    assert ((p > 0).sum(-1) <= 4).all() and (p[:, 3] > 0).all()
    torch.testing.assert_close(p, entmax(x, alpha), atol=1e-12, rtol=0)
    # two entries of the support in one group: the start is below the threshold, the result the same
    x[:, 4] = x[:, 3] - 0.05
    _, _, shift, maxima = ops._row_shifts(x, None, size)
    start = ops._newton_threshold((maxima - shift) * (alpha - 1), 1 / (alpha - 1))[0]
    p, stats = ops.entmax_with_stats(x, alpha, None)
    assert (start < stats[:, 1:2] - 1e-6).all() and (p[:, 4] > 0).all()
    reference = {2.0: entmax_pkg.sparsemax, 1.5: entmax_pkg.entmax15}.get(alpha)
    expected = reference(x) if reference else entmax_pkg.entmax_bisect(x, alpha, n_iter=100)
    torch.testing.assert_close(p, expected, atol=1e-10, rtol=0)


def test_support_parts_of_groups_over_budget_are_dropped_before_they_are_joined():
    """Parts of the support (each listed for a span of rows) whose group of rows holds more than the budget are
    dropped and their rows unmarked before the parts are joined; a part across two groups is counted by its rows and
    kept whole. The groups then listed are exactly those listed from all the parts: a group at the budget stays."""
    import fluence_fairseq.ops.entmax as ops

    group_rows, most = 4, 6
    gen = torch.Generator().manual_seed(0)

    def part(first, stop, count):
        rows = torch.randint(first, stop, (count,), generator=gen).sort().values
        return rows, torch.randint(0, 50, (count,), generator=gen)

    # groups 0 (rows 0-3): 3 + 3 = 6 (at the budget), 1 (4-7): 4 + 3 = 7 (over), 2 (8-11): 2 + 3 from the part
    # across groups 2 and 3, 3 (12-15): 2 from it and 5 = 7 (over)
    spans = [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 14), (14, 16)]
    parts = [part(0, 2, 3), part(2, 4, 3), part(4, 6, 4), part(6, 8, 3), part(8, 10, 2), None, part(14, 16, 5)]
    parts[5] = (torch.tensor([10, 11, 11, 12, 13]), torch.tensor([1, 2, 3, 4, 5]))
    listed = torch.ones(16, dtype=torch.bool)
    kept = ops._parts_within_budget(list(parts), spans, listed.clone(), group_rows, most)
    assert [id(p) for p in kept] == [id(parts[i]) for i in (0, 1, 4, 5)]
    marked = listed.clone()
    ops._parts_within_budget(list(parts), spans, marked, group_rows, most)
    assert marked.tolist() == [True] * 4 + [False] * 4 + [True] * 4 + [False] * 4

    def joined(ps):
        return tuple(torch.cat(t) for t in zip(*ps))

    everything = ops._listed_groups(joined(parts), listed.clone(), group_rows, most)
    budgeted = ops._listed_groups(joined(kept), marked, group_rows, most)
    for a, b in zip(everything, budgeted):
        assert torch.equal(a, b)
    assert everything[2].tolist() == [True, False, True, False]
    assert ops._parts_within_budget(list(parts[:2]), spans[:2], listed.clone(), group_rows, most) == list(parts[:2])


@pytest.mark.usefixtures("search_machinery")
@pytest.mark.parametrize("alpha", [2.0, 1.5, 1.3])
def test_support_spread_over_many_groups_is_searched_through_their_halves(alpha, monkeypatch):
    """Rows whose support has one entry in each of 14 of their 32 groups (too many groups to search through, 7/16)
    but in 14 of their 64 halves (7/32): the chunk is searched through the halves above the start, before its
    shift, and gives the reference's probabilities, row statistics equal to the full search's and its support
    listed; a masked entry and a fully masked row change nothing."""
    import fluence_fairseq.ops.entmax as ops

    g = ops.START_GROUP
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 32 * g, generator=gen, dtype=torch.float64) * 0.1
    # one large entry in the first or second half of 14 groups, all 14 in the support; 1.5-entmax's spread so that
    # its smallest ones are above the start only once scaled by α - 1 (the halves' maxima must be, as the groups')
    spread = 0.03 if alpha == 1.5 else 0.001
    for i, group in enumerate(range(0, 28, 2)):
        x[:, group * g + (5 if i % 2 else g // 2 + 7)] = 3.0 - spread * i
    mask = torch.zeros(x.shape, dtype=torch.bool)
    mask[1, 7] = True
    mask[5] = True
    searched = []
    unshifted = ops._gathered_unshifted
    monkeypatch.setattr(ops, "_gathered_unshifted", lambda *a, **kw: searched.append(a[-1]) or unshifted(*a, **kw))
    p, stats, support = ops.entmax_with_stats(x, alpha, mask, with_support=0.5)
    assert searched == [ops.FINE_GROUP]
    masked = x.masked_fill(mask, float("-inf"))
    reference = {2.0: entmax_pkg.sparsemax, 1.5: entmax_pkg.entmax15}.get(alpha)
    expected = reference(masked[:5]) if reference else entmax_pkg.entmax_bisect(masked[:5], alpha, n_iter=100)
    torch.testing.assert_close(p[:5], expected, atol=1e-10, rtol=0)
    assert torch.equal(p[5], torch.zeros_like(p[5]))
    assert torch.equal(torch.stack(support, 1), (p > 0).nonzero())
    monkeypatch.setattr(ops, "FINE_GROUP", ops.START_GROUP)  # halves as large as the groups: never sparse
    searched.clear()
    p_full, stats_full, _ = ops.entmax_with_stats(x, alpha, mask, with_support=0.5)
    assert searched == []
    torch.testing.assert_close(p, p_full, atol=1e-12, rtol=0)
    torch.testing.assert_close(stats, stats_full, atol=1e-12, rtol=0)


@pytest.mark.usefixtures("search_machinery")
@pytest.mark.parametrize("scale", [2.0, 20.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_general_alpha_searches_the_entries_above_its_start_only(scale, dtype, monkeypatch):
    """For α other than 1.5 and 2 (a power of every entry in every Newton step) a chunk whose rows have few entries
    above their group-maxima start runs the search on those entries alone and scatters the output: probabilities
    and row statistics equal the full-row search's (forced by GATHER_BELOW = 0), with masked entries, a fully
    masked row and a row masked but for its last entry; dense chunks (α = 1.1 at scale 2) are not gathered: their
    sampled rows too wide to try, or most of their entries above the start (searched from their mean's bound)."""
    import fluence_fairseq.ops.entmax as ops

    x = _scores(2, 3, 4, 1024, scale=scale, dtype=dtype)
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) < 0.2
    mask[0, 0, 0] = True
    mask[0, 0, 1] = True
    mask[0, 0, 1, -1] = False
    alpha = torch.tensor([1.1, 1.3, 1.8], dtype=dtype).view(1, 3, 1, 1)
    monkeypatch.setattr(ops, "ROW_CHUNK_ELEMENTS", 4 * 1024)  # one chunk per (batch, head)
    outcomes = []  # (α of each row of a search, how it was searched)
    gathered, unshifted, mean_start = ops._gathered_threshold, ops._gathered_unshifted, ops._mean_start

    def alphas_of(beta):
        return [round(1 + 1 / b, 6) for b in beta.reshape(-1).tolist()]

    def spy(*args, **kwargs):
        found = gathered(*args, **kwargs)
        if kwargs.get("output", True):  # the chunks' searches, not their starts'
            outcomes.append((alphas_of(args[1]), "gathered" if found is not None else "refused"))
        return found

    def unshifted_spy(*args, **kw):  # runs of chunks with few groups above their start, searched before their shift
        found = unshifted(*args, **kw)
        outcomes.append((alphas_of(args[6]), "gathered" if found is not None else "refused"))
        return found

    def dense_spy(u, beta, start):
        outcomes.append((alphas_of(beta), "dense"))
        return mean_start(u, beta, start)

    monkeypatch.setattr(ops, "_gathered_threshold", spy)
    monkeypatch.setattr(ops, "_gathered_unshifted", unshifted_spy)
    monkeypatch.setattr(ops, "_mean_start", dense_spy)
    p, stats = ops.entmax_with_stats(x, alpha, mask)
    rows = [(a, how) for alphas, how in outcomes for a in alphas]
    monkeypatch.setattr(ops, "GATHER_BELOW", 0.0)
    outcomes.clear()
    p_full, stats_full = ops.entmax_with_stats(x, alpha, mask)
    assert all(how != "gathered" for _, how in outcomes)
    if scale == 20.0:
        assert sorted(a for a, _ in rows) == [1.1] * 8 + [1.3] * 8 + [1.8] * 8
        assert all(how == "gathered" for _, how in rows)
    else:  # α = 1.1 dense (searched from its mean, or in full, too wide to try), 1.8 sparse
        assert {how for a, how in rows if a == 1.1} <= {"refused", "dense"} and ("dense" in {h for _, h in rows})
        assert [how for a, how in rows if a == 1.8] == ["gathered"] * 8
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(p, p_full, atol=tol, rtol=0)
    torch.testing.assert_close(stats, stats_full, atol=tol, rtol=tol)
    assert torch.equal(p[0, 0, 0], torch.zeros(1024, dtype=dtype)) and p[0, 0, 1, -1] == 1
    assert (p[mask] == 0).all()


@pytest.mark.usefixtures("search_machinery")
def test_a_chunk_with_a_row_too_wide_to_gather_is_refused_before_listing_its_entries(monkeypatch):
    """The sampled columns predict the gathered copy's widest row (rows of 1,024 or more entries: 64 samples a row
    or more): one row with most of its entries above the start refuses the chunk before anything is listed, though
    the chunk's mean share is small; shorter rows judge by the mean share, and by a row most of whose samples
    (more than WIDE_ROW_SAMPLES) are above."""
    import fluence_fairseq.ops.entmax as ops

    u = torch.full((64, 1024), -2.0)
    u[:, 0] = 0.0
    u[7, :900] = -0.1  # one wide row
    start = torch.full((64, 1), -0.5)
    share, row_share = ops._sampled_shares(u, start)
    assert share < 0.05 and row_share > 0.8
    assert ops._too_wide(share, row_share, 1024) and ops._too_wide(share, row_share, 512)
    u[7, 600:] = -2.0  # 38 of its 64 samples above: wide for rows of 1,024, not judged wide on fewer samples
    share, row_share = ops._sampled_shares(u, start)
    assert 0.5 < row_share <= ops.WIDE_ROW_SAMPLES
    assert ops._too_wide(share, row_share, 1024) and not ops._too_wide(share, row_share, 512)
    u[7, :900] = -0.1
    listed = []
    entries = ops._entries_above
    monkeypatch.setattr(ops, "_entries_above", lambda *a, **k: listed.append(1) or entries(*a, **k))
    assert ops._gathered_threshold(u.clone(), 4.0, start, None) is None and not listed
    u[7, :900] = -2.0
    assert ops._gathered_threshold(u.clone(), 4.0, start, None) is not None and listed


@pytest.mark.usefixtures("search_machinery")
@pytest.mark.parametrize("alpha", [2.0, 1.5, 1.3, "per-head"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_sparse_chunks_searched_before_their_shift_equal_the_shifted_search(alpha, dtype, masked, monkeypatch):
    """Chunks of rows whose groups above the start are few are searched on those groups' entries, shifted alone,
    and the output scattered into zeros, the chunk never shifted as a whole: the probabilities and row statistics
    equal the search over shifted chunks (forced by gathering nowhere), with a dense head beside sparse ones (runs
    of sparse chunks and a dense chunk between them), masked entries, a fully masked row, a row masked but for its
    last entry, ties at a group maximum; a chunk with a row too wide to gather is shifted as a whole."""
    import fluence_fairseq.ops.entmax as ops

    n = 1024
    x = _scores(2, 4, 6, n, seed=3, dtype=torch.float64)
    x[:, :3] *= torch.tensor([20.0, 8.0, 12.0], dtype=torch.float64).view(1, 3, 1, 1)  # sparse heads
    x[:, 3] *= 0.01  # a dense head: most of its groups above the start
    x[0, 0, 2, 64:67] = x[0, 0, 2].max() + 1.0  # a tie at a group's maximum, in the support
    x = x.to(dtype)
    mask = None
    if masked:
        mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) < 0.2
        mask[0, 0, 0] = True
        mask[0, 1, 1] = True
        mask[0, 1, 1, -1] = False
        mask[0, 0, 2, 64:67] = False
    a = torch.tensor([1.2, 1.5, 1.9, 1.3], dtype=torch.float64).view(1, 4, 1, 1) if alpha == "per-head" else alpha
    monkeypatch.setattr(ops, "ROW_CHUNK_ELEMENTS", 6 * n)  # one chunk per (batch, head)
    runs, shifted = [], []
    unshifted, shifted_search = ops._gathered_unshifted, ops._shifted_search
    monkeypatch.setattr(ops, "_gathered_unshifted",
                        lambda *args, **kw: runs.append((args[0].size(0), unshifted(*args, **kw))) or runs[-1][1])
    monkeypatch.setattr(ops, "_shifted_search", lambda x_rows, *args, **kw: shifted.append(x_rows.size(0))
                        or shifted_search(x_rows, *args, **kw))
    p, stats = ops.entmax_with_stats(x, a, mask)
    # heads 0-2 of both batches are sparse: two runs of 18 rows, searched unshifted; the dense heads shifted
    assert [rows for rows, _ in runs] == [18, 18]
    assert shifted == [6, 6]
    monkeypatch.setattr(ops, "GATHER_DEVICES", ())
    p_full, stats_full = ops.entmax_with_stats(x, a, mask)
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(p, p_full, atol=tol, rtol=0)
    torch.testing.assert_close(stats, stats_full, atol=tol, rtol=tol)
    torch.testing.assert_close(p.sum(-1)[p.sum(-1) > 0], torch.ones_like(p.sum(-1)[p.sum(-1) > 0]), atol=tol, rtol=0)
    assert (p[0, 0, 2, 64:67] > 0).all()
    if masked:
        assert (p[mask] == 0).all() and torch.equal(p[0, 0, 0], torch.zeros(n, dtype=p.dtype))
        assert p[0, 1, 1, -1] == 1
    # a chunk with a row whose groups above the start could hold more than GATHER_BELOW of its entries (a row too
    # wide to gather) is not sparse: it is shifted and judged as a whole
    monkeypatch.setattr(ops, "GATHER_DEVICES", ("cpu",))
    monkeypatch.setattr(ops, "GATHER_BELOW", 1 / n)
    runs.clear(), shifted.clear()
    p_refused, stats_refused = ops.entmax_with_stats(x, a, mask)
    assert not runs and shifted == [6] * 8
    torch.testing.assert_close(p_refused, p_full, atol=tol, rtol=0)
    torch.testing.assert_close(stats_refused, stats_full, atol=tol, rtol=tol)


@pytest.mark.usefixtures("either_path")
@pytest.mark.parametrize("alpha", [2.0, 1.5, 1.3, 2.5, "per-head"])
@pytest.mark.parametrize("shape", [(0, 3, 512), (2, 3, 0)])
def test_no_rows_or_rows_without_entries_give_empty_results_and_gradients(alpha, shape):
    """An empty batch and rows of no entries (attention over no keys) give empty probabilities, empty score
    gradients and a zero α gradient, as softmax does, instead of a reshape error."""
    x = torch.randn(*shape, requires_grad=True)
    a = torch.tensor([1.2, 1.6, 1.9], requires_grad=True) if alpha == "per-head" else alpha
    p = entmax(x, a.view(3, 1) if alpha == "per-head" else a)
    assert p.shape == x.shape
    p.sum().backward()
    assert x.grad.shape == x.shape
    if alpha == "per-head":
        assert torch.equal(a.grad, torch.zeros(3))


@pytest.mark.parametrize("alpha", [2.0, 1.5, 1.25, 1.9, "per-head"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 3e-6)])
@pytest.mark.parametrize("shape", [(2, 3, 5, 9), (5, 3, 1, 40), (4, 3, 1, 350)])  # sorted, sorted, Newton steps
def test_small_problems_take_their_own_path_and_equal_the_search(alpha, dtype, tol, shape, monkeypatch):
    """A small problem (a decoding step) is normalised apart, without the search's chunks, starts and gathers:
    sparsemax and 1.5-entmax from the sorted rows up to SORTED_ELEMENTS scores and by plain Newton steps
    beyond, any other α by plain Newton steps. Probabilities, their support and the row statistics equal the
    search's, with masked entries, -inf scores, a row without entries, ties and a one-hot row."""
    import fluence_fairseq.ops.entmax as ops
    x = _scores(*shape, seed=3, scale=2.0, dtype=dtype)
    x[0, 0, 0, : shape[-1] // 2] = 1.0  # ties at the top
    x[1, 1, 0, 1:] = float("-inf")  # one entry left: one-hot
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[0, 1, 0] = True  # a row without entries
    mask[:, 2, :, ::3] = True
    a = torch.tensor([1.2, 1.6, 2.0], dtype=dtype).view(1, 3, 1, 1) if alpha == "per-head" else alpha
    calls = []
    for name in ("_small_entmax_with_stats", "_sorted_threshold", "_plain_newton", "_newton_threshold"):
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *args, _f=original, _n=name, **kw: calls.append(_n) or _f(*args, **kw))
    p, stats = ops.entmax_with_stats(x, a, mask)
    sorted_rows = alpha in (2.0, 1.5) and x.numel() <= ops.SORTED_ELEMENTS
    assert calls[0] == "_small_entmax_with_stats" and "_newton_threshold" not in calls
    assert ("_sorted_threshold" in calls) == sorted_rows and ("_plain_newton" in calls) != sorted_rows
    monkeypatch.setattr(ops, "SMALL_ELEMENTS", 0)
    calls.clear()
    p_search, stats_search = ops.entmax_with_stats(x, a, mask)
    assert "_newton_threshold" in calls and "_small_entmax_with_stats" not in calls
    torch.testing.assert_close(p, p_search, atol=tol, rtol=0)
    assert torch.equal(p > 0, p_search > 0) or tol > 1e-10  # float32 may round an entry at the threshold
    live = stats_search[..., 2] != 0
    assert torch.equal(stats[..., 2] != 0, live) and not live[0, 1, 0]
    torch.testing.assert_close(stats[live], stats_search[live], atol=tol, rtol=tol)
    assert torch.equal(p[0, 1, 0], torch.zeros(shape[-1], dtype=dtype)) and p[1, 1, 0, 0] == 1
    torch.testing.assert_close(p.sum(-1)[live], torch.ones_like(p.sum(-1)[live]), atol=tol, rtol=0)


@pytest.mark.parametrize("alpha", [2.0, 1.5])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 3e-6), (torch.float16, 1e-3)])
@pytest.mark.parametrize("shape", [(2, 3, 5, 9), (5, 3, 1, 40)])
def test_small_unmasked_problems_take_the_fewest_calls_and_equal_the_search(alpha, dtype, tol, shape, monkeypatch):
    """Without a mask (a decoding step's scores) sparsemax and 1.5-entmax of a small problem skip the row
    bookkeeping (:func:`_small_sorted_entmax`) and equal the search's probabilities, with -inf scores, a row of
    -inf only (zeros), ties and a one-hot row; the thresholds' 1/k come from the longest rows seen before."""
    import fluence_fairseq.ops.entmax as ops
    x = _scores(*shape, seed=5, scale=2.0, dtype=torch.float64).to(dtype)
    x[0, 0, 0, : shape[-1] // 2] = 1.0  # ties at the top
    x[1, 1, 0, 1:] = float("-inf")  # one entry left: one-hot
    x[0, 1, 0] = float("-inf")  # a row without entries
    x[:, 2, :, ::3] = float("-inf")
    ops.entmax(_scores(2, 700, dtype=torch.float64).to(dtype), alpha)  # longer rows first: their 1/k are cached
    calls = []
    original = ops._small_sorted_entmax
    monkeypatch.setattr(ops, "_small_sorted_entmax", lambda *args: calls.append(args[1]) or original(*args))
    p = ops.entmax(x, alpha)
    assert calls == [1 / (alpha - 1)] and p.dtype == dtype
    monkeypatch.setattr(ops, "SMALL_ELEMENTS", 0)
    p_search = ops.entmax(x, alpha)
    assert calls == [1 / (alpha - 1)]
    torch.testing.assert_close(p, p_search, atol=tol, rtol=0)
    assert torch.equal(p[0, 1, 0], torch.zeros(shape[-1], dtype=dtype)) and p[1, 1, 0, 0] == 1
    live = p.sum(-1) > 0
    torch.testing.assert_close(p.sum(-1)[live].double(), torch.ones_like(p.sum(-1)[live]).double(), atol=tol, rtol=0)


@pytest.mark.parametrize("alpha", [1.3, "per-head"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 3e-6), (torch.float16, 1e-3)])
@pytest.mark.parametrize("shape", [(5, 4, 1, 16), (5, 4, 1, 300)])
@pytest.mark.parametrize("masked", [False, True])
def test_small_general_problems_without_statistics_take_the_lean_steps_and_equal_the_search(alpha, dtype, tol, shape,
                                                                                               masked, monkeypatch):
    """A general α's small problem without row statistics (a decoding step) is normalised in its own shape by
    the lean Newton steps (no row bookkeeping, d^(β-1) and one dot product a step, one convergence check for all
    rows) and equals the search's probabilities: with per-head α from 1.01 to exactly 2 (where d^0 would count
    the zeros), masked entries, -inf scores, rows without entries (all -inf, or all masked), ties and a one-hot
    row."""
    import fluence_fairseq.ops.entmax as ops
    x = _scores(*shape, seed=7, scale=2.0, dtype=torch.float64).to(dtype)
    x[0, 0, 0, : shape[-1] // 2] = 1.0  # ties at the top
    x[1, 1, 0, 1:] = float("-inf")  # one entry left: one-hot
    x[2, 1, 0] = float("-inf")  # a row without entries
    x[:, 2, :, ::3] = float("-inf")
    mask = None
    if masked:
        mask = torch.zeros(shape[0], 1, 1, shape[-1], dtype=torch.bool)  # key padding, broadcast over heads
        mask[3, 0, 0, shape[-1] // 3:] = True
        mask[4] = True  # a row without entries
    a = torch.tensor([1.01, 1.6, 2.0, 1.2], dtype=dtype).view(1, 4, 1, 1) if alpha == "per-head" else alpha
    calls = []
    for name in ("_small_general_entmax", "_small_newton_step", "_newton_step", "_row_shifts"):
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *args, _f=original, _n=name, **kw: calls.append(_n) or _f(*args, **kw))
    p = ops.entmax(x, a, mask=mask)
    assert calls[0] == "_small_general_entmax" and "_small_newton_step" in calls
    assert "_newton_step" not in calls and "_row_shifts" not in calls
    assert p.shape == x.shape and p.dtype == dtype
    monkeypatch.setattr(ops, "SMALL_ELEMENTS", 0)
    p_search = ops.entmax(x, a, mask=mask)
    torch.testing.assert_close(p, p_search, atol=tol, rtol=0)
    assert torch.equal(p[2, 1, 0], torch.zeros(shape[-1], dtype=dtype)) and p[1, 1, 0, 0] == 1
    if masked:
        assert torch.equal(p[4], torch.zeros_like(p[4])) and torch.equal(p[3, :, :, shape[-1] // 3:],
                                                                        torch.zeros_like(p[3, :, :, shape[-1] // 3:]))
    live = p.sum(-1) > 0
    torch.testing.assert_close(p.sum(-1)[live].double(), torch.ones_like(p.sum(-1)[live]).double(), atol=tol, rtol=0)


def test_small_general_problems_that_do_not_converge_are_normalised_from_the_threshold_reached(monkeypatch):
    """Where the lean steps do not converge within MAX_NEWTON_STEPS, the small problem is normalised from the
    threshold reached, as the statistics' path does (rows of its own shape): the same probabilities, rows without
    entries 0."""
    import fluence_fairseq.ops.entmax as ops
    x = _scores(5, 4, 1, 40, seed=2, scale=3.0)
    x[2, 1, 0] = float("-inf")  # a row without entries
    a = torch.tensor([1.1, 1.5, 1.9, 1.3]).view(1, 4, 1, 1)
    monkeypatch.setattr(ops, "MAX_NEWTON_STEPS", 2)
    u = (x - x.amax(-1, keepdim=True)) * (a - 1)
    assert ops._plain_newton(u, 1 / (a - 1))[1:] == (None, None)  # two steps from -1: not converged
    p = ops._small_general_entmax(x, a, None)
    p_stats, _ = ops._small_entmax_with_stats(x, a, None)  # with statistics: rows of (R, n), one β each
    torch.testing.assert_close(p, p_stats, atol=1e-7, rtol=0)
    assert torch.equal(p[2, 1, 0], torch.zeros(40)) and bool((p.sum(-1)[p.sum(-1) > 0] - 1).abs().max() < 1e-5)
    monkeypatch.setattr(ops, "MAX_NEWTON_STEPS", 50)
    assert not torch.allclose(p, ops._small_general_entmax(x, a, None), atol=1e-7)  # converged: other numbers


def test_factors_cached_under_inference_mode_serve_calls_with_gradients():
    """The sorted thresholds' cached 1/k made by a first call under ``torch.inference_mode`` (fairseq-generate may
    run there) are ordinary tensors: a later call with gradients, and its backward, take them."""
    import fluence_fairseq.ops.entmax as ops
    ops._INVERSE_COUNTS.clear()
    with torch.inference_mode():
        p_inference = ops.entmax(_scores(3, 4, 33, dtype=torch.float64), 1.5)
    x = _scores(3, 4, 33, dtype=torch.float64).requires_grad_()
    p = ops.entmax(x, 1.5)
    p.pow(2).sum().backward()
    assert not any(t.is_inference() for pair in ops._INVERSE_COUNTS.values() for t in pair)
    torch.testing.assert_close(p.detach(), p_inference, atol=0, rtol=0)
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def test_a_call_without_gradients_records_no_graph_and_one_with_them_does():
    x = _scores(5, 8, 1, 40)
    alpha = torch.full((1, 8, 1, 1), 1.3, requires_grad=True)
    with torch.no_grad():
        p_free = entmax(x, alpha)
    assert p_free.grad_fn is None
    p = entmax(x, alpha)
    assert p.grad_fn is not None
    torch.testing.assert_close(p.detach(), p_free, atol=0, rtol=0)
    (p * _scores(5, 8, 1, 40, seed=1)).sum().backward()
    assert alpha.grad is not None and bool(alpha.grad.abs().sum() > 0)


@pytest.mark.parametrize("cls", [FSSparsemax, FSEntmax15, FSAlphaEntmax])
@pytest.mark.parametrize("cross", [False, True])
def test_decoding_steps_normalise_without_the_search(cls, cross, monkeypatch):
    """A decoding step (one query per beam) takes the small-problem path; its outputs equal the full pass."""
    import fluence_fairseq.ops.entmax as ops
    torch.manual_seed(0)
    attn = cls(32, 4, causal=not cross, cross=cross).eval()
    tgt = torch.randn(7, 3, 32)
    src = torch.randn(11, 3, 32) if cross else tgt
    with torch.no_grad():
        full = attn(tgt, src, src, need_weights=False)[0]
        searched = []
        search = ops._newton_threshold
        monkeypatch.setattr(ops, "_newton_threshold", lambda *a, **k: searched.append(a[0].shape) or search(*a, **k))
        state, steps = {}, []
        for t in range(tgt.size(0)):
            step = tgt[t : t + 1]
            kv = src if cross else step
            steps.append(attn(step, kv, kv, incremental_state=state, static_kv=cross, need_weights=False)[0])
    assert searched == []
    torch.testing.assert_close(torch.cat(steps), full, atol=1e-5, rtol=0)


@pytest.mark.usefixtures("search_machinery")
@pytest.mark.parametrize("alpha", [2.0, 1.5, "per-head"])
@pytest.mark.parametrize("n", [512, 500])  # 500: not whole groups, listed by comparing every entry
def test_the_support_is_listed_in_row_order_or_refused_when_too_wide(alpha, n, monkeypatch):
    """``with_support``: the (row, column) of every positive probability, in row order, whether its chunks were
    searched through their sparse groups or shifted (forced by SCAN_GROUPS_BELOW = 0) and listed after; None when
    the support is more than the share asked for, or every 16th column says so before listing."""
    import fluence_fairseq.ops.entmax as ops

    x = _scores(2, 3, 40, n, seed=4, scale=12.0)
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(6)) < 0.1
    a = torch.tensor([1.3, 1.6, 2.0]).view(1, 3, 1, 1) if alpha == "per-head" else alpha
    for scan in (ops.SCAN_GROUPS_BELOW, 0.0):
        monkeypatch.setattr(ops, "SCAN_GROUPS_BELOW", scan)
        p, stats, support = ops.entmax_with_stats(x, a, mask, with_support=0.5)
        want = (p.reshape(-1, n) > 0).nonzero().unbind(1)
        assert support is not None and all(torch.equal(s, w) for s, w in zip(support, want))
        share = want[0].numel() / p.numel()
        assert ops.entmax_with_stats(x, a, mask, with_support=share * 0.99)[2] is None
        assert ops.entmax_with_stats(x, a, mask, with_support=share)[2] is not None


@pytest.mark.usefixtures("search_machinery")
@pytest.mark.parametrize("n", [512, 500])
@pytest.mark.parametrize("chunk_rows", [None, 24])  # 24: chunks cut through the groups of 40 rows
def test_groups_of_rows_are_listed_each_on_its_own(n, chunk_rows, monkeypatch):
    """``support_rows``: each group of consecutive rows (an attention's (batch, head) pair) is listed on its own:
    the groups within the share, and only they, come back with every positive entry of their rows in row order;
    a group beyond it (a head of α near 1 beside sparse ones) is left out; None when no group is within it."""
    import fluence_fairseq.ops.entmax as ops

    if chunk_rows is not None:
        monkeypatch.setattr(ops, "ROW_CHUNK_ELEMENTS", chunk_rows * n)
    x = _scores(2, 3, 40, n, seed=5, scale=12.0)
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(7)) < 0.1
    a = torch.tensor([1.6, 1.02, 2.0]).view(1, 3, 1, 1)  # the middle head dense
    share = 1 / 16
    p, _, found = ops.entmax_with_stats(x, a, mask, with_support=share, support_rows=40)
    positive = p.reshape(-1, n) > 0
    per_group = positive.view(6, 40 * n).sum(1)
    assert torch.equal(found[2], per_group <= share * 40 * n)
    assert found[2].tolist() == [True, False, True, True, False, True]
    keep = found[2].repeat_interleave(40).view(-1, 1)
    want = (positive & keep).nonzero().unbind(1)
    assert all(torch.equal(f, w) for f, w in zip(found[:2], want))
    assert ops.entmax_with_stats(x, 1.02, mask, with_support=share, support_rows=40)[2] is None


@pytest.mark.usefixtures("search_machinery")
@pytest.mark.parametrize("support_rows", [None, 40])
def test_a_general_alpha_searched_above_its_start_lists_its_support_without_another_pass(support_rows, monkeypatch):
    """A shifted chunk of a general α whose search ran on its entries above the start has listed its support on
    the way (the positive outputs among those entries): no listing pass over the chunk (_listed_support) follows,
    and the support is every positive probability in row order."""
    import fluence_fairseq.ops.entmax as ops

    monkeypatch.setattr(ops, "SCAN_GROUPS_BELOW", 0.0)  # every chunk shifted, none searched before its shift
    calls = []
    listed_support = ops._listed_support
    monkeypatch.setattr(ops, "_listed_support", lambda *a, **kw: calls.append(1) or listed_support(*a, **kw))
    x = _scores(2, 3, 40, 512, seed=4, scale=12.0)
    p, _, found = ops.entmax_with_stats(x, 1.6, None, with_support=1 / 4, support_rows=support_rows)
    assert not calls
    want = (p.reshape(-1, 512) > 0).nonzero().unbind(1)
    assert all(torch.equal(f, w) for f, w in zip(found[:2], want))
    if support_rows is not None:
        assert bool(found[2].all())


@pytest.mark.usefixtures("search_machinery")
@pytest.mark.parametrize("chunk_rows", [40, 24])  # one group a chunk; chunks cutting through the groups
def test_a_floor_on_the_listed_groups_lists_nothing_below_it_and_changes_nothing_at_it(chunk_rows, monkeypatch):
    """``support_groups_at_least``: when fewer groups may be listed than that share (judged on their samples after
    the search), no chunk's output is listed at all and the support is None; at the floor the support is exactly
    the one listed without it (every positive entry of the listed groups in row order, the same groups), also
    where some chunks listed theirs during their search (a general α searched above its start) and others after
    it, in any order of the two. The probabilities and statistics never depend on it."""
    import fluence_fairseq.ops.entmax as ops

    n = 512
    monkeypatch.setattr(ops, "ROW_CHUNK_ELEMENTS", chunk_rows * n)
    monkeypatch.setattr(ops, "SCAN_GROUPS_BELOW", 0.0)  # every chunk shifted (not through its groups or their
    monkeypatch.setattr(ops, "HALVES_BELOW", 0.0)  # halves): the sparse heads list during their search
    # every other chunk's search keeps what it listed to itself: that chunk is listed from its output afterwards
    searches = []
    shifted_search = ops._shifted_search
    monkeypatch.setattr(ops, "_shifted_search", lambda *args, **kw: shifted_search(
        *args[:-1], args[-1] if searches.append(1) or len(searches) % 2 else [], **kw))
    x = _scores(2, 3, 40, n, seed=4, scale=12.0)
    a = torch.tensor([1.6, 1.02, 1.8]).view(1, 3, 1, 1)  # per batch row: sparse, dense, sparse
    share = 1 / 16
    p, stats, found = ops.entmax_with_stats(x, a, None, with_support=share, support_rows=40)
    assert found[2].tolist() == [True, False, True, True, False, True]
    listings = []
    listed_rows = ops._listed_rows
    monkeypatch.setattr(ops, "_listed_rows", lambda *args: listings.append(1) or listed_rows(*args))
    p_at, stats_at, at = ops.entmax_with_stats(x, a, None, with_support=share, support_rows=40,
                                               support_groups_at_least=4 / 6)
    assert listings  # some chunks were listed after the search
    assert torch.equal(p_at, p) and torch.equal(stats_at, stats)
    assert all(torch.equal(f, w) for f, w in zip(at, found))
    listings.clear()
    p_over, stats_over, over = ops.entmax_with_stats(x, a, None, with_support=share, support_rows=40,
                                                     support_groups_at_least=4.5 / 6)
    assert over is None and not listings
    assert torch.equal(p_over, p) and torch.equal(stats_over, stats)


@pytest.mark.usefixtures("search_machinery")
@pytest.mark.parametrize("searched", ["through their groups", "shifted, every other listing after its search"])
@pytest.mark.parametrize("share,floor", [(1 / 16, 0.0), (1 / 16, 4 / 6), (1 / 16, 4.5 / 6), (1 / 400, 0.0)])
def test_listed_groups_left_unwritten_carry_their_probabilities_in_the_support(searched, share, floor, monkeypatch):
    """``dense_listed=False``: the listed groups' probabilities come with the support, ``(rows, columns, listed,
    values)``, equal to the dense output's at those entries, and the same support as without it; every row of the
    groups not listed in the end (dense, over their budget, or all of them below the floor, when the support is
    None) is written as without it; the rows whose search listed them are not written at all."""
    import fluence_fairseq.ops.entmax as ops

    n = 512
    monkeypatch.setattr(ops, "ROW_CHUNK_ELEMENTS", 40 * n)
    if searched != "through their groups":
        monkeypatch.setattr(ops, "SCAN_GROUPS_BELOW", 0.0)
        monkeypatch.setattr(ops, "HALVES_BELOW", 0.0)
        searches = []
        shifted_search = ops._shifted_search

        def every_other(*args, **kw):  # a search that keeps its listing to itself writes its output
            searches.append(1)
            return shifted_search(*args, **kw) if len(searches) % 2 else shifted_search(*args[:-1], [])

        monkeypatch.setattr(ops, "_shifted_search", every_other)
    x = _scores(2, 3, 40, n, seed=4, scale=12.0)
    a = torch.tensor([1.6, 1.02, 1.8]).view(1, 3, 1, 1)  # per batch row: sparse, dense, sparse
    kwargs = dict(with_support=share, support_rows=40, support_groups_at_least=floor)
    p, stats, found = ops.entmax_with_stats(x, a, None, **kwargs)
    if searched != "through their groups":
        searches.clear()
    # memory the call leaves unwritten made recognisable: float tensors from torch.empty start as NaN (else their
    # contents are whatever the allocator held before: probabilities of the first call, at times)
    real_empty = torch.empty

    def nan_empty(*args, **kw):
        fresh = real_empty(*args, **kw)
        return fresh.fill_(float("nan")) if fresh.is_floating_point() else fresh

    monkeypatch.setattr(torch, "empty", nan_empty)
    p_left, stats_left, left = ops.entmax_with_stats(x, a, None, dense_listed=False, **kwargs)
    monkeypatch.setattr(torch, "empty", real_empty)
    assert torch.equal(stats_left, stats)
    rows_p, rows_left = p.view(6, 40, n), p_left.view(6, 40, n)
    if found is None:
        assert left is None and torch.equal(p_left, p)
        return
    assert len(left) == 4 and all(torch.equal(f, g) for f, g in zip(left[:3], found))
    torch.testing.assert_close(left[3], p.view(-1, n)[found[0], found[1]], atol=0, rtol=0)
    listed = found[2]
    assert torch.equal(rows_left[~listed], rows_p[~listed])  # every group not listed written as before
    if share == 1 / 400:
        assert not bool(listed.all()) and bool(listed.any())  # some sparse groups over their budget
    # the listed groups' rows are left as the search had them, not written: never written (NaN) where the search
    # ran through their groups, the shifted scores (negative entries) where it ran on the shifted rows
    left_rows = rows_left[listed]
    assert bool(left_rows.isnan().any() if searched == "through their groups" else (left_rows < 0).any())
    assert not bool(rows_left[~listed].isnan().any())


@pytest.mark.usefixtures("search_machinery")
def test_a_group_listed_in_one_chunk_and_refused_in_the_next_is_left_out(monkeypatch):
    """A group whose rows lie in two chunks, sparse in the first (listed) and dense in the second (refused by its
    sample), is not listed, even if the entries of its listed part are few."""
    import fluence_fairseq.ops.entmax as ops

    n = 512
    monkeypatch.setattr(ops, "ROW_CHUNK_ELEMENTS", 20 * n)  # chunks of 20 rows: group 0 = rows 0-39
    x = _scores(1, 2, 40, n, seed=5, scale=12.0)
    x[0, 0, 20:] *= 0.001  # group 0's second half: nearly flat rows, dense
    p, _, found = ops.entmax_with_stats(x, 2.0, None, with_support=1 / 16, support_rows=40)
    first_half = int((p[0, 0, :20] > 0).sum())
    assert first_half <= n * 40 / 16 < int((p[0, 0] > 0).sum())  # the listed half alone would pass
    assert found[2].tolist() == [False, True]
    assert bool((found[0] >= 40).all())


@pytest.mark.usefixtures("search_machinery")
def test_sparse_runs_merge_consecutive_chunks_alike(monkeypatch):
    """Runs of the row chunks whose chosen groups hold less than SCAN_GROUPS_BELOW of their entries, or not; the
    last chunk's slice may reach past the rows; a sparse run stops at RUN_ELEMENTS (rows x widest chosen
    entries)."""
    import fluence_fairseq.ops.entmax as ops

    n = 64 * ops.START_GROUP  # 64 groups a row: a chunk of 2 rows is sparse below 32 chosen groups
    chunks = [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8), slice(8, 10)]
    per_row = torch.tensor([3, 4, 60, 1, 20, 20, 0, 0, 10])  # 9 rows: the last chunk has 1
    runs = ops._sparse_runs(chunks, per_row, n)
    g = ops.START_GROUP
    assert [(r.start, r.stop, group, len(members)) for r, group, members in runs] == [
        (0, 2, g, 1), (2, 6, 0, 2), (6, 10, g, 2)]
    assert [m for _, _, members in runs for m in members] == chunks
    monkeypatch.setattr(ops, "RUN_ELEMENTS", 3 * 10 * ops.START_GROUP)  # the last run: 3 rows, 10 groups at most
    assert [(r.start, r.stop) for r, _, _ in ops._sparse_runs(chunks, per_row, n)] == [(0, 2), (2, 6), (6, 10)]
    monkeypatch.setattr(ops, "RUN_ELEMENTS", 3 * 10 * ops.START_GROUP - 1)
    assert [(r.start, r.stop, group) for r, group, _ in ops._sparse_runs(chunks, per_row, n)] == [
        (0, 2, g), (2, 6, 0), (6, 8, g), (8, 10, g)]


@pytest.mark.usefixtures("search_machinery")
def test_sparse_runs_judge_dense_chunks_again_on_halves_of_their_groups():
    """A chunk too dense through its groups is judged on their halves, asked only where the halves' share predicted
    from the groups' passes HALVES_BELOW: its rows' halves above the start give it FINE_GROUP, or leave it dense;
    the chunks the groups already pass are not asked."""
    import fluence_fairseq.ops.entmax as ops

    g, h = ops.START_GROUP, ops.FINE_GROUP
    assert g == 2 * h
    n = 64 * g  # 64 groups, 128 halves a row; two rows a chunk: sparse below 32 chosen groups or 64 chosen halves
    chunks = [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    # groups' shares 5/32 (sparse), 10/32, 10/32 (halves predicted at 0.18: asked) and 20/32 (predicted at 0.41)
    per_row = torch.tensor([10, 10, 20, 20, 20, 20, 40, 40])
    halves = {2: torch.tensor([20, 20]), 4: torch.tensor([40, 50])}  # 40 of 256 halves pass (< 0.35), 90 do not
    assert ops.HALVES_BELOW == 0.35
    asked = []

    def halves_above(part):
        asked.append((part.start, part.stop))
        return halves[part.start]

    runs = ops._sparse_runs(chunks, per_row, n, halves_above)
    assert asked == [(2, 4), (4, 6)]
    assert [(r.start, r.stop, group) for r, group, _ in runs] == [(0, 2, g), (2, 4, h), (4, 8, 0)]


@pytest.mark.usefixtures("search_machinery")
@pytest.mark.parametrize("n", [1024, 1000])  # 1000: not whole groups of 32, compared in full
def test_entries_above_the_start_found_through_their_groups_equal_a_full_comparison(n, monkeypatch):
    """The entries above each row's start are found among the groups whose maxima are above it: the same (row,
    column) pairs in the same order as comparing every entry, with masked entries, a row with nothing above its
    start and a fully masked row; chunks whose chosen groups hold too much of the chunk, and rows not made of
    whole groups, compare every entry."""
    import fluence_fairseq.ops.entmax as ops

    u = _scores(64, n, scale=3.0)
    u[3, ::3] = float("-inf")
    u[5] = float("-inf")
    u[39, -3] = 50.0  # the one entry above the start, in the row's last group
    start = u.amax(-1, keepdim=True).clamp(min=-1.0) - 2.0
    start[7] = 100.0  # nothing above
    groups = ops._group_maxima(u, ops.START_GROUP)
    want = (u > start).nonzero().unbind(1)
    calls = []
    in_groups = ops._entries_above_in_groups
    monkeypatch.setattr(ops, "_entries_above_in_groups", lambda *a: calls.append(1) or in_groups(*a))
    if n % ops.START_GROUP == 0:
        got = in_groups(u, start, groups > start)
        assert all(torch.equal(g, w) for g, w in zip(got, want)) and want[0].numel() > 64
    assert all(torch.equal(g, w) for g, w in zip(ops._entries_above(u, start, groups), want))
    assert calls == ([1] if n % ops.START_GROUP == 0 else [])
    monkeypatch.setattr(ops, "SCAN_GROUPS_BELOW", 0.0)
    assert all(torch.equal(g, w) for g, w in zip(ops._entries_above(u, start, groups), want))
    assert len(calls) <= 1


def test_a_compared_chunk_with_a_row_too_wide_is_refused_by_its_counts_before_listing(monkeypatch):
    """With ``widest``, a chunk whose entries are all compared counts each row's entries above the start first:
    a row over the bound refuses the chunk (None) without listing anything; at the bound the listing equals the
    full comparison's."""
    import fluence_fairseq.ops.entmax as ops

    u = _scores(16, 64, scale=3.0)
    start = u.amax(-1, keepdim=True) - 2.0
    widest = int((u > start).sum(-1).max())
    want = (u > start).nonzero().unbind(1)
    got = ops._entries_above(u, start, None, widest=widest)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    listings = []
    nonzero = torch.Tensor.nonzero
    monkeypatch.setattr(torch.Tensor, "nonzero", lambda self, *a, **k: listings.append(1) or nonzero(self, *a, **k))
    assert ops._entries_above(u, start, None, widest=widest - 1) is None and not listings
    # the gathered search refuses on the counts: one row with every entry above its start (past GATHER_BELOW)
    start[5] = -100.0
    assert ops._gathered_threshold(u.clone(), 4.0, start, None, sampled=True) is None and not listings
    start[5] = u[5].amax() - 2.0
    assert ops._gathered_threshold(u.clone(), 4.0, start, None, sampled=True) is not None and listings


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_powers_by_logarithms_equal_torch_pow_and_keep_zeros_exact(dtype):
    """``exp2(β log2 d)`` (:func:`~fluence_fairseq.ops.entmax._log_powers`) against ``torch.pow`` on entries of
    [0, 1] with one β per row from 1 up: within an ulp of 1 in absolute terms, zeros exactly 0 for every β >= 1
    (at β = 1 the clamped zero's logarithm is the smallest normal float's, which the threshold sends to -inf),
    powers at or below the smallest normal float 0, written in place too."""
    import fluence_fairseq.ops.entmax as ops

    gen = torch.Generator().manual_seed(0)
    d = torch.rand(6, 400, generator=gen, dtype=torch.float64).pow_(3).to(dtype)
    d[:, ::3] = 0.0
    d[:, 1] = torch.finfo(dtype).tiny  # a normal number whose power is denormal for β > 1
    d[:, 2] = 1.0
    beta = torch.tensor([1.0, 1.0 + 1e-6, 1.1, 1.19, 2.0, 9.0], dtype=dtype).view(-1, 1)
    want = d.double().pow(beta.double())
    got = ops._log_powers(d, beta, torch.empty_like(d))
    eps = torch.finfo(dtype).eps
    assert float((got.double() - want).abs().max()) <= eps
    assert (got[d == 0] == 0).all() and (got[:, 2] == 1).all()
    assert (got[:, 1] == 0).all()  # powers at or below the smallest normal float (at β = 1: tiny itself)
    assert (got >= 0).all()
    in_place = d.clone()
    assert torch.equal(ops._log_powers(in_place, beta, in_place), got)
    assert torch.equal(ops._log_powers(d, 1.7, torch.empty_like(d)),
                       ops._log_powers(d, torch.full_like(beta, 1.7), torch.empty_like(d)))


def test_the_power_path_is_measured_once_per_device_and_dtype_unless_set(monkeypatch):
    """``POWERS_BY_LOGARITHMS`` None: tensors of ``LOGARITHMS_FROM`` elements or more take the way measured once
    per (device type, dtype) and kept (a later call follows the kept answer without measuring again); smaller
    ones take ``torch.pow`` without a measurement. True and False decide for every size."""
    import fluence_fairseq.ops.entmax as ops

    monkeypatch.setattr(ops, "_POWER_PATHS", {})
    calls = []
    log_powers = ops._log_powers
    monkeypatch.setattr(ops, "_log_powers", lambda *a, **k: calls.append(a[0].numel()) or log_powers(*a, **k))
    monkeypatch.setattr(ops, "POWERS_BY_LOGARITHMS", None)
    small, large = torch.rand(4, 8), torch.rand(64, ops.LOGARITHMS_FROM // 64)
    torch.testing.assert_close(ops.nonnegative_power(small, 2.5, torch.empty_like(small)), small.pow(2.5), atol=1e-7,
                               rtol=0)
    assert ops._POWER_PATHS == {} and calls == []
    got = ops.nonnegative_power(large, 2.5, torch.empty_like(large))
    assert list(ops._POWER_PATHS) == [("cpu", torch.float32)] and len(calls) >= 5  # the measurement's timings
    chosen = ops._POWER_PATHS["cpu", torch.float32]
    assert isinstance(chosen, bool) and calls.count(large.numel()) == int(chosen)
    torch.testing.assert_close(got, large.pow(2.5), atol=1e-7, rtol=0)
    calls.clear()
    ops._POWER_PATHS["cpu", torch.float32] = not chosen
    ops.nonnegative_power(large, 2.5, torch.empty_like(large))
    assert calls == ([large.numel()] if not chosen else [])
    for forced in (True, False):
        monkeypatch.setattr(ops, "POWERS_BY_LOGARITHMS", forced)
        for d in (small, large):
            calls.clear()
            torch.testing.assert_close(ops.nonnegative_power(d, 2.5, torch.empty_like(d)), d.pow(2.5), atol=1e-7,
                                       rtol=0)
            assert calls == ([d.numel()] if forced else [])


@pytest.mark.parametrize("alpha", [1.05, 1.3, 1.9, "per-head"])
def test_general_alpha_with_powers_by_logarithms_equals_torch_pow(alpha, monkeypatch):
    """The whole normaliser with its powers by logarithms against ``torch.pow`` (float32, long rows, the search
    machinery): probabilities within 1e-6, the same support, rows summing to one."""
    import fluence_fairseq.ops.entmax as ops

    monkeypatch.setattr(ops, "SMALL_ELEMENTS", 0)
    x = _scores(2, 4, 64, 700, scale=2.0)
    a = torch.tensor([1.05, 1.3, 1.6, 1.95]).view(1, 4, 1, 1) if alpha == "per-head" else alpha
    monkeypatch.setattr(ops, "POWERS_BY_LOGARITHMS", False)
    want = entmax(x, a)
    monkeypatch.setattr(ops, "POWERS_BY_LOGARITHMS", True)
    got = entmax(x, a)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert torch.equal(got > 0, want > 0) and ((got == 0).any() or alpha == 1.05)  # α = 1.05: dense rows here
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 4, 64), atol=1e-6, rtol=0)


@pytest.mark.usefixtures("search_machinery")
def test_a_general_alphas_start_is_searched_on_the_group_maxima_above_minus_one(monkeypatch):
    """The search for the start begins at τ = -1, so only group maxima above -1 count: a general α runs it on those
    alone when few are (sparse rows): the start equals the full search's and lies at or below the row's τ, and the
    probabilities equal those with every gather refused."""
    import fluence_fairseq.ops.entmax as ops

    x = _scores(2, 2, 16, 2048, scale=5.0, dtype=torch.float64)
    alpha = torch.tensor([1.3, 1.9], dtype=torch.float64).view(1, 2, 1, 1)
    _, _, shift, maxima = ops._row_shifts(x, None, ops.START_GROUP)
    beta = ops._per_row(1 / (alpha - 1), x.shape)
    maxima = ((maxima - shift) * (alpha - 1)).reshape(-1, maxima.size(-1))
    minus_one = maxima.new_full((maxima.size(0), 1), -1.0)
    found = ops._gathered_threshold(maxima.clone(), beta, minus_one, None, output=False)
    assert found is not None and found[1] is None
    full = ops._newton_threshold(maxima, beta)[0]
    torch.testing.assert_close(found[0], full, atol=1e-14, rtol=0)
    starts = []
    gathered = ops._gathered_threshold
    monkeypatch.setattr(ops, "_gathered_threshold",
                        lambda *a, **k: starts.append(k) or gathered(*a, **k))
    p, stats = ops.entmax_with_stats(x, alpha, None)
    assert any(k.get("output") is False for k in starts)
    assert (found[0] <= stats[..., 1].reshape(-1, 1) + 1e-15).all()
    monkeypatch.setattr(ops, "GATHER_BELOW", 0.0)
    p_full, stats_full = ops.entmax_with_stats(x, alpha, None)
    torch.testing.assert_close(p, p_full, atol=1e-14, rtol=0)
    torch.testing.assert_close(stats, stats_full, atol=1e-13, rtol=1e-13)


@pytest.mark.usefixtures("search_machinery")
@pytest.mark.parametrize("alpha", [1.3, 1.5, 2.0, "per-head"])
def test_the_start_search_stops_after_start_steps_below_every_threshold(alpha, monkeypatch):
    """The search over the group maxima gives only a start: it stops after START_STEPS Newton steps (each iterate
    from below is below the maxima's root, so below the row's τ), and the probabilities and statistics equal
    those from a start searched to convergence."""
    import fluence_fairseq.ops.entmax as ops

    x = _scores(2, 2, 16, 1024, seed=6, scale=3.0, dtype=torch.float64)
    a = torch.tensor([1.2, 1.7], dtype=torch.float64).view(1, 2, 1, 1) if alpha == "per-head" else alpha
    widths = []
    step = ops._newton_step
    monkeypatch.setattr(ops, "_newton_step", lambda u, *args: widths.append(u.size(-1)) or step(u, *args))
    monkeypatch.setattr(ops, "START_STEPS", None)
    p_full, stats_full = ops.entmax_with_stats(x, a, None)
    uncapped = widths.count(1024 // ops.START_GROUP)
    widths.clear()
    monkeypatch.setattr(ops, "START_STEPS", 1)
    starts = []
    search = ops._newton_threshold

    def spy(u, *args, **kw):
        found = search(u, *args, **kw)
        if u.size(-1) == 1024 // ops.START_GROUP:
            starts.append(found[0])
        return found

    monkeypatch.setattr(ops, "_newton_threshold", spy)
    p, stats = ops.entmax_with_stats(x, a, None)
    assert uncapped > 1 and widths.count(1024 // ops.START_GROUP) <= 1
    if starts:
        assert (starts[0].view(-1) <= stats[..., 1].reshape(-1) + 1e-15).all()
    torch.testing.assert_close(p, p_full, atol=1e-14, rtol=0)
    torch.testing.assert_close(stats, stats_full, atol=1e-13, rtol=1e-13)


@pytest.mark.usefixtures("search_machinery")
@pytest.mark.parametrize("alpha", [1.05, 1.3, 1.5, 2.0])
def test_mean_start_is_at_or_below_every_rows_threshold_and_on_it_for_equal_entries(alpha):
    """Dense rows start from the bound that the mean of their entries above -1 gives (Jensen's inequality): at or
    below each row's τ for rows of every spread, with masked entries, entries below -1, a fully masked row and a
    row of one entry; equal to τ (to a few ulps) for a row of equal entries; never below the start it is given."""
    import fluence_fairseq.ops.entmax as ops

    beta = 1 / (alpha - 1)
    rows = []
    for scale in (0.01, 0.3, 1.0, 5.0):
        x = _scores(8, 300, scale=scale, dtype=torch.float64, seed=int(scale * 100))
        rows.append((x - x.amax(-1, keepdim=True)) * (alpha - 1))
    u = torch.cat(rows)
    u[0, ::2] = float("-inf")
    u[1, 5:] = -3.0
    u[2] = float("-inf")
    u[3, 1:] = float("-inf")
    equal = torch.zeros(1, 300, dtype=torch.float64)
    u = torch.cat([u, equal, equal - 0.01 * torch.arange(300, dtype=torch.float64) / 300])
    top = u.amax(-1, keepdim=True)
    u = u - torch.where(top > float("-inf"), top, torch.zeros_like(top))  # every row's max at 0, as the callers'
    tau = ops._newton_threshold(u, beta)[0]
    bound = ops._mean_start(u, beta, None)
    live = torch.arange(u.size(0)) != 2
    assert (bound[live] <= tau[live]).all() and (bound >= -1).all()
    assert (tau[-2] - bound[-2]).abs() < 1e-13  # equal entries: the bound is the root
    group_start = ops._newton_threshold(ops._group_maxima(u, ops.START_GROUP), beta)[0]
    # nearly equal entries (a spread of 0.01): close to it, far closer than the group maxima's root
    assert tau[-1] - bound[-1] < 1e-3 and tau[-1] - group_start[-1] > 10 * (tau[-1] - bound[-1])
    start = torch.full_like(tau, -0.5)
    assert (ops._mean_start(u, beta, start) >= start).all()


@pytest.mark.usefixtures("search_machinery")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
def test_dense_chunks_searched_from_their_mean_take_fewer_steps_and_equal_the_group_start(dtype, tol, monkeypatch):
    """A general α's chunk most of whose entries lie above its start (dense rows: α near 1, small scores) starts
    from the larger of the group-maxima root and the mean's bound: fewer full-row steps in float32 (no more in
    float64), the same probabilities."""
    import fluence_fairseq.ops.entmax as ops

    x = _scores(2, 3, 64, 1024, scale=0.3, dtype=dtype)
    alpha = torch.tensor([1.1, 1.2, 1.4], dtype=dtype).view(1, 3, 1, 1)
    monkeypatch.setattr(ops, "ROW_CHUNK_ELEMENTS", 64 * 1024)  # one chunk per (batch, head)
    steps = _full_row_steps(ops, monkeypatch, 1024)
    p, stats = ops.entmax_with_stats(x, alpha, None)
    from_mean = sum(steps)
    steps.clear()
    monkeypatch.setattr(ops, "_mean_start", lambda u, beta, start: start)
    p_group, stats_group = ops.entmax_with_stats(x, alpha, None)
    # float64's tolerance takes 3-5 steps from either start; float32's 2-3 save one
    assert from_mean < 0.8 * sum(steps) if dtype == torch.float32 else from_mean <= sum(steps)
    torch.testing.assert_close(p, p_group, atol=tol, rtol=0)
    torch.testing.assert_close(stats[..., :2], stats_group[..., :2], atol=16 * tol, rtol=0)  # shift, τ
    # the normaliser: two searches stop within the tolerance of the root, which moves the sum by β tol / d
    torch.testing.assert_close(stats[..., 2], stats_group[..., 2], atol=0, rtol=20 * tol)


@pytest.mark.usefixtures("search_machinery")
@pytest.mark.parametrize("scale", [0.3, 3.0])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 2e-15), (torch.float32, 1e-6)])
def test_rows_settled_without_a_confirming_step_equal_confirmed_ones(dtype, tol, scale, monkeypatch):
    """A search whose steps take powers settles a row when its next step is predicted far below the tolerance,
    moving its powers to first order instead of taking a confirming step: at least a tenth fewer full-row steps,
    probabilities within rounding of the confirming search's (SETTLE off) and as close to the entmax package's
    bisection, τ within the tolerance."""
    import fluence_fairseq.ops.entmax as ops

    x = _scores(2, 4, 64, 512, scale=scale, dtype=dtype)
    alphas = [1.05, 1.1, 1.25, 1.6]
    alpha = torch.tensor(alphas, dtype=dtype).view(1, 4, 1, 1)
    steps = _full_row_steps(ops, monkeypatch, 512)
    p, stats = ops.entmax_with_stats(x, alpha, None)
    settled_steps = sum(steps)
    steps.clear()
    monkeypatch.setattr(ops, "SETTLE", False)
    p_confirmed, stats_confirmed = ops.entmax_with_stats(x, alpha, None)
    assert settled_steps < 0.9 * sum(steps)
    torch.testing.assert_close(p, p_confirmed, atol=tol, rtol=0)
    torch.testing.assert_close(stats[..., 1], stats_confirmed[..., 1], atol=16 * tol, rtol=0)
    reference = torch.stack([entmax_pkg.entmax_bisect(x[:, h].double(), a, n_iter=200)
                             for h, a in enumerate(alphas)], 1)
    error, confirmed_error = (p.double() - reference).abs().max(), (p_confirmed.double() - reference).abs().max()
    assert error <= confirmed_error + tol


@pytest.mark.parametrize("alpha", [2.0, 1.5, 1.3, "per-head"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 2e-6)])
def test_small_searches_take_every_step_on_all_rows_and_equal_the_full_search(alpha, dtype, tol, monkeypatch):
    """A search on at most LEAN_AT_MOST entries takes each Newton step on all its rows (none compacted, none
    settled: their bookkeeping cost more calls than the steps they spare), with the same probabilities and
    thresholds as the search that settles and compacts, and as the entmax package's, with masked entries and a
    fully masked row."""
    import fluence_fairseq.ops.entmax as ops

    monkeypatch.setattr(ops, "SMALL_ELEMENTS", 0)
    x = _scores(2, 3, 16, 160, seed=8, scale=2.0, dtype=dtype)
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(9)) < 0.2
    mask[1, 2, 3] = True
    a = torch.tensor([1.1, 1.4, 1.8], dtype=dtype).view(1, 3, 1, 1) if alpha == "per-head" else alpha
    rows_per_step = []
    step = ops._newton_step
    monkeypatch.setattr(ops, "_newton_step", lambda u, *args: rows_per_step.append(u.size(0)) or step(u, *args))
    monkeypatch.setattr(ops, "LEAN_AT_MOST", 0)
    p_full, stats_full = ops.entmax_with_stats(x, a, mask)
    compacted = [r for r in rows_per_step if r < 96]
    rows_per_step.clear()
    monkeypatch.setattr(ops, "LEAN_AT_MOST", x.numel())
    p, stats = ops.entmax_with_stats(x, a, mask)
    assert compacted and rows_per_step and set(rows_per_step) == {96}
    torch.testing.assert_close(p, p_full, atol=tol, rtol=0)
    torch.testing.assert_close(stats[..., :2], stats_full[..., :2], atol=4 * tol, rtol=0)
    assert bool((p[1, 2, 3] == 0).all()) and not bool(p[mask].any())
    alphas = [1.1, 1.4, 1.8] if alpha == "per-head" else [alpha] * 3
    reference = torch.stack([entmax_pkg.entmax_bisect(x[:, h].double().masked_fill(mask[:, h], float("-inf")),
                                                      alphas[h], n_iter=200) for h in range(3)], 1)
    reference[1, 2, 3] = 0.0
    torch.testing.assert_close(p.double(), reference, atol=10 * tol, rtol=0)


@pytest.mark.usefixtures("either_path")
def test_gradients_in_x_and_alpha_pass_gradcheck():
    x = _scores(3, 4, 7, dtype=torch.float64).requires_grad_()
    alpha = (1.05 + 0.9 * torch.rand(1, 4, 1, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, a: entmax(x, a), (x, alpha))
    assert torch.autograd.gradcheck(lambda x: sparsemax(x), (x,))
    assert torch.autograd.gradcheck(lambda x: entmax15(x), (x,))


@pytest.mark.usefixtures("search_machinery")
@pytest.mark.parametrize("alpha", [1.3, 2.5])
def test_fixed_general_alpha_backward_on_full_rows_passes_gradcheck(alpha, monkeypatch):
    """A fixed α other than 1.5 and 2 takes s = p^(2-α) as exp2((2-α) log2 p) on full rows (the sparse path
    refused): exactly 0 off the support (below 2 a clamped zero's power is tiny, above it infinite), and the
    scores' gradient passes gradcheck on rows with zeros."""
    import fluence_fairseq.ops.entmax as ops

    monkeypatch.setattr(ops, "SUPPORT_BELOW", -1.0)
    x = _scores(3, 4, 9, scale=3.0, dtype=torch.float64).requires_grad_()
    p = entmax(x, alpha)
    assert (p == 0).any() and (p > 0).any()
    s, log2_p = ops._support_weights(p.detach(), alpha)
    assert (s[p == 0] == 0).all() and torch.isfinite(s).all()
    torch.testing.assert_close(s[p > 0], p.detach()[p > 0] ** (2 - alpha), atol=0, rtol=1e-13)
    torch.testing.assert_close(log2_p[p > 0], torch.log2(p.detach()[p > 0]), atol=0, rtol=1e-15)
    assert torch.autograd.gradcheck(lambda x: entmax(x, alpha), (x,))


@pytest.mark.usefixtures("either_path")
@pytest.mark.parametrize("alpha", [2.0, 2.5, 4.0])
def test_alpha_gradient_at_two_and_above_is_finite_and_passes_gradcheck(alpha):
    """α's gradient takes p^(2-α) as exp((2-α) log p): from α = 2 on, the zeros' clamped logarithm gives
    exp(+large) (inf in float64 at α = 4), which must be set to 0 off the support, not multiplied by it."""
    x = _scores(3, 4, 9, scale=3.0, dtype=torch.float64).requires_grad_()
    a = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    p = entmax(x, a)
    assert (p == 0).any()
    grad_x, grad_a = torch.autograd.grad((p * _scores(3, 4, 9, seed=1, dtype=torch.float64)).sum(), (x, a))
    assert torch.isfinite(grad_x).all() and torch.isfinite(grad_a)
    assert torch.autograd.gradcheck(lambda x, a: entmax(x, a), (x, a))


@pytest.mark.usefixtures("search_machinery")
@pytest.mark.parametrize("alpha", [1.3, 1.9, 2.5, "per-head"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
def test_backward_on_the_gathered_support_equals_the_full_rows(alpha, dtype, tol, monkeypatch):
    """A general α's backward on a sparse chunk runs on the gathered support only (off it s, p and p log p are 0):
    the scores' and α's gradients equal the full-row backward's (SUPPORT_BELOW forced either way), a row without
    support included, and the sparse path passes gradcheck through entmax."""
    import fluence_fairseq.ops.entmax as ops

    x = _scores(2, 3, 5, 40, scale=4.0, dtype=dtype)
    a = (torch.tensor([1.2, 1.6, 1.9], dtype=dtype).view(1, 3, 1, 1) if alpha == "per-head"
         else torch.tensor(alpha, dtype=dtype))
    p = ops.entmax(x, a)
    p[0, 0, 0] = 0  # a row with nothing in its support
    grad = _scores(2, 3, 5, 40, seed=1, dtype=dtype)
    calls = []
    sparse = ops._sparse_backward_rows
    monkeypatch.setattr(ops, "_sparse_backward_rows", lambda *args: calls.append(1) or sparse(*args))
    monkeypatch.setattr(ops, "SUPPORT_BELOW", 1.0)
    got = ops.entmax_backward(p, grad, a, with_alpha=True)
    assert calls
    monkeypatch.setattr(ops, "SUPPORT_BELOW", -1.0)
    calls.clear()
    want = ops.entmax_backward(p, grad, a, with_alpha=True)
    assert not calls
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)
    assert torch.equal(got[0][0, 0, 0], torch.zeros(40, dtype=dtype)) and (got[0][p == 0] == 0).all()
    if dtype == torch.float64:
        monkeypatch.setattr(ops, "SUPPORT_BELOW", 1.0)
        leaf_x, leaf_a = x[:1, :, :2, :9].clone().requires_grad_(), a.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda x, a: ops.entmax(x, a), (leaf_x, leaf_a))


@pytest.mark.usefixtures("search_machinery")
def test_sparse_support_found_through_groups_equals_every_positive_entry(monkeypatch):
    """Backward finds a sparse chunk's support through the groups holding any of it (rows of whole groups): the
    positive entries of every row, in order, rows without support included; the gradients equal the full rows'."""
    import fluence_fairseq.ops.entmax as ops

    x = _scores(4, 2, 8, 1024, scale=8.0, dtype=torch.float64)
    a = torch.tensor([1.5, 1.8], dtype=torch.float64).view(1, 2, 1, 1)
    p = ops.entmax(x, a)
    p[0, 0, 0] = 0
    rows = p.reshape(-1, 1024)
    calls = []
    in_groups = ops._entries_above_in_groups
    monkeypatch.setattr(ops, "_entries_above_in_groups", lambda *args: calls.append(1) or in_groups(*args))
    found = ops._sparse_support(rows)
    assert calls == [1] and found is not None
    want = (rows > 0).nonzero().unbind(1)
    assert all(torch.equal(f, w) for f, w in zip(found, want))
    grad = _scores(4, 2, 8, 1024, seed=1, dtype=torch.float64)
    got = ops.entmax_backward(p, grad, a, with_alpha=True)
    monkeypatch.setattr(ops, "SUPPORT_BELOW", -1.0)
    full = ops.entmax_backward(p, grad, a, with_alpha=True)
    for g, w in zip(got, full):
        torch.testing.assert_close(g, w, atol=1e-13, rtol=1e-13)


@pytest.mark.usefixtures("either_path")
def test_alpha_gradient_matches_the_paper_worked_example():
    # the example of the notes (verified there by finite differences against entmax_bisect)
    z = torch.tensor([0.3, -0.2, 1.1, 0.0, -1.0], dtype=torch.float64)
    alpha = torch.tensor(1.4, dtype=torch.float64, requires_grad=True)
    p = entmax(z, alpha)
    torch.testing.assert_close(p, torch.tensor([0.194798, 0.057834, 0.646303, 0.101065, 0.0], dtype=torch.float64),
                               atol=1e-6, rtol=0)
    jac = [torch.autograd.grad(p[i], alpha, retain_graph=True)[0].item() for i in range(5)]
    assert jac == pytest.approx([-0.062289, -0.22845, 0.480604, -0.189865, 0.0], abs=1e-5)


@pytest.mark.usefixtures("either_path")
def test_fully_masked_rows_give_zeros_and_finite_gradients():
    x = _scores(4, 6).requires_grad_()
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[1] = True
    mask[2, :5] = True
    alpha = torch.tensor(1.3, requires_grad=True)
    for normaliser in (sparsemax, entmax15, lambda x, mask: entmax(x, alpha, mask=mask)):
        p = normaliser(x, mask=mask)
        assert torch.equal(p[1], torch.zeros(6))
        assert torch.equal(p[2], torch.tensor([0.0, 0, 0, 0, 0, 1]))
        (p * torch.arange(6.0)).sum().backward()
        assert torch.isfinite(x.grad).all() and torch.equal(x.grad[1], torch.zeros(6))
        x.grad = None
    assert torch.isfinite(alpha.grad)
    # -inf scores are masks too (the entmax package crashes or returns NaN on such rows)
    inf_row = torch.full((2, 5), float("-inf"))
    assert torch.equal(entmax15(inf_row), torch.zeros(2, 5))


@pytest.mark.usefixtures("either_path")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_normalised_in_float32(dtype):
    x = _scores(8, 40, scale=3.0) - 1000.0  # very negative logits: the package gives NaN in bf16
    alpha = torch.full((8, 1), 1.3)
    for p, reference in ((entmax(x.to(dtype), alpha), entmax(x.to(dtype).float(), alpha)),
                         (entmax15(x.to(dtype)), entmax15(x.to(dtype).float()))):
        assert p.dtype == dtype and torch.isfinite(p).all()
        torch.testing.assert_close(p.float(), reference, atol=1e-2, rtol=0)  # only the output rounding differs


@pytest.mark.usefixtures("search_machinery")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_long_low_precision_rows_start_from_their_group_maxima_in_float32(dtype):
    """Rows long enough for the group-maxima start (their maxima taken in the input's dtype, the search in
    float32), very negative and with masked entries: finite, and the float32 normaliser of the same scores."""
    import fluence_fairseq.ops.entmax as ops

    x = (_scores(3, 2 * ops.GROUP_START_FROM + 7, scale=3.0) - 1000.0).to(dtype)
    mask = torch.zeros(x.shape, dtype=torch.bool)
    mask[1, ::3] = True
    alpha = torch.full((3, 1), 1.3)
    for normaliser in (sparsemax, entmax15, lambda x, mask: entmax(x, alpha, mask=mask)):
        p = normaliser(x, mask=mask)
        assert p.dtype == dtype and torch.isfinite(p).all() and not p[1, ::3].any()
        torch.testing.assert_close(p.float(), normaliser(x.float(), mask=mask), atol=1e-2, rtol=0)


@pytest.mark.usefixtures("either_path")
@pytest.mark.parametrize("alpha", [1.5, 2.0, 5.0, 10.0])
def test_peaked_rows_give_one_hot_without_nan(alpha):
    x = torch.zeros(3, 100)
    x[:, 7] = 5.0
    p = entmax(x, alpha)
    assert torch.isfinite(p).all()
    assert torch.equal(p, torch.nn.functional.one_hot(torch.full((3,), 7), 100).float())


@pytest.mark.usefixtures("either_path")
def test_mask_argument_equals_minus_infinity_and_dim_is_respected():
    x = _scores(5, 7, 3)
    mask = torch.rand(5, 7, 3, generator=torch.Generator().manual_seed(3)) < 0.3
    p = entmax15(x, dim=1, mask=mask)
    torch.testing.assert_close(p, entmax15(x.masked_fill(mask, float("-inf")).transpose(1, 2)).transpose(1, 2))
    assert torch.equal(p[mask], torch.zeros(int(mask.sum())))


def test_bad_alpha_is_refused_with_a_clear_error():
    x = _scores(2, 3, 4)
    with pytest.raises(ValueError, match="alpha > 1"):
        entmax(x, 1.0)
    with pytest.raises(ValueError, match="alpha > 1"):
        entmax(x, torch.tensor([0.5, 1.5, 1.5]).view(1, 3, 1))
    with pytest.raises(ValueError, match="size 1 along the normalised"):
        entmax(x, torch.full((2, 3, 4), 1.5))
    for shape in [(4, 1), (2, 2, 1), (3, 3, 1)]:  # broadcasting checked by hand: as torch.broadcast_shapes
        with pytest.raises(ValueError, match="does not broadcast"):
            entmax(x, torch.full(shape, 1.5))
    for shape in [(3, 1), (2, 1, 1), (1, 1), (1, 3, 1), (2, 3, 1)]:
        assert entmax(x, torch.full(shape, 1.5)).shape == x.shape
    # α broadcasts to x's rows, not x to α's (which failed later with an error about expanding a tensor)
    with pytest.raises(ValueError, match=r"alpha of shape \(1, 3, 1\) does not broadcast against x \(2, 1, 4\)"):
        entmax(_scores(2, 1, 4), torch.full((1, 3, 1), 1.5))
    with pytest.raises(TypeError, match="floating-point"):
        entmax(torch.ones(2, 3, dtype=torch.long), 1.5)


# -------------------------------------------------------------------------------------------- attentions
def _weights(attn, x, **kw):
    return attn(x, x, x, need_head_weights=True, **kw)[1]  # (H, B, L, L)


@pytest.mark.parametrize("cls,reference", [(FSSparsemax, entmax_pkg.sparsemax), (FSEntmax15, entmax_pkg.entmax15)])
def test_attention_weights_are_the_package_normaliser_of_the_scores(cls, reference):
    torch.manual_seed(0)
    attn = cls(16, 2).eval()
    x = torch.randn(6, 3, 16)
    q = attn.q_proj(x).view(6, 3, 2, 8).permute(1, 2, 0, 3) * 8**-0.5
    k = attn.k_proj(x).view(6, 3, 2, 8).permute(1, 2, 0, 3)
    expected = reference(q @ k.transpose(-1, -2))  # (B, H, L, L)
    torch.testing.assert_close(_weights(attn, x).transpose(0, 1), expected, atol=1e-6, rtol=0)


def test_causal_attention_puts_no_weight_on_the_future_and_hard_masks_are_removed():
    torch.manual_seed(0)
    attn = FSEntmax15(16, 2, causal=True).eval()
    w = _weights(attn, torch.randn(7, 2, 16))
    assert torch.equal(w.triu(1), torch.zeros_like(w))
    mask = torch.zeros(7, 7, dtype=torch.bool)
    mask[3] = True  # a query with nothing left to attend to
    w = _weights(FSEntmax15(16, 2).eval(), torch.randn(7, 2, 16), attn_mask=mask)
    assert torch.equal(w[:, :, 3], torch.zeros(2, 2, 7))


def test_alpha_parametrisation_keeps_alpha_in_range_under_training():
    torch.manual_seed(0)
    for direction in (+1.0, -1.0):  # push alpha up (sparser) and down (denser) with a large learning rate
        attn = FSAlphaEntmax(16, 4, alpha_init=1.5)
        opt = torch.optim.SGD(attn.parameters(), lr=50.0)
        for _ in range(20):
            opt.zero_grad()
            (direction * -attn.alpha().sum()).backward()
            opt.step()
            alpha = attn.alpha()
            assert torch.isfinite(alpha).all() and (alpha >= ALPHA_MIN).all() and (alpha <= ALPHA_MAX).all()
        assert torch.allclose(alpha, torch.full((4,), ALPHA_MAX if direction > 0 else ALPHA_MIN))


def test_gradient_reaches_alpha_through_attention_and_training_moves_it():
    torch.manual_seed(0)
    attn = FSAlphaEntmax(16, 4, alpha_init=1.5)
    x = torch.randn(9, 2, 16)
    attn(x, x, x)[0].pow(2).sum().backward()
    assert attn.pre_alpha.grad is not None and (attn.pre_alpha.grad != 0).all()
    before = attn.alpha().detach().clone()
    opt = torch.optim.Adam(attn.parameters(), lr=0.05)
    target = torch.randn(9, 2, 16)
    for _ in range(10):
        opt.zero_grad()
        (attn(x, x, x)[0] - target).pow(2).mean().backward()
        opt.step()
    assert not torch.allclose(attn.alpha(), before)


def test_alpha_without_gradients_is_made_again_only_when_its_parameter_or_scale_changes():
    """Calls without gradients (decoding, validation) reuse α until the parameter's values change, however they
    change: through ``.data`` as fairseq's optimizers write it (the version counter does not see that), in place,
    by ``load_state_dict``, by a dtype change, or by a new scale; calls with gradients make it every time, with
    its graph."""
    torch.manual_seed(0)
    attn = FSAlphaEntmax(16, 4)

    def current():
        return learned_alpha(attn.pre_alpha, attn.alpha_lr_scale).detach().view(1, -1, 1, 1)

    with torch.no_grad():
        first = attn._alpha_for_scores()
        assert attn._alpha_for_scores() is first
        torch.testing.assert_close(first, current(), atol=0, rtol=0)
    for change in (lambda: attn.pre_alpha.data.add_(0.3), lambda: attn.pre_alpha.mul_(0.5),
                   lambda: attn.load_state_dict({"pre_alpha": torch.randn(4), **{k: v for k, v in
                                                 attn.state_dict().items() if k != "pre_alpha"}}),
                   lambda: setattr(attn, "alpha_lr_scale", 2.0), lambda: attn.double()):
        with torch.no_grad():
            before = attn._alpha_for_scores()
            change()
            after = attn._alpha_for_scores()
        assert after is not before and after.dtype == attn.pre_alpha.dtype
        torch.testing.assert_close(after, current(), atol=0, rtol=0)
        assert not torch.equal(after, before.to(after.dtype))
    with torch.inference_mode():  # made under inference mode, still served to a later call without gradients
        served = attn._alpha_for_scores()
    with torch.no_grad():
        assert attn._alpha_for_scores() is served
    with_grad = attn._alpha_for_scores()
    assert with_grad.grad_fn is not None and with_grad is not served
    torch.testing.assert_close(with_grad.detach(), served, atol=0, rtol=0)


@pytest.mark.parametrize("cls", [FSSparsemax, FSEntmax15, FSAlphaEntmax])
def test_attention_dropout_applies_in_training_or_when_asked_for_at_inference_only(cls):
    """The plain pass drops probabilities in training and, in evaluation, only where fairseq's dropout module is
    set to apply during inference (MC dropout); otherwise evaluation equals the module without dropout."""
    torch.manual_seed(0)
    attn, plain = cls(16, 2, dropout=0.5).eval(), cls(16, 2).eval()
    plain.load_state_dict(attn.state_dict())
    x = torch.randn(6, 2, 16)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, x, x)[0], plain(x, x, x)[0], atol=0, rtol=0)
        attn.dropout_module.apply_during_inference = True
        assert not torch.allclose(attn(x, x, x)[0], plain(x, x, x)[0])
        attn.dropout_module.apply_during_inference = False
        attn.train()
        assert not torch.allclose(attn(x, x, x)[0], plain(x, x, x)[0])


def test_alpha_init_option():
    torch.manual_seed(0)
    assert torch.allclose(FSAlphaEntmax(8, 2, alpha_init=1.2).alpha(), torch.full((2,), 1.2))
    random = FSAlphaEntmax(8, 4).alpha()
    assert ((random > ALPHA_MIN) & (random < ALPHA_MAX)).all() and random.unique().numel() == 4
    assert parse_alpha_init("RANDOM") == "random" and parse_alpha_init("1.7") == 1.7
    for bad in ("2", "1.0", "dense"):
        with pytest.raises(ValueError, match="alpha_init"):
            parse_alpha_init(bad)


@pytest.mark.parametrize("alpha_init", ["random", 1.05])
def test_alpha_lr_scale_keeps_the_start_and_moves_the_pre_activation_that_much_faster_under_adam(alpha_init):
    x, target = torch.randn(9, 2, 16), torch.randn(9, 2, 16)
    models = {}
    for scale in (1.0, 20.0):
        torch.manual_seed(0)
        models[scale] = FSAlphaEntmax(16, 4, alpha_init=alpha_init, alpha_lr_scale=scale)
    torch.testing.assert_close(models[20.0].alpha(), models[1.0].alpha())  # same start, same seed
    moved = {}
    for scale, attn in models.items():
        start = (scale * attn.pre_alpha).detach().clone()
        opt = torch.optim.Adam([attn.pre_alpha], lr=1e-3)  # Adam's first step is lr * sign(gradient)
        opt.zero_grad()
        (attn(x, x, x)[0] - target).pow(2).mean().backward()
        opt.step()
        moved[scale] = (scale * attn.pre_alpha).detach() - start
    torch.testing.assert_close(moved[20.0], 20.0 * moved[1.0], rtol=1e-4, atol=1e-7)
    assert (moved[1.0].abs() > 0.5e-3).all()


def test_alpha_lr_scale_is_validated_and_reaches_the_command_line():
    for bad in (0, -1.0, float("nan"), "fast"):
        with pytest.raises(ValueError, match="alpha_lr_scale"):
            FSAlphaEntmax(8, 2, alpha_lr_scale=bad)
    from fluence_fairseq.modules.registry import get_attention

    assert "alpha_lr_scale" in {o.name for o in get_attention("alpha_entmax").options}


def test_density_counts_nonzero_weights_of_real_queries_only():
    torch.manual_seed(0)
    attn = FSSparsemax(16, 2).eval()
    x = torch.randn(6, 2, 16)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    assert attn.density_counts() is None
    attn.track_density()
    w = attn(x, x, x, key_padding_mask=pad, need_head_weights=True)[1]  # (H, B, L, L)
    counts = attn.density_counts()
    real = torch.ones(2, 6, dtype=torch.bool)
    real[1, 4:] = False
    nonzero = [sum(int((w[h, b, i] > 0).sum()) for b in range(2) for i in range(6) if real[b, i]) for h in range(2)]
    allowed = 6 * 6 + 4 * 4
    assert counts[0].tolist() == nonzero and counts[1].tolist() == [allowed, allowed]
    assert (counts[0] < counts[1]).all()  # sparsemax on random scores leaves zeros
    attn.track_density(False)
    attn(x, x, x)
    assert attn.density_counts() is None


def _run_counting(attn, x, **kwargs):
    """Output, weights, input/parameter gradients and density counts of one forward + backward."""
    x = x.detach().requires_grad_()
    attn.zero_grad()
    attn.track_density()
    out, weights = attn(x, x, x, need_weights=True, **kwargs)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype))
    grads = [x.grad] + [p.grad for p in attn.parameters()]
    return out, weights, grads, attn.density_counts().clone()


@pytest.mark.parametrize("cls", [FSSparsemax, FSEntmax15, FSAlphaEntmax])
def test_causal_query_blocks_equal_the_full_pass(cls):
    torch.manual_seed(0)
    attn = cls(32, 4, causal=True).double()
    if cls is FSAlphaEntmax:
        attn.set_alibi()  # a relative bias must follow each block's query offset
    length = 300  # blocks of 64, the last one partial
    assert attn.query_blocks(length) == [(s, min(s + 64, length)) for s in range(0, length, 64)]
    x = torch.randn(length, 2, 32, dtype=torch.float64)
    pad = torch.zeros(2, length, dtype=torch.bool)
    pad[1, -9:] = True
    blocked = _run_counting(attn, x, key_padding_mask=pad)
    attn.BLOCKED_FROM = length + 1  # one block: the whole matrix with its future half masked
    assert attn.query_blocks(length) == [(0, length)]
    full = _run_counting(attn, x, key_padding_mask=pad)
    for got, want in zip(blocked[:2], full[:2]):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    for got, want in zip(blocked[2], full[2]):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    assert torch.equal(blocked[3], full[3])
    assert blocked[1].triu(1).abs().max() == 0  # nothing on the future


def test_causal_query_blocks_slice_an_additive_attn_mask():
    torch.manual_seed(0)
    attn = FSEntmax15(32, 4, causal=True).double()
    length = 200
    x = torch.randn(length, 2, 32, dtype=torch.float64)
    bias = torch.randn(length, length, dtype=torch.float64)
    bias[torch.rand(length, length) < 0.1] = float("-inf")  # hard-masked keys too
    blocked = attn(x, x, x, attn_mask=bias, need_weights=True)
    attn.BLOCKED_FROM = length + 1
    full = attn(x, x, x, attn_mask=bias, need_weights=True)
    for got, want in zip(blocked, full):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    # gradients through the returned weights too (the blocks are assembled by ops.common.lower_blocks)
    probe = torch.randn_like(full[1])
    grads = []
    for threshold in (EntmaxAttentionBase.BLOCKED_FROM, length + 1):
        attn.BLOCKED_FROM = threshold
        xg = x.clone().requires_grad_()
        out, weights = attn(xg, xg, xg, attn_mask=bias, need_weights=True)
        (out.sum() + (weights * probe).sum()).backward()
        grads.append(xg.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-10, rtol=0)


def test_query_blocks_only_for_long_inputs():
    for attn in (FSEntmax15(32, 4, causal=True), FSEntmax15(32, 4)):
        assert attn.query_blocks(127) == [(0, 127)]
        assert len(attn.query_blocks(4096)) == 8


@pytest.mark.parametrize("cls", [FSEntmax15, FSAlphaEntmax])
@pytest.mark.parametrize("cross", [False, True])
def test_full_attention_in_query_blocks_equals_one_pass(cls, cross, monkeypatch):
    """Noncausal self and cross attention run in query blocks against every key, with plain (head-averaged)
    weights averaged block by block; output, weights, density counts and the gradients through both (of x, the
    keys' input and α) equal one pass's."""
    torch.manual_seed(0)
    attn = (cls(32, 4, self_attention=False, encoder_decoder_attention=True) if cross else cls(32, 4)).double()
    tgt, src = 300, 260 if cross else 300
    x = torch.randn(tgt, 2, 32, dtype=torch.float64)
    memory = torch.randn(src, 2, 32, dtype=torch.float64) if cross else x
    pad = torch.zeros(2, src, dtype=torch.bool)
    pad[1, -9:] = True
    probe = torch.randn(2, tgt, src, dtype=torch.float64)

    def run():
        xs = x.clone().requires_grad_()
        kv = memory.clone().requires_grad_() if cross else xs
        attn.zero_grad()
        attn.track_density()
        out, weights = attn(xs, kv, kv, key_padding_mask=pad)
        (out.pow(2).sum() + (weights * probe).sum()).backward()
        grads = [xs.grad] + ([kv.grad] if cross else []) + [p.grad for p in attn.parameters()]
        return [out.detach(), weights.detach()] + grads + [attn.density_counts().clone()]

    calls = []
    rows = EntmaxAttentionBase._attend_rows
    monkeypatch.setattr(EntmaxAttentionBase, "_attend_rows", lambda self, q, *a: calls.append(q.size(2))
                        or rows(self, q, *a))
    blocked = run()
    assert calls == [64] * 4 + [44]
    calls.clear()
    attn.BLOCKED_FROM = tgt + 1
    full = run()
    assert calls == [tgt]
    for got, want in zip(blocked, full):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_causal_query_blocks_with_memory_equal_one_pass():
    torch.manual_seed(0)
    attn = FSEntmax15(32, 4, causal=True).double().eval()
    attn.set_alibi()
    x = torch.randn(400, 2, 32, dtype=torch.float64)
    full = attn(x, x, x, need_weights=False)[0]
    memory = {}
    first = attn(x[:150], memory=memory, need_weights=False)[0]
    second = attn(x[150:], memory=memory, need_weights=False)[0]  # 250 queries at offset 150: blocked
    assert len(attn.query_blocks(250)) > 1
    torch.testing.assert_close(torch.cat([first, second]), full, atol=1e-12, rtol=0)


# -------------------------------------------------------------------------------------- models and logs
def test_fluence_criterion_logs_alpha_always_and_density_in_validation():
    import fairseq_helpers as H
    from fairseq.logging import metrics
    from fluence_fairseq.criterions import FluenceLabelSmoothedCrossEntropyCriterion, sparse_attentions

    model, task, _ = H.build("transformer_alpha_entmax_tiny", ["--alpha-init", "1.9", "--dropout", "0"])
    criterion = FluenceLabelSmoothedCrossEntropyCriterion(task, sentence_avg=False, label_smoothing=0.1)
    sample = H.translation_sample(task)
    labels = [label for label, _ in sparse_attentions(model)]
    assert labels == ["enc_self_0", "enc_self_1", "dec_self_0", "cross_0", "dec_self_1", "cross_1"]
    model.train()
    _, _, train_log = criterion(model, sample)
    assert all(train_log[f"alpha_{label}__sum"] == pytest.approx(1.9) for label in labels)
    assert not any(key.startswith("density") for key in train_log)
    model.eval()
    with torch.no_grad():
        _, _, valid_log = criterion(model, sample)
    assert all(module.density_counts() is None for _, module in sparse_attentions(model))  # tracking switched off
    with metrics.aggregate() as agg:
        type(criterion).reduce_metrics([valid_log, valid_log])
        values = agg.get_smoothed_values()
    densities = [values[f"density_{label}"] for label in labels]
    assert all(0 < d < 1 for d in densities) and 0 < values["density"] < 1
    assert values["alpha_cross_1"] == pytest.approx(1.9, abs=1e-3)
    # the counted density is that of the weights the model used: recompute one layer by hand
    attn = model.encoder.layers[0].self_attn
    attn.track_density()
    with torch.no_grad():
        model(**sample["net_input"])
    nonzero, allowed = attn.density_counts().sum(dim=1)
    assert values["density_enc_self_0"] == pytest.approx(float(nonzero / allowed), abs=1e-3)


def test_softmax_model_logs_no_sparse_statistics():
    import fairseq_helpers as H
    from fluence_fairseq.criterions import FluenceLabelSmoothedCrossEntropyCriterion

    model, task, _ = H.build("fluence_transformer", ["--encoder-layers", "1", "--decoder-layers", "1",
                                                     "--encoder-embed-dim", "16", "--encoder-ffn-embed-dim", "16",
                                                     "--encoder-attention-heads", "2", "--decoder-attention-heads", "2"])
    criterion = FluenceLabelSmoothedCrossEntropyCriterion(task, sentence_avg=False, label_smoothing=0.1)
    model.eval()
    _, _, log = criterion(model, H.translation_sample(task))
    assert not any(key.startswith(("alpha", "density", "span")) for key in log)


def test_sparse_architectures_use_the_normaliser_in_every_attention():
    import fairseq_helpers as H

    for arch, cls in (("transformer_sparsemax_tiny", FSSparsemax), ("transformer_entmax15_tiny", FSEntmax15),
                      ("transformer_alpha_entmax_tiny", FSAlphaEntmax), ("transformer_lm_entmax15_tiny", FSEntmax15)):
        model, _, _ = H.build(arch)
        attentions = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)
                      or hasattr(m, "q_proj")]
        assert attentions and all(type(m) is cls for m in attentions), arch


def test_train_generate_and_plot_alpha_entmax(translation_bin, tmp_path, capsys):
    import fairseq_helpers as H

    log = H.run_fairseq("train", [translation_bin, "--user-dir", "fluence_fairseq", "--arch",
                                  "transformer_alpha_entmax_tiny", "--criterion", "fluence_label_smoothed_cross_entropy",
                                  "--label-smoothing", "0.1", "--alpha-lr-scale", "20", "--alpha-init", "1.2",
                                  *H.tiny_train_flags(tmp_path, 4)])
    train = [ln for ln in log.splitlines() if "| train |" in ln][-1]
    valid = [ln for ln in log.splitlines() if "| valid |" in ln][-1]
    assert "alpha_enc_self_0" in train and "alpha_cross_1" in train and "density" not in train
    density = float(re.search(r"density_dec_self_1 ([0-9.]+)", valid).group(1))
    assert 0 < density <= 1 and "alpha_dec_self_0" in valid
    out = H.run_fairseq("generate", [translation_bin, "--path", tmp_path / "checkpoint_last.pt", "--user-dir",
                                     "fluence_fairseq", "--cpu", "--beam", "3", "--max-len-b", "10",
                                     "--batch-size", "8"])
    assert re.search(r"BLEU4? = [0-9.]+", out), out[-2000:]
    # the plot command reads alpha from the checkpoint and measures every head's density on the data
    from fluence_fairseq.cli import plot

    image = tmp_path / "entmax.png"
    assert plot.main(["entmax", str(tmp_path / "checkpoint_last.pt"), "-o", str(image),
                      "--data", str(translation_bin)]) == 0
    assert image.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "learned alpha per head" in printed and "attention density per head on 'valid'" in printed
    values = [float(v) for line in printed.splitlines() if line.startswith("layer ") for v in line.split()[2:]]
    assert len(values) == 2 * (2 + 2 + 2) * 5  # alpha and density: 3 types x 2 layers x (4 heads + mean)
    assert all(0 < v <= 2 for v in values)
    # the plot's alpha is the model's own, --alpha-lr-scale included (the parameter alone would read 1 + sigmoid(p))
    from fairseq import checkpoint_utils

    [model], _, _ = checkpoint_utils.load_model_ensemble_and_task([str(tmp_path / "checkpoint_last.pt")])
    state = plot.load_checkpoint(str(tmp_path / "checkpoint_last.pt"))
    alphas = plot.find_alphas(plot.model_state(state), float(plot.model_option(state, "alpha_lr_scale")))
    first = model.encoder.layers[0].self_attn
    assert first.alpha_lr_scale == 20.0
    assert alphas["enc_self"][0] == pytest.approx(first.alpha().tolist())
    assert all(abs(a - 1.2) < 0.3 for a in alphas["enc_self"][0]) and alphas["enc_self"][0] != [1.2] * 4


def test_a_new_entmax_attention_must_say_its_alpha():
    from fluence_fairseq.modules.entmax import EntmaxAttentionBase

    class NoAlpha(EntmaxAttentionBase):
        pass

    with pytest.raises(TypeError, match="must set fixed_alpha or override alpha"):
        NoAlpha(8, 2)

    class Fixed(EntmaxAttentionBase):
        fixed_alpha = 1.25

    x = torch.randn(5, 1, 8)
    torch.testing.assert_close(Fixed(8, 2)(x, x, x)[1].sum(-1), torch.ones(1, 5))


def test_rows_go_in_large_chunks_off_the_cpu():
    """On a GPU each pass is a kernel launch and each Newton step a synchronisation: CPU-sized chunks (cache-sized)
    made causal 1.5-entmax at L=4096 take 4.1 s there against fairseq's 19 ms. Off the CPU the rows of a
    (4, 8, 4096, 4096) matrix go in 8 chunks; on it, in 1,024."""
    import fluence_fairseq.ops.entmax as ops

    rows = 4 * 8 * 4096
    on_cpu = ops._row_chunks(torch.empty(1, 4096).expand(rows, 4096))
    off_cpu = ops._row_chunks(torch.empty(rows, 4096, device="meta"))
    assert len(on_cpu) == rows * 4096 // ops.ROW_CHUNK_ELEMENTS == 1024
    assert len(off_cpu) == rows * 4096 // ops.DEVICE_ROW_CHUNK_ELEMENTS == 8
    assert off_cpu[0] == slice(0, 16384) and off_cpu[-1].stop >= rows
    backward = ops._row_chunks(torch.empty(1, 4096).expand(rows, 4096), ops.BACKWARD_ROW_CHUNK_ELEMENTS)
    assert len(backward) == rows * 4096 // ops.BACKWARD_ROW_CHUNK_ELEMENTS
    assert ops._row_chunks(torch.empty(rows, 4096, device="meta"), ops.BACKWARD_ROW_CHUNK_ELEMENTS) == off_cpu


# ------------------------------------------------------------------------- long passes: recomputing backward
def _pass_inputs(tgt_len: int, src_len: int, cross: bool, bsz: int = 2):
    """Queries (and keys of a cross attention) of width 32 in float64 needing grad, a key padding mask with the
    last 9 keys of row 1 padded, and weights for the output's loss."""
    x = torch.randn(tgt_len, bsz, 32, dtype=torch.float64, requires_grad=True)
    src = torch.randn(src_len, bsz, 32, dtype=torch.float64, requires_grad=True) if cross else x
    kpm = torch.zeros(bsz, src_len, dtype=torch.bool)
    kpm[1, -9:] = True
    return x, src, kpm, torch.randn(tgt_len, bsz, 32, dtype=torch.float64)


def _grads_of_a_pass(attn, x, src, kpm, w):
    for t in list(attn.parameters()) + [x, src]:
        t.grad = None
    out, _ = attn(x, src, src, key_padding_mask=kpm, need_weights=False)
    (out * w).sum().backward()
    grads = {"out": out.detach(), "x": x.grad, "src": src.grad}
    # k_proj.bias has an exactly zero gradient (a per-row constant added to the scores): rounding noise, left out
    grads.update({n: p.grad for n, p in attn.named_parameters() if p.grad is not None and n != "k_proj.bias"})
    return grads


@pytest.mark.parametrize("name", ["sparsemax", "entmax15", "alpha_entmax"])
@pytest.mark.parametrize("causal,cross,alibi", [(False, False, False), (True, False, False), (False, True, False),
                                                (True, False, True)])
def test_recomputing_pass_equals_the_plain_one(monkeypatch, name, causal, cross, alibi):
    """Above RECOMPUTE_FROM_ELEMENTS a pass keeps three numbers per query row instead of the probabilities and
    recomputes each block in backward: the same output and gradients (float64, key padding, a learned α, blocks
    of a few rows so that there are many)."""
    from fluence_fairseq.modules.registry import get_attention
    import fluence_fairseq.modules.entmax as module

    calls = []
    real = module.blocked_entmax_attention
    monkeypatch.setattr(module, "blocked_entmax_attention",
                        lambda *a, **kw: calls.append(kw["blocks"]) or real(*a, **kw))
    torch.manual_seed(0)
    attn = get_attention(name).build(32, 4, dropout=0.0, causal=causal, cross=cross).double()
    if alibi:  # a relative bias follows each block's query positions
        attn.set_alibi()
    x, src, kpm, w = _pass_inputs(70, 53 if cross else 70, cross)
    S = src.size(0)
    monkeypatch.setattr(attn, "RECOMPUTE_FROM_ELEMENTS", 1 << 60)
    plain = _grads_of_a_pass(attn, x, src, kpm, w)
    assert not calls
    monkeypatch.setattr(attn, "RECOMPUTE_FROM_ELEMENTS", 0)
    monkeypatch.setattr(attn, "RECOMPUTE_BLOCK_ELEMENTS", 8 * 8 * S)  # 8 rows of B x H
    recomputed = _grads_of_a_pass(attn, x, src, kpm, w)
    assert len(calls) == 1 and len(calls[0]) >= 5
    assert plain.keys() == recomputed.keys()
    for key in plain:
        torch.testing.assert_close(recomputed[key], plain[key], rtol=1e-9, atol=1e-11, msg=key)


def test_recomputing_pass_is_left_for_weights_masks_and_density_and_takes_the_dropout(monkeypatch):
    import fluence_fairseq.modules.entmax as module

    calls = []
    monkeypatch.setattr(module, "blocked_entmax_attention",
                        lambda *a, **kw: calls.append(kw["dropout_p"]) or torch.zeros(0))
    attn = FSEntmax15(16, 2, dropout=0.1)
    monkeypatch.setattr(attn, "RECOMPUTE_FROM_ELEMENTS", 0)
    x = torch.randn(12, 2, 16)
    attn.eval()
    attn(x, x, x, need_weights=True)  # weights asked for
    attn(x, x, x, need_weights=False, attn_mask=torch.zeros(12, 12))  # an additive mask
    attn.track_density(True)
    attn(x, x, x, need_weights=False)  # counting non-zero weights
    assert calls == []
    attn.track_density(False)
    for training, dropout in ((False, 0.0), (True, 0.1)):
        attn.train(training)
        with pytest.raises(RuntimeError):  # the stub's empty output: the recomputing pass was taken
            attn(x, x, x, need_weights=False)
        assert calls[-1] == dropout  # the attention dropout in training only


def test_recomputing_pass_with_dropout_is_reproducible(monkeypatch):
    """With attention dropout the recomputing pass draws its masks from a seed taken from torch's generator: the
    same global seed gives the same output and gradients, another seed another output."""
    attn = FSEntmax15(16, 2, dropout=0.3)
    monkeypatch.setattr(attn, "RECOMPUTE_FROM_ELEMENTS", 0)
    monkeypatch.setattr(attn, "RECOMPUTE_BLOCK_ELEMENTS", 2 * 2 * 12 * 3)
    attn.train()
    x = torch.randn(12, 2, 16, requires_grad=True)

    def run(seed):
        torch.manual_seed(seed)
        x.grad = None
        out, _ = attn(x, x, x, need_weights=False)
        out.pow(2).sum().backward()
        return out.detach(), x.grad.clone()

    (a, ga), (b, gb), (c, _) = run(1), run(1), run(2)
    assert torch.equal(a, b) and torch.equal(ga, gb) and not torch.equal(a, c)


@pytest.mark.parametrize("causal", [False, True])
def test_recompute_blocks_cover_the_queries_within_the_budget(causal):
    attn = FSEntmax15(16, 2, causal=causal)
    attn.RECOMPUTE_BLOCK_ELEMENTS = 4 * 2 * 100  # B=2, H=2: 100 scores a row of (B, H)
    q, k = torch.zeros(2, 2, 37, 8), torch.zeros(2, 2, 37 if causal else 50, 8)
    blocks = attn.recompute_blocks(q, k, 0)
    assert blocks[0][0] == 0 and blocks[-1][1] == 37 and all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    for start, end in blocks:
        keys = min(37, end) if causal else 50
        assert end - start == 1 or 2 * 2 * (end - start) * keys <= attn.RECOMPUTE_BLOCK_ELEMENTS


@pytest.mark.parametrize("name", ["sparsemax", "entmax15", "alpha_entmax"])
@pytest.mark.parametrize("causal,cross,alibi", [(False, False, False), (True, False, False), (False, True, False),
                                                (True, False, True)])
def test_pass_by_support_equals_the_plain_one(monkeypatch, name, causal, cross, alibi):
    """From SUPPORT_FROM_ELEMENTS a pass runs its blocks through blocked_entmax_attention, keeping each block's
    probabilities or (sparse blocks) their support: the same output, head-averaged weights and gradients as the
    plain pass, with a loss on the weights too (float64, key padding, a learned α, scores scaled so many rows
    keep one key, blocks of a few rows)."""
    from fluence_fairseq.modules.registry import get_attention
    import fluence_fairseq.modules.entmax as module
    import fluence_fairseq.ops.entmax_attention as ops

    calls, supports = [], []
    real = module.blocked_entmax_attention
    monkeypatch.setattr(module, "blocked_entmax_attention",
                        lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    support_backward = ops._support_block_backward
    monkeypatch.setattr(ops, "_support_block_backward", lambda *a: supports.append(1) or support_backward(*a))
    torch.manual_seed(0)
    attn = get_attention(name).build(32, 4, dropout=0.0, causal=causal, cross=cross).double()
    with torch.no_grad():  # peaked scores: sparse rows
        attn.q_proj.weight.mul_(6.0 if name == "sparsemax" else 30.0)
    if alibi:
        attn.set_alibi()
    x, src, kpm, w = _pass_inputs(160, 192 if cross else 160, cross)
    w_weights = torch.randn(2, 160, src.size(0), dtype=torch.float64)

    def run():
        for t in list(attn.parameters()) + [x, src]:
            t.grad = None
        out, weights = attn(x, src, src, key_padding_mask=kpm)  # fairseq's default: need_weights=True
        ((out * w).sum() + (weights * w_weights).sum()).backward()
        grads = {"out": out.detach(), "weights": weights.detach(), "x": x.grad, "src": src.grad}
        grads.update({n: p.grad for n, p in attn.named_parameters() if p.grad is not None and n != "k_proj.bias"})
        no_weights, _ = attn(x, src, src, key_padding_mask=kpm, need_weights=False)
        return grads, no_weights.detach()

    monkeypatch.setattr(attn, "SUPPORT_FROM_ELEMENTS", 1 << 60)
    plain, plain_no_weights = run()
    assert not calls
    monkeypatch.setattr(attn, "SUPPORT_FROM_ELEMENTS", 0)
    monkeypatch.setattr(attn, "BLOCKED_FROM", 32)  # query blocks of at least 16 rows
    by_support, no_weights = run()
    assert len(calls) == 2 and all(kw["keep_probabilities"] for kw in calls) and len(calls[0]["blocks"]) >= 8
    assert [kw["need_weights"] for kw in calls] == [True, False] and supports
    torch.testing.assert_close(no_weights, plain_no_weights, rtol=1e-9, atol=1e-11)
    assert plain.keys() == by_support.keys()
    for key in plain:
        torch.testing.assert_close(by_support[key], plain[key], rtol=1e-9, atol=1e-11, msg=key)


def test_pass_by_support_is_left_for_head_weights_masks_density_and_short_queries_and_takes_the_dropout(
        monkeypatch):
    import fluence_fairseq.modules.entmax as module

    calls = []
    monkeypatch.setattr(module, "blocked_entmax_attention", lambda *a, **kw: calls.append(kw) or torch.zeros(0))
    attn = FSEntmax15(16, 2, dropout=0.1)
    monkeypatch.setattr(attn, "SUPPORT_FROM_ELEMENTS", 0)
    x = torch.randn(attn.BLOCKED_FROM, 2, 16)
    attn.eval()
    attn(x, x, x, need_weights=True, need_head_weights=True)  # every head's weights
    attn(x, x, x, need_weights=False, attn_mask=torch.zeros(len(x), len(x)))  # an additive mask
    attn(x[:-1], x[:-1], x[:-1], need_weights=False)  # fewer queries than BLOCKED_FROM
    attn.track_density(True)
    attn(x, x, x, need_weights=False)  # counting non-zero weights
    attn.track_density(False)
    assert calls == []
    for training, dropout in ((False, 0.0), (True, 0.1)):
        attn.train(training)
        with pytest.raises(RuntimeError):  # the stub's empty output: the pass by support was taken
            attn(x, x, x, need_weights=False)
        assert calls[-1]["keep_probabilities"] and calls[-1]["dropout_p"] == dropout  # in training only


def test_entries_taken_and_put_through_the_flat_view_or_by_index():
    """``take_entries`` / ``put_entries`` equal indexing by (rows, columns), on contiguous tensors (through their
    flat view) and on strided ones (by index); int32 indices as the support keeps them."""
    from fluence_fairseq.ops.entmax import put_entries, take_entries

    g = torch.Generator().manual_seed(0)
    base = torch.randn(7, 9, generator=g)
    rows, cols = torch.tensor([0, 0, 3, 6, 6]), torch.tensor([1, 8, 4, 0, 8])
    values = torch.randn(5, generator=g)
    for x in (base, base.t().contiguous().t()):
        for r, c in ((rows, cols), (rows.int(), cols.int())):
            torch.testing.assert_close(take_entries(x, r, c), base[rows, cols], rtol=0, atol=0)
            written = put_entries(x.clone(), r, c, values)
            expected = base.clone()
            expected[rows, cols] = values
            torch.testing.assert_close(written, expected, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [FSEntmax15, FSAlphaEntmax])
def test_attention_dropout_through_the_pass_by_support_keeps_the_output_unbiased(cls, monkeypatch):
    """Training steps of a pass by support with attention dropout 0.3 (one α per head for α-entmax): the mean of
    100 outputs is within 6 standard errors of the output without dropout at each of its 32k values (the largest
    reads 4.6-5.0; dropout without its 1 / (1 - p) reads 20), and the pass took the dropout."""
    import fluence_fairseq.modules.entmax as module

    torch.manual_seed(0)
    attn = cls(32, 4, dropout=0.3, causal=True).double()
    x = torch.randn(256, 4, 32, dtype=torch.float64) * 3
    assert 4 * 4 * 256 * 256 >= attn.SUPPORT_FROM_ELEMENTS  # the pass by support, not the plain one
    import fluence_fairseq.ops.entmax_attention as ops

    rates, drawn = [], []
    real, support_dropout = module.blocked_entmax_attention, ops._support_dropout
    monkeypatch.setattr(module, "blocked_entmax_attention", lambda *a, **kw: rates.append(kw["dropout_p"]) or
                        real(*a, **kw))
    monkeypatch.setattr(ops, "_support_dropout", lambda *a: drawn.append(1) or support_dropout(*a))
    attn.eval()
    with torch.no_grad():
        reference = attn(x, x, x, need_weights=False)[0]
        attn.train()
        outs = torch.stack([attn(x, x, x, need_weights=False)[0] for _ in range(100)])
    assert rates == [0.0] + [0.3] * 100 and drawn  # blocks on their support drew their entries' masks
    standard_error = outs.std(dim=0) / 100 ** 0.5
    assert float(standard_error.max()) > 0.01  # the dropout moved the outputs
    assert bool(((outs.mean(dim=0) - reference).abs() <= 6 * standard_error + 1e-9).all())


def test_group_size_is_read_when_called_not_when_imported(monkeypatch):
    """START_GROUP changed after import (``benchmarks.entmax_search --start-group``) reaches every search through
    the groups: the entries above the start found through 16-entry groups are those a full comparison finds."""
    import fluence_fairseq.ops.entmax as ops

    monkeypatch.setattr(ops, "START_GROUP", 16)
    gen = torch.Generator().manual_seed(4)
    u = torch.randn(6, 1024, generator=gen) - 3.0
    u[:, [3, 100, 517, 900]] += 4.0
    start = torch.full((6, 1), -0.5)
    groups = ops._group_maxima(u, 16)
    assert int((groups > start).sum()) * 16 < ops.SCAN_GROUPS_BELOW * u.numel()  # the groups' route is taken
    rows, columns = ops._entries_above(u, start, groups)
    expected = (u > start).nonzero().unbind(1)
    assert torch.equal(rows, expected[0]) and torch.equal(columns, expected[1])


@pytest.mark.parametrize("seed,small", randomized.seeds(12))
def test_random_rows_match_bisection_in_float64(seed, small):
    """Random row lengths and counts, scales, ties, masks, -inf entries and α (fixed, per row, learned):
    probabilities and both gradients match bisection in float64 (:func:`randomized.entmax_case`)."""
    randomized.check(randomized.entmax_case, seed, small)
