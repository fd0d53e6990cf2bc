"""Pruned attention (global keep mask): the block-sparse and dense paths against a plain masked softmax."""
import pytest
import torch

import randomized
from fluence_fairseq.ops import common, pruned_attention as pa
from fluence_fairseq.pruning.policy import pruning_mask, random_pruning_mask
from fluence_fairseq.ops.pruned_attention import BlockLayout, choose_path, pruned_attention


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny problems: OpenMP threads only add synchronisation (milliseconds per call on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference(q, k, v, keep, key_padding_mask=None):
    """Masked softmax with -inf fill; rows with no allowed key give 0. Returns (out, probs)."""
    scores = torch.matmul(q * q.size(-1) ** -0.5, k.transpose(-1, -2))
    allowed = keep.unsqueeze(0)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    probs = torch.where(allowed.any(-1, keepdim=True), probs, torch.zeros_like(probs))
    return torch.matmul(probs, v), probs


def inputs(bsz, heads, tgt_len, src_len, dim=8, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)  # drawn on the CPU, used on the test's (default) device
    return [torch.randn(bsz, heads, n, dim, generator=gen, dtype=dtype, device="cpu").to(torch.get_default_device())
            .requires_grad_() for n in (tgt_len, src_len, src_len)]


def check_against_reference(keep, *, bsz=2, key_padding_mask=None, block=8, dtype=torch.float64, tol=1e-10,
                            q_blocks=(1, 2, 4)):
    """The chosen path, both paths forced, every query-block size in ``q_blocks`` (multiples of ``block``) and both
    block-sparse variants against :func:`reference`. Returns the layout with square blocks."""
    heads, tgt_len, src_len = keep.shape
    q, k, v = inputs(bsz, heads, tgt_len, src_len, dtype=dtype)
    ref, _ = reference(q, k, v, keep, key_padding_mask)
    grad = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (q, k, v), grad)

    def agrees(out):
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
        for g, w in zip(torch.autograd.grad(out, (q, k, v), grad), want):
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g, w, atol=tol, rtol=tol)

    out, weights = pruned_attention(q, k, v, keep, key_padding_mask=key_padding_mask, block=block)
    assert weights is None
    agrees(out)
    agrees(pruned_attention(q, k, v, keep, key_padding_mask=key_padding_mask, path="dense")[0])
    layouts = [BlockLayout.build(keep, block, block * f) for f in q_blocks]
    for layout in layouts:
        agrees(pruned_attention(q, k, v, keep, key_padding_mask=key_padding_mask, layout=layout,
                                path="block-sparse")[0])
        # the autograd variant of the block-sparse path (used with dropout or off CPU) agrees too
        agrees(pa._sparse_path(q, k, v, layout, key_padding_mask, 0.0, lean=False))
    return layouts[0]


@pytest.mark.parametrize("density", [0.002, 0.02, 0.1])
def test_random_sparse_masks_match_reference(density):
    gen = torch.Generator().manual_seed(1)
    keep = torch.rand(3, 64, 64, generator=gen) < density
    # block structure so that the layout is sparse enough for the block-sparse path
    keep &= torch.rand(3, 8, 1, 8, 1, generator=gen).expand(3, 8, 8, 8, 8).reshape(3, 64, 64) < 0.3
    check_against_reference(keep)


def test_float32_matches_reference_to_float32_tolerance():
    keep = torch.tril(torch.ones(64, 64, dtype=torch.bool)) & ~torch.tril(torch.ones(64, 64, dtype=torch.bool), -12)
    check_against_reference(keep.expand(2, 64, 64), dtype=torch.float32, tol=2e-5)


def test_causal_band_and_lengths_not_multiples_of_the_block():
    tgt_len = src_len = 45
    rel = torch.arange(tgt_len).view(-1, 1) - torch.arange(src_len).view(1, -1)
    keep = torch.stack([(rel >= 0) & (rel < w) for w in (3, 7, 20)])  # causal bands of three widths
    layout = check_against_reference(keep)
    assert layout.q_blocks == 6 and layout.k_blocks == 6
    # causal: no kept block above the diagonal
    assert bool((layout.row % 6 >= layout.key_block).all())


def test_mask_from_pruning_mask_with_lq_different_from_lk():
    gen = torch.Generator().manual_seed(2)
    tgt_len, src_len = 40, 72
    rel = (torch.arange(tgt_len).view(-1, 1) * src_len / tgt_len - torch.arange(src_len).view(1, -1)).abs()
    patterns = torch.stack([torch.exp(-rel / w) for w in (1.0, 3.0, 10.0, 30.0)]).unsqueeze(0)
    patterns = patterns * (1 + 0.1 * torch.rand(patterns.shape, generator=gen))
    keep = pruning_mask(patterns, 90.0, "layer")[0]
    assert 0.05 < keep.float().mean() < 0.15
    check_against_reference(keep)


