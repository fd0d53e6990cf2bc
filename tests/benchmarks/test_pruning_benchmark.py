"""Smoke test of the pruned-attention benchmark at tiny sizes: report structure, paths and arithmetic, no timing
thresholds (timings are for the benchmark command, not the test suite)."""
import math
import subprocess

import pytest
import torch

from benchmarks import ab, pruning as bp



def main_lines(capsys, argv):
    """The lines ``benchmarks.pruning`` prints for ``argv`` (the process's thread count restored after it)."""
    threads = torch.get_num_threads()
    try:
        bp.main(argv)
    finally:
        torch.set_num_threads(threads)
    return capsys.readouterr().out.strip().splitlines()

def test_synthetic_patterns_are_row_stochastic_and_causal():
    p = bp.synthetic_patterns(4, 48, causal=True)
    assert p.shape == (1, 4, 48, 48)
    torch.testing.assert_close(p.sum(-1), torch.ones(1, 4, 48, dtype=p.dtype))
    assert p[0].triu(1).abs().max() == 0
    keep = bp.make_mask("informed", 90.0, 4, 48, causal=True)
    assert keep.shape == (4, 48, 48) and not bool(keep.triu(1).any())
    assert int(keep.sum()) == round(0.1 * 4 * 48 * 49 / 2)
    # the band heads keep their diagonal
    assert bool(keep[0].diagonal(-1)[1:].all() or keep[0].diagonal()[1:].all())


def test_report_with_in_process_workers(monkeypatch):
    """The whole driver, with every worker run in this process (a fresh process each costs seconds)."""
    monkeypatch.setattr(bp, "run_in_fresh_process", lambda module, job, what, env=None: bp._worker(job))
    threads = torch.get_num_threads()
    try:
        report = bp.run_benchmark(length=64, heads=2, head_dim=8, batch=1, threads=1, repeats=2, block=8,
                                  log=lambda msg: None)
    finally:
        torch.set_num_threads(threads)
    rows = report["rows"]
    assert [(r["pattern"], r["case"]) for r in rows] == [(p, c[0]) for p in ("noncausal", "causal") for c in bp.CASES]
    for r in rows:
        base = next(b for b in rows if b["pattern"] == r["pattern"] and b["path"] == "sdpa")
        assert r["time_ms_median"] > 0 and len(r["time_ms"]) == 2 and math.isfinite(r["peak_mem_mb"])
        assert r["time_ratio"] == pytest.approx(r["time_ms_median"] / base["time_ms_median"])
    by = {(r["pattern"], r["case"]): r for r in rows}
    for pattern in ("noncausal", "causal"):
        informed = by[(pattern, "data-informed 90%")]
        assert informed["kept_share"] == pytest.approx(0.1, abs=0.01)
        assert by[(pattern, "random 90%")]["kept_share"] == pytest.approx(informed["kept_share"], abs=1e-3)
        assert by[(pattern, "masked-dense 90%")]["path"] == "dense"
        assert informed["block_density"] < by[(pattern, "random 90%")]["block_density"]
    for r in rows:
        if r["case"].startswith("data-informed"):  # the plan's measured choice, with its timings
            assert r["path"] == "dense" or r["path"].startswith("block-sparse "), r["path"]
            assert r["why"].startswith("measured (fwd+bwd, B=1): ") and "dense " in r["why"]
    informed = [c[0] for c in bp.CASES if c[0].startswith("data-informed")]
    assert [(t["pattern"], t["case"], t["measure"], t["limit"]) for t in report["targets"]] == [
        (p, c, m, limit) for p in ("noncausal", "causal") for c in informed
        for m, limit in [("time", 1.0), ("memory", 1.5)] + ([("time", 0.4)] if c.endswith(" 90%") else [])]
    for t in report["targets"]:
        assert t["met"] == (t["ratio"] <= t["limit"])
    text = bp.markdown(report)
    assert "| causal | data-informed 90% |" in text and "target <= 0.4" in text and "Why each path" in text


