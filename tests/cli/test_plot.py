import argparse

import pytest
import torch

from fluence_fairseq.cli import plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _checkpoint(path, model, cfg_model=None, args=None):
    state = {"model": model, "cfg": {"model": cfg_model, "common": {"seed": 1}}, "args": args}
    torch.save(state, path)
    return path


def _span_model():
    return {
        "encoder.embed_tokens.weight": torch.zeros(10, 4),
        "encoder.layers.0.self_attn.adaptive_span.current_val": torch.tensor([0.5, 0.25]).view(2, 1, 1),
        "encoder.layers.1.self_attn.adaptive_span.current_val": torch.tensor([1.0, 0.0]).view(2, 1, 1),
        "decoder.layers.0.self_attn.adaptive_span.current_val": torch.tensor([0.125, 0.75]).view(2, 1, 1),
        "decoder.layers.0.self_attn.k_proj.weight": torch.zeros(4, 4),
    }


def test_spans_plot_and_table(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "ckpt.pt", _span_model(),
                       cfg_model=argparse.Namespace(arch="transformer_adaptive_span_tiny", attn_span=64,
                                                    adapt_span_ramp=8))
    out = tmp_path / "spans.png"
    assert plot.main(["spans", str(ckpt), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    text = capsys.readouterr().out
    assert "attn_span=64, ramp=8" in text
    # rows: head spans then the mean; encoder layers 0, 1 come before decoder layer 0
    enc = [line for line in text.splitlines() if line.startswith("layer")]
    assert enc[0].split()[2:] == ["32.0", "16.0", "24.0"]
    assert enc[1].split()[2:] == ["64.0", "0.0", "32.0"]
    assert enc[2].split()[2:] == ["8.0", "48.0", "28.0"]
    assert "encoder: avg 28.0, max 64.0" in text
    assert "decoder: avg 28.0, max 48.0" in text


def test_spans_include_ramp_and_flag_fallback(tmp_path, capsys):
    # no attn_span in the config (e.g. a foreign checkpoint): --attn-span supplies it; ramp defaults to 32
    ckpt = _checkpoint(tmp_path / "ckpt.pt", _span_model(), cfg_model=argparse.Namespace(arch="x"))
    with pytest.raises(SystemExit, match="--attn-span"):
        plot.main(["spans", str(ckpt), "-o", str(tmp_path / "a.png")])
    out = tmp_path / "b.png"
    plot.main(["spans", str(ckpt), "-o", str(out), "--attn-span", "100", "--include-ramp"])
    text = capsys.readouterr().out
    enc = [line for line in text.splitlines() if line.startswith("layer")]
    assert enc[0].split()[2:4] == ["82.0", "57.0"]  # min(100, z*100 + 32)
    assert enc[1].split()[2:4] == ["100.0", "32.0"]
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_decoder_only_checkpoint_with_dict_config(tmp_path, capsys):
    # language models have only a decoder; dataclass-configured models store cfg['model'] as a plain dict
    model = {f"decoder.layers.{i}.self_attn.adaptive_span.current_val": torch.full((4, 1, 1), 0.25 * i)
             for i in range(3)}
    ckpt = _checkpoint(tmp_path / "lm.pt", model, cfg_model={"_name": "lm", "attn_span": 256, "adapt_span_ramp": 32})
    out = tmp_path / "lm.png"
    plot.main(["spans", str(ckpt), "-o", str(out)])
    text = capsys.readouterr().out
    assert "encoder" not in text
    rows = [line.split()[2:] for line in text.splitlines() if line.startswith("layer")]
    assert rows == [["0.0"] * 5, ["64.0"] * 5, ["128.0"] * 5]
    assert "decoder: avg 64.0, max 128.0 tokens over 3 layers x 4 heads" in text
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_no_spans_is_a_clear_error(tmp_path):
    ckpt = _checkpoint(tmp_path / "plain.pt", {"decoder.layers.0.self_attn.k_proj.weight": torch.zeros(4, 4)},
                       cfg_model=argparse.Namespace(arch="transformer", attn_span=64))
    out = tmp_path / "spans.png"
    with pytest.raises(SystemExit, match="no adaptive spans"):
        plot.main(["spans", str(ckpt), "-o", str(out)])
    assert not out.exists()


def test_missing_checkpoint_and_unknown_command(tmp_path):
    with pytest.raises(SystemExit, match=r"missing\.pt does not exist"):
        plot.main(["spans", str(tmp_path / "missing.pt")])
    with pytest.raises(SystemExit):
        plot.main(["nonsense"])


def test_patterns_plot_writes_png(tmp_path, capsys):
    from fluence_fairseq.pruning.patterns import PatternAccumulator, save_patterns

    acc = PatternAccumulator(layers=2, heads=3, max_len=6)
    weights = torch.softmax(torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    for layer in range(2):
        acc.add(layer, weights, torch.tensor([[False] * 4, [True, False, False, False]]),
                torch.tensor([[False] * 4, [True, False, False, False]]), count=layer == 0)
    save_patterns(str(tmp_path / "self-enc"), acc, {"type": "self-enc", "split": "train", "layers": [0, 1]})
    out = tmp_path / "patterns.png"
    assert plot.main(["patterns", str(tmp_path / "self-enc.npy"), "--out", str(out), "--max-pos", "5",
                      "--layers", "1"]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    log_out = tmp_path / "log.png"
    assert plot.main(["patterns", str(tmp_path / "self-enc.npy"), "-o", str(log_out), "--log"]) == 0
    assert log_out.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(SystemExit, match="out of range"):
        plot.main(["patterns", str(tmp_path / "self-enc.npy"), "-o", str(out), "--layers", "2"])
    with pytest.raises(SystemExit, match="does not exist"):
        plot.main(["patterns", str(tmp_path / "missing.npy"), "-o", str(out)])
