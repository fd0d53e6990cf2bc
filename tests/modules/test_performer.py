"""Performer (FAVOR+): contract, explicit slow reference, softmax approximation, projection buffer, redraws,
and the shared chunked causal linear-attention op (gradcheck, exactness with extreme key scales)."""
import pytest
import torch

from attention_contract import AttentionContract, Case
from fluence_fairseq.modules import FSPerformer, Performer
from fluence_fairseq.modules.performer import FEATURE_EPS, orthogonal_gaussian_projection
from fluence_fairseq.ops.linear_attention import causal_linear_attention, linear_attention

E, H, DH = 32, 4, 8


class TestPerformerContract(AttentionContract):
    # m = 12 > head_dim = 8: two orthogonal blocks; chunk 4 < the sequence lengths: several chunks
    case = Case("performer", lambda **kw: FSPerformer(32, 4, approx_attn_dim=12, chunk_size=4, **kw))


def _heads(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def slow_performer(attn, q, k, v, *, causal, query_offset=0, key_padding_mask=None):
    """The FAVOR+ weights written out pair by pair in float64: w_ij = phi(q_i) . phi(k_j) with
    phi(q) = exp(Wq' - max) + eps, phi(k) = (exp(Wk' - |k'|^2/2 - c_k) + eps) exp(c_k), c_k = max_f(...)."""
    W = attn.projection.double()
    qs, ks = q * DH ** -0.25, k * DH ** -0.25
    lq = torch.einsum("bhld,hmd->bhlm", qs, W)
    fq = torch.exp(lq - lq.amax(-1, keepdim=True)) + FEATURE_EPS
    lk = torch.einsum("bhsd,hmd->bhsm", ks, W) - 0.5 * (ks ** 2).sum(-1, keepdim=True)
    ck = lk.amax(-1, keepdim=True)
    fk = torch.exp(lk - ck) + FEATURE_EPS
    B, _, L, _ = q.shape
    S = k.size(2)
    out = torch.zeros(B, H, L, v.size(-1), dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(L):
                logw = []
                for j in range(S):
                    visible = (not causal or j <= i + query_offset) and not (
                        key_padding_mask is not None and key_padding_mask[b, j])
                    logw.append(torch.log(fq[b, h, i] @ fk[b, h, j]) + ck[b, h, j, 0] if visible
                                else torch.tensor(float("-inf"), dtype=torch.float64))
                logw = torch.stack(logw)
                if torch.isinf(logw).all():
                    continue
                out[b, h, i] = torch.softmax(logw, 0) @ v[b, h]
    return out


@pytest.mark.parametrize("cross,causal", [(False, False), (False, True), (True, False), (True, True)])
def test_equals_slow_reference_in_every_pattern(cross, causal):
    attn = Performer(E, H, approx_attn_dim=12, chunk_size=3, causal=causal, cross=cross).double()
    L, S = 7, (5 if cross else 7)
    q, k, v = _heads(2, H, L, DH, seed=1), _heads(2, H, S, DH, seed=2) * 2, _heads(2, H, S, DH, seed=3)
    kpm = torch.zeros(2, S, dtype=torch.bool)
    kpm[1, -2:] = True
    offset = S - L if not cross else 0
    got, weights = attn.attend(q, k, v, key_padding_mask=kpm, attn_mask=None, query_offset=offset, need_weights=False)
    assert weights is None
    want = slow_performer(attn, q, k, v, causal=causal, query_offset=offset, key_padding_mask=kpm)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_approaches_softmax_as_features_grow():
    q, k, v = _heads(4, H, 16, DH, seed=4) * 0.5, _heads(4, H, 16, DH, seed=5) * 0.5, _heads(4, H, 16, DH, seed=6)
    exact = torch.softmax(q @ k.transpose(-1, -2) / DH ** 0.5, -1) @ v
    errors = {}
    for m in (16, 2048):
        attn = Performer(E, H, approx_attn_dim=m, seed=0).double()
        out, _ = attn.attend(q, k, v, key_padding_mask=None, attn_mask=None, query_offset=0, need_weights=False)
        errors[m] = (out - exact).abs().mean().item()
    assert errors[2048] < 0.3 * errors[16], errors
    assert errors[2048] < 0.02, errors


def test_projection_is_orthogonal_in_blocks_and_seeded():
    w = orthogonal_gaussian_projection(2, 12, 8, torch.Generator().manual_seed(0))
    block = w[0, :8] / w[0, :8].norm(dim=-1, keepdim=True)
    torch.testing.assert_close(block @ block.t(), torch.eye(8), atol=1e-5, rtol=0)
    a, b = Performer(E, H, seed=3), Performer(E, H, seed=3)
    assert torch.equal(a.projection, b.projection)
    assert not torch.equal(a.projection, Performer(E, H, seed=4).projection)


def test_projection_is_a_persistent_buffer_and_survives_a_round_trip():
    torch.manual_seed(0)
    a = FSPerformer(E, H, approx_attn_dim=8).eval()
    assert "projection" in a.state_dict() and "projection" in dict(a.named_buffers())
    torch.manual_seed(1)
    b = FSPerformer(E, H, approx_attn_dim=8).eval()
    assert not torch.equal(a.projection, b.projection)
    b.load_state_dict(a.state_dict())
    x = _heads(6, 2, E, seed=7).float()
    torch.testing.assert_close(b(x, x, x)[0], a(x, x, x)[0], atol=0, rtol=0)


def test_redraw_every_n_training_calls_and_never_in_eval():
    attn = FSPerformer(E, H, approx_attn_dim=8, feature_redraw_interval=3)
    x = _heads(5, 2, E, seed=8).float()
    seen = [attn.projection.clone()]
    for _ in range(7):
        attn(x, x, x)
        seen.append(attn.projection.clone())
    changed = [not torch.equal(seen[i], seen[i + 1]) for i in range(7)]
    assert changed == [False, False, False, True, False, False, True]  # calls 4 and 7 use a new draw
    attn.eval()
    for _ in range(5):
        attn(x, x, x)
    assert torch.equal(attn.projection, seen[-1])
    never = FSPerformer(E, H, approx_attn_dim=8)
    before = never.projection.clone()
    for _ in range(4):
        never(x, x, x)
    assert torch.equal(never.projection, before)


def test_no_leak_even_with_a_huge_future_key():
    """The key stabiliser is a running maximum: a future key whose scale exceeds the earlier ones by far more
    than the float range (a whole-sequence maximum would underflow every earlier key) changes nothing before it."""
    attn = Performer(E, H, approx_attn_dim=8, chunk_size=4, causal=True)
    # long keys: log scales of several hundreds below 0; the future key k' = w reaches the largest possible
    # scale |w|^2 / 2
    q, k, v = (_heads(1, H, 12, DH, seed=s).float() for s in (9, 10, 11))
    k = k * 20
    base, _ = attn.attend(q, k, v, key_padding_mask=None, attn_mask=None, query_offset=0, need_weights=False)
    k2 = k.clone()
    k2[:, :, 9] = attn.projection[:, 0] * DH ** 0.25
    _, scale = attn.key_features(k2)
    assert (scale[..., 9:10] - scale[..., :9]).min() > 110  # exp(-110) underflows in float32
    changed, _ = attn.attend(q, k2, v, key_padding_mask=None, attn_mask=None, query_offset=0, need_weights=False)
    torch.testing.assert_close(changed[:, :, :9], base[:, :, :9], atol=1e-5, rtol=0)
    assert torch.isfinite(changed).all() and base[:, :, :9].abs().amax(-1).min() > 0.05  # real outputs, not 0/0


@pytest.mark.parametrize("offset", [0, -2, 3, 30])
def test_causal_op_gradcheck_with_scales_padding_and_offsets(offset):
    g = torch.Generator().manual_seed(offset + 5)
    q = torch.rand(2, 2, 7, 3, dtype=torch.float64, generator=g).requires_grad_()
    k = torch.rand(2, 2, 6, 3, dtype=torch.float64, generator=g).requires_grad_()
    v = torch.randn(2, 2, 6, 2, dtype=torch.float64, generator=g).requires_grad_()
    c = (torch.randn(2, 2, 6, dtype=torch.float64, generator=g) * 3).requires_grad_()
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1, :2] = True

    def fn(q, k, v, c):
        return causal_linear_attention(q, k, v, query_offset=offset, key_log_scale=c, key_padding_mask=kpm,
                                       eps=1e-30, chunk_size=4)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v, c))
    noncausal = lambda q, k, v, c: linear_attention(q, k, v, causal=False, key_log_scale=c, key_padding_mask=kpm,
                                                    eps=1e-30)
    assert torch.autograd.gradcheck(noncausal, (q, k, v, c))