def test_heads_layouts():
    """``lbhd``: (B, H, L, D) views of (L, B, H, D) memory whose gradients reach the leaves they view; the report
    says which layout it ran."""
    make, grad = bp.heads_inputs(2, 3, 5, 4, "lbhd")
    q, k, v = make()
    assert q.shape == grad.shape == (2, 3, 5, 4) and not q.is_contiguous() and q._base.shape == (5, 2, 3, 4)
    assert not q._base.is_leaf and make()[0] is not q  # fresh heads at every step, as a module's projections make
    torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(grad)
    leaves = [x._base.grad_fn.next_functions[0][0].variable for x in (q, k, v)]
    assert all(leaf.is_leaf and leaf.grad is not None for leaf in leaves)
    make()
    assert all(leaf.grad is None for leaf in leaves)  # reset at each step
    same = bp.heads_inputs(2, 3, 5, 4, "bhld")[0]
    assert all(x.is_contiguous() and x.is_leaf for x in same()) and same()[0] is same()[0]
    with pytest.raises(ValueError, match="bhld or lbhd"):
        bp.heads_inputs(2, 3, 5, 4, "blhd")
    report = {"config": dict(batch=1, heads=2, length=8, head_dim=4, block=4, threads=1, heads_layout="lbhd"),
              "machine": dict(cpu="x", torch="t", load_avg_1min=0.0), "rows": [], "targets": []}
    assert "views of (L, B, H, D) memory" in bp.markdown(report)


def test_report_on_module_layout_heads(monkeypatch):
    monkeypatch.setattr(bp, "run_in_fresh_process", lambda module, job, what, env=None: bp._worker(job))
    threads = torch.get_num_threads()
    try:
        report = bp.run_benchmark(length=64, heads=2, head_dim=8, batch=2, threads=1, repeats=1, block=8,
                                  patterns=("causal",), heads_layout="lbhd", log=lambda msg: None)
    finally:
        torch.set_num_threads(threads)
    assert report["config"]["heads_layout"] == "lbhd"
    assert len(report["rows"]) == len(bp.CASES) and all(r["time_ms_median"] > 0 for r in report["rows"])


def test_worker_subprocess_memory():
    job = {"case": {"kind": "informed", "tau": 90.0, "force": None}, "causal": True, "length": 32, "heads": 2,
           "head_dim": 8, "batch": 1, "threads": 1, "repeats": 1, "block": 8, "memory_only": True}
    result = bp.run_in_fresh_process("benchmarks.pruning", job, "smoke", bp.MEMORY_ENV)
    assert math.isfinite(result["peak_mem_mb"]) and result["why"].startswith("measured")
    # the benchmark's memory runs repeat the timing run's choice
    for chosen in ("dense", "block-sparse 16x8"):
        job["case"]["chosen"] = chosen
        result = bp.run_in_fresh_process("benchmarks.pruning", job, "smoke", bp.MEMORY_ENV)
        assert result["path"] == chosen and result["why"] == "the timing run's choice"


def test_unknown_pattern_is_refused():
    with pytest.raises(SystemExit, match="unknown patterns"):
        bp.main(["--quick", "--patterns", "cross"])
    with pytest.raises(SystemExit, match="--patterns"):  # none at all (it ran nothing before)
        bp.main(["--quick", "--patterns", ","])


@pytest.mark.skipif(subprocess.run(["git", "rev-parse", "HEAD"], cwd=ab.REPO, capture_output=True).returncode != 0,
                    reason="needs a git checkout (the old side is read with git show)")