@pytest.mark.parametrize("side", ["left", "right"])
def test_key_padding(side):
    rel = torch.arange(50).view(-1, 1) - torch.arange(50).view(1, -1)
    keep = torch.stack([rel.abs() <= 4, (rel >= 0) & (rel < 10)])
    keep[:, :, :2] = True  # global columns (padded away on the left)
    pad = torch.zeros(3, 50, dtype=torch.bool)
    if side == "left":
        pad[0, :7], pad[1, :20] = True, True
    else:
        pad[0, -7:], pad[1, -20:] = True, True
    check_against_reference(keep, bsz=3, key_padding_mask=pad)  # some rows lose every key to the padding


@pytest.mark.skipif(common.FLASH_CPU_BACKWARD is None, reason="this torch build has no CPU flash kernels")
@pytest.mark.parametrize("causal", [False, True])
def test_padded_batches_run_item_by_item_on_their_unpadded_keys(causal, monkeypatch):
    """Past ``PER_ITEM_FROM`` the dense path of a padded batch calls the kernel once per item: on the item's
    unpadded keys alone where they are one run (left, right or both sides padded), with a bias of its own where
    they are not (holes); an item with every key padded gives 0. Outputs and gradients as the reference's, with
    and without a plan (whose causal flag the kernel then takes on keys sliced from ``lo > 0``)."""
    monkeypatch.setattr(pa, "PER_ITEM_FROM", 0)
    length = 40
    rel = torch.arange(length).view(-1, 1) - torch.arange(length).view(1, -1)
    keep = torch.stack([rel.abs() <= 3, rel.abs() <= 12, torch.ones(length, length, dtype=torch.bool)])
    keep[:, :, :2] = True  # global columns: padded away on the left, so rows near the start may lose every key
    if causal:
        keep &= rel >= 0
    pad = torch.zeros(6, length, dtype=torch.bool)
    pad[1, -9:] = True  # right
    pad[2, :13] = True  # left
    pad[3, :5], pad[3, -7:] = True, True  # both sides
    pad[4, 10:20] = True  # a hole
    pad[5] = True  # nothing to attend to
    keys = []
    kernel = common.FLASH_CPU
    monkeypatch.setattr(common, "FLASH_CPU", lambda q, k, *a, **kw: keys.append(k.size(2)) or kernel(q, k, *a, **kw))
    q, k, v = inputs(6, 3, length, length, dtype=torch.float64)
    ref, _ = reference(q, k, v, keep, pad)
    grad = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for plan in (None, pa.PrunedPlan(keep, 8)):
        keys.clear()
        out, _ = pa._dense_path(q, k, v, keep, pad, 0.0, False, plan)
        assert keys == [length, length - 9, length - 13, length - 12, length]  # item 5 calls no kernel
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
        assert out[5].abs().max() == 0
        for got, expected in zip(torch.autograd.grad(out, (q, k, v), grad), want):
            torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    assert plan.causal == causal and len(plan._extent) == 1  # the rows' first and last keys, found once


def test_fully_pruned_rows_and_heads_give_zero_output_and_zero_gradients():
    rel = torch.arange(48).view(-1, 1) - torch.arange(48).view(1, -1)
    keep = torch.stack([rel.abs() <= 2, torch.zeros(48, 48, dtype=torch.bool), rel.abs() <= 5])
    keep[0, 10:20] = False  # rows inside a kept block row
    keep[2, 16:32] = False  # whole query blocks
    keep[0, 5, 40] = True  # lone far entry
    q, k, v = inputs(2, 3, 48, 48, dtype=torch.float64)
    out, _ = pruned_attention(q, k, v, keep, block=8, path="block-sparse")
    assert choose_path(48, 48, pa.PrunedPlan(keep, 8)) == "block-sparse"
    assert out[:, 1].abs().max() == 0 and out[:, 0, 10:20].abs().max() == 0 and out[:, 2, 16:32].abs().max() == 0
    out.sum().backward()
    assert q.grad[:, 1].abs().max() == 0 and k.grad[:, 1].abs().max() == 0 and v.grad[:, 1].abs().max() == 0
    assert q.grad[:, 0, 10:20].abs().max() == 0
    check_against_reference(keep)


