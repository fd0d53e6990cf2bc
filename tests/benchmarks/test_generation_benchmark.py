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


def test_per_beam_source_times_each_fluence_arch_against_its_per_beam_variant(capsys, monkeypatch):
    """``--per-beam-source``: a variant of every fluence arch (not of stock fairseq's) whose searches project and
    cache every beam's copy of the source and copy the encoder's output at every reorder; the switches are back
    after each of its searches."""
    from fluence_fairseq.models.layers import FluenceTransformerEncoder
    from fluence_fairseq.modules.attention_base import FluenceAttention
    calls = []
    cache, reorder = FluenceAttention._cache_shared_source, FluenceTransformerEncoder.reorder_encoder_out

    def counting(self, *args):
        calls.append(self.shares_source)
        return cache(self, *args)

    monkeypatch.setattr(FluenceAttention, "_cache_shared_source", counting)
    result = generation.main(["transformer", "fluence_transformer", *TINY, "--per-beam-source"])
    assert list(result) == ["transformer", "fluence_transformer", "fluence_transformer" + generation.PER_BEAM]
    assert 0 < result["fluence_transformer"]["per_beam_ratio"] < 10
    assert "per_beam_ratio" not in result["transformer"]
    # warm-up and 2 rounds of the arch's own searches, one cross layer each: the per-beam ones never call it
    assert calls == [True] * 3
    assert FluenceAttention._cache_shared_source is counting
    assert FluenceTransformerEncoder.reorder_encoder_out is reorder
    out = capsys.readouterr().out
    assert "| fluence_transformer, per-beam source |" in out


def test_per_beam_source_switches_off_one_part_alone(monkeypatch):
    """``--per-beam-source reads``: the variant's beams read their own copies (``shares_source`` off in its
    searches) while the source is still projected once per sentence."""
    from fluence_fairseq.modules.attention_base import FluenceAttention
    calls = []
    cache = FluenceAttention._cache_shared_source

    def counting(self, *args):
        calls.append(self.shares_source)
        return cache(self, *args)

    monkeypatch.setattr(FluenceAttention, "_cache_shared_source", counting)
    result = generation.main(["fluence_transformer", *TINY, "--per-beam-source", "reads"])
    assert "per_beam_ratio" in result["fluence_transformer"]
    assert calls.count(True) == 3 and calls.count(False) == 3  # the variant's searches: projected once, not shared
    with pytest.raises(SystemExit):
        generation.main(["fluence_transformer", *TINY, "--per-beam-source", "nope"])


def test_eager_reorder_times_each_fluence_arch_against_its_copying_variant(capsys, monkeypatch):
    """``--eager-reorder``: a variant of every fluence arch whose reorders select the cached self-attention keys
    at once (no pending order in its searches), timed in turn with the arch itself (whose reorders defer); the
    switch is back after each of the variant's searches; the two variants are not combined."""
    from fluence_fairseq.modules.attention_base import FluenceAttention
    deferred = []
    own = FluenceAttention.reorder_incremental_state

    def recording(self, state, order):
        result = own(self, state, order)
        buffer = self._get_input_buffer(state)
        if not self.cross and buffer.get("prev_key") is not None:
            deferred.append("pending_order" in buffer)
        return result

    monkeypatch.setattr(FluenceAttention, "reorder_incremental_state", recording)
    defers = FluenceAttention._defers_reorder
    result = generation.main(["transformer", "fluence_transformer", *TINY, "--eager-reorder"])
    assert list(result) == ["transformer", "fluence_transformer", "fluence_transformer" + generation.EAGER]
    assert 0 < result["fluence_transformer"]["eager_ratio"] < 10 and "eager_ratio" not in result["transformer"]
    # warm-up and 2 rounds of each: the arch's own searches defer every reorder, the variant's none
    assert deferred.count(True) == deferred.count(False) > 0
    assert FluenceAttention._defers_reorder is defers
    assert "| fluence_transformer, eager reorder |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="one variant at a time"):
        generation.main(["fluence_transformer", *TINY, "--eager-reorder", "--per-beam-source"])