def test_state_continuation_equals_one_call():
    g = torch.Generator().manual_seed(3)
    q, k = torch.rand(1, 2, 20, 4, generator=g), torch.rand(1, 2, 20, 4, generator=g)
    v, c = torch.randn(1, 2, 20, 3, generator=g), torch.randn(1, 2, 20, generator=g) * 300
    full, _ = causal_linear_attention(q, k, v, key_log_scale=c, eps=1e-30, chunk_size=8)
    outs, state = [], None
    for lo, hi in [(0, 7), (7, 8), (8, 20)]:
        out, state = causal_linear_attention(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi],
                                             key_log_scale=c[..., lo:hi], state=state, eps=1e-30, chunk_size=3)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 2), full, atol=1e-5, rtol=0)
    assert torch.isfinite(full).all()


def test_hyper_parameter_validation():
    with pytest.raises(ValueError, match="approx_attn_dim"):
        Performer(E, H, approx_attn_dim=0)
    with pytest.raises(ValueError, match="feature_redraw_interval"):
        Performer(E, H, feature_redraw_interval=-1)
    with pytest.raises(ValueError, match="attn_mask"):
        attn = FSPerformer(E, H)
        x = torch.randn(4, 1, E)
        attn(x, x, x, attn_mask=torch.zeros(4, 4, dtype=torch.bool).fill_diagonal_(True))


