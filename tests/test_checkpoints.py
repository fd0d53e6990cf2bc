"""Every command that reads a checkpoint says which file is wrong, how, and what to do: truncated, empty, random
bytes, the wrong kind of file, and objects outside the weights-only allow-list."""
import collections
import re
import os

import numpy as np
import pytest
import torch

import fairseq_helpers as H
from fluence_fairseq import checkpoints
from fluence_fairseq.cli import attn_score, plot, prune_layers, prune_weights


class NotAllowed:  # pickled by reference: weights-only loading refuses it
    pass


def _valid(path):
    torch.save({"model": collections.OrderedDict(w=torch.randn(64, 64)), "args": None, "cfg": None}, path)
    return path


def make(kind, tmp_path):
    path = tmp_path / f"{kind}.pt"
    if kind == "truncated":
        data = _valid(tmp_path / "whole.pt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "npy":  # the wrong kind of file: a pattern array
        with open(path, "wb") as f:
            np.save(f, np.zeros((2, 2)))
    elif kind == "untrusted":
        torch.save({"model": {}, "x": NotAllowed()}, path)
    return path


#: kind -> what the message must say
EXPECTED = {
    "truncated": r"is truncated or corrupt \(\d+ bytes",
    "empty": r"is empty \(0 bytes\)",
    "random": r"is not a PyTorch checkpoint",
    "npy": r"is not a PyTorch checkpoint",
    "untrusted": r"outside the weights-only allow-list",
}
KINDS = list(EXPECTED)


def _commands(path, tmp_path, data):
    out = str(tmp_path / "out.pt")
    return {
        "fluence-plot": lambda: plot.main(["spans", str(path), "-o", str(tmp_path / "s.png")]),
        "fluence-prune-layers": lambda: prune_layers.main([str(path), out, "--decoder-layers-to-keep", "0"]),
        "fluence-prune-weights": lambda: prune_weights.main([str(path), out, "--amount", "0.5"]),
        "fluence-attn-score": lambda: attn_score.main([str(data), "--path", str(path), "--cpu", "--out", str(tmp_path / "patterns")]),
    }


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", ["fluence-plot", "fluence-prune-layers", "fluence-prune-weights",
                                     "fluence-attn-score"])
def test_plugin_commands_name_the_file_and_the_problem(kind, command, tmp_path, translation_bin, capsys):
    path = make(kind, tmp_path)
    with pytest.raises(SystemExit) as stopped:
        _commands(path, tmp_path, translation_bin)[command]()
    message = str(stopped.value.code) if not isinstance(stopped.value.code, int) else capsys.readouterr().err
    assert str(path) in message and re.search(EXPECTED[kind], message), message
    if kind in ("truncated", "empty"):
        assert "use another checkpoint" in message
    if kind == "untrusted" and command == "fluence-plot":
        assert "pass --trust-checkpoint" in message
    if kind != "untrusted":
        assert "weights_only=False" not in message  # never advise unsafe loading for a broken file


def test_trusting_a_broken_file_does_not_ask_for_trust_again(tmp_path):
    path = make("random", tmp_path)
    with pytest.raises(SystemExit) as stopped:
        plot.main(["spans", str(path), "--trust-checkpoint", "-o", str(tmp_path / "s.png")])
    message = str(stopped.value.code)
    assert "is not a PyTorch checkpoint" in message and "--trust-checkpoint" not in message


@pytest.mark.parametrize("kind", KINDS)
def test_fairseq_loading_names_the_file(kind, tmp_path):
    """fairseq-generate, resuming fairseq-train and from_pretrained all read through load_checkpoint_to_cpu."""
    from fairseq import checkpoint_utils

    path = make(kind, tmp_path)
    with pytest.raises(checkpoints.CheckpointError, match=EXPECTED[kind]) as failed:
        checkpoint_utils.load_checkpoint_to_cpu(str(path))
    assert str(path) in str(failed.value)


def test_errors_about_a_sound_file_pass_through_unchanged(tmp_path):
    from fairseq import checkpoint_utils

    with pytest.raises(KeyError, match="best_loss"):  # fairseq's upgrade of a dict that is no fairseq checkpoint
        checkpoint_utils.load_checkpoint_to_cpu(str(_valid(tmp_path / "ok.pt")))
    with pytest.raises(OSError):  # a missing file is fairseq's own error
        checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "missing.pt"))


def test_fairseq_generate_and_resume_on_a_truncated_checkpoint(translation_bin, tmp_path):
    save = tmp_path / "ck"
    H.run_fairseq("train", [translation_bin, "--user-dir", "fluence_fairseq", "--arch",
                            "transformer_adaptive_span_tiny", *H.tiny_train_flags(save, 2)])
    last = save / "checkpoint_last.pt"
    from fairseq import checkpoint_utils

    assert checkpoint_utils.load_checkpoint_to_cpu(str(last))["extra_state"]  # the sound file loads
    last.write_bytes(last.read_bytes()[: os.path.getsize(last) // 3])
    with pytest.raises(AssertionError, match=r"checkpoint_last\.pt is truncated or corrupt") as generate:
        H.run_fairseq("generate", [translation_bin, "--user-dir", "fluence_fairseq", "--path", last, "--cpu",
                                   "--beam", "2", "--max-len-b", "5"])
    assert "use another checkpoint" in str(generate.value)
    with pytest.raises(AssertionError, match=r"checkpoint_last\.pt is truncated or corrupt.*--restore-file"):
        H.run_fairseq("train", [translation_bin, "--user-dir", "fluence_fairseq", "--arch",
                                "transformer_adaptive_span_tiny", *H.tiny_train_flags(save, 4)])


@pytest.mark.parametrize("damage", ["truncated_idx", "empty_idx", "random_idx", "truncated_bin"])
def test_a_damaged_binarised_split_is_named_when_it_opens(damage, lm_bin, tmp_path):
    import shutil

    from fairseq.data import data_utils

    data = tmp_path / "bin"
    shutil.copytree(lm_bin, data)
    idx, binary = data / "valid.idx", data / "valid.bin"
    if damage == "truncated_idx":
        idx.write_bytes(idx.read_bytes()[:20])
    elif damage == "empty_idx":
        idx.write_bytes(b"")
    elif damage == "random_idx":
        idx.write_bytes(np.random.default_rng(1).bytes(200))
    else:
        binary.write_bytes(binary.read_bytes()[:50])
    with pytest.raises(checkpoints.CorruptDataError) as failed:
        data_utils.load_indexed_dataset(str(data / "valid"), None)
    message = str(failed.value)
    assert str(data / "valid") in message and "fairseq-preprocess" in message
    if damage == "truncated_bin":
        assert re.search(r"valid\.bin is truncated: 50 bytes, its index .* needs \d+", message)
    # the intact copy still opens
    assert len(data_utils.load_indexed_dataset(str(lm_bin / "valid"), None)) == 16
