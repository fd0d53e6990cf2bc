"""examples/language_model/entmax_sparsity.py: the training command, and density and timing measured on a tiny
trained checkpoint (two updates on generated text)."""
import json

import pytest

from tests import fairseq_helpers as H


@pytest.fixture(scope="module")
def script():
    return H.load_script("examples/language_model/entmax_sparsity.py", "entmax_sparsity")


def test_training_command_has_no_positions_and_alibi(script, tmp_path):
    args = script.parse_args(["--max-update", "7", "--segment", "256", "--dim", "64"])
    cmd = [str(c) for c in script.train_command(args, tmp_path / "bin", "alpha_entmax", tmp_path / "save")]
    assert cmd[cmd.index("--decoder-self-attention") + 1] == "alpha_entmax"
    assert "--no-token-positional-embeddings" in cmd and cmd[cmd.index("--attn-position-bias") + 1] == "alibi"
    assert cmd[cmd.index("--tokens-per-sample") + 1] == "256" and cmd[cmd.index("--max-update") + 1] == "7"
    assert cmd[cmd.index("--decoder-ffn-embed-dim") + 1] == "256" and cmd[cmd.index("--dropout") + 1] == "0.0"


def test_nonsense_settings_are_refused(script):
    for argv in (["--max-update", "0"], ["--lengths", "512", "0"], ["--batch", "-1"]):
        with pytest.raises(SystemExit):
            script.parse_args(argv)


def test_density_and_steps_of_a_trained_checkpoint(script, tmp_path):
    raw = H.create_lm_data(tmp_path)
    binary = H.preprocess_lm(raw, tmp_path / "bin")
    save = tmp_path / "save"
    H.run_fairseq("train", [binary, "--user-dir", "fluence_fairseq", "--task", "language_modeling",
                            "--arch", "fluence_transformer_lm", "--decoder-self-attention", "entmax15",
                            "--decoder-layers", "2", "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32",
                            "--decoder-attention-heads", "4", "--no-token-positional-embeddings",
                            "--attn-position-bias", "alibi", "--tokens-per-sample", "32",
                            "--sample-break-mode", "none", "--criterion", "cross_entropy",
                            *H.tiny_train_flags(save, max_update=2)])
    args = script.parse_args(["--lengths", "24", "40", "--batch", "2", "--repeats", "1", "--max-update", "2",
                              "--layers", "2", "--dim", "16"])
    measured = script.measure(args, binary, save / "checkpoint_last.pt")
    assert set(measured["lengths"]) == {24, 40} and measured["alpha"] is None
    for length, m in measured["lengths"].items():
        assert len(m["density"]) == 2 and all(len(layer) == 4 for layer in m["density"])
        # causal: the first query sees one key (density 1 there), a one-hot row 1/keys
        assert all(1 / length <= d <= 1 for layer in m["density"] for d in layer)
        assert m["heads"] == 8 and 0 <= m["heads_within_share"] <= 8
        assert m["support_s"] > 0 and m["dense_s"] > 0 and m["ratio"] > 0
    results = {"entmax15": {"valid_bpc": 7.5, "train_s": 1.0, **measured}}
    text = script.report(args, results)
    assert "| entmax15 | 7.5 | 24 |" in text and "| entmax15 | 7.5 | 40 |" in text and "of 8 |" in text
    json.dumps(results, default=str)  # what main writes beside the report
