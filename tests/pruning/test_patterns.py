"""Average attention patterns: accumulation with padding and left-pad alignment, the file format and its errors."""
import json

import numpy as np
import pytest
import torch

from fluence_fairseq.pruning.patterns import PatternAccumulator, load_patterns, save_patterns

H = 2


def _batch(lengths, width, left, seed):
    """Random row-stochastic weights (B, H, width, width) and the padding of sentences of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(len(lengths), H, width, width, generator=g)
    weights = weights / weights.sum(-1, keepdim=True)
    padding = torch.ones(len(lengths), width, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if left:
            padding[b, width - n:] = False
        else:
            padding[b, :n] = False
    return weights, padding


def _brute_force(batches, max_len, left):
    """Mean over sentences of weights[b, h, i, j] at sentence positions (i, j), by explicit loops."""
    sums = torch.zeros(H, max_len, max_len, dtype=torch.float64)
    counts = torch.zeros(max_len, max_len, dtype=torch.float64)
    for weights, lengths in batches:
        width = weights.size(-1)
        for b, n in enumerate(lengths):
            pad = width - n if left else 0
            for i in range(min(n, max_len)):
                for j in range(min(n, max_len)):
                    sums[:, i, j] += weights[b, :, pad + i, pad + j].double()
                    counts[i, j] += 1
    return sums / counts.clamp(min=1), counts


@pytest.mark.parametrize("left", [True, False])
def test_averages_equal_a_brute_force_mean_over_real_positions(left):
    acc = PatternAccumulator(layers=1, heads=H, max_len=6)
    batches = []
    for seed, lengths in enumerate([[5, 3, 8], [2, 7], [8, 8, 1, 4]]):
        width = max(lengths)
        weights, padding = _batch(lengths, width, left, seed)
        acc.add(0, weights, padding, padding)
        batches.append((weights, lengths))
    expected, counts = _brute_force(batches, 6, left)
    torch.testing.assert_close(acc.averages()[0], expected)
    assert torch.equal(acc.counts, counts) and acc.sentences == 9


def test_left_padding_is_aligned_to_the_first_real_token():
    acc = PatternAccumulator(layers=1, heads=H, max_len=4)
    weights = torch.zeros(1, H, 4, 4)
    weights[0, :, 2, 3] = 1.0  # real tokens at 2, 3 (two left pads): query 0 attends key 1
    padding = torch.tensor([[True, True, False, False]])
    acc.add(0, weights, padding, padding)
    averages = acc.averages()[0]
    assert torch.equal(averages[:, 0, 1], torch.ones(H)) and averages.sum() == H
    assert acc.counts[:2, :2].sum() == 4 and acc.counts[2:].sum() == 0  # padding never counts


def test_cross_attention_uses_each_side_padding_and_layers_share_counts():
    acc = PatternAccumulator(layers=2, heads=H, max_len=5)
    weights, _ = _batch([3], 3, False, 0)
    tgt_pad = torch.tensor([[False, False, True]])  # 2 real target tokens (right padded)
    src = torch.rand(1, H, 3, 4)
    src_pad = torch.tensor([[True, False, False, False]])  # 3 real source tokens (left padded)
    acc.add(0, src, tgt_pad, src_pad)
    acc.add(1, src * 2, tgt_pad, src_pad, count=False)
    torch.testing.assert_close(acc.averages()[0, :, :2, :3], src[0, :, :2, 1:].double())
    torch.testing.assert_close(acc.averages()[1], 2 * acc.averages()[0])
    assert acc.counts.sum() == 6


def test_save_and_load_round_trip_without_pickle(tmp_path):
    acc = PatternAccumulator(layers=3, heads=H, max_len=4)
    weights, padding = _batch([4, 2], 4, True, 1)
    for layer in range(3):
        acc.add(layer, weights, padding, padding, count=layer == 0)
    paths = save_patterns(str(tmp_path / "self-enc"), acc, {"split": "valid"})
    array = np.load(paths["npy"], allow_pickle=False)
    assert array.shape == (3, H, 4, 4) and array.dtype == np.float32
    info = json.loads((tmp_path / "self-enc.json").read_text())
    assert info["split"] == "valid" and info["counts"][0][0] == 2 and info["counts"][3][3] == 1
    loaded = load_patterns(paths["npy"], layers=3, heads=H, min_len=4)
    torch.testing.assert_close(loaded, acc.averages().float())


def test_reference_layout_is_accepted(tmp_path):
    path = tmp_path / "reference.npy"
    np.save(path, np.random.rand(2, 1, H, 5, 5))  # the AP repository's (L, 1, H, N, N) float64
    assert load_patterns(str(path), layers=2, heads=H).shape == (2, H, 5, 5)


def test_bad_pattern_files_name_the_file_and_the_expected_shape(tmp_path):
    good = tmp_path / "p.npy"
    np.save(good, np.random.rand(2, H, 6, 6).astype(np.float32))
    with pytest.raises(ValueError, match=r"missing\.npy does not exist.*compute_attn_score"):
        load_patterns(str(tmp_path / "missing.npy"))
    corrupt = tmp_path / "corrupt.npy"
    corrupt.write_bytes(b"not an array")
    with pytest.raises(ValueError, match=r"corrupt\.npy is not a \.npy array \(it starts with b'not an'\)"):
        load_patterns(str(corrupt))
    truncated = tmp_path / "truncated.npy"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"truncated\.npy is truncated or corrupt.*compute_attn_score") as error:
        load_patterns(str(truncated))
    assert "allow_pickle" not in str(error.value)  # never advise unsafe loading for a broken file
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.npy is not a \.npy array"):
        load_patterns(str(empty))
    with pytest.raises(ValueError, match=r"p\.npy has 2 layers.*needs \(layers=3, heads=2, N, N\)"):
        load_patterns(str(good), layers=3, heads=H)
    with pytest.raises(ValueError, match="has 2 heads"):
        load_patterns(str(good), layers=2, heads=4)
    with pytest.raises(ValueError, match=r"length 6.*N >= 8"):
        load_patterns(str(good), layers=2, heads=H, min_len=8)
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full((1, 1, 2, 2), np.nan))
    with pytest.raises(ValueError, match="NaN"):
        load_patterns(str(nan))


def test_bad_inputs_are_refused():
    acc = PatternAccumulator(layers=1, heads=H, max_len=4)
    with pytest.raises(ValueError, match="out of range"):
        acc.add(1, torch.rand(1, H, 2, 2))
    with pytest.raises(ValueError, match="must be contiguous"):
        acc.add(0, torch.rand(1, H, 3, 3), torch.tensor([[False, True, False]]))
    with pytest.raises(ValueError, match="max_len must be a positive integer"):
        PatternAccumulator(1, 1, 0)