def test_paired_against_a_revision_reports_every_layout(capsys):
    lines = main_lines(capsys, ["--against", "HEAD", "--quick", "--pairs", "2", "--patterns", "causal"])
    # quick sizes: blocks of 8, query blocks of 8, 16 and 32 (the default --q-factors), at 70% and 90%
    assert [line.split(":")[0] for line in lines] == [
        f"causal data-informed {tau}% {q}x8" for tau in (70, 90) for q in (8, 16, 32)]
    for line in lines:
        ratio = float(line.split("new / old ")[1].split()[0])
        assert ratio > 0 and line.endswith("gradients differ by at most 0.0e+00")  # HEAD against itself
    lines = main_lines(capsys, ["--against", "HEAD", "--quick", "--pairs", "1", "--patterns", "noncausal",
                                "--q-factors", "2"])
    assert [line.split(":")[0] for line in lines] == [f"noncausal data-informed {tau}% 16x8" for tau in (70, 90)]
    # the new side's key blocks changed: same query blocks, the same attention (gradients to rounding)
    lines = main_lines(capsys, ["--against", "HEAD", "--quick", "--pairs", "1", "--patterns", "noncausal",
                                "--q-factors", "2", "--new-block", "4"])
    assert [line.split(": new / old")[0] for line in lines] == [f"noncausal data-informed {tau}% 16x8 (new: 16x4)"
                                                                for tau in (70, 90)]
    for line in lines:
        assert float(line.split("gradients differ by at most ")[1]) < 1e-5
    with pytest.raises(SystemExit, match="--new-block must be a positive integer"):
        bp.main(["--against", "HEAD", "--quick", "--new-block", "0"])


def test_paired_alternates_which_side_runs_first(monkeypatch):
    """A step right after dense SDPA ran 5-8% slower than the next one, so the old side always first read the same
    code at 0.92-0.94x against itself: the pairs alternate (old, new), (new, old), ..."""
    import types

    import fluence_fairseq.ops.pruned_attention as new_ops
    order = []
    real = new_ops._sparse_path

    def spy(name):
        return lambda *a, **kw: order.append(name) or real(*a, **kw)

    old_ops = types.ModuleType("old_pruned_attention")
    old_ops.BlockLayout, old_ops._sparse_path = new_ops.BlockLayout, spy("old")
    monkeypatch.setattr(ab, "load_revision", lambda module, rev: old_ops)
    monkeypatch.setattr(new_ops, "_sparse_path", spy("new"))
    threads = torch.get_num_threads()
    try:
        lines = bp.paired("HEAD", length=64, heads=2, head_dim=8, batch=1, block=8, pairs=4, taus=(90.0,),
                          q_factors=(1,), patterns=("causal",))
    finally:
        torch.set_num_threads(threads)
    assert len(lines) == 1
    assert order[2:] == ["old", "new", "new", "old", "old", "new", "new", "old"]  # after the gradient check's two


@pytest.mark.parametrize("factors", ["0", "two", ""])
def test_paired_refuses_bad_query_block_factors(factors):
    with pytest.raises(SystemExit, match="--q-factors must be"):
        bp.main(["--against", "HEAD", "--quick", "--q-factors", factors])


@pytest.mark.parametrize("pattern", ["noncausal", "causal"])
def test_per_head_reports_every_head_and_the_sum_of_their_fastest_paths(capsys, pattern):
    lines = main_lines(capsys, ["--per-head", "--quick", "--patterns", pattern])
    # quick sizes: 2 heads; per mask (10%, 30%) a line for each head, then the sum of their fastest paths
    assert [line.split(" (kept")[0].split(":")[0] for line in lines] == [
        f"{pattern} data-informed {tau}%{suffix}" for tau in (10, 30) for suffix in (" head 0", " head 1", "")]
    for head_lines, total in ((lines[0:2], lines[2]), (lines[3:5], lines[5])):
        fastest = 0.0
        for line in head_lines:
            timings, best = line.split(": ", 1)[1].split("; fastest: ")
            times = {name: float(ms) for name, ms in (part.rsplit(" ", 2)[:2] for part in timings.split(", "))}
            assert "masked dense" in times and times[best] == min(times.values())
            fastest += times[best]
        assert abs(float(total.split("sum to ")[1].split()[0]) - fastest) <= 0.2  # the printed times are rounded


