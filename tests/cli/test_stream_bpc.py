"""fluence-stream-bpc: bits per token of a stream LM by position in the segment, with and without its memory."""
import json
import re

import pytest

import fairseq_helpers as H
from fluence_fairseq.cli import stream_bpc

WINDOW, LAYERS, SEGMENT = 4, 2, 16  # the tiny stream LM: local attention, window 4, 2 layers, segments of 16


def test_memory_changes_only_the_positions_its_window_reaches_and_the_mean_is_eval_lms(lm_bin, stream_checkpoint,
                                                                                      tmp_path):
    out = tmp_path / "table.md"
    assert stream_bpc.main([str(lm_bin), "--path", str(stream_checkpoint[0]), "--label", "local", "--subset", "valid",
                            "--batch-size", "1", "--edges", "0,4,8", "--cpu", "--out", str(out),
                            "--json", str(tmp_path / "bpc.json"), "--plot", str(tmp_path / "bpc.png")]) == 0
    result = json.loads((tmp_path / "bpc.json").read_text())["results"]["local"]
    with_memory, dropped = result["memory"]["per_position"], result["memory dropped"]["per_position"]
    assert len(with_memory) == SEGMENT
    # a target at position p sees p + 1 tokens of its segment; through 2 layers of a 4-token window the model reads
    # back 2 * 3 positions, so memory changes positions < 6 and nothing after
    reach = LAYERS * (WINDOW - 1)
    assert with_memory[0] != pytest.approx(dropped[0], abs=1e-3)
    assert with_memory[reach - 1] != pytest.approx(dropped[reach - 1], abs=1e-6)
    # beyond the reach only float32 rounding may differ: the first position there reads its window over a key set
    # whose masked part differs, which on an AMD EPYC's BLAS moved its bpc by 2.6e-8 (bitwise equal on an Intel
    # Xeon); the positions the memory does reach moved by 4.5e-4 or more
    assert with_memory[reach:] == pytest.approx(dropped[reach:], abs=1e-6)
    # with one row every target of the stream is scored once, as fairseq-eval-lm --batch-size 1 scores them
    log = H.run_fairseq("eval_lm", [lm_bin, "--user-dir", "fluence_fairseq", "--task", "fluence_lm_stream",
                                    "--path", stream_checkpoint[0], "--batch-size", "1", "--cpu",
                                    "--tokens-per-sample", str(SEGMENT), "--gen-subset", "valid"])
    eval_lm = float(re.search(r"Loss \(base 2\): ([0-9.]+)", log).group(1))
    assert result["memory"]["buckets"][-1] == pytest.approx(eval_lm, abs=1e-4)
    table = out.read_text()
    assert "| checkpoint | mode | 0–3 | 4–7 | 8–15 | all |" in table and "| local | memory dropped |" in table
    assert (tmp_path / "bpc.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, match", [
    (["--edges", "4,8"], "--edges must start at 0"),
    (["--edges", "0,8,8"], "--edges must start at 0 and increase"),
    (["--edges", "0,a"], "comma-separated integers"),
    (["--label", "a", "--label", "b"], "one --label per --path"),
    (["--batch-size", "0"], "--batch-size must be a positive"),
])
def test_bad_arguments_are_refused_naming_the_flag(argv, match, capsys):
    with pytest.raises(SystemExit):
        stream_bpc.main(["data", "--path", "ckpt.pt", *argv])
    assert re.search(match, capsys.readouterr().err)


def test_a_checkpoint_of_another_task_is_refused_naming_the_task(lm_bin, tmp_path, capsys):
    save = tmp_path / "plain"
    H.run_fairseq("train", [lm_bin, "--user-dir", "fluence_fairseq", "--task", "language_modeling", "--arch",
                            H.STREAM_ARCH, "--tokens-per-sample", "16", *H.tiny_train_flags(save, 1)])
    with pytest.raises(SystemExit):
        stream_bpc.main([str(lm_bin), "--path", str(save / "checkpoint_last.pt"), "--cpu"])
    assert "trained with --task language_modeling, not fluence_lm_stream" in capsys.readouterr().err
