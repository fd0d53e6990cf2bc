"""Smoke test of benchmarks.attention on tiny sizes: report structure and arithmetic, no timing thresholds."""
import math

import pytest

from benchmarks.attention import (
    KEEP_QKV, MHA, PROJECTIONS, SDPA, BenchConfig, DecodeGrowthTarget, TimeRatioTarget, Variant, build_parser,
    config_from_args, decode_series, markdown, run_benchmark, write_outputs,
)

POSITIONS = [16, 32, 64]
BATCHES = [1, 3]
SOFTMAX = Variant("softmax", decode=True)
SPAN = Variant("adaptive_span", {"attn_span": 64, "adapt_span_ramp": 8}, {"span": 16}, decode=True)


@pytest.fixture(scope="module")
def report():
    # one thread per worker: a loaded test machine would otherwise stall OpenMP and slow the test down
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        cfg = BenchConfig(
            [SOFTMAX, SPAN], pattern="causal", dim=32, heads=4, batch=16, lengths=[64], repeats=2, warmup=1,
            decode_positions=POSITIONS, decode_batches=BATCHES, decode_steps=2,
            targets=[TimeRatioTarget(SPAN.label, MHA, 0.5), DecodeGrowthTarget(SPAN.label, 3, 1.1)],
        )
        return run_benchmark(cfg, log=lambda msg: None)


def test_training_rows_have_positive_finite_numbers(report):
    rows = {row["case"]: row for row in report["train"]}
    assert set(rows) == {"softmax", "adaptive_span span=16", MHA, SDPA, PROJECTIONS, KEEP_QKV}
    for row in rows.values():
        assert len(row["time_ms"]) == 2
        assert row["time_ms_min"] == min(row["time_ms"]) and row["time_ms_median"] >= row["time_ms_min"]
        for key in ("time_ms_median", "time_ms_min", "peak_mem_mb"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["case"], key, row[key])


def test_ratios_follow_from_raw_numbers(report):
    rows = {row["case"]: row for row in report["train"]}
    for row in rows.values():
        for ref, suffix in ((MHA, "mha"), (SDPA, "sdpa")):
            assert row[f"time_vs_{suffix}"] == pytest.approx(row["time_ms_median"] / rows[ref]["time_ms_median"])
            assert row[f"mem_vs_{suffix}"] == pytest.approx(row["peak_mem_mb"] / rows[ref]["peak_mem_mb"])
    assert rows[MHA]["time_vs_mha"] == pytest.approx(1.0)


def test_work_is_the_profiled_floating_point_work_of_a_step(report):
    """The projections' work is exactly their four (L x D) x (D x D) products, forward and backward (a weight and
    an input gradient each); an attention's is more; the column is in the report."""
    rows = {row["case"]: row for row in report["train"]}
    length, dim, batch = report["config"]["lengths"][0], report["config"]["dim"], report["config"]["batch"]
    projections = 4 * 3 * 2 * batch * length * dim * dim
    assert rows[PROJECTIONS]["gflop"] == pytest.approx(projections / 1e9, rel=0.02)
    assert rows[PROJECTIONS]["work_vs_proj"] == pytest.approx(1.0)
    for case in ("softmax", MHA):
        assert rows[case]["work_vs_proj"] > 1.0, case
        assert rows[case]["work_vs_proj"] == pytest.approx(rows[case]["gflop"] / rows[PROJECTIONS]["gflop"])
    assert "| work / proj |" in markdown(report)


def test_decode_rows_for_every_position_and_batch(report):
    series = decode_series(report)
    assert set(series) == {(case, b) for case in ("softmax", "adaptive_span span=16", MHA) for b in BATCHES}
    for points in series.values():
        assert [p for p, _ in points] == POSITIONS
        assert all(math.isfinite(ms) and ms > 0 for _, ms in points)


