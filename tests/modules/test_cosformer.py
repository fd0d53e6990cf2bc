"""cosFormer: contract, the explicit O(L^2) re-weighted formula in every pattern, padding honoured (the
reference ignored it), fixed-M validation, activations, vdim."""
import math

import pytest
import torch
import torch.nn.functional as F

from attention_contract import AttentionContract, Case
from fluence_fairseq.modules import CosformerAttention, FSCosformerAttention
from fluence_fairseq.ops.linear_attention import causal_linear_attention
from fluence_fairseq.ops.linear_attention import linear_attention as linear_attention_op

E, H, DH = 32, 4, 8


class TestCosformerContract(AttentionContract):
    # a small M so that the re-weighting really varies over the test sequences; chunks shorter than them
    case = Case("cosformer", lambda **kw: FSCosformerAttention(32, 4, cosformer_max_len=16, chunk_size=4, **kw))


def _heads(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def slow_cosformer(q, k, v, *, act, causal, cross, max_len, query_offset=0, key_padding_mask=None):
    """out_i = sum_j w_ij v_j / sum_j w_ij, w_ij = act(q_i) . act(k_j) cos(pi (p_i - p_j) / 2M), pair by pair."""
    act_fn = F.relu if act == "relu" else (lambda x: 1 + F.elu(x))
    B, _, L, _ = q.shape
    S = k.size(2)
    real = torch.ones(B, S, dtype=torch.bool) if key_padding_mask is None else ~key_padding_mask
    out = torch.zeros(B, H, L, v.size(-1), dtype=torch.float64)
    for b in range(B):
        real_pos = (real[b].cumsum(0) - 1).tolist()  # position among the real tokens
        for h in range(H):
            for i in range(L):
                num, den = 0.0, 0.0
                for j in range(S):
                    if not real[b, j] or (causal and j > i + query_offset):
                        continue
                    if not (cross or causal):  # M = real length, positions over real tokens
                        M, pi_, pj = int(real[b].sum()), real_pos[i], real_pos[j]
                    else:
                        M, pi_ = max_len, i + query_offset
                        pj = real_pos[j] if (cross and not causal) else j
                    w = (act_fn(q[b, h, i]) @ act_fn(k[b, h, j])) * math.cos(math.pi * (pi_ - pj) / (2 * M))
                    num, den = num + w * v[b, h, j], den + w
                if torch.is_tensor(den) and den > 0:
                    out[b, h, i] = num / den
    return out


@pytest.mark.parametrize("act", ["relu", "elu"])
@pytest.mark.parametrize("cross,causal", [(False, False), (False, True), (True, False), (True, True)])
def test_equals_explicit_reweighted_formula_in_every_pattern(cross, causal, act):
    attn = CosformerAttention(E, H, cosformer_max_len=13, act_fun=act, chunk_size=3, causal=causal,
                              cross=cross).double()
    L, S = 7, (9 if cross else 7)
    q, k, v = _heads(2, H, L, DH, seed=1), _heads(2, H, S, DH, seed=2), _heads(2, H, S, DH, seed=3)
    kpm = torch.zeros(2, S, dtype=torch.bool)
    kpm[1, -2:] = True
    if not causal:
        kpm[0, :2] = True  # left padding: positions count the real tokens only
    offset = 3 if cross else S - L  # cross: queries continue after 3 earlier decoding steps
    got, weights = attn.attend(q, k, v, key_padding_mask=kpm, attn_mask=None, query_offset=offset, need_weights=False)
    assert weights is None
    want = slow_cosformer(q, k, v, act=act, causal=causal, cross=cross, max_len=13, query_offset=offset,
                          key_padding_mask=kpm)
    real_rows = slice(None) if cross else ~kpm  # self attention: padded query rows are meaningless
    torch.testing.assert_close(got.transpose(1, 2)[real_rows], want.transpose(1, 2)[real_rows], atol=1e-10,
                               rtol=1e-10)


@pytest.mark.parametrize("cross,causal", [(False, False), (False, True), (True, False), (True, True)])
def test_padding_is_honoured(cross, causal):
    """Padded keys carrying garbage change nothing (the reference ignored key_padding_mask)."""
    torch.manual_seed(0)
    attn = FSCosformerAttention(E, H, cosformer_max_len=32, causal=causal, cross=cross).eval()
    x = torch.randn(6, 1, E)
    src = torch.randn(5, 1, E) if cross else x
    want = attn(x, src, src, need_weights=False)[0]
    junk = torch.randn(3, 1, E) * 10
    if causal and not cross:  # future keys are invisible anyway: pad on the left (a left-padded prefix)
        padded = torch.cat([junk, src])
        kpm = torch.cat([torch.ones(1, 3), torch.zeros(1, src.size(0))], 1).bool()
        got = attn(padded, key_padding_mask=kpm, need_weights=False)[0][3:]
        ignored = attn(padded, need_weights=False)[0][3:]
    else:
        padded = torch.cat([src, junk])
        kpm = torch.cat([torch.zeros(1, src.size(0)), torch.ones(1, 3)], 1).bool()
        if cross:
            got = attn(x, padded, padded, key_padding_mask=kpm, need_weights=False)[0]
            ignored = attn(x, padded, padded, need_weights=False)[0]
        else:
            got = attn(padded, key_padding_mask=kpm, need_weights=False)[0][:6]
            ignored = attn(padded, need_weights=False)[0][:6]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(ignored, want, atol=1e-3), "the garbage keys should matter when not masked"


def test_decoding_positions_continue_and_match_the_full_forward():
    """The reference restarted query positions at every call, so decoding differed from the full forward."""
    torch.manual_seed(0)
    for causal in (False, True):
        attn = FSCosformerAttention(E, H, cosformer_max_len=10, cross=True, causal=causal).eval()
        x, src = torch.randn(8, 2, E), torch.randn(8, 2, E)
        full = attn(x, src, src, need_weights=False)[0]
        state, steps = {}, []
        for t in range(8):
            steps.append(attn(x[t : t + 1], src, src, incremental_state=state, static_kv=True, need_weights=False)[0])
        torch.testing.assert_close(torch.cat(steps), full, atol=1e-5, rtol=0)


def test_positions_beyond_max_len_raise_a_clear_error():
    attn = FSCosformerAttention(E, H, cosformer_max_len=8, causal=True)
    with pytest.raises(ValueError, match="cosformer-max-len"):
        x = torch.randn(9, 1, E)
        attn(x, x, x)
    state = {}
    x = torch.randn(8, 1, E)
    attn(x, x, x, incremental_state=state)  # 8 positions fit
    with pytest.raises(ValueError, match="at least 9"):
        attn(x[:1], x[:1], x[:1], incremental_state=state)
    noncausal = FSCosformerAttention(E, H, cosformer_max_len=8)  # noncausal self: M = the real length
    y = torch.randn(50, 1, E)
    assert torch.isfinite(noncausal(y, y, y)[0]).all()


def test_decoding_state_is_constant_size():
    attn = FSCosformerAttention(E, H, cosformer_max_len=64, causal=True).eval()
    state = {}
    for _ in range(5):
        x = torch.randn(1, 2, E)
        attn(x, x, x, incremental_state=state)
    buf = next(iter(state.values()))
    assert buf["cos_kv"].shape == (2, H, 2 * DH, DH) and buf["cos_k"].shape == (2, H, 2 * DH)
    assert "prev_key" not in buf and int(buf["cos_steps"][0]) == 5


def test_vdim_is_honoured_and_options_validated():
    attn = FSCosformerAttention(E, H, kdim=12, vdim=20, cross=True)
    assert attn.v_proj.in_features == 20 and attn.k_proj.in_features == 12
    out = attn(torch.randn(3, 2, E), torch.randn(5, 2, 12), torch.randn(5, 2, 20))[0]
    assert out.shape == (3, 2, E)
    with pytest.raises(ValueError, match="act_fun"):
        CosformerAttention(E, H, act_fun="gelu")
    with pytest.raises(ValueError, match="cosformer_max_len"):
        CosformerAttention(E, H, cosformer_max_len=0)


@pytest.mark.parametrize("offset", [0, -3, 2, 40])
def test_causal_op_gradcheck_without_scales(offset):
    g = torch.Generator().manual_seed(offset + 11)
    q = torch.rand(2, 2, 9, 4, dtype=torch.float64, generator=g).requires_grad_()
    k = torch.rand(2, 2, 7, 4, dtype=torch.float64, generator=g).requires_grad_()
    v = torch.randn(2, 2, 7, 3, dtype=torch.float64, generator=g).requires_grad_()
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[0, -3:] = True
    fn = lambda q, k, v: causal_linear_attention(q, k, v, query_offset=offset, key_padding_mask=kpm, eps=1e-6,
                                                 chunk_size=3)[0]
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("group", [4, 1024])
@pytest.mark.parametrize("causal", [True, False])
def test_mixed_features_equal_explicit_features_across_groups(monkeypatch, group, causal):
    """query_mix / key_mix (the sin/cos re-weighting applied block by block) equal the explicit 2d features, with
    the causal and noncausal ops split into several groups of positions (gradients included)."""
    import fluence_fairseq.ops.linear_attention as la
    monkeypatch.setattr(la, "GROUP", group)
    g = torch.Generator().manual_seed(7)
    q = torch.rand(2, 2, 19, 4, dtype=torch.float64, generator=g).requires_grad_()
    k = torch.rand(2, 2, 19, 4, dtype=torch.float64, generator=g).requires_grad_()
    v = torch.randn(2, 2, 19, 3, dtype=torch.float64, generator=g).requires_grad_()
    angle = torch.rand(2, 1, 19, 1, dtype=torch.float64, generator=g)
    mix = torch.cat([angle.sin(), angle.cos()], -1)
    kpm = torch.zeros(2, 19, dtype=torch.bool)
    kpm[1, :3] = True

    def explicit(q, k, v):
        feats = lambda x: torch.cat([x * angle.sin(), x * angle.cos()], -1)
        return la.linear_attention(feats(q), feats(k), v, causal=causal, key_padding_mask=kpm, eps=1e-6,
                                   chunk_size=3)

    def mixed(q, k, v):
        return la.linear_attention(q, k, v, causal=causal, key_padding_mask=kpm, eps=1e-6, chunk_size=3,
                                   query_mix=mix, key_mix=mix)

    torch.testing.assert_close(mixed(q, k, v), explicit(q, k, v))
    w = torch.randn(2, 2, 19, 3, dtype=torch.float64, generator=g)
    ga = torch.autograd.grad((mixed(q, k, v) * w).sum(), (q, k, v))
    gb = torch.autograd.grad((explicit(q, k, v) * w).sum(), (q, k, v))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(mixed, (q, k, v))


def _relu_case(causal, length, seed=3):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, length, 4, dtype=torch.float64, generator=g) for _ in range(3))
    q[0, 0, :3, :2] = 0.0  # relu's boundary: its gradient there is 0 (torch's convention) in both paths
    k[1, 1, 4, :] = 0.0
    angle = torch.rand(1, 1, length, 1, dtype=torch.float64, generator=g)
    mix = torch.cat([angle.sin(), angle.cos()], -1)
    kpm = torch.zeros(2, length, dtype=torch.bool)
    kpm[1, -5:] = True
    w = torch.randn(2, 2, length, 4, dtype=torch.float64, generator=g)
    kw = dict(causal=causal, key_padding_mask=kpm, eps=1e-6, chunk_size=4, query_mix=mix, key_mix=mix)
    return (q, k, v), w, kw


