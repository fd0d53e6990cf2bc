"""ops.linear_attention: the scans of the carried states over a group's chunks (both ways, loop and cumsum)."""
import pytest
import torch

from fluence_fairseq.ops import linear_attention as ops


def _naive_scan(per_chunk, initial, reverse):
    """State entering each chunk and the final one, as plain Python sums."""
    chunks = per_chunk.size(2)
    order = list(range(chunks))[::-1] if reverse else list(range(chunks))
    states = torch.empty_like(per_chunk)
    state = initial.clone()
    for t in order:
        states[:, :, t] = state
        state = state + per_chunk[:, :, t]
    return states, state


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("chunks", [1, 2, 8])
@pytest.mark.parametrize("tail", [(5,), (5, 3)])  # a denominator's key sums (cumsum) and a numerator's (loop)
def test_scans_match_naive_sums(reverse, chunks, tail, monkeypatch):
    torch.manual_seed(chunks)
    per_chunk = torch.randn(2, 3, chunks, *tail, dtype=torch.float64)
    initial = torch.randn(2, 3, *tail, dtype=torch.float64)
    want_states, want_final = _naive_scan(per_chunk, initial, reverse)
    monkeypatch.setattr(ops, "CUMSUM_STATE_ELEMENTS", 5)  # (5,) takes the cumsum, (5, 3) the loop
    states, final = ops._scan_states(per_chunk, initial, None, reverse=reverse)
    assert states.shape == per_chunk.shape and final.shape == initial.shape
    torch.testing.assert_close(states, want_states, rtol=0, atol=1e-13)
    torch.testing.assert_close(final, want_final, rtol=0, atol=1e-13)


@pytest.mark.parametrize("reverse", [False, True])
def test_cumsum_scan_leaves_its_inputs_alone(reverse):
    torch.manual_seed(0)
    per_chunk, initial = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 4)
    kept = per_chunk.clone(), initial.clone()
    ops._scan_by_cumsum(per_chunk, initial, reverse)
    assert torch.equal(per_chunk, kept[0]) and torch.equal(initial, kept[1])


def test_denominator_states_take_the_cumsum(monkeypatch):
    """The (B, H, T, M) key sums take the cumsum, the (B, H, T, M, d) numerators the loop, decayed states the loop."""
    calls = []
    real = ops._scan_by_cumsum
    monkeypatch.setattr(ops, "_scan_by_cumsum", lambda *a: calls.append(a[0].shape) or real(*a))
    ops._scan_states(torch.randn(1, 8, 8, 128), torch.zeros(1, 8, 128), None)
    ops._scan_states(torch.randn(1, 8, 8, 128, 64), torch.zeros(1, 8, 128, 64), None)
    ops._scan_states(torch.randn(1, 8, 8, 128), torch.zeros(1, 8, 128), torch.rand(1, 8, 8))
    assert calls == [torch.Size([1, 8, 8, 128])]