def test_bias_order_compares_both_kernel_orders_on_every_mask(capsys, monkeypatch):
    """Both sides run the same mask through the kernel: the shared bias with heads as the kernel's batch, the
    expanded one in its usual order (seen from the shapes the kernel is called with)."""
    from fluence_fairseq.ops import common

    kernel, batches = common.FLASH_CPU, []
    monkeypatch.setattr(common, "FLASH_CPU", lambda q, *a, **kw: batches.append(q.size(0)) or kernel(q, *a, **kw))
    lines = main_lines(capsys, ["--bias-order", "--length", "64", "--heads", "3", "--head-dim", "8", "--batch", "2", "--pairs", "2",
                 "--patterns", "causal"])
    assert [line.split(" masked dense")[0] for line in lines] == [f"causal data-informed {tau}%" for tau in (10, 30, 50)]
    # per mask three rounds (one warm-up) of both sides: heads first calls the kernel with 3 (heads) items, usual
    # with 2 (the batch)
    assert sorted(set(batches)) == [2, 3] and batches.count(3) == batches.count(2) == 3 * 3


def test_mask_cost_times_each_kernel_call_with_each_mask(capsys, monkeypatch):
    """Every variant's forward and backward are timed, the masks reach the kernel as described (none, a full
    zero mask, rows of stride 0), and each ratio is to the unmasked call of the same part."""
    from fluence_fairseq.ops import common

    seen = []
    forward, backward = common.FLASH_CPU, common.FLASH_CPU_BACKWARD

    def spy(kernel, part):
        def call(*a, attn_mask=None, **kw):
            seen.append((part, None if attn_mask is None else attn_mask.stride(2)))
            return kernel(*a, attn_mask=attn_mask, **kw)
        return call

    monkeypatch.setattr(common, "FLASH_CPU", spy(forward, "forward"))
    monkeypatch.setattr(common, "FLASH_CPU_BACKWARD", spy(backward, "backward"))
    lines = main_lines(capsys, ["--mask-cost", "--quick", "--pairs", "2"])
    names = ["no mask", "zero mask (1, H, L, L)", "one row per head (stride 0)"]
    assert [line.split(":")[0] for line in lines] == [f"{part} {name}" for part in ("forward", "backward")
                                                      for name in names]
    assert lines[0].endswith("1.000x no mask") and lines[3].endswith("1.000x no mask")
    length = bp.QUICK_SIZES["length"]
    for part in ("forward", "backward"):
        assert {stride for p, stride in seen if p == part} == {None, length, 0}


def test_padding_compares_item_by_item_one_call_and_unpadded(capsys, monkeypatch):
    """Each side takes the path it names: item by item (the padded item's kernel call sees only its unpadded
    keys), one call (full keys, a per-item bias), and the unpadded batch in one call."""
    from fluence_fairseq.ops import common

    kernel, calls = common.FLASH_CPU, []
    monkeypatch.setattr(common, "FLASH_CPU", lambda q, k, *a, **kw: calls.append(
        (q.size(0), k.size(2), kw["attn_mask"].size(0))) or kernel(q, k, *a, **kw))
    lines = main_lines(capsys, ["--padding", "--length", "64", "--heads", "3", "--head-dim", "8", "--batch", "2", "--pairs", "1",
                 "--patterns", "noncausal"])
    assert [line.split(":")[0] for line in lines] == [f"noncausal data-informed {tau}%, 8 keys of one item padded"
                                                      for tau in (10, 30, 50)]
    assert all("unpadded" in line and "item by item" in line and "one call" in line for line in lines)
    # per mask and round: unpadded (one call, the shared bias with the 3 heads as the kernel's batch), item by item
    # (1 item each: 64 then 56 keys), one call (2 items, 64 keys, a bias per item)
    assert set(calls) == {(3, 64, 3), (1, 64, 1), (1, 56, 1), (2, 64, 2)}
    assert calls.count((1, 56, 1)) == calls.count((2, 64, 2)) == calls.count((3, 64, 3)) == 3 * 2
