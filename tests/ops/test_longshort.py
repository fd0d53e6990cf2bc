"""The long-short op's forward through the CPU flash kernel (``FLASH_GROUPS``) against its explicit scores."""
import pytest
import torch

import fluence_fairseq.ops.longshort as ops
from fluence_fairseq.ops.common import FLASH_CPU
from fluence_fairseq.ops.longshort import long_short_attention

pytestmark = pytest.mark.skipif(FLASH_CPU is None, reason="this torch build has no CPU flash kernel")


def _inputs(length, bsz=2, heads=3, dim=8, rank=2, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    # q, k, v as fairseq's heads: permuted views of (L, B, H, D)
    qkv = [rnd(length, bsz, heads, dim).permute(1, 2, 0, 3) for _ in range(3)]
    params = [1 + 0.3 * rnd(heads, dim), 0.3 * rnd(heads, dim), 1 + 0.3 * rnd(heads, dim), 0.3 * rnd(heads, dim),
              rnd(heads, dim, rank), rnd(heads, rank)]
    grad = rnd(length, bsz, heads, dim).permute(1, 2, 0, 3)
    return qkv, params, grad


def _run(flash, monkeypatch, *, causal, length, window, block=None, padding=None, reuse=False, alibi=False,
         dropout=0.0, dtype=torch.float64):
    """Output and every gradient of one call with ``FLASH_GROUPS = flash``."""
    monkeypatch.setattr(ops, "FLASH_GROUPS", flash)
    (q, k, v), params, grad = _inputs(length, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, *params)]
    q, k, v = leaves[:3]
    if reuse:  # the op may free k and v and write over q: give it copies of its own
        q, k, v = (t * 1 for t in (q, k, v))
    torch.manual_seed(0)
    out = long_short_attention(
        q, k, v, ln_local=leaves[3:5], ln_global=leaves[5:7], proj_weight=leaves[7], proj_bias=leaves[8],
        key_padding_mask=padding, causal=causal, window=window, chunk_size=3, block_size=block, reuse_buffers=reuse,
        dropout_p=dropout, alibi_slopes=torch.tensor([0.5, 0.25, 0.125], dtype=dtype) if alibi else None)
    result = out.detach().clone()
    out.backward(grad.clone())
    # proj_bias's gradient is zero up to rounding (a softmax over positions ignores a constant per column)
    return [result] + [t.grad for t in leaves[:-1]]


@pytest.mark.parametrize("reuse", [False, True])
@pytest.mark.parametrize("block", [None, 4])
@pytest.mark.parametrize("group_elements", [1, 1 << 20])
@pytest.mark.parametrize("causal,length,window", [(True, 61, 9), (True, 64, 20), (False, 61, 7), (False, 80, 12)])
def test_flash_forward_equals_the_explicit_scores(causal, length, window, group_elements, block, reuse, monkeypatch):
    """Float64, so any difference beyond rounding is a wrong mask, column, share or row. One block per group
    (``group_elements`` 1) puts groups past the first query, whose global columns become visible part-way through
    (the global mask); a length that is no multiple of the block leaves a last block to the explicit path; the
    default blocks differ between the flash forward and the explicit backward (64 and 128 from a span of 97)."""
    monkeypatch.setattr(ops, "_FLASH_GROUP_ELEMENTS", group_elements)
    calls = []
    kernel = ops.FLASH_CPU
    monkeypatch.setattr(ops, "FLASH_CPU", lambda *a, **kw: (calls.append(a[0].shape), kernel(*a, **kw))[1])
    kw = dict(causal=causal, length=length, window=window, block=block, reuse=reuse)
    want = _run(False, monkeypatch, **kw)
    assert not calls
    got = _run(True, monkeypatch, **kw)
    assert calls, "the flash path was not taken"
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-11)


