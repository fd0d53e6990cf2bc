"""Nyströmformer attention: contract, the explicit formula, exact fallback, batch independence, padding."""
import pytest
import torch

from attention_contract import AttentionContract, Case, assert_weightless_path_matches_explicit
from fluence_fairseq.modules import FSNystromAttention, FSSoftmax, NystromAttention
from fluence_fairseq.ops.landmarks import iterative_pinv, segment_index


class TestNystromContract(AttentionContract):
    """Few landmarks (3 < 13 tokens, uneven segments) and the convolution over V, whose weight must get gradients
    and whose padded inputs must not matter."""

    case = Case("nystrom", lambda **kw: FSNystromAttention(32, 4, num_landmarks=3, conv_kernel_size=3, **kw),
                tgt_len=13)


# ------------------------------------------------------------------------------- explicit reference
def reference_segments(n, m):
    """Nyströmformer's segmentation of n tokens into m contiguous segments (one token each when n <= m)."""
    if n <= m:
        return [[i] for i in range(n)]
    small = n // m
    num_small = (small + 1) * m - n
    sizes = [small] * num_small + [small + 1] * (m - num_small)
    starts = [sum(sizes[:c]) for c in range(m)]
    return [list(range(s, s + z)) for s, z in zip(starts, sizes)]


def reference_pinv(a, iterations):
    """Newton-Schulz-type iteration of the paper for one (m, m) matrix, scaled by its own norms."""
    z = a.t() / (a.abs().sum(0).max() * a.abs().sum(1).max())
    eye = torch.eye(a.size(0), dtype=a.dtype)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def reference_nystrom(q, k, v, pad, m, pinv=None):
    """Dense Nyström per sequence and head on the real tokens; ``pinv(a)`` defaults to torch.linalg.pinv."""
    pinv = torch.linalg.pinv if pinv is None else pinv
    out = torch.zeros_like(q)
    scale = q.size(-1) ** -0.5
    for b in range(q.size(0)):
        real = (~pad[b]).nonzero().flatten() if pad is not None else torch.arange(q.size(2))
        segs = reference_segments(len(real), m)
        for h in range(q.size(1)):
            qb, kb, vb = q[b, h, real], k[b, h, real], v[b, h, real]
            if len(real) <= m:
                res = torch.softmax(qb @ kb.t() * scale, -1) @ vb
            else:
                ql = torch.stack([qb[s].mean(0) for s in segs])
                kl = torch.stack([kb[s].mean(0) for s in segs])
                k1 = torch.softmax(qb @ kl.t() * scale, -1)
                k2 = torch.softmax(ql @ kl.t() * scale, -1)
                k3 = torch.softmax(ql @ kb.t() * scale, -1)
                res = k1 @ pinv(k2) @ (k3 @ vb)
            out[b, h, real] = res
    return out


def attend(attn, q, k, v, pad=None, need_weights=False):
    return attn.attend(q, k, v, key_padding_mask=pad, attn_mask=None, query_offset=0, need_weights=need_weights)


def random_heads(batch=3, length=23, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 2, length, 8, generator=g, dtype=torch.float64) * scale for _ in range(3)]


def test_segments_follow_the_reference_rule_on_real_tokens():
    assert reference_segments(10, 4) == [[0, 1], [2, 3], [4, 5, 6], [7, 8, 9]]
    real = torch.ones(1, 10, dtype=torch.bool)
    assert segment_index(real, 4).tolist() == [[0, 0, 1, 1, 2, 2, 2, 3, 3, 3]]
    left = torch.tensor([[False] * 3 + [True] * 10])
    assert segment_index(left, 4).tolist() == [[-1] * 3 + [0, 0, 1, 1, 2, 2, 2, 3, 3, 3]]
    assert segment_index(torch.ones(1, 3, dtype=torch.bool), 4).tolist() == [[0, 1, 2]]
    assert segment_index(torch.ones(1, 8, dtype=torch.bool), 4).tolist() == [[0, 0, 1, 1, 2, 2, 3, 3]]


@pytest.mark.parametrize("pinv_iterations", [1, 6])
def test_equals_explicit_formula_with_the_iterative_pinv(pinv_iterations):
    q, k, v = random_heads()
    pad = torch.zeros(3, 23, dtype=torch.bool)
    pad[0, :5] = True  # left padding, 18 real tokens
    pad[1, -8:] = True  # right padding, 15 real
    attn = NystromAttention(16, 2, num_landmarks=4, pinv_iterations=pinv_iterations)
    got, _ = attend(attn, q, k, v, pad)
    want = reference_nystrom(q, k, v, pad, 4, pinv=lambda a: reference_pinv(a, pinv_iterations))
    real = ~pad[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[real], want[real], atol=1e-10, rtol=1e-10)


def test_many_pinv_iterations_approach_the_exact_pseudo_inverse():
    q, k, v = random_heads(length=29)
    want = reference_nystrom(q, k, v, None, 5)  # torch.linalg.pinv
    few = attend(NystromAttention(16, 2, num_landmarks=5, pinv_iterations=1), q, k, v)[0]
    many = attend(NystromAttention(16, 2, num_landmarks=5, pinv_iterations=30), q, k, v)[0]
    torch.testing.assert_close(many, want, atol=1e-8, rtol=1e-8)
    assert (few - want).abs().max() > 100 * (many - want).abs().max()
    a = torch.softmax(torch.randn(4, 6, 6, dtype=torch.float64), -1)
    torch.testing.assert_close(iterative_pinv(a, 40), torch.linalg.pinv(a), atol=1e-8, rtol=1e-8)


