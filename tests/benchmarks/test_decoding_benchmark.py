"""benchmarks.decoding on tiny sizes: every case timed at its own position, ratios to fairseq's attention."""
import math

import pytest
import torch

from benchmarks import decoding
from benchmarks.common import bench_spec, build_module


def test_steps_of_every_case_with_ratios_to_fairseq_attention(capsys):
    result = decoding.main(["softmax", "entmax15", "--positions", "3,5", "--beam", "2", "--dim", "32", "--heads", "2",
                            "--steps", "2", "--rounds", "2", "--allocator", "default"])
    labels = [decoding.MHA, "softmax", "entmax15"]
    assert set(result) == {(p, n, label) for p in ("self", "cross") for n in (3, 5) for label in labels}
    for (pattern, position, label), row in result.items():
        assert math.isfinite(row["us"]) and row["us"] > 0
        if label == decoding.MHA:
            assert row["ratio"] == 1.0
    out = capsys.readouterr().out
    assert "beam 2" in out and "2 rounds of 2 steps" in out and out.count("| cross | 5 | entmax15 |") == 1


@pytest.mark.parametrize("spec", [bench_spec("entmax15"), {"kind": "fairseq_mha"}])
def test_every_timed_step_starts_from_the_filled_cache(spec):
    module = build_module(spec, 16, 2, cross=False, causal=True).eval()
    with torch.no_grad():
        case = decoding.Case(module, False, 4, 3, 16)
        for _ in range(3):
            case.step(16)
            (buffer,) = case.state.values()
            assert buffer["prev_key"].shape[:3] == (3, 2, 5)  # the 4 filled tokens and this step's
    (filled,) = case.filled.values()
    assert filled["prev_key"].shape[:3] == (3, 2, 4) and len(case.us) == 3


def test_sentences_repeat_their_source_for_their_beams_and_reorder_within_them(monkeypatch):
    """``--sentences``: the batch is sentences x beam; a sentence's source is the same for its beams (as fairseq's
    beam search repeats it), and the self attention's reorders move each row to a beam of its own sentence."""
    orders = []
    module = build_module(bench_spec("softmax"), 16, 2, cross=False, causal=True).eval()
    reorder = module.reorder_incremental_state
    monkeypatch.setattr(module, "reorder_incremental_state", lambda state, order: orders.append(order) or reorder(
        state, order))
    with torch.no_grad():
        case = decoding.Case(module, False, 2, 3, 16, sentences=2)
        for _ in range(20):
            case.step(16)
        cross = decoding.Case(build_module(bench_spec("softmax"), 16, 2, cross=True, causal=False).eval(), True, 4,
                              3, 16, sentences=2)
    assert all(torch.equal(order // 3, torch.arange(6) // 3) for order in orders) and len(orders) == 20
    assert torch.equal(cross.source[:, 0], cross.source[:, 2])
    assert not torch.equal(cross.source[:, 2], cross.source[:, 3])
    (buffer,) = case.state.values()
    assert buffer["prev_key"].size(0) == 6
    with pytest.raises(SystemExit, match="--sentences must be >= 1"):
        decoding.main(["softmax", "--sentences", "0"])


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit, match="unknown attention 'nope'"):
        decoding.main(["nope"])
    with pytest.raises(SystemExit, match="--patterns takes self, cross"):
        decoding.main(["softmax", "--patterns", "self,both"])
    with pytest.raises(SystemExit, match="--positions needs positive integers"):
        decoding.main(["softmax", "--positions", "0"])
    with pytest.raises(SystemExit, match="--beam must be >= 1"):
        decoding.main(["softmax", "--beam", "0"])
    with pytest.raises(SystemExit, match="s4d does not decode as cross attention"):
        decoding.main(["s4d", "--patterns", "cross", "--positions", "2"])


def test_eager_reorder_adds_each_attention_copying_at_every_reorder(capsys, monkeypatch):
    """``--eager-reorder``: every attention's self steps also timed with its reorders selecting the cached keys at
    once (no pending order left for the step), each attention's ratio to that variant reported; not for fairseq's
    attention or cross steps."""
    from fluence_fairseq.modules.attention_base import PENDING_ORDER, FluenceAttention
    left = []
    own = FluenceAttention.reorder_incremental_state

    def recording(self, state, order):
        result = own(self, state, order)
        left.append(PENDING_ORDER in self._get_input_buffer(state))
        return result

    monkeypatch.setattr(FluenceAttention, "reorder_incremental_state", recording)
    result = decoding.main(["softmax", "--positions", "3", "--rounds", "1", "--steps", "2", "--dim", "16",
                            "--heads", "2", "--allocator", "default", "--eager-reorder"])
    assert set(result) == {("self", 3, "fairseq MHA"), ("self", 3, "softmax"), ("self", 3, "softmax, eager reorder"),
                           ("cross", 3, "fairseq MHA"), ("cross", 3, "softmax")}
    assert 0 < result[("self", 3, "softmax")]["eager_ratio"] < 10
    assert "eager_ratio" not in result[("cross", 3, "softmax")]
    assert left.count(True) == left.count(False) == 5  # warm-up and timed steps of each self case
    assert "| self | 3 | softmax, eager reorder |" in capsys.readouterr().out