def test_default_blocks_differ_between_the_flash_forward_and_the_explicit_backward(monkeypatch):
    blocks = []
    kernel = ops.FLASH_CPU
    monkeypatch.setattr(ops, "FLASH_CPU", lambda *a, **kw: (blocks.append(a[0].size(2)), kernel(*a, **kw))[1])
    grouped = ops._LongShort._groups
    backward_blocks = []

    def groups(bsz, heads, nblocks, bq, *rest, **kw):
        backward_blocks.append(bq)
        return grouped(bsz, heads, nblocks, bq, *rest, **kw)

    monkeypatch.setattr(ops._LongShort, "_groups", staticmethod(groups))
    want = _run(False, monkeypatch, causal=True, length=300, window=100)
    got = _run(True, monkeypatch, causal=True, length=300, window=100)
    assert ops.FLASH_BLOCK == 64 and set(blocks[::2]) == {64}  # the band calls' query blocks
    assert backward_blocks[-1] == 128  # the explicit backward's (span 100 > 96)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flash_forward_in_lower_precision(dtype, monkeypatch):
    """The kernel's log-sum-exps are float32 for bfloat16 inputs: the shares are taken in float32 and the output
    keeps the inputs' dtype, within that dtype's rounding of the explicit scores."""
    want = _run(False, monkeypatch, causal=True, length=200, window=40, dtype=dtype)
    got = _run(True, monkeypatch, causal=True, length=200, window=40, dtype=dtype)
    assert got[0].dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol * float(want[0].abs().max()))


@pytest.mark.parametrize("case", ["padding", "alibi", "dropout"])
def test_the_explicit_scores_where_the_flash_path_does_not_apply(case, monkeypatch):
    """Padding inside a window (and padded global columns: one mask cannot serve every sequence), ALiBi and
    attention dropout take the explicit scores: with padding only the blocks whose windows are all real keys take
    the kernel (none here, where padding reaches every window), with ALiBi or dropout none."""
    calls = []
    kernel = ops.FLASH_CPU
    monkeypatch.setattr(ops, "FLASH_CPU", lambda *a, **kw: (calls.append(1), kernel(*a, **kw))[1])
    padding = None
    if case == "padding":
        padding = torch.zeros(2, 40, dtype=torch.bool)
        padding[1, ::6] = True
    kw = dict(causal=True, length=40, window=5, padding=padding, alibi=case == "alibi",
              dropout=0.3 if case == "dropout" else 0.0)
    want = _run(False, monkeypatch, **kw)
    got = _run(True, monkeypatch, **kw)
    assert not calls
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_groups_keep_flash_and_explicit_blocks_apart():
    """A group is all one kind, the flash ones cut by their own bound, the explicit ones by the scores'."""
    padded = torch.zeros(1, 64, dtype=torch.bool)
    padded[0, 40] = True
    bq, left = 4, 5
    kb = bq + left
    nblocks = 16
    masks = ops._LongShort._masks(padded, None, torch.zeros(0, dtype=torch.long), 1, 64, nblocks, bq, kb, left, 0,
                                  torch.device("cpu"))
    groups = ops._LongShort._groups(1, 2, nblocks, bq, kb, torch.device("cpu"), masks.flash_applies, 3)
    assert [g[0] for g in groups] == sorted(g[0] for g in groups) and groups[-1][1] == nblocks
    assert all(g0 < g1 for g0, g1, _ in groups)
    for g0, g1, fast in groups:
        assert all(masks.flash_applies(t) == fast for t in range(g0, g1))
    # block 0 reaches before the first key, blocks 10-11 hold key 40 in their windows
    assert [t for t in range(nblocks) if not masks.flash_applies(t)] == [0, 1, 10, 11]
    assert max(g1 - g0 for g0, g1, fast in groups if fast) > 1


