"""benchmarks.paired on tiny sizes: every case timed in every round, ratios to the projections, bounds judged."""
import math

import pytest

from benchmarks import paired


def test_ratios_to_the_projections_and_the_registry_bounds(capsys):
    result = paired.main(["abc", "performer", "--length", "64", "--dim", "32", "--heads", "2", "--rounds", "3",
                          "--threads", "1", "--allocator", "default"])
    assert list(result) == [paired.PROJECTIONS, "abc", "performer"]
    proj = result[paired.PROJECTIONS]
    assert proj["ratio"] == proj["ratio_min"] == proj["ratio_max"] == 1.0 and proj["bound"] is None
    for name in ("abc", "performer"):
        row = result[name]
        assert row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
        assert math.isfinite(row["ms"]) and row["ms"] > 0
        assert row["bound"] == paired.get_attention(name).bench_time_bound
    out = capsys.readouterr().out
    assert "causal pattern, L=64" in out and "3 rounds" in out
    assert out.count("| abc |") == 1 and ("| met |" in out or "**missed**" in out)


def test_unknown_attention_unsupported_pattern_and_no_rounds_are_refused():
    with pytest.raises(SystemExit, match="unknown attention 'nope'"):
        paired.main(["nope", "--length", "16"])
    with pytest.raises(SystemExit, match="--pattern causal: lara does not support it"):
        paired.main(["lara", "--length", "16"])
    with pytest.raises(SystemExit, match="--rounds must be >= 1"):
        paired.main(["abc", "--rounds", "0"])


def test_variants_take_constructor_keywords_over_the_benchmark_options():
    name, spec = paired.parse_variant("longshort:block_size=32,ls_window_size=8", "causal")
    assert name == "longshort" and spec["options"]["block_size"] == 32 and spec["options"]["ls_window_size"] == 8
    _, spec = paired.parse_variant("cosformer:act_fun=elu", "causal")
    assert spec["options"] == {"cosformer_max_len": 16384, "act_fun": "elu"}  # bench_options kept
    result = paired.main(["longshort", "longshort:block_size=4", "--length", "48", "--dim", "16", "--heads", "2",
                          "--rounds", "1", "--threads", "1", "--allocator", "default"])
    assert result["longshort:block_size=4"]["bound"] == result["longshort"]["bound"] == 1.6
    with pytest.raises(SystemExit, match="longshort:nope=3: .*unexpected keyword argument 'nope'"):
        paired.main(["longshort:nope=3", "--length", "16", "--dim", "16", "--heads", "2"])
    with pytest.raises(SystemExit, match="block_size must be an integer >= 1, got 0"):
        paired.main(["longshort:block_size=0", "--length", "16", "--dim", "16", "--heads", "2"])
    with pytest.raises(SystemExit, match="keywords are written NAME:KEY=VALUE"):
        paired.parse_variant("longshort:block_size", "causal")


def test_class_attributes_and_memory(capsys):
    name, spec = paired.parse_variant("entmax15:RECOMPUTE_BLOCK_ELEMENTS=4096,RECOMPUTE_FROM_ELEMENTS=0", "causal")
    assert spec["attributes"] == {"RECOMPUTE_BLOCK_ELEMENTS": 4096, "RECOMPUTE_FROM_ELEMENTS": 0}
    assert "RECOMPUTE_BLOCK_ELEMENTS" not in spec["options"]
    module = paired.build_module(spec, 16, 2, False, True)
    assert module.RECOMPUTE_BLOCK_ELEMENTS == 4096 and type(module).RECOMPUTE_BLOCK_ELEMENTS != 4096
    with pytest.raises(ValueError, match="has no class attribute 'NOPE'"):
        paired.build_module({**spec, "attributes": {"NOPE": 1}}, 16, 2, False, True)
    result = paired.main(["entmax15:RECOMPUTE_FROM_ELEMENTS=0", "--length", "32", "--dim", "16", "--heads", "2",
                          "--rounds", "1", "--threads", "1", "--allocator", "default", "--memory"])
    row = result["entmax15:RECOMPUTE_FROM_ELEMENTS=0"]
    assert row["peak_mb"] >= 0 and result[paired.PROJECTIONS]["peak_mb"] >= 0
    assert row["bound"] is None  # no time bound against the projections for a dense attention
    assert "memory / projections" in capsys.readouterr().out


def test_need_weights_calls_the_attentions_with_the_default_weights(capsys, monkeypatch):
    import benchmarks.common as common

    seen = []
    real = common.training_step
    monkeypatch.setattr(paired, "training_step", lambda *a, **kw: seen.append(kw.get("need_weights")) or real(*a, **kw))
    paired.main(["entmax15", "--length", "32", "--dim", "16", "--heads", "2", "--rounds", "1", "--threads", "1",
                 "--allocator", "default", "--need-weights"])
    assert seen == [True, True]  # the projections' case and the attention's
    assert "need_weights=True (weights returned, not used)" in capsys.readouterr().out


def test_attention_dropout_is_set_on_every_attention_and_bad_rates_are_refused(capsys, monkeypatch):
    built = []
    real = paired.build_module
    monkeypatch.setattr(paired, "build_module", lambda *a, **kw: built.append(real(*a, **kw)) or built[-1])
    paired.main(["entmax15", "softmax", "--length", "32", "--dim", "16", "--heads", "2", "--rounds", "1",
                 "--threads", "1", "--allocator", "default", "--attention-dropout", "0.25"])
    assert [m.dropout_module.p for m in built[1:]] == [0.25, 0.25] and all(m.training for m in built[1:])
    assert "attention dropout 0.25" in capsys.readouterr().out
    for rate in ("1", "-0.1"):
        with pytest.raises(SystemExit, match=r"--attention-dropout must be in \[0, 1\)"):
            paired.main(["entmax15", "--length", "16", "--attention-dropout", rate])
    result = paired.main(["entmax15", "--length", "16", "--dim", "16", "--heads", "2", "--rounds", "1", "--threads",
                          "1", "--allocator", "default", "--attention-dropout", "0.1", "--memory"])
    assert result["entmax15"]["peak_mb"] >= 0  # the memory worker builds the attention with the dropout too
    spec = {"kind": "attention", "name": "entmax15", "options": {}, "setup": {"attention_dropout": 0.2}}
    assert paired.build_module(spec, 16, 2, False, True).dropout_module.p == 0.2
    with pytest.raises(ValueError, match=r"attention_dropout=1.5 must be in \[0, 1\)"):
        paired.build_module({**spec, "setup": {"attention_dropout": 1.5}}, 16, 2, False, True)