def test_everything_pruned():
    q, k, v = inputs(1, 2, 40, 40)
    keep = torch.zeros(2, 40, 40, dtype=torch.bool)
    for path in ("auto", "dense", "block-sparse"):
        out, _ = pruned_attention(q, k, v, keep, block=8, path=path)
        assert out.shape == q.shape and out.abs().max() == 0
        (gq,) = torch.autograd.grad(out.sum(), (q,))
        assert gq.abs().max() == 0



@pytest.mark.parametrize("tgt_len,src_len", [(33, 7), (33, 200)])
def test_a_head_keeping_keys_only_in_its_last_partial_query_block(tgt_len, src_len):
    """A head whose only kept rows lie in the last query block, a partial one outside every item of merged rows
    (33 queries: two whole blocks of 16 and one row after them): building its layouts used to search band windows
    over an empty set of candidates and raise an IndexError, so a model whose mask had such a head failed at the
    first call of that length."""
    keep = torch.zeros(2, tgt_len, src_len, dtype=torch.bool)
    keep[0, -1, 3] = True
    keep[0, -1, src_len - 1] = True
    keep[1] = torch.rand(tgt_len, src_len, generator=torch.Generator().manual_seed(0)) < 0.5
    for q_block in (16, 32):
        assert BlockLayout.build(keep, 16, q_block).triples > 0
    check_against_reference(keep, block=16, q_blocks=(1, 2))

def test_gradcheck_float64(device):
    keep = torch.zeros(2, 10, 12, dtype=torch.bool)
    keep[0, :, :3] = True
    keep[0, 2, 9] = True
    keep[1, 4:, 5:8] = True  # rows 0-3 of head 1 have no key
    pad = torch.tensor([[False] * 11 + [True], [True] * 2 + [False] * 10])
    q, k, v = inputs(2, 2, 10, 12, dim=3, dtype=torch.float64)
    for q_block in (4, 8):
        layout = BlockLayout.build(keep, 4, q_block)
        torch.autograd.gradcheck(lambda q, k, v: pruned_attention(q, k, v, keep, key_padding_mask=pad, layout=layout,
                                                                  path="block-sparse")[0], (q, k, v))
    torch.autograd.gradcheck(lambda q, k, v: pruned_attention(q, k, v, keep, key_padding_mask=pad, path="dense")[0],
                             (q, k, v))


def test_need_weights_match_reference_and_rows_sum_to_one_or_zero():
    rel = torch.arange(40).view(-1, 1) - torch.arange(40).view(1, -1)
    keep = torch.stack([rel.abs() <= 3, (rel >= 0) & (rel < 6)])
    keep[1, 30:] = False
    pad = torch.zeros(2, 40, dtype=torch.bool)
    pad[1, :5] = True
    q, k, v = inputs(2, 2, 40, 40, dtype=torch.float64)
    out, weights = pruned_attention(q, k, v, keep, key_padding_mask=pad, need_weights=True)
    ref, ref_weights = reference(q, k, v, keep, pad)
    torch.testing.assert_close(weights, ref_weights)
    torch.testing.assert_close(out, ref)
    sums = weights.sum(-1)
    assert bool((((sums - 1).abs() < 1e-12) | (sums == 0)).all())
    assert bool((sums[:, 1, 30:] == 0).all()) and bool((sums[1, 1, :5] == 0).all())
    assert weights.masked_select(~keep.unsqueeze(0).expand_as(weights)).abs().max() == 0


@pytest.mark.parametrize("path", ["block-sparse", "dense"])
def test_dropout_scales_kept_probabilities(path):
    """One kept key per query and v = 1: every output is 0 (dropped) or exactly 1 / (1 - p) (kept and scaled)."""
    p, length = 0.25, 64
    keep = torch.eye(length, dtype=torch.bool).expand(2, length, length).contiguous()
    q, k, _ = inputs(2, 2, length, length)
    v = torch.ones(2, 2, length, 8)
    torch.manual_seed(0)
    out, _ = pruned_attention(q, k, v, keep, dropout_p=p, block=8, path=path)
    values = out[..., 0].flatten()
    assert bool(((values == 0) | ((values - 1 / (1 - p)).abs() < 1e-5)).all())
    dropped = (values == 0).float().mean()
    assert 0.1 < dropped < 0.4  # about p of them dropped
    assert bool((out == out[..., :1]).all())  # the whole row shares the probability


