"""Smoke test of the model-throughput benchmark on tiny archs: report structure and arithmetic, no timing
thresholds (timings are for the benchmark command, not the test suite)."""
import math

import pytest

from benchmarks.models import BenchModelsConfig, Setting, _worker, attention_of, main, markdown, run_benchmark

TINY = Setting("mt", "transformer_local_tiny", ["transformer_alpha_entmax_tiny"], batch=4, src_len=10, tgt_len=8,
               doc="tiny translation")


@pytest.fixture(scope="module")
def report():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        cfg = BenchModelsConfig([TINY], vocab=64, warmup=1, repeats=2, targets={"alpha_entmax": 0.8, "local": 0.9})
        return run_benchmark(cfg, log=lambda msg: None)


def test_every_model_is_measured_with_ratios_to_the_baseline(report):
    base, alpha = report["rows"]
    assert (base["attention"], base["baseline"], alpha["attention"], alpha["baseline"]) == (
        "local", True, "alpha_entmax", False)
    for r in (base, alpha):
        assert r["tokens_per_s"] > 0 and r["params"] > 0 and math.isfinite(r["peak_mem_mb"])
        assert r["tokens_per_s"] == pytest.approx(4 * 8 / r["step_s_median"])
        assert r["throughput_vs_baseline"] == pytest.approx(r["tokens_per_s"] / base["tokens_per_s"])
    assert base["target"] is None  # the baseline is not held to a target, even if its attention has one
    assert alpha["target"] == 0.8 and alpha["met"] == (alpha["throughput_vs_baseline"] >= 0.8)
    text = markdown(report)
    assert "`transformer_alpha_entmax_tiny`" in text and "tiny translation" in text and ">= 0.80" in text


def test_language_model_step_and_arch_names():
    result = _worker({"arch": "transformer_lm_sparsemax_tiny", "extra": [], "vocab": 40, "batch": 2, "src_len": 0,
                      "tgt_len": 12, "warmup": 1, "repeats": 1, "threads": 1})
    assert result["tokens_per_s"] > 0 and result["params"] > 0
    assert [attention_of(a) for a in ("fluence_transformer_small", "transformer_entmax15", "transformer_lm_s4d_tiny",
                                      "transformer_alpha_entmax_small")] == ["softmax", "entmax15", "s4d", "alpha_entmax"]


def test_unknown_setting_is_refused():
    with pytest.raises(SystemExit, match="unknown settings"):
        main(["--settings", "nope"])


def test_every_preset_has_its_targets_and_the_long_one_none():
    from benchmarks.models import PRESET_TARGETS, PRESETS, SPARSE_TARGETS

    assert set(PRESET_TARGETS) == set(PRESETS)
    assert PRESET_TARGETS["sparse"] == SPARSE_TARGETS and PRESET_TARGETS["sparse_long"] == {}
    (long_setting,) = PRESETS["sparse_long"]
    # its blocks are long enough for the entmax passes that keep no L x L tensor (8 heads of the base LM)
    from fluence_fairseq.modules.entmax import EntmaxAttentionBase
    assert long_setting.batch * 8 * long_setting.tgt_len ** 2 >= EntmaxAttentionBase.RECOMPUTE_FROM_ELEMENTS


def test_model_args_reach_every_model_and_flags_no_arch_takes_are_refused(monkeypatch):
    from benchmarks import models

    with pytest.raises(SystemExit, match=r"--model-args: fluence_transformer_lm does not take \['--nope', '1'\]"):
        main(["--settings", "lm_base", "--model-args", "--nope 1"])
    seen = []

    def stop(cfg):
        seen.append(cfg)
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "run_benchmark", stop)
    with pytest.raises(KeyboardInterrupt):
        main(["--model-args", "--attention-dropout 0.1"])
    assert seen and all(s.extra[-2:] == ("--attention-dropout", "0.1") for s in seen[0].settings)
    model, _ = models._build("transformer_lm_entmax15_tiny", ["--attention-dropout", "0.25"], 40)
    assert {layer.self_attn.dropout_module.p for layer in model.decoder.layers} == {0.25}
    report = {"machine": {"cpu": "x", "threads": 1, "threads_from": "torch", "torch": "t", "load_avg_1min": 0.0,
                          "allocator": "default"},
              "config": {"settings": [{"name": "lm", "doc": "a model", "extra": ["--attention-dropout", "0.1"]}]},
              "rows": [], "wall_s": 1.0}
    assert "**lm**: a model. Model flags: `--attention-dropout 0.1`." in markdown(report)
