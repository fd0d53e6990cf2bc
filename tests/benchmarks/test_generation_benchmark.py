"""benchmarks.generation on a tiny model: every arch searched, the fixed output length checked, ratios to the first."""
import math

import pytest

from benchmarks import generation

TINY = ["--model-args", "--encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 16 --decoder-embed-dim 16 "
        "--encoder-ffn-embed-dim 32 --decoder-ffn-embed-dim 32 --encoder-attention-heads 2 "
        "--decoder-attention-heads 2", "--vocab", "40", "--sentences", "2", "--src-len", "5", "--tgt-len", "4",
        "--beam", "2", "--rounds", "2", "--allocator", "default"]


def test_every_arch_searched_with_ratios_to_the_first(capsys):
    result = generation.main(["transformer", "transformer_entmax15", *TINY])
    assert list(result) == ["transformer", "transformer_entmax15"]
    assert result["transformer"]["ratio"] == 1.0
    for row in result.values():
        assert math.isfinite(row["s"]) and row["s"] > 0 and row["sentences_per_s"] > 0
    out = capsys.readouterr().out
    assert "4 decoding steps, beam 2" in out and out.count("| transformer_entmax15 |") == 1


def test_an_output_of_another_length_is_refused(monkeypatch):
    from fairseq.sequence_generator import SequenceGenerator
    generate = SequenceGenerator.generate

    def shorter(self, models, sample, **kwargs):
        hypotheses = generate(self, models, sample, **kwargs)
        hypotheses[0][0]["tokens"] = hypotheses[0][0]["tokens"][:-1]
        return hypotheses

    monkeypatch.setattr(SequenceGenerator, "generate", shorter)
    with pytest.raises(RuntimeError, match="outputs of lengths"):
        generation.main(["transformer", *TINY])


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit, match="unknown --arch 'nope'"):
        generation.main(["nope"])
    with pytest.raises(SystemExit, match="--beam must be >= 1"):
        generation.main(["transformer", "--beam", "0"])
