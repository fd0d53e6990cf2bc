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
