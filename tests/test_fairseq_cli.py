"""fairseq's command-line tools with fluence models, end to end on tiny random data (CPU, a few updates each).

Every tool runs as ``python -m fairseq_cli.<tool>`` with this interpreter and ``--user-dir fluence_fairseq`` from
the repository root (fairseq resolves the name relative to the current directory), except where a test says
otherwise.
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

import fairseq_helpers as H

USER_DIR = ["--user-dir", "fluence_fairseq"]
TRANSLATION_ARCH = ["--arch", "transformer_adaptive_span_tiny", "--criterion",
                    "adaptive_span_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
                    "--adapt-span-init", "0.2"]
GENERATION = ["--cpu", "--beam", "3", "--max-len-b", "20", "--batch-size", "8"]


def span_logs(log: str):
    """(span_avg, span_max, span_loss) of the last training summary line."""
    line = [ln for ln in log.splitlines() if "| train |" in ln][-1]
    return tuple(float(re.search(rf"{k} ([0-9.e+-]+)", line).group(1)) for k in ("span_avg", "span_max", "span_loss"))


@pytest.fixture(scope="module")
def trained(translation_bin, tmp_path_factory):
    """A tiny adaptive-span translation model trained for 8 updates: (data-bin, save dir, training log)."""
    save = tmp_path_factory.mktemp("translation_ckpt")
    log = H.run_fairseq("train", [translation_bin, *USER_DIR, *TRANSLATION_ARCH, *H.tiny_train_flags(save, 8)])
    return translation_bin, save, log


def test_train_logs_span_statistics_and_saves(trained):
    _, save, log = trained
    assert "FluenceTransformerModel" in log and "FSAdaptiveSpan" in log
    for split in ("train_inner", "| train |", "| valid |"):
        line = [ln for ln in log.splitlines() if split in ln][-1]
        assert all(key in line for key in ("span_avg", "span_max", "span_loss")), line
    span_avg, span_max, span_loss = span_logs(log)
    assert 8 <= span_avg <= span_max <= 32  # ramp 8 <= spans (tokens, ramp included) <= attn_span 32
    assert 0 < span_loss < 1e-3
    assert (save / "checkpoint_last.pt").exists() and (save / "checkpoint_best.pt").exists()


def test_generate_with_beam_search_prints_bleu(trained):
    data, save, _ = trained
    out = H.run_fairseq("generate", [data, "--path", save / "checkpoint_best.pt", *USER_DIR, *GENERATION,
                                     "--print-alignment"])
    assert re.search(r"BLEU4? = [0-9.]+", out), out[-2000:]
    assert "H-0\t" in out and "A-0\t" in out


def test_interactive_reads_stdin(trained):
    data, save, _ = trained
    out = H.run_fairseq("interactive", [data, "--path", save / "checkpoint_best.pt", *USER_DIR, *GENERATION,
                                        "--source-lang", "in", "--target-lang", "out", "--buffer-size", "8"],
                        input="a b c d e\nj i h g\n")
    assert "H-0\t" in out and "H-1\t" in out, out[-2000:]


def test_hub_from_pretrained_translates(trained):
    from fluence_fairseq.models import FluenceTransformerModel

    data, save, _ = trained
    hub = FluenceTransformerModel.from_pretrained(str(save), checkpoint_file="checkpoint_best.pt",
                                                 data_name_or_path=str(data))
    out = hub.translate("a b c d e", beam=3, max_len_b=20)
    assert isinstance(out, str) and set(out.split()) <= set(H.LETTERS) | {"<unk>"}


def test_resume_from_checkpoint_last(trained, tmp_path):
    data, save, _ = trained
    resumed = tmp_path / "resume"
    shutil.copytree(save, resumed)
    log = H.run_fairseq("train", [data, *USER_DIR, *TRANSLATION_ARCH, *H.tiny_train_flags(resumed, 12)])
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 8 updates\)", log), log[-3000:]
    assert re.search(r"num_updates 12\b", log) and "done training" in log


def test_user_dir_directory_registers_everything(translation_bin, tmp_path):
    """``--user-dir user_dir`` (relative, from the checkout) and ``--user-dir <absolute path>`` (any directory)."""
    log = H.run_fairseq("train", [translation_bin, "--user-dir", "user_dir", *TRANSLATION_ARCH,
                                  *H.tiny_train_flags(tmp_path / "ck", 2)])
    assert "span_avg" in log and "done training" in log
    out = H.run_fairseq("generate", [translation_bin, "--path", tmp_path / "ck" / "checkpoint_last.pt",
                                     "--user-dir", H.REPO / "user_dir", *GENERATION], cwd=tmp_path)
    assert re.search(r"BLEU4? = [0-9.]+", out)


def test_language_model_trains_and_eval_lm_works(lm_bin, tmp_path):
    save = tmp_path / "lm_ckpt"
    log = H.run_fairseq("train", [
        lm_bin, *USER_DIR, "--task", "language_modeling", "--arch", "transformer_lm_adaptive_span_tiny",
        "--criterion", "adaptive_span_cross_entropy", "--tokens-per-sample", "48",
        "--sample-break-mode", "eos",  # TokenBlockDataset's eos mode needs the numpy-2 compat shim
        *H.tiny_train_flags(save, 6),
    ])
    assert "FluenceTransformerLanguageModel" in log and "span_max" in log and "done training" in log
    out = H.run_fairseq("eval_lm", [
        lm_bin, "--path", save / "checkpoint_best.pt", *USER_DIR, "--cpu", "--gen-subset", "valid",
        "--tokens-per-sample", "24", "--context-window", "8", "--max-tokens", "256", "--num-workers", "0",
    ])
    assert re.search(r"Loss \(base 2\): [0-9.]+, Perplexity: [0-9.]+", out), out[-2000:]


def test_installed_package_works_as_user_dir_from_any_directory(trained, tmp_path):
    """After ``pip install .`` (non-editable), fairseq finds ``--user-dir fluence_fairseq`` next to itself in
    site-packages, from any working directory."""
    env = {k: v for k, v in H.clean_env().items() if k != "PYTHONPATH"}
    probe = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; s = u.find_spec('fluence_fairseq'); "
                               "print(s.origin if s else '')"],
        cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=True,
    )
    origin = probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else ""
    site = os.path.realpath(sysconfig.get_paths()["purelib"])
    if not origin or not os.path.realpath(origin).startswith(site + os.sep):
        pytest.fail(
            "fluence_fairseq is not installed in this interpreter's site-packages "
            f"({site}; found: {origin or 'nothing'}). Install it non-editable first, e.g. `make install` or "
            f"`{sys.executable} -m pip install --no-deps {H.REPO}`, then rerun this test."
        )
    data, save, _ = trained
    out = H.run_fairseq("generate", [data, "--path", save / "checkpoint_best.pt", *USER_DIR, *GENERATION],
                        cwd=tmp_path, env=env)
    assert re.search(r"BLEU4? = [0-9.]+", out)
