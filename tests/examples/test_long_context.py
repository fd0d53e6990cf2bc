"""examples/language_model/long_context.py: training commands and the table kept over sittings (no training here)."""
import json

import pytest

from tests import fairseq_helpers as H


@pytest.fixture(scope="module")
def lc():
    return H.load_script("examples/language_model/long_context.py", "long_context")


def _args(lc, argv=()):
    return lc.parse_args(list(argv))


def test_linear_decay_reaches_zero_at_the_last_update(lc):
    args = _args(lc, ["--lr-scheduler", "polynomial_decay", "--max-update", "6000"])
    cmd = [str(c) for c in lc.train_command(args, "bin", "save", "softmax", False, [])]
    assert cmd[cmd.index("--lr-scheduler") + 1] == "polynomial_decay"
    assert cmd[cmd.index("--end-learning-rate") + 1] == "0"
    assert cmd[cmd.index("--total-num-update") + 1] == "6000"
    default = [str(c) for c in lc.train_command(_args(lc), "bin", "save", "softmax", False, [])]
    assert default[default.index("--total-num-update") + 1] == "8000"  # the default budget
    inverse = [str(c) for c in lc.train_command(_args(lc, ["--lr-scheduler", "inverse_sqrt"]), "bin", "save",
                                                "softmax", False, [])]
    assert inverse[inverse.index("--lr-scheduler") + 1] == "inverse_sqrt" and "--total-num-update" not in inverse


def _row(lc, args, bpc):
    return {"attention": "softmax", "memory": False, "test_bpc": bpc, "train_seconds": 1.0, "peak_rss_mb": 1.0,
            "wps": 1.0, "span_avg": None, "span_max": None, "settings": lc.settings(args)}


def test_rows_of_an_earlier_sitting_are_kept_and_rows_of_other_settings_left_out_of_the_table(lc, tmp_path):
    args = _args(lc, ["--max-update", "6000", "--rows", "abc", "--out", str(tmp_path / "t.md")])
    other = _args(lc, ["--max-update", "3000"])
    saved = {"softmax": _row(lc, args, 2.05), "local": _row(lc, other, 9.99), "abc": _row(lc, args, 7.77)}
    (tmp_path / "results.json").write_text(json.dumps(saved))
    kept = lc.earlier_rows(args, tmp_path)
    assert set(kept) == {"softmax", "local"}  # abc is trained again in this sitting
    kept["abc"] = _row(lc, args, 2.5)
    text = lc.write_results(args, kept, tmp_path)
    assert "| softmax | no | 2.050 |" in text and "| abc | no | 2.500 |" in text
    assert "9.99" not in text and "6000 updates" in text and "linear decay to 0" in text
    assert set(json.loads((tmp_path / "results.json").read_text())) == {"softmax", "local", "abc"}


def test_resume_keeps_finished_rows_of_the_same_settings(lc, tmp_path):
    args = _args(lc, ["--max-update", "6000", "--rows", "softmax", "abc", "--resume"])
    other = _args(lc, ["--max-update", "3000"])
    saved = {"softmax": _row(lc, args, 2.05), "abc": _row(lc, other, 7.77)}
    (tmp_path / "results.json").write_text(json.dumps(saved))
    kept = lc.earlier_rows(args, tmp_path)
    assert set(kept) == {"softmax"}  # finished with these settings; abc (other settings) is trained again
    assert set(lc.earlier_rows(_args(lc, ["--max-update", "6000", "--rows", "softmax"]), tmp_path)) == {"abc"}


def test_targets_are_checked_on_the_rows_present(lc, tmp_path):
    args = _args(lc, ["--out", str(tmp_path / "t.md")])

    def row(attention, memory, bpc, wps, span=None):
        r = _row(lc, args, bpc)
        r.update(attention=attention, memory=memory, wps=wps, span_avg=span, span_max=span)
        return r

    results = {"softmax": row("softmax", False, 2.072, 10000.0), "softmax_mem": row("softmax", True, 2.05, 4000.0),
               "adaptive_span_mem": row("adaptive_span", True, 2.08, 8000.0, span=1500.0),
               "abc": row("abc", False, 2.3, 9000.0), "abc_mem": row("abc", True, 2.2, 7500.0),
               "s4d": row("s4d", False, 2.3, 9000.0), "s4d_mem": row("s4d", True, 2.31, 8500.0),
               "local": row("local", False, 2.3, 9000.0), "local_mem": row("local", True, 2.2, 4000.0)}
    results["abc_mem"]["test_bpc_memory_dropped"] = 2.4
    text = lc.write_results(args, results, tmp_path)
    assert "| abc_mem | yes | 2.200 | 2.400 |" in text and "| abc | no | 2.300 | - |" in text
    assert "2.1 test bpc: 2.072, met" in text
    assert "2.080 vs 2.050 (+0.030), **missed**" in text  # 0.03 above softmax with memory
    assert "softmax with memory's: 0.50x, met" in text
    assert "(1024): 1500, **missed**" in text  # mean span above a quarter of --attn-span 4096
    assert "abc: memory beats no memory on test bpc: 2.200 vs 2.300 (-0.100), met" in text
    assert "s4d: memory beats no memory on test bpc: 2.310 vs 2.300 (+0.010), **missed**" in text
    assert "abc (constant state): training step with carried state at most 1.1x without: 1.20x" in text
    assert "s4d (constant state): training step with carried state at most 1.1x without: 1.06x" in text
    assert "local (constant state)" not in text  # local attention keeps a window, not a constant state
    assert "local: memory beats no memory" in text
    assert "not measured yet (rows not in the table): adaptive_span, performer, performer_mem, longshort" in text


def test_by_position_scores_the_kept_checkpoints_of_the_rows_asked_for(lc, tmp_path):
    out_dir = tmp_path / "long_context"
    out_dir.mkdir()
    args = _args(lc, ["--work", str(tmp_path), "--by-position", "--rows", "local", "local_mem", "abc",
                      "--eval-batch-size", "4"])
    (out_dir / "results.json").write_text(json.dumps({"local": _row(lc, args, 2.0), "abc": _row(lc, args, 2.1),
                                                      "local_mem": _row(lc, args, 1.9)}))
    for row in ("local", "local_mem"):  # abc's checkpoint was not kept
        (out_dir / row).mkdir()
        (out_dir / row / "checkpoint_last.pt").write_bytes(b"")
    cmd = lc.by_position_command(args, tmp_path / "bin", out_dir, ["local", "local_mem"])
    assert cmd[1:4] == ["-m", "fluence_fairseq.cli.stream_bpc", str(tmp_path / "bin")]
    assert cmd[cmd.index("--batch-size") + 1] == "4" and cmd[cmd.index("--subset") + 1] == "test"
    assert [cmd[i + 1] for i, c in enumerate(cmd) if c == "--label"] == ["local", "local_mem"]
    assert cmd[cmd.index("--out") + 1] == str(out_dir / "by_position.md")
    empty = _args(lc, ["--work", str(tmp_path), "--by-position", "--rows", "abc"])
    with pytest.raises(SystemExit, match="no row of .* has its checkpoint kept"):
        lc.by_position(empty)