@pytest.mark.parametrize("length", [24, 26])  # 26: not whole chunks (the causal op then allocates as before)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("reuse", [False, True])
def test_op_applies_relu_itself_and_writes_gradients_over_its_inputs(monkeypatch, causal, length, reuse):
    """relu=True (the op makes the features a block at a time) equals relu before the op, outputs and gradients,
    across several groups; with reuse_inputs the gradients land in the inputs' own memory (whole chunks) and
    are the same numbers."""
    import fluence_fairseq.ops.linear_attention as la
    monkeypatch.setattr(la, "GROUP", 8)
    inputs, w, kw = _relu_case(causal, length)
    leaves = [t.clone().requires_grad_() for t in inputs]
    expected = la.linear_attention(F.relu(leaves[0]), F.relu(leaves[1]), leaves[2], **kw)
    expected_grads = torch.autograd.grad((expected * w).sum(), leaves)
    given = [t.clone().requires_grad_() for t in inputs]
    owned = [t * 1.0 for t in given]  # the op's own copies: nothing else reads them
    out = la.linear_attention(*owned, relu=True, reuse_inputs=reuse, **kw)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-13)
    grads = torch.autograd.grad((out * w).sum(), given)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    reused = reuse and (not causal or length % 4 == 0)
    # the causal op zeroes padded keys in a copy of k (its own), so the caller's k then stays as it was
    for copy, grad, original, written in zip(owned, grads, inputs, (reused, reused and not causal, reused)):
        # each input's memory now holds its gradient (reuse) or is untouched
        torch.testing.assert_close(copy.detach(), grad if written else original, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_reused_inputs_refuse_a_second_backward_and_shared_memory(causal):
    inputs, w, kw = _relu_case(causal, 24)
    given = [t.clone().requires_grad_() for t in inputs]
    out = linear_attention_op(*[t * 1.0 for t in given], relu=True, reuse_inputs=True, **kw)
    (out * w).sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        (out * w).sum().backward()  # the saved inputs now hold gradients: autograd must not read them again
    q = inputs[0].clone()
    with pytest.raises(ValueError, match="separate memories"):
        linear_attention_op(q, q, inputs[2].clone(), relu=True, reuse_inputs=True, **kw)
    with pytest.raises(ValueError, match="key_log_scale"):
        linear_attention_op(*[t.clone() for t in inputs], reuse_inputs=True,
                            key_log_scale=torch.zeros(2, 2, 24, dtype=torch.float64), **kw)


def test_relu_cosformer_writes_gradients_over_its_heads_only_in_a_whole_pass(monkeypatch):
    """The base marks the heads exclusive only around a whole pass without cache or memory: cosFormer then
    reuses them (and its parameter gradients equal those of the pass without reuse); decoding steps and
    streaming segments never write over what their cache keeps."""
    import fluence_fairseq.ops.linear_attention as la
    seen = []
    op = la.linear_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("reuse_inputs"))
        return op(*args, **kwargs)

    monkeypatch.setattr("fluence_fairseq.modules.cosformer.linear_attention", spy)
    torch.manual_seed(0)
    attn = FSCosformerAttention(E, H, causal=True, cosformer_max_len=64, chunk_size=4).double()
    x = torch.randn(8, 2, E, dtype=torch.float64)
    grads = []
    for exclusive in (True, False):
        attn.zero_grad()
        if not exclusive:  # the same pass through attend with the flag off
            monkeypatch.setattr(type(attn), "heads_exclusive", property(lambda self: False, lambda self, v: None))
        attn(x)[0].pow(2).sum().backward()
        grads.append([p.grad.clone() for p in attn.parameters()])
    assert seen == [True, False]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert attn.heads_exclusive is False
    monkeypatch.undo()
    attn = FSCosformerAttention(E, H, causal=True, cosformer_max_len=64, chunk_size=4)
    flags = []
    real_attend = type(attn).attend
    monkeypatch.setattr(type(attn), "attend", lambda self, *a, **k: flags.append(self.heads_exclusive)
                        or real_attend(self, *a, **k))
    attn(torch.randn(8, 2, E))
    state = {}
    attn(torch.randn(1, 2, E), incremental_state=state)  # a decoding step: attend_incremental, never exclusive
    assert flags == [True] and attn.heads_exclusive is False


