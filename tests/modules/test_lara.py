"""LARA: contract, the explicit slow formula (eval and training), randomness, padding, exact fallback."""
import pytest
import torch

from fluence_fairseq.modules import FSLara, FSSoftmax, Lara


# ------------------------------------------------------------------------------- explicit reference
def reference_segments(n, m):
    """Nyströmformer's segmentation of n tokens into m contiguous segments."""
    small = n // m
    num_small = (small + 1) * m - n
    sizes = [small] * num_small + [small + 1] * (m - num_small)
    starts = [sum(sizes[:c]) for c in range(m)]
    return [list(range(s, s + z)) for s, z in zip(starts, sizes)]


def reference_lara(q, k, v, pad, m, eps=None):
    """LARA term by term, one query, proposal and key at a time, on the real tokens of each sequence.

    ``eps`` (B, H, m, D): the proposal noise (None = eval, omega = mu).
    """
    d = q.size(-1)
    s = d ** -0.5

    def log_phi(x, w):
        return s * (w @ x) - s * (x @ x) / 2

    out = torch.zeros_like(q)
    for b in range(q.size(0)):
        real = (~pad[b]).nonzero().flatten().tolist() if pad is not None else list(range(q.size(2)))
        segs = reference_segments(len(real), m)
        for h in range(q.size(1)):
            qs, ks, vs = q[b, h, real], k[b, h, real], v[b, h, real]
            mus = [qs[seg].mean(0) + ks[seg].mean(0) for seg in segs]
            omegas = [mu if eps is None else mu + eps[b, h, c] for c, mu in enumerate(mus)]
            kvs, lses = [], []
            for w in omegas:
                logits = torch.stack([log_phi(kj, w) for kj in ks])
                kvs.append(sum(p * vj for p, vj in zip(torch.softmax(logits, 0), vs)))
                lses.append(torch.logsumexp(logits, 0))
            for n, qn in enumerate(qs):
                log_r = torch.stack([
                    s * (mu @ qn) + log_phi(qn, w) + lse - log_phi(mu, w)
                    for mu, w, lse in zip(mus, omegas, lses)
                ])
                r = torch.softmax(log_r, 0)
                out[b, h, real[n]] = sum(rc * kv for rc, kv in zip(r, kvs))
    return out


def attend(attn, q, k, v, pad=None, need_weights=False):
    return attn.attend(q, k, v, key_padding_mask=pad, attn_mask=None, query_offset=0, need_weights=need_weights)


def random_heads(batch=2, length=14, seed=0, scale=0.7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 2, length, 8, generator=g, dtype=torch.float64) * scale for _ in range(3)]


def padded_batch():
    q, k, v = random_heads(batch=3)
    pad = torch.zeros(3, 14, dtype=torch.bool)
    pad[0, :3] = True  # left padding, 11 real tokens (segments 2, 3, 3, 3)
    pad[1, -4:] = True  # right padding, 10 real tokens
    return q, k, v, pad


def test_eval_equals_explicit_formula():
    q, k, v, pad = padded_batch()
    attn = Lara(16, 2, num_landmarks=4).eval()
    got = attend(attn, q, k, v, pad)[0]
    want = reference_lara(q, k, v, pad, 4)
    real = ~pad[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[real], want[real], atol=1e-10, rtol=1e-10)


def test_training_equals_explicit_formula_with_the_same_noise():
    q, k, v, pad = padded_batch()
    attn = Lara(16, 2, num_landmarks=4).train()
    torch.manual_seed(123)
    got = attend(attn, q, k, v, pad)[0]
    torch.manual_seed(123)
    eps = torch.randn(3, 2, 4, 8, dtype=torch.float64)  # omega = mu + eps, drawn from the global RNG
    want = reference_lara(q, k, v, pad, 4, eps=eps)
    real = ~pad[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[real], want[real], atol=1e-10, rtol=1e-10)


