"""Every efficient-attention architecture through fairseq's command-line tools: fairseq-train, fairseq-generate
(beam search) and fairseq-interactive for ``transformer_<name>_tiny``; fairseq-train and fairseq-eval-lm for
``transformer_lm_<name>_tiny``. One encoder-decoder architecture runs in the default suite; all of them run with
``pytest -m slow``."""
import re

import pytest

import fairseq_helpers as H
from fluence_fairseq.models import ARCHITECTURES

USER_DIR = ["--user-dir", "fluence_fairseq"]
GENERATION = ["--cpu", "--beam", "3", "--max-len-b", "20", "--batch-size", "8"]
HANDWRITTEN = {"fluence_transformer", "fluence_transformer_lm"}
ENC_DEC = sorted(a.name for a in ARCHITECTURES if a.name.endswith("_tiny") and a.model == "fluence_transformer"
                 and "adaptive_span" not in a.name)
LM = sorted(a.name for a in ARCHITECTURES if a.name.endswith("_tiny") and a.model == "fluence_transformer_lm"
            and "adaptive_span" not in a.name)
#: the default-suite representative: efficient attention in all three roles of the model
DEFAULT = "transformer_performer_tiny"


def _marks(arch):
    return [] if arch == DEFAULT else [pytest.mark.slow]


def _attention_classes(arch):
    row = next(a for a in ARCHITECTURES if a.name == arch)
    from fluence_fairseq.modules import ATTENTIONS

    return {ATTENTIONS[name].cls.__name__ for name in row.attention.values()}


@pytest.mark.parametrize("arch", [pytest.param(a, marks=_marks(a)) for a in ENC_DEC])
def test_translation_train_generate_interactive(arch, translation_bin, tmp_path):
    save = tmp_path / "ckpt"
    log = H.run_fairseq("train", [translation_bin, *USER_DIR, "--arch", arch, "--criterion",
                                  "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
                                  *H.tiny_train_flags(save, 6)])
    assert "done training" in log
    for cls in _attention_classes(arch):
        assert cls in log, f"{cls} missing from the model printed by fairseq-train"
    out = H.run_fairseq("generate", [translation_bin, "--path", save / "checkpoint_last.pt", *USER_DIR,
                                     *GENERATION])
    assert re.search(r"BLEU4? = [0-9.]+", out), out[-2000:]
    hyps = [ln for ln in out.splitlines() if ln.startswith("H-")]
    assert len(hyps) == 16, out[-2000:]  # every test sentence got a hypothesis
    out = H.run_fairseq("interactive", [translation_bin, "--path", save / "checkpoint_last.pt", *USER_DIR,
                                        *GENERATION, "--source-lang", "in", "--target-lang", "out",
                                        "--buffer-size", "8"], input="a b c d e\nj i h g\n")
    assert "H-0\t" in out and "H-1\t" in out, out[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("arch", LM)
def test_language_model_train_and_eval_lm(arch, lm_bin, tmp_path):
    save = tmp_path / "lm"
    log = H.run_fairseq("train", [lm_bin, *USER_DIR, "--task", "language_modeling", "--arch", arch,
                                  "--tokens-per-sample", "48", "--sample-break-mode", "eos",
                                  *H.tiny_train_flags(save, 4)])
    assert "done training" in log
    out = H.run_fairseq("eval_lm", [lm_bin, "--path", save / "checkpoint_last.pt", *USER_DIR, "--cpu",
                                    "--gen-subset", "valid", "--tokens-per-sample", "24", "--context-window", "8",
                                    "--max-tokens", "256", "--num-workers", "0"])
    assert re.search(r"Perplexity: [0-9.]+", out), out[-2000:]