def test_temperature_is_one_over_sqrt_head_dim():
    """The reference scaled q and k by d^-1/2 each (temperature 1/d); the landmark formula must use d^-1/2."""
    q, k, v = random_heads(batch=1, length=20, scale=2.0)
    got = attend(NystromAttention(16, 2, num_landmarks=4), q, k, v)[0]
    torch.testing.assert_close(got, reference_nystrom(q, k, v, None, 4, pinv=lambda a: reference_pinv(a, 6)))
    buggy = reference_nystrom(q / 8 ** 0.25, k / 8 ** 0.25, v, None, 4, pinv=lambda a: reference_pinv(a, 6))
    assert (got - buggy).abs().max() > 1e-2


def test_exact_softmax_when_real_length_at_most_num_landmarks():
    torch.manual_seed(0)
    attn = FSNystromAttention(32, 4, num_landmarks=8).eval()
    softmax = FSSoftmax(32, 4).eval()
    softmax.load_state_dict(attn.state_dict())
    x = torch.randn(12, 3, 32)
    pad = torch.zeros(3, 12, dtype=torch.bool)
    pad[0, 8:] = True  # 8 real tokens: exact
    pad[1, :6] = True  # 6 real tokens: exact
    # row 2 has 12 real tokens: Nystrom; a mixed batch must still give rows 0 and 1 exactly
    got = attn(x, x, x, key_padding_mask=pad, need_weights=False)[0]
    want = softmax(x, x, x, key_padding_mask=pad, need_weights=False)[0]
    real = ~pad.t()
    torch.testing.assert_close(got[:, :2][real[:, :2]], want[:, :2][real[:, :2]], atol=1e-6, rtol=0)
    assert (got[:, 2] - want[:, 2]).abs().max() > 1e-4, "the long row should be approximated"
    short = x[:8]
    torch.testing.assert_close(attn(short, short, short)[0], softmax(short, short, short)[0], atol=1e-6, rtol=0)


def test_output_of_a_sequence_does_not_depend_on_its_batch():
    """The pinv's initial scaling is per sequence and head (the reference's was over the whole batch)."""
    q, k, v = random_heads(batch=2, length=25)
    q[1] *= 6  # a very peaked neighbour: its kernel_2 has very different column sums
    k[1] *= 6
    attn = NystromAttention(16, 2, num_landmarks=4)
    together = attend(attn, q, k, v)[0]
    alone = attend(attn, q[:1], k[:1], v[:1])[0]
    torch.testing.assert_close(together[:1], alone, atol=1e-12, rtol=0)


def test_padding_anywhere_at_the_edges_gives_the_same_outputs():
    q, k, v = random_heads(batch=1, length=19)
    attn = NystromAttention(16, 2, num_landmarks=5, conv_kernel_size=3).double()
    want = attend(attn, q, k, v)[0]
    junk = [torch.randn(1, 2, 4, 8, dtype=torch.float64) * 50 for _ in range(3)]
    for left, right in [(4, 0), (0, 4), (2, 2)]:
        parts = [torch.cat([j[:, :, :left], t, j[:, :, 4 - right:]], 2) for j, t in zip(junk, (q, k, v))]
        pad = torch.tensor([[True] * left + [False] * 19 + [True] * right])
        got = attend(attn, *parts, pad)[0]
        torch.testing.assert_close(got[:, :, left:left + 19], want, atol=1e-10, rtol=0)


def test_implied_weights_reproduce_the_output():
    q, k, v = random_heads(length=21)
    pad = torch.zeros(3, 21, dtype=torch.bool)
    pad[1, :15] = True  # 6 real tokens: exact softmax row
    out, weights = attend(NystromAttention(16, 2, num_landmarks=6), q, k, v, pad, need_weights=True)
    assert weights.shape == (3, 2, 21, 21)
    assert torch.all(weights[1][:, :, :15] == 0)
    torch.testing.assert_close(weights @ v, out)


def test_finite_gradients_in_a_mixed_batch_with_an_empty_row():
    q, k, v = (t.float().requires_grad_(True) for t in random_heads(length=17))
    pad = torch.zeros(3, 17, dtype=torch.bool)
    pad[0] = True
    pad[1, 3:] = True
    out, _ = attend(NystromAttention(16, 2, num_landmarks=4), q, k, v, pad)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.all(v.grad[0] == 0) and torch.all(v.grad[1, :, 3:] == 0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_landmarks": 0}, "num_landmarks"),
        ({"num_landmarks": 2.5}, "num_landmarks"),
        ({"pinv_iterations": 0}, "pinv_iterations"),
        ({"conv_kernel_size": -1}, "conv_kernel_size"),
        ({"conv_kernel_size": 4}, "odd"),
    ],
)
def test_hyper_parameter_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FSNystromAttention(32, 4, **kwargs)


def test_training_path_equals_the_explicit_kernels():
    """Without weights (float32/64) both L-sized kernels are recomputed in backward and the gradients written in
    the projections' layout; outputs and gradients must equal the explicit path's (need_weights=True), with key
    padding."""
    torch.manual_seed(0)
    attn = FSNystromAttention(32, 4, num_landmarks=4).double()
    x = torch.randn(40, 2, 32, dtype=torch.float64)
    pad = torch.zeros(2, 40, dtype=torch.bool)
    pad[1, 29:] = True
    assert_weightless_path_matches_explicit(attn, x, pad)
