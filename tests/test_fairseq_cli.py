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


@pytest.fixture(scope="module")
def trained_lm(lm_bin, tmp_path_factory):
    """A tiny adaptive-span language model trained for 6 updates: (data-bin, save dir, training log)."""
    save = tmp_path_factory.mktemp("lm_ckpt")
    log = H.run_fairseq("train", [
        lm_bin, *USER_DIR, "--task", "language_modeling", "--arch", "transformer_lm_adaptive_span_tiny",
        "--criterion", "adaptive_span_cross_entropy", "--tokens-per-sample", "48",
        "--sample-break-mode", "eos",  # TokenBlockDataset's eos mode needs the numpy-2 compat shim
        *H.tiny_train_flags(save, 6),
    ])
    return lm_bin, save, log


def test_language_model_trains_and_eval_lm_works(trained_lm):
    lm_bin, save, log = trained_lm
    assert "FluenceTransformerLanguageModel" in log and "span_max" in log and "done training" in log
    out = H.run_fairseq("eval_lm", [
        lm_bin, "--path", save / "checkpoint_best.pt", *USER_DIR, "--cpu", "--gen-subset", "valid",
        "--tokens-per-sample", "24", "--context-window", "8", "--max-tokens", "256", "--num-workers", "0",
    ])
    assert re.search(r"Loss \(base 2\): [0-9.]+, Perplexity: [0-9.]+", out), out[-2000:]


def test_eval_lm_refuses_blocks_longer_than_the_model_instead_of_scoring_nothing(trained_lm):
    """fairseq skips blocks longer than the model's positions without scoring them ("Evaluated 0 tokens ...
    Perplexity: 1.00", exit 0); the model was trained with --tokens-per-sample 48."""
    lm_bin, save, _ = trained_lm
    with pytest.raises(AssertionError, match=r"blocks are longer than the model's 48 positions.*"
                                             r"--tokens-per-sample 48 or less"):
        H.run_fairseq("eval_lm", [lm_bin, "--path", save / "checkpoint_best.pt", *USER_DIR, "--cpu",
                                  "--gen-subset", "valid", "--num-workers", "0"])


def test_generate_translates_every_sentence_whatever_the_batch_size(trained):
    """fairseq main drops a last batch whose size is not a multiple of --required-batch-size-multiple (8):
    16 sentences in batches of 3 gave 15 hypotheses, and the README's plain --beam 5 gave 16 of 20."""
    data, save, _ = trained
    for batch in (["--batch-size", "3"], ["--max-tokens", "50"]):
        out = H.run_fairseq("generate", [data, "--path", save / "checkpoint_best.pt", *USER_DIR, "--cpu",
                                         "--beam", "2", "--max-len-b", "5", *batch])
        ids = sorted(int(ln.split("\t")[0][2:]) for ln in out.splitlines() if ln.startswith("H-"))
        assert ids == list(range(16)), (batch, ids)


LM_HUB_SCRIPT = """
import sys
order, save, data = sys.argv[1:]
if order == "import":
    import fluence_fairseq  # noqa: F401
from fairseq.models.transformer_lm import TransformerLanguageModel
kwargs = {"user_dir": "fluence_fairseq"} if order == "user_dir" else {}
lm = TransformerLanguageModel.from_pretrained(save, checkpoint_file="checkpoint_best.pt", data_name_or_path=data,
                                              **kwargs)
lm.eval()
print("SAMPLE", lm.sample("a b c", beam=1, sampling=True, sampling_topk=5, max_len_b=8, seed=1))
scored = lm.score("a b c d e")
print("SCORE", len(scored["positional_scores"]), float(scored["positional_scores"].sum()))
"""


@pytest.mark.parametrize("order", ["import", pytest.param("user_dir", marks=pytest.mark.slow)])
def test_hub_language_model_samples_and_scores(trained_lm, tmp_path, order):
    env = {k: v for k, v in H.clean_env().items() if k != "PYTHONPATH"}
    data, save, _ = trained_lm
    proc = subprocess.run([sys.executable, "-c", LM_HUB_SCRIPT, order, str(save), str(data)], cwd=tmp_path,
                          env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:]
    sample = re.search(r"^SAMPLE (.*)$", proc.stdout, re.M).group(1).split()
    assert sample[:3] == ["a", "b", "c"] and len(sample) > 3, sample  # continues the prompt
    n, total = re.search(r"^SCORE (\d+) (\S+)$", proc.stdout, re.M).groups()
    # b c d e and </s>, each a log-probability (the first character has no context to be predicted from)
    assert int(n) == 5 and float(total) < 0


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


HUB_SCRIPT = """
import sys
order, save, data = sys.argv[1:]
if order in ("import", "both"):
    import fluence_fairseq  # noqa: F401
from fairseq.models.transformer import TransformerModel
kwargs = {"user_dir": "fluence_fairseq"} if order in ("user_dir", "both") else {}
hub = TransformerModel.from_pretrained(save, checkpoint_file="checkpoint_best.pt", data_name_or_path=data, **kwargs)
print("TRANSLATION", hub.translate("a b c d e", beam=3, max_len_b=20))
if order == "both":
    from fairseq import options
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [data, "--user-dir", "fluence_fairseq", "--arch",
                                                "transformer_adaptive_span_tiny"])
    print("PARSED", args.arch, args.attn_span)
"""


@pytest.mark.parametrize("order", [pytest.param("import", marks=pytest.mark.slow),
                                   pytest.param("user_dir", marks=pytest.mark.slow), "both"])
def test_hub_loads_after_import_with_user_dir_or_both_from_any_directory(trained, tmp_path, order):
    """fairseq spells the installed plugin ``site-packages/fairseq/../fluence_fairseq``; an imported plugin must
    still count as that user dir (fairseq otherwise calls the name "not globally unique")."""
    env = {k: v for k, v in H.clean_env().items() if k != "PYTHONPATH"}
    data, save, _ = trained
    proc = subprocess.run([sys.executable, "-c", HUB_SCRIPT, order, str(save), str(data)], cwd=tmp_path, env=env,
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:]
    translation = re.search(r"^TRANSLATION (.*)$", proc.stdout, re.M).group(1)
    assert translation and set(translation.split()) <= set(H.LETTERS) | {"<unk>"}
    if order == "both":
        assert re.search(r"^PARSED transformer_adaptive_span_tiny \d+$", proc.stdout, re.M), proc.stdout[-2000:]


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device (make gpu-check runs it)")
@pytest.mark.parametrize("precision", [[], ["--amp"]], ids=["fp32", "amp"])
def test_train_and_generate_on_cuda(translation_bin, tmp_path, precision):
    env = H.clean_env(CUDA_VISIBLE_DEVICES="0")
    save = tmp_path / "ck"
    flags = [f for f in H.tiny_train_flags(save, 4) if f != "--cpu"]
    log = H.run_fairseq("train", [translation_bin, *USER_DIR, *TRANSLATION_ARCH, *flags, *precision], env=env)
    assert "done training" in log and "cuda" in log.lower()
    out = H.run_fairseq("generate", [translation_bin, "--path", save / "checkpoint_last.pt", *USER_DIR, "--beam",
                                     "3", "--max-len-b", "20", "--batch-size", "5"], env=env)
    ids = sorted(int(ln.split("\t")[0][2:]) for ln in out.splitlines() if ln.startswith("H-"))
    assert ids == list(range(16)), out[-2000:]