@pytest.mark.parametrize("scaled", [False, True])
def test_causal_backward_over_many_groups(monkeypatch, scaled):
    """Backward runs group by group from the states kept at each group's entry and never recomputes the output:
    with 11 groups the gradients are those of one group (key log scales, padding, an offset, to float64
    rounding), and a second backward through a retained graph gives the same numbers (gradcheck needs it)."""
    import fluence_fairseq.ops.linear_attention as la
    g = torch.Generator().manual_seed(5)
    q = torch.rand(2, 2, 20, 4, dtype=torch.float64, generator=g).requires_grad_()
    k = torch.rand(2, 2, 22, 4, dtype=torch.float64, generator=g).requires_grad_()
    v = torch.randn(2, 2, 22, 3, dtype=torch.float64, generator=g).requires_grad_()
    c = (3 * torch.randn(2, 2, 22, dtype=torch.float64, generator=g)).requires_grad_() if scaled else None
    kpm = torch.zeros(2, 22, dtype=torch.bool)
    kpm[0, -3:] = True
    w = torch.randn(2, 2, 20, 3, dtype=torch.float64, generator=g)
    leaves = (q, k, v) + ((c,) if scaled else ())

    def grads(group):
        monkeypatch.setattr(la, "GROUP", group)
        out = causal_linear_attention(q, k, v, query_offset=2, key_log_scale=c, key_padding_mask=kpm, eps=1e-6,
                                      chunk_size=2)[0]
        first = torch.autograd.grad((out * w).sum(), leaves, retain_graph=True)
        second = torch.autograd.grad((out * w).sum(), leaves)
        for a, b in zip(first, second):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        return first

    for a, b in zip(grads(2), grads(64)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