@pytest.mark.parametrize("causal", [True, False])
def test_groups_of_positions_change_nothing(monkeypatch, causal):
    """The ops work on groups of positions (bounded temporaries); many small groups equal one group, values and
    gradients, with scales, padding and an offset."""
    import fluence_fairseq.ops.linear_attention as la
    g = torch.Generator().manual_seed(21)
    q = torch.rand(2, 2, 23, 3, dtype=torch.float64, generator=g).requires_grad_()
    k = torch.rand(2, 2, 21, 3, dtype=torch.float64, generator=g).requires_grad_()
    v = torch.randn(2, 2, 21, 2, dtype=torch.float64, generator=g).requires_grad_()
    c = (torch.randn(2, 2, 21, dtype=torch.float64, generator=g) * 30).requires_grad_()
    kpm = torch.zeros(2, 21, dtype=torch.bool)
    kpm[0, :4] = True
    w = torch.randn(2, 2, 23, 2, dtype=torch.float64, generator=g)

    def run(group):
        monkeypatch.setattr(la, "GROUP", group)
        out = la.linear_attention(q, k, v, causal=causal, query_offset=-1 if causal else 0, key_log_scale=c,
                                  key_padding_mask=kpm, eps=1e-30, chunk_size=3)
        return (out, *torch.autograd.grad((out * w).sum(), (q, k, v, c)))

    for a, b in zip(run(3), run(1024)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("keys", [False, True])
def test_feature_map_gradient_is_exact_at_the_max_and_through_the_scale(keys):
    """The fused feature function keeps neither the logits nor the exponential; its gradient must still be the
    exact one, including the row max (which moves the argmax logit) and, for keys, |x|² and the log scale."""
    from fluence_fairseq.modules.performer import _PositiveFeatures

    gen = torch.Generator().manual_seed(0)
    # a strided heads view, as the attention passes it
    x = torch.randn(5, 2, 3, 4, generator=gen, dtype=torch.float64).permute(1, 2, 0, 3).requires_grad_()
    w = torch.randn(3, 6, 4, generator=gen, dtype=torch.float64)
    coef = 0.25 if keys else 0.0

    def fused(x):
        features, scale = _PositiveFeatures.apply(x, w, coef, FEATURE_EPS)
        return features, scale

    def plain(x):
        logits = torch.matmul(x, w.transpose(-1, -2).unsqueeze(0)) - coef * x.pow(2).sum(-1, keepdim=True)
        scale = logits.amax(-1, keepdim=True)
        return torch.exp(logits - scale) + FEATURE_EPS, scale.squeeze(-1)

    assert torch.autograd.gradcheck(fused, (x,))
    weights = torch.randn(2, 3, 5, 6, generator=gen, dtype=torch.float64), torch.randn(2, 3, 5, generator=gen,
                                                                                       dtype=torch.float64)
    grads = []
    for fn in (fused, plain):
        features, scale = fn(x)
        (features * weights[0]).sum().add((scale * weights[1]).sum()).backward()
        grads.append(x.grad)
        x.grad = None
        torch.testing.assert_close(features, plain(x)[0].detach(), atol=1e-14, rtol=0)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-12, rtol=0)
    assert grads[0].stride() == x.stride()  # written in the layout of the heads view