def test_targets_and_markdown(report, tmp_path):
    ratio, growth = report["targets"]
    rows = {row["case"]: row for row in report["train"]}
    assert ratio["value"] == pytest.approx(rows[SPAN.label]["time_ms_median"] / rows[MHA]["time_ms_median"])
    points = decode_series(report)[(SPAN.label, 3)]
    assert growth["value"] == pytest.approx(points[-1][1] / points[0][1])
    assert ratio["pass"] == (ratio["value"] <= 0.5)
    text = markdown(report)
    for needle in ("torch", "threads", "| 64 | softmax |", f"| {MHA} | 3 |", "PASS" if ratio["pass"] else "FAIL"):
        assert needle in text
    written = write_outputs(report, str(tmp_path / "sub" / "smoke"))
    assert [p.rsplit(".", 1)[1] for p in written] == ["md", "json", "png"]
    assert all((tmp_path / "sub" / f"smoke.{ext}").stat().st_size > 0 for ext in ("md", "json", "png"))


def test_preset_and_command_line_options():
    cfg = config_from_args(_parse(["--preset", "adaptive_span", "--lengths", "1024,4096"]))
    assert cfg.lengths == [1024, 4096] and cfg.dim == 512 and cfg.heads == 8 and cfg.batch == 1
    assert [v.label for v in cfg.variants] == [f"adaptive_span span={s}" for s in (64, 1024, 4096)]
    assert [v.decode for v in cfg.variants] == [True, False, False]
    assert cfg.variants[0].options == {"attn_span": 4096, "adapt_span_ramp": 32}
    assert len(cfg.targets) == 5
    # targets on what the run does not measure are left out (they raised a KeyError once the run was over)
    from benchmarks.attention import DecodeGrowthTarget, LengthGrowthTarget
    cfg = config_from_args(_parse(["--preset", "efficient_causal", "--lengths", "8192", "--no-decode"]))
    assert cfg.targets and not any(isinstance(t, (DecodeGrowthTarget, LengthGrowthTarget)) for t in cfg.targets)
    assert any(isinstance(t, DecodeGrowthTarget) for t in config_from_args(_parse(["--preset", "efficient_causal"])).targets)
    noncausal = [["--preset", "efficient_noncausal"], ["--preset", "efficient_noncausal", "--lengths", "16384"]]
    assert [any(isinstance(t, LengthGrowthTarget) for t in config_from_args(_parse(a)).targets) for a in noncausal] == [
        True, False]
    cfg = config_from_args(_parse(["adaptive_span", "--opt", "attn_span=256", "--setup", "span=32", "--no-decode"]))
    assert cfg.variants == [Variant("adaptive_span", {"attn_span": 256}, {"span": 32.0})]
    with pytest.raises(SystemExit):
        config_from_args(_parse(["softmax", "--opt", "attn_span=256"]))


def _parse(argv):
    return build_parser().parse_args(argv)


def test_efficient_presets_cover_every_registered_method_with_its_bounds():
    from benchmarks.attention import PRESETS, DecodeGrowthTarget, LengthGrowthTarget, TimeRatioTarget
    from fluence_fairseq.modules import ATTENTIONS

    noncausal = PRESETS["efficient_noncausal"]()
    names = {v.attention for v in noncausal.variants}
    efficient = {n for n, spec in ATTENTIONS.items() if spec.family == "efficient"}
    assert names == efficient and {"local", "abc", "performer", "s4d", "longshort"} <= names
    assert "softmax" not in names and "entmax15" not in names
    bounds = {t.case: t.limit for t in noncausal.targets if isinstance(t, TimeRatioTarget) and t.metric != "peak_mem_mb"}
    assert all(bounds[v.label] == ATTENTIONS[v.attention].bench_time_bound for v in noncausal.variants)
    assert noncausal.baseline_max_length == 8192 and max(noncausal.lengths) == 16384
    assert any(isinstance(t, LengthGrowthTarget) for t in noncausal.targets)
    causal = PRESETS["efficient_causal"]()
    assert all((False, True) in ATTENTIONS[v.attention].cls.supported_patterns for v in causal.variants)
    assert all(v.decode for v in causal.variants)
    # the decode-growth targets follow the constant_state capability the attentions declare
    constant = {t.case for t in causal.targets if isinstance(t, DecodeGrowthTarget)}
    assert constant == {v.label for v in causal.variants if ATTENTIONS[v.attention].cls.constant_state}
    assert {"abc", "performer", "s4d"} <= constant and "local" not in constant