def test_rolling_rows_equal_folding_into_a_full_buffer():
    """Groups of many blocks fold their windows in padded pieces that run up to a block past the last window's
    rows; the rolling buffer must hold those rows too (random windows, blocks and group sizes, rolled out
    mid-way)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        bq = int(torch.randint(1, 6, (), generator=g))
        left = int(torch.randint(0, 12, (), generator=g))
        right = int(torch.randint(0, 3, (), generator=g))
        kb = bq + left + right
        nblocks = int(torch.randint(1, 30, (), generator=g))
        length = nblocks * bq - int(torch.randint(0, bq, (), generator=g))
        cuts = sorted(set(torch.randint(1, nblocks + 1, (4,), generator=g).tolist()) | {nblocks})
        groups = [(a, b, False) for a, b in zip([0] + cuts[:-1], cuts)]
        windows = [torch.randn(1, 2, g1 - g0, kb, 3, generator=g, dtype=torch.float64) for g0, g1, _ in groups]
        full = torch.zeros(1, 2, (nblocks + 1) * bq + kb, 3, dtype=torch.float64)
        for (g0, _, _), w in zip(groups, windows):
            ops.fold_windows(w, full, g0, bq)
        out = torch.full((1, 2, length, 3), float("nan"), dtype=torch.float64)
        rolling = ops._RollingRows(out, left, bq, kb, groups)
        for (g0, g1, _), w in zip(groups, windows):
            rolling.fold(w, g0, g1)
        rolling.finish()
        torch.testing.assert_close(out, full[:, :, left:left + length], rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal,length,window", [(True, 61, 9), (False, 61, 7)])
@pytest.mark.parametrize("case", ["plain", "padding", "alibi", "dropout", "grouped"])
def test_backward_from_the_saved_log_sum_exps_equals_the_softmax(causal, length, window, case, monkeypatch):
    """Backward's probabilities from the forward's log-sum-exps (base 2, each part of the scores on its own)
    against a softmax of the joined scores, float64: the groups with padding in a window keep the softmax, the
    others take the saved rows whichever path the forward took (the flash kernel's, or the explicit scores' with
    ALiBi or dropout, whose mask backward draws over the joined columns again, group by group as forward did:
    ``test_long_short_function_gradcheck_float64`` checks those gradients against finite differences)."""
    if case == "alibi" and not causal:
        pytest.skip("ALiBi is causal only")
    if case in ("grouped", "dropout"):  # one block a group: with dropout groups are not cut where padding is
        monkeypatch.setattr(ops, "_GROUP_ELEMENTS", 1)
    padding = None
    if case == "padding":  # longer than a window: the last queries of sequence 1 have no key at all
        padding = torch.zeros(2, length, dtype=torch.bool)
        padding[1, -20:] = True
    taken = []
    scores = ops._LongShort._block_scores

    def block_scores(*args, base2=False, **kw):
        taken.append(base2)
        return scores(*args, base2=base2, **kw)

    monkeypatch.setattr(ops._LongShort, "_block_scores", staticmethod(block_scores))
    kw = dict(causal=causal, length=length, window=window, padding=padding, alibi=case == "alibi",
              dropout=0.3 if case == "dropout" else 0.0, block=4)
    monkeypatch.setattr(ops, "BACKWARD_FROM_LSE", False)
    want = _run(True, monkeypatch, **kw)
    assert not any(taken)
    monkeypatch.setattr(ops, "BACKWARD_FROM_LSE", True)
    got = _run(True, monkeypatch, **kw)
    assert any(taken)
    if case == "padding":
        assert not all(taken[len(taken) // 2:])  # some groups kept the softmax
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-11)


def test_log_sum_exps_only_kept_when_a_backward_will_follow(monkeypatch):
    """The explicit forward reads its scores twice more for the rows' log-sum-exps, which only backward uses: not
    under ``torch.no_grad`` (inference), nor without an input that requires a gradient."""
    monkeypatch.setattr(ops, "FLASH_GROUPS", False)
    calls = []
    amax = torch.amax
    monkeypatch.setattr(torch, "amax", lambda *a, **kw: (calls.append(1), amax(*a, **kw))[1])
    (q, k, v), params, _ = _inputs(40)

    def call():
        return long_short_attention(q, k, v, ln_local=params[:2], ln_global=params[2:4], proj_weight=params[4],
                                    proj_bias=params[5], key_padding_mask=None, causal=True, window=5, block_size=4)

    frozen = call()  # nothing requires a gradient
    assert not calls
    params = [p.requires_grad_() for p in params]
    with torch.no_grad():
        quiet = call()
    assert not calls
    trained = call()  # the parameters require gradients: a backward may follow
    assert calls
    torch.testing.assert_close(quiet, trained.detach(), rtol=0, atol=0)
    torch.testing.assert_close(frozen, quiet, rtol=0, atol=0)