@pytest.mark.parametrize("path", ["block-sparse", "dense"])
def test_dropout_is_unbiased(path):
    rel = torch.arange(32).view(-1, 1) - torch.arange(32).view(1, -1)
    keep = (rel.abs() <= 3).expand(2, 32, 32).contiguous()
    q, k, v = inputs(1, 2, 32, 32)
    with torch.no_grad():
        clean, _ = pruned_attention(q, k, v, keep, block=8)
        torch.manual_seed(0)
        kwargs = dict(dropout_p=0.3, block=8, path=path)
        runs = torch.stack([pruned_attention(q, k, v, keep, **kwargs)[0] for _ in range(400)])
    assert (runs.mean(0) - clean).abs().mean() < 0.1 * clean.abs().mean()
    assert (runs[0] - clean).abs().mean() > 0.1 * clean.abs().mean()  # dropout did act


def test_path_choice(monkeypatch):
    calls = []
    for name in ("_dense_path", "_sparse_path"):
        original = getattr(pa, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(pa, name, spy)
    rel = torch.arange(64).view(-1, 1) - torch.arange(64).view(1, -1)
    sparse = (rel.abs() <= 2).expand(2, 64, 64).contiguous()
    dense = random_pruning_mask((1, 2, 64, 64), 90.0)[0]
    q, k, v = inputs(1, 2, 64, 64)
    cases = [(sparse, {}, "_sparse_path"), (dense, {}, "_dense_path"),
             (sparse, {"need_weights": True}, "_dense_path"), (sparse, {"path": "dense"}, "_dense_path"),
             (dense, {"path": "block-sparse"}, "_sparse_path"),
             (sparse, {"block": 64}, "_dense_path")]  # the whole sequence fits in one block
    for keep, kwargs, want in cases:
        calls.clear()
        kwargs = {"block": 8, **kwargs}
        pruned_attention(q, k, v, keep, **kwargs)
        assert calls == [want], (kwargs, calls)
    assert BlockLayout.build(dense, 8).density > 0.9 > 0.4 > BlockLayout.build(sparse, 8).density
    with pytest.raises(ValueError, match="path must be"):
        pruned_attention(q, k, v, sparse, path="sparse")


def test_static_estimate_prefers_coarser_query_blocks_only_when_they_keep_little_more(monkeypatch):
    """In buckets a band keeps the same key blocks whatever the query block, so the coarsest is cheapest (bands,
    windows of keys, are off here); a layout that keeps every block at every size is never estimated cheaper than
    dense."""
    monkeypatch.setattr(pa, "_BANDS", False)
    rel = torch.arange(256).view(-1, 1) - torch.arange(256).view(1, -1)
    band = (rel.abs() <= 3).expand(2, 256, 256).contiguous()
    ranked = pa.PrunedPlan(band, 8).estimates()
    assert ranked[0][0] is not None and ranked[0][0].q_block > 8
    full = torch.ones(2, 256, 256, dtype=torch.bool)
    assert pa.PrunedPlan(full, 8).estimates()[0][0] is None


@pytest.mark.parametrize("sparse_ms, paired, want", [(5.0, None, "block-sparse"), (8.6, 0.92, "block-sparse"),
                                                     (9.2, 0.97, "dense"), (9.2, 1.04, "dense"),
                                                     (20.0, None, "dense")])
def test_tuned_plan_takes_the_measured_faster_path(monkeypatch, sparse_ms, paired, want):
    """With ``tune=True`` the path is the one that measured faster: a layout 15% below dense at once, one closer
    only if alternating pairs with dense put it 5% below (and no pairs run where the rounds settle it); decided
    once per (device, dtype, head dim, grad mode) and explained in ``decisions``."""
    rel = torch.arange(64).view(-1, 1) - torch.arange(64).view(1, -1)
    keep = (rel.abs() <= 2).expand(2, 64, 64).contiguous()
    plan = pa.PrunedPlan(keep, 8, tune=True)
    timed, confirmed = [], []
    monkeypatch.setattr(pa.PrunedPlan, "_time", lambda self, layouts, *a: timed.extend(layouts) or
                        [10.0 if layout is None else sparse_ms for layout in layouts])
    monkeypatch.setattr(pa.PrunedPlan, "_paired_ratio", lambda self, layout, *a: confirmed.append(layout) or paired)
    q, k, v = inputs(1, 2, 64, 64)
    out, _ = pruned_attention(q, k, v, keep, plan=plan)
    ref, _ = reference(q, k, v, keep)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (path, layout, reason), = plan.decisions.values()
    assert path == want and (layout is None) == (want == "dense")
    assert "measured (fwd+bwd" in reason and "dense 10.00 ms" in reason
    assert len(confirmed) == (paired is not None) and all(c is not None for c in confirmed)
    assert ("pairs" in reason) == (paired is not None)
    if paired is not None:
        assert f"/ dense in {pa._CONFIRM_PAIRS} pairs: {paired:.3f}" in reason
    assert None in timed and len(timed) >= 2
    n = len(timed)
    pruned_attention(q, k, v, keep, plan=plan)
    assert len(timed) == n  # decided once
    with torch.no_grad():
        pruned_attention(q, k, v, keep, plan=plan)
    assert len(timed) > n and len(plan.decisions) == 2  # inference is timed on its own
    # what no decision took holds no cached mask
    assert bool(plan._bias) == (want == "dense")
    for candidate in plan.layouts:
        cached = any(bucket._bias for bucket in candidate.buckets)
        assert cached == (candidate is layout), (candidate, layout)
    assert plan.cached_bytes() > plan.keep.numel()


def test_paired_ratio_times_both_sides_alternately_and_leaves_the_inputs_alone(monkeypatch):
    """The confirmation runs the layout and the dense path the same number of times, which goes first
    alternating, and gives the median of the pairs' ratios."""
    rel = torch.arange(96).view(-1, 1) - torch.arange(96).view(1, -1)
    keep = (rel.abs() <= 5).expand(2, 96, 96).contiguous()
    q, k, v = inputs(2, 2, 96, 96)
    plan = pa.PrunedPlan(keep, 8, tune=True)
    layout = plan.layouts[0]
    runs = []
    sparse, dense = pa._sparse_path, pa._dense_path
    monkeypatch.setattr(pa, "_sparse_path", lambda *a, **kw: runs.append("sparse") or sparse(*a, **kw))
    monkeypatch.setattr(pa, "_dense_path", lambda *a, **kw: runs.append("dense") or dense(*a, **kw))
    ratio = plan._paired_ratio(layout, q, k, v, None, True)
    assert 0 < ratio < float("inf")
    pairs = [tuple(runs[i : i + 2]) for i in range(0, len(runs), 2)]
    assert len(pairs) == pa._CONFIRM_PAIRS and pairs[0] == ("sparse", "dense") and pairs[1] == ("dense", "sparse")
    assert q.grad is None and k.grad is None and v.grad is None


def test_tuning_leaves_inputs_gradients_and_random_state_alone():
    rel = torch.arange(96).view(-1, 1) - torch.arange(96).view(1, -1)
    keep = (rel.abs() <= 5).expand(2, 96, 96).contiguous()
    q, k, v = inputs(2, 2, 96, 96)
    plan = pa.PrunedPlan(keep, 8, tune=True)
    state = torch.get_rng_state()
    out, _ = pruned_attention(q, k, v, keep, plan=plan)
    assert torch.equal(state, torch.get_rng_state())
    assert q.grad is None and k.grad is None and v.grad is None
    out.sum().backward()
    ref, _ = reference(*(x.detach().requires_grad_() for x in (q, k, v)), keep)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # every candidate was run (and filled its cached masks); only the chosen one keeps them
    (_, chosen, _), = plan.decisions.values()
    assert "dense" in plan.decisions[next(iter(plan.decisions))][2]
    assert bool(plan._bias) == (chosen is None)
    for candidate in plan.layouts:
        assert any(bucket._bias for bucket in candidate.buckets) == (candidate is chosen)


def test_causal_masks_use_the_causal_flash_kernel_and_match(monkeypatch):
    """A mask inside the causal triangle takes the kernel's ``is_causal`` with the mask; others do not."""
    flags = []
    kernel = common.FLASH_CPU  # the dense path's kernel (through ops.common.cpu_flash_attention)
    monkeypatch.setattr(common, "FLASH_CPU", lambda *a, **kw: flags.append(a[4] if len(a) > 4 else False) or kernel(*a, **kw))
    rel = torch.arange(80).view(-1, 1) - torch.arange(80).view(1, -1)
    causal = torch.stack([(rel >= 0) & (rel < 9), rel >= 0, (rel >= 0) & (rel % 7 == 0)])
    assert pa.PrunedPlan(causal, 8).causal and not pa.PrunedPlan(rel.abs().le(3).expand(3, 80, 80), 8).causal
    assert not pa.PrunedPlan(causal[:, :60], 8).causal  # not square
    pad = torch.zeros(2, 80, dtype=torch.bool)
    pad[1, -11:] = True
    q, k, v = inputs(2, 3, 80, 80, dtype=torch.float64)
    ref, _ = reference(q, k, v, causal, pad)
    grad = torch.randn_like(ref)
    wants = torch.autograd.grad(ref, (q, k, v), grad)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        qq, kk, vv = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
        out, _ = pruned_attention(qq, kk, vv, causal, key_padding_mask=pad, plan=pa.PrunedPlan(causal, 8),
                                  path="dense")
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
        for got, want in zip(torch.autograd.grad(out, (qq, kk, vv), grad.to(dtype)), wants):
            torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    assert flags == [True, True]
    band = rel.abs().le(3).expand(3, 80, 80).contiguous()
    pruned_attention(q, k, v, band, plan=pa.PrunedPlan(band, 8), path="dense")
    assert flags[-1] is False


def test_layout_of_block_diagonal_mask():
    keep = torch.block_diag(*[torch.ones(8, 8, dtype=torch.bool)] * 4).expand(3, 32, 32).contiguous()
    layout = BlockLayout.build(keep, 8)
    assert layout.density == pytest.approx(0.25) and layout.triples == 12
    assert layout.computed_density == pytest.approx(0.25)
    assert torch.equal(layout.row, torch.arange(12)) and torch.equal(layout.key_block, torch.arange(4).repeat(3))
    assert bool(layout.mask.all())
    # misaligned blocks (block 16 over 8-blocks): every kept 16-block is only half full
    half = BlockLayout.build(keep, 16)
    assert half.density == pytest.approx(0.5) and not bool(half.mask.all())
    # one extra entry adds exactly one block
    keep2 = keep.clone()
    keep2[0, 0, 31] = True
    assert BlockLayout.build(keep2, 8).triples == 13


def test_layout_buckets_and_device_move():
    rel = torch.arange(96).view(-1, 1) - torch.arange(96).view(1, -1)
    keep = torch.stack([rel.abs() <= 1, rel.abs() <= 40, rel >= 0])
    layout = BlockLayout.build(keep, 8).to("cpu")
    counts = layout.counts.tolist()
    assert sum(counts) == layout.triples
    rows = torch.cat([b.rows for b in layout.buckets])
    assert sorted(rows.tolist()) == [r for r in range(len(counts)) if counts[r] > 0]
    assert any(isinstance(b, pa._Band) for b in layout.buckets)
    for bucket in layout.buckets:
        if not isinstance(bucket, pa._Band):
            assert all(counts[r] <= bucket.cap <= max(counts[r], 1) * pa._GRID_RATIO + 1
                       for r in bucket.rows.tolist())
    moved = layout.to("cpu")
    for a, b in zip(layout.buckets, moved.buckets):
        assert type(a) is type(b) and torch.equal(a.rows, b.rows) and torch.equal(a.mask, b.mask)
        assert torch.equal(a.cols, b.cols) and a.keys == b.keys
    check_against_reference(keep)


def test_bucket_padding_slots_are_computed_and_masked(monkeypatch):
    monkeypatch.setattr(pa, "_BANDS", False)
    rel = torch.arange(96).view(-1, 1) - torch.arange(96).view(1, -1)
    keep = torch.stack([rel.abs() <= 1, rel.abs() <= 40, rel >= 0])
    layout = BlockLayout.build(keep, 8)
    assert layout.computed_density > layout.density  # long rows are padded up to their bucket's count ...
    check_against_reference(keep)  # ... and the padding slots are masked
    with pytest.raises(ValueError):
        pruned_attention(*inputs(1, 3, 96, 96), keep, layout=BlockLayout.build(keep[:, :50], 8))


def test_buckets_split_into_row_chunks(monkeypatch):
    monkeypatch.setattr(pa, "_CHUNK_ELEMENTS", 1)  # one item (a bucket's row, a band's merged rows) per fused call
    rel = torch.arange(72).view(-1, 1) - torch.arange(72).view(1, -1)
    keep = torch.stack([rel.abs() <= 2, rel.abs() <= 30, (rel >= 0) & (rel < 12)])
    keep[1, 20:30] = False
    layout = BlockLayout.build(keep, 8)
    assert len(list(pa._chunks(layout, 2, 8))) == sum(b.items for b in layout.buckets) > len(layout.buckets)
    assert sum(b.items * getattr(b, "merge", 1) for b in layout.buckets) == len(layout.bucket_rows)
    pad = torch.zeros(2, 72, dtype=torch.bool)
    pad[1, -9:] = True
    check_against_reference(keep, key_padding_mask=pad)


@pytest.mark.skipif(pa.FLASH_CPU_BACKWARD is None, reason="this torch has no CPU flash kernel backward")
def test_bucket_key_gradients_fold_back_without_a_copy():
    """With the rows as the kernel's batch, a bucket's key/value gradients reshape onto (B, rows * cap, block, D)
    as a view (before, a reshape copied each of them: a quarter of the block-sparse path's copies)."""
    bsz, n, cap, b, bq, d = 2, 3, 4, 8, 16, 8
    q = torch.randn(bsz, n, bq, d)
    k, v = torch.randn(bsz, n, cap * b, d), torch.randn(bsz, n, cap * b, d)
    bias = torch.zeros(1, n, bq, cap * b)
    q_r, k_r, v_r, bias_r = pa._rows_first(q, k, v, bias)
    out, lse = pa.FLASH_CPU(q_r, k_r, v_r, attn_mask=bias_r)
    _, gk, gv = pa.FLASH_CPU_BACKWARD(torch.ones_like(out), q_r, k_r, v_r, out, lse, 0.0, False, attn_mask=bias_r)
    for g in (gk, gv):
        folded = g.transpose(0, 1).reshape(bsz, n * cap, b, d)
        assert folded.untyped_storage().data_ptr() == g.untyped_storage().data_ptr()
    # and the swap itself changes nothing: the same numbers as the kernel on the problem as given
    want = pa.FLASH_CPU(q, k, v, attn_mask=bias)[0]
    torch.testing.assert_close(out.transpose(0, 1), want, rtol=0, atol=0)


def _banded_keep(heads, tgt_len, src_len, causal=False, seed=0):
    """Diagonal bands of different widths and offsets per head (as data-informed masks are) with holes inside,
    and two rows per head that also keep the first keys (they leave their head's band, which splits into runs)."""
    gen = torch.Generator().manual_seed(seed)
    i = torch.arange(tgt_len).view(-1, 1) * src_len // tgt_len
    j = torch.arange(src_len).view(1, -1)
    keep = []
    for h in range(heads):
        lo, hi = 10 + 6 * h, 6 + 9 * h
        band = (j >= i - lo) & (j <= i + (0 if causal else hi))
        band &= torch.rand(tgt_len, src_len, generator=gen) > 0.1  # holes
        band[[tgt_len // 3 + h, 2 * tgt_len // 3 - h], :3] = True  # rows that also keep the first keys
        keep.append(band & (j <= i) if causal else band)
    return torch.stack(keep)


@pytest.mark.parametrize("causal,tgt_len,src_len", [(False, 256, 256), (False, 250, 233), (False, 192, 300),
                                                     (True, 256, 256), (True, 250, 250)])
def test_banded_masks_take_bands_and_match_reference(causal, tgt_len, src_len):
    """Rows whose kept key blocks lie in a window that moves with the diagonal are computed as bands (strided
    views of the keys, slices of the queries): every kept entry is in exactly one band or bucket, band rows are
    consecutive, and the result equals the reference with every query block, on the fused and the autograd paths,
    with key padding too (lengths that are not multiples of the block: partial last blocks)."""
    keep = _banded_keep(3, tgt_len, src_len, causal)
    banded = 0
    for q_block in (8, 16, 32):
        layout = BlockLayout.build(keep, 8, q_block)
        bands = [b for b in layout.buckets if isinstance(b, pa._Band)]
        banded += len(bands)
        rows = torch.cat([b.rows for b in layout.buckets])
        assert rows.unique().numel() == rows.numel()  # no row in two groups
        assert set(rows.tolist()) == set(layout.counts.nonzero().flatten().tolist())
        kept = sum(int(b.mask.sum()) for b in layout.buckets)
        assert kept == int(keep.sum())  # every kept entry inside its row's window or bucket, once
        for band in bands:
            assert torch.equal(band.rows, torch.arange(band.first, band.first + band.rows.numel()))
            assert band.rows.numel() >= pa._MIN_BAND_ROWS and band.keys % min(pa._WIDTH_MULTIPLE, 8) == 0
            # every window inside the head's keys; a head's first (last) items share one window moved inside
            assert band.step in (0, band.q_block) and band.q_block == band.merge * q_block
            assert 0 <= band.start and band.start + band.step * (band.items - 1) + band.keys <= band.head_keys
            # every kept entry of its rows lies in its window: the window's mask holds all of them
            heads_rows = keep.view(3, -1, q_block, src_len) if tgt_len % q_block == 0 else None
            if heads_rows is not None:
                h, r = divmod(int(band.rows[0]), layout.q_blocks)
                want = heads_rows[h, r : r + band.rows.numel()].sum((1, 2))
                per_row = band.mask.reshape(band.rows.numel(), q_block, band.keys)  # items of merged rows
                assert torch.equal(per_row.sum((1, 2)), want)
    assert banded
    pad = torch.zeros(2, src_len, dtype=torch.bool)
    pad[1, -13:] = True
    check_against_reference(keep)
    check_against_reference(keep, key_padding_mask=pad)


def test_a_wide_band_merges_rows_and_its_edge_rows_share_a_window():
    """A band 81 keys wide over query blocks of 8: items of several rows (fewer, larger problems), and the head's
    first and last rows, whose windows would reach past the keys, in bands of one shared window (step 0) at the
    keys' ends; the result is the reference's."""
    rel = torch.arange(256).view(-1, 1) - torch.arange(256).view(1, -1)
    keep = (rel.abs() <= 40).expand(2, 256, 256).contiguous()
    layout = BlockLayout.build(keep, 8)
    bands = [b for b in layout.buckets if isinstance(b, pa._Band)]
    assert any(b.merge > 1 for b in bands)
    edges = [b for b in bands if b.step == 0]
    assert {b.start for b in edges} >= {0, 256 - edges[-1].keys}
    for band in edges:
        x = torch.randn(1, 2 * layout.k_blocks, 8, 4)
        view = band.blocks(x, 0, band.items)
        assert view.stride(1) == 0 and torch.equal(view, band.blocks(x, 0, band.items, gather=True))
    assert sum(b.rows.numel() for b in bands) > 0.9 * 2 * layout.q_blocks
    check_against_reference(keep, q_blocks=(1,))
    pad = torch.zeros(2, 256, dtype=torch.bool)
    pad[1, :7] = True  # padding inside the first rows' shared window
    check_against_reference(keep, key_padding_mask=pad, q_blocks=(1,))


def test_band_keys_are_views_and_its_rows_slices():
    """A band's keys and values are one strided view of the key blocks (overlapping windows, no copy), its queries
    a slice; the same numbers as the gathered blocks."""
    keep = _banded_keep(2, 256, 256)
    layout = BlockLayout.build(keep, 8, 16)
    band = max((b for b in layout.buckets if isinstance(b, pa._Band)), key=lambda b: b.rows.numel())
    assert band.rows.numel() >= 3
    x = torch.randn(2, 2 * layout.k_blocks, 8, 4)
    view = band.blocks(x, 1, band.rows.numel())
    assert view.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    gathered = band.blocks(x, 1, band.rows.numel(), gather=True)  # the autograd path's copy
    assert gathered.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    assert torch.equal(view, gathered)
    rows = torch.randn(2, 2 * layout.q_blocks, 16, 4)
    taken = band.take(rows, 1, 3)
    assert taken.untyped_storage().data_ptr() == rows.untyped_storage().data_ptr()
    assert torch.equal(taken, rows.index_select(1, band.rows[1:3]))


def test_bands_off_gives_the_same_result(monkeypatch):
    """Bands are a way of computing, not a different answer: with them off (buckets only) the outputs and
    gradients agree to rounding."""
    keep = _banded_keep(3, 256, 256)
    q, k, v = inputs(2, 3, 256, 256, dtype=torch.float64)
    grad = torch.randn(2, 3, 256, 8, dtype=torch.float64)
    results = []
    for on in (True, False):
        monkeypatch.setattr(pa, "_BANDS", on)
        layout = BlockLayout.build(keep, 8, 16)
        assert any(isinstance(b, pa._Band) for b in layout.buckets) == on
        out = pruned_attention(q, k, v, keep, layout=layout, path="block-sparse")[0]
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_runs_and_window_candidates():
    assert pa._runs([0, 1, 2, 5, 6, 9]) == [[0, 1, 2], [5, 6], [9]]
    assert pa._runs([]) == []
    assert pa._candidates(torch.tensor([3, 1, 3, 2, 3, 1, 7]), 8).tolist() == [1, 2, 3, 7]
    many = torch.cat([torch.full((90,), 5), torch.arange(100, 110)])  # most rows at 5, a tail of ten others
    got = pa._candidates(many, 4)
    assert got.numel() <= 4 and 5 in got.tolist() and got.min() == 5 and got.max() == 109


@pytest.mark.parametrize("seed,small", randomized.seeds(12))
def test_random_cases_match_the_masked_softmax(seed, small):
    """Random masks (bands, blocks, scattered entries, empty rows and heads), paddings, lengths, layouts and paths:
    outputs and gradients equal the float64 masked softmax (:func:`randomized.pruned_attention_case`)."""
    randomized.check(randomized.pruned_attention_case, seed, small)