def test_growth_and_memory_targets_and_skipped_baselines():
    from benchmarks.attention import LengthGrowthTarget, add_ratios

    rows = [{"case": "x", "length": 1000, "time_ms_median": 10.0, "peak_mem_mb": 5.0},
            {"case": "x", "length": 8000, "time_ms_median": 160.0, "peak_mem_mb": 40.0},
            {"case": PROJECTIONS, "length": 8000, "time_ms_median": 100.0, "peak_mem_mb": 50.0}]
    add_ratios(rows)
    assert math.isnan(rows[0]["time_vs_proj"]) and rows[1]["time_vs_proj"] == pytest.approx(1.6)
    report = {"train": rows}
    # the projections measured at one length only: the raw exponent is judged
    growth = LengthGrowthTarget("x", 1.15).check(report)
    assert growth["value"] == pytest.approx(math.log(16) / math.log(8)) and not growth["pass"]
    # with the projections at both lengths, their own growth (L^1.1 here) is taken out: 1 + 4/3 - 1.1
    rows.append({"case": PROJECTIONS, "length": 1000, "time_ms_median": 100.0 / 8 ** 1.1, "peak_mem_mb": 6.0})
    growth = LengthGrowthTarget("x", 1.15).check(report)
    assert growth["value"] == pytest.approx(1 + math.log(16) / math.log(8) - 1.1) and not growth["pass"]
    assert "x = 1.33" in growth["target"] and "as L^1.10" in growth["target"]
    rows[-1]["time_ms_median"] = 100.0 / 8 ** 1.25  # the projections grew as L^1.25: x's own growth is 1.08
    assert LengthGrowthTarget("x", 1.15).check(report)["pass"]
    assert not LengthGrowthTarget("x", 1.15, reference=None).check(report)["pass"]
    mem = TimeRatioTarget("x", PROJECTIONS, 1.5, length=8000, metric="peak_mem_mb").check(report)
    assert mem["value"] == pytest.approx(0.8) and mem["pass"] and "peak memory" in mem["target"]


def test_summary_table_marks_missed_targets(report):
    from benchmarks.attention import summary

    text = summary([report], length=64)
    lines = text.splitlines()
    span_row = next(line for line in lines if line.startswith(f"| {SPAN.label} |"))
    assert "causal: time / proj" in lines[0] and MHA in text and PROJECTIONS not in text.split("\n\n")[0]
    time_target, decode_target = report["targets"]
    assert span_row.split(" | ")[1].endswith("*") == (not time_target["pass"])
    assert span_row.rstrip(" |").split(" | ")[-1].count("/") == 1  # batch 1 and batch 3 decode ratios
    span = next(row for row in report["train"] if row["case"] == SPAN.label)
    assert lines[0].split(" | ")[2] == "work / proj" and span_row.split(" | ")[2] == f"{span['work_vs_proj']:.2f}"


def test_decoding_cases_are_timed_in_interleaved_rounds(monkeypatch):
    import benchmarks.common as common

    calls = []
    real = common._decode_call

    def recording(module, tokens, state):
        calls.append(id(state))
        return real(module, tokens, state)

    monkeypatch.setattr(common, "_decode_call", recording)
    rows = common.measure_decoding({"kind": "attention", "name": "softmax"}, dim=16, heads=2, positions=[4, 8],
                                   batches=[1, 2], steps=4, warmup=1)
    assert [(r["position"], r["batch"]) for r in rows] == [(4, 1), (4, 2), (8, 1), (8, 2)]
    timed = calls[-16:]  # 4 cases x 4 steps, after the fills and the warm-up
    cases = timed[:4]
    assert len(set(cases)) == 4 and timed == cases * 4  # every round visits every case once, in the same order


def test_keep_qkv_floor_is_a_correct_autograd_step():
    import torch
    from benchmarks.common import _KeepQKV, build_module
    q, k, v = (torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(_KeepQKV.apply, (q, k, v))
    with pytest.raises(ValueError, match="self attention"):
        build_module({"kind": "keep_qkv"}, 8, 2, cross=True, causal=False)