def test_eval_is_deterministic_and_training_is_random():
    torch.manual_seed(0)
    attn = FSLara(32, 4, num_landmarks=4)
    x = torch.randn(20, 2, 32)
    train_a = attn.train()(x, x, x, need_weights=False)[0]
    train_b = attn(x, x, x, need_weights=False)[0]
    assert (train_a - train_b).abs().max() > 1e-4, "training proposals should be sampled afresh every call"
    eval_a = attn.eval()(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(attn(x, x, x, need_weights=False)[0], eval_a, atol=0, rtol=0)
    assert (eval_a - train_a).abs().max() > 1e-4


def test_padding_invariance_in_training_with_the_same_noise():
    q, k, v = random_heads(batch=1, length=13)
    attn = Lara(16, 2, num_landmarks=5).train()
    torch.manual_seed(5)
    want = attend(attn, q, k, v)[0]
    junk = [torch.randn(1, 2, 4, 8, dtype=torch.float64) * 50 for _ in range(3)]
    for left, right in [(4, 0), (0, 4), (1, 3)]:
        parts = [torch.cat([j[:, :, :left], t, j[:, :, 4 - right:]], 2) for j, t in zip(junk, (q, k, v))]
        pad = torch.tensor([[True] * left + [False] * 13 + [True] * right])
        torch.manual_seed(5)
        got = attend(attn, *parts, pad)[0]
        torch.testing.assert_close(got[:, :, left:left + 13], want, atol=1e-10, rtol=0)


def test_exact_softmax_when_real_length_at_most_num_landmarks():
    torch.manual_seed(0)
    attn = FSLara(32, 4, num_landmarks=6).train()  # even in training: no proposals are sampled
    softmax = FSSoftmax(32, 4).eval()
    softmax.load_state_dict(attn.state_dict())
    x = torch.randn(10, 3, 32)
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[0, 6:] = True
    pad[1, :5] = True  # rows 0 and 1 are short, row 2 (10 tokens) uses LARA
    got = attn(x, x, x, key_padding_mask=pad, need_weights=False)[0]
    want = softmax(x, x, x, key_padding_mask=pad, need_weights=False)[0]
    real = ~pad.t()
    torch.testing.assert_close(got[:, :2][real[:, :2]], want[:, :2][real[:, :2]], atol=1e-6, rtol=0)
    assert (got[:, 2] - want[:, 2]).abs().max() > 1e-4


def test_implied_weights_are_a_distribution_that_reproduces_the_output():
    q, k, v, pad = padded_batch()
    out, weights = attend(Lara(16, 2, num_landmarks=4).eval(), q, k, v, pad, need_weights=True)
    assert torch.all(weights >= 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 2, 14, dtype=torch.float64))
    assert torch.all(weights.masked_select(pad[:, None, None, :]) == 0)
    torch.testing.assert_close(weights @ v, out)


def test_finite_gradients_in_a_mixed_batch_with_an_empty_row():
    q, k, v = (t.float().requires_grad_(True) for t in random_heads(batch=3, length=17))
    pad = torch.zeros(3, 17, dtype=torch.bool)
    pad[0] = True
    pad[1, 3:] = True
    out, _ = attend(Lara(16, 2, num_landmarks=4).train(), q, k, v, pad)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.all(v.grad[0] == 0) and torch.all(v.grad[1, :, 3:] == 0)


@pytest.mark.parametrize("value", [0, -3, 2.0, True])
def test_num_landmarks_validation(value):
    with pytest.raises(ValueError, match="num_landmarks"):
        FSLara(32, 4, num_landmarks=value)


@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_one_node_approximation_equals_autograd_and_can_reuse_its_inputs(monkeypatch, noise, padded):
    """Without weights, float32/64 LARA is one autograd node recomputing its (m, L) and (L, m) kernels in backward
    (several row blocks here): the same output and gradients as the plain autograd expression (the weights
    path), with the same noise; with reuse_inputs the gradients land in q, k and v's own memory."""
    import fluence_fairseq.ops.landmarks as lm
    monkeypatch.setattr(lm, "_ROWS", 16)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 50, 8, dtype=torch.float64, generator=g) for _ in range(3))
    kpm = torch.zeros(2, 50, dtype=torch.bool)
    kpm[1, -9:] = True
    kpm = kpm if padded else None
    w = torch.randn(2, 3, 50, 8, dtype=torch.float64, generator=g)
    results = []
    for mode in ("autograd", "node", "reuse"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        given = [t * 1.0 for t in leaves]  # memories nothing else reads
        torch.manual_seed(1)
        out, weights = lm.lara_attention(*given, num_landmarks=6, noise=noise, key_padding_mask=kpm,
                                         need_weights=mode == "autograd", reuse_inputs=mode == "reuse")
        assert (weights is None) == (mode != "autograd")
        (out * w).sum().backward()
        results.append([out.detach()] + [t.grad for t in leaves])
        for inside, leaf, original in zip(given, leaves, (q, k, v)):
            torch.testing.assert_close(inside.detach(), leaf.grad if mode == "reuse" else original, rtol=0, atol=0)
    for node in results[1:]:
        for got, want in zip(node, results[0]):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_reuse_is_not_taken_when_a_sequence_uses_the_exact_fallback():
    """A sequence with at most num_landmarks real tokens takes exact attention, which reads k after LARA's
    backward: then nothing is written over the inputs."""
    import fluence_fairseq.ops.landmarks as lm
    q, k, v = (torch.randn(2, 2, 12, 4, dtype=torch.float64) for _ in range(3))
    kpm = torch.zeros(2, 12, dtype=torch.bool)
    kpm[1, 3:] = True  # 3 real tokens <= 4 landmarks
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    given = [t * 1.0 for t in leaves]
    out, _ = lm.lara_attention(*given, num_landmarks=4, noise=True, key_padding_mask=kpm, reuse_inputs=True)
    out.sum().backward()
    for inside, original in zip(given, (q, k, v)):
        torch.testing.assert_close(inside.detach(), original, rtol=0, atol=0)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
