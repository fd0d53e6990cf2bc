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


def _cross_attention(arch):
    from fluence_fairseq.models.attention_args import DECODER_CROSS
    from fluence_fairseq.modules import ATTENTIONS

    row = next(a for a in ARCHITECTURES if a.name == arch)
    return ATTENTIONS[row.attention[DECODER_CROSS.attr]].cls


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
    # --print-alignment reads cross-attention weights: where the cross attention does not return them, a clear
    # refusal instead of fairseq's IndexError inside the generator
    align = [translation_bin, "--path", save / "checkpoint_last.pt", *USER_DIR, *GENERATION, "--print-alignment"]
    if _cross_attention(arch).weights_by_default:
        assert "A-0\t" in H.run_fairseq("generate", align)
    else:
        with pytest.raises(AssertionError, match="--print-alignment reads the cross-attention weights.*encoder_attn"):
            H.run_fairseq("generate", align)


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


def test_cosformer_length_error_names_a_fix_that_works_in_fairseq_generate(translation_bin, tmp_path):
    """Generating past a trained cosFormer's M stops with a message; the override it suggests then works."""
    save = tmp_path / "ckpt"
    H.run_fairseq("train", [translation_bin, *USER_DIR, "--arch", "transformer_cosformer_tiny",
                            "--cosformer-max-len", "24", *H.tiny_train_flags(save, 2)])
    long_generation = [translation_bin, "--path", save / "checkpoint_last.pt", *USER_DIR, "--cpu", "--beam", "2",
                       "--batch-size", "8", "--max-len-a", "0", "--max-len-b", "40", "--min-len", "30"]
    with pytest.raises(AssertionError) as failed:
        H.run_fairseq("generate", long_generation)
    message = str(failed.value)
    assert "beyond cosformer_max_len=24" in message and "at least 25" in message, message[-3000:]
    override = re.search(r'--model-overrides "(\{[^"]+\})"', message).group(1).replace("M", "41")  # 40 + 1
    out = H.run_fairseq("generate", [*long_generation, "--model-overrides", override])
    hyps = [ln for ln in out.splitlines() if ln.startswith("H-")]
    assert len(hyps) == 16 and all(len(h.split("\t")[2].split()) >= 30 for h in hyps), out[-2000:]
