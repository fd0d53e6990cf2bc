"""ProbSparse attention (Informer): an explicit loop reference, determinism, padding, exactness (the contract runs
from the registry, in tests/modules/test_contract.py)."""
import math

import pytest
import torch

from attention_contract import B, E, _call, _decode, _randn, assert_weightless_path_matches_explicit
from fluence_fairseq.modules import FSProbSparse, FSSoftmax
from fluence_fairseq.modules.attention_base import UnsupportedPatternError
from fluence_fairseq.ops.probsparse import sample_keys

HEADS = 4


# ------------------------------------------------------------------------------------ slow reference
def _count(n, factor):
    return max(1, min(n, factor * math.ceil(math.log(n))))


def slow_probsparse(attn, x, src, key_padding_mask, factor):
    """ProbSparse with loops: eval sample ranks floor((t + 1/2) n / U) among the real keys, M over them with the
    sample mean, top-u real queries exact, the rest the mean of the real values. x: (L, B, E), src: (S, B, E)."""
    cross = src is not None
    src = x if src is None else src
    L, S, d = x.size(0), src.size(0), attn.head_dim
    out = torch.zeros(L, x.size(1), E, dtype=torch.float64)
    W = {n: (getattr(attn, n).weight.double(), getattr(attn, n).bias.double()) for n in ("q_proj", "k_proj", "v_proj")}
    for b in range(x.size(1)):
        keys = [j for j in range(S) if key_padding_mask is None or not key_padding_mask[b, j]]
        queries = list(range(L)) if cross else keys
        n, m = len(keys), len(queries)
        U, u = _count(n, factor), _count(m, factor)
        sampled = [keys[((2 * t + 1) * n) // (2 * U)] for t in range(U)]
        q_all = x[:, b].double() @ W["q_proj"][0].t() + W["q_proj"][1]
        k_all = src[:, b].double() @ W["k_proj"][0].t() + W["k_proj"][1]
        v_all = src[:, b].double() @ W["v_proj"][0].t() + W["v_proj"][1]
        for h in range(HEADS):
            cols = slice(h * d, (h + 1) * d)
            q, k, v = q_all[:, cols], k_all[:, cols], v_all[:, cols]
            score = {}
            for i in queries:
                dots = [float(q[i] @ k[s]) for s in sampled]
                score[i] = max(dots) - sum(dots) / U
            top = sorted(queries, key=lambda i: -score[i])[:u]
            mean = sum(v[j] for j in keys) / n
            for i in queries:
                if i in top:
                    logits = torch.stack([q[i] @ k[j] / math.sqrt(d) for j in keys])
                    p = torch.softmax(logits, 0)
                    out[i, b, cols] = sum(p[t] * v[j] for t, j in enumerate(keys))
                else:
                    out[i, b, cols] = mean
    return out.float() @ attn.out_proj.weight.t() + attn.out_proj.bias


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_equals_slow_reference_in_eval(cross):
    torch.manual_seed(0)
    attn = FSProbSparse(E, HEADS, factor=1, cross=cross).eval()
    L, S = 23, 19 if cross else 23
    x = _randn(L, 3, E, seed=1)
    src = _randn(S, 3, E, seed=2) if cross else None
    kpm = torch.zeros(3, S, dtype=torch.bool)
    kpm[1, -5:] = True
    kpm[2, :7] = True
    kv = x if src is None else src
    got = attn(query=x, key=kv, value=kv, key_padding_mask=kpm, need_weights=False)[0]
    with torch.no_grad():
        want = slow_probsparse(attn, x, src, kpm, factor=1)
    real = torch.ones(L, 3, dtype=torch.bool) if cross else ~kpm.t()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
    # the method is really sparse here: some queries output the mean, so it is not softmax attention
    exact = FSSoftmax(E, HEADS, cross=cross).eval()
    exact.load_state_dict(attn.state_dict())
    assert not torch.allclose(got, exact(query=x, key=kv, value=kv, key_padding_mask=kpm)[0], atol=1e-3)


def test_eval_deterministic_across_calls_and_batch_compositions():
    torch.manual_seed(0)
    attn = FSProbSparse(E, HEADS, factor=1).eval()
    sentence = _randn(30, 1, E, seed=3)
    alone = _call(attn, sentence)
    torch.testing.assert_close(_call(attn, sentence), alone, atol=0, rtol=0)
    # the same sentence in a batch, right- and left-padded next to longer and shorter sentences
    others = _randn(45, 2, E, seed=4)
    x = torch.cat([torch.cat([sentence, _randn(15, 1, E, seed=5)]), others], 1)
    kpm = torch.zeros(3, 45, dtype=torch.bool)
    kpm[0, 30:] = True
    kpm[2, :20] = True
    got = attn(query=x, key=x, value=x, key_padding_mask=kpm, need_weights=False)[0]
    torch.testing.assert_close(got[:30, :1], alone, atol=1e-5, rtol=0)
    x_left = torch.cat([_randn(15, 1, E, seed=6), sentence])
    left = torch.zeros(1, 45, dtype=torch.bool)
    left[0, :15] = True
    got_left = attn(query=x_left, key=x_left, value=x_left, key_padding_mask=left, need_weights=False)[0]
    torch.testing.assert_close(got_left[15:], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_large_factor_is_softmax_attention(cross):
    torch.manual_seed(0)
    attn = FSProbSparse(E, HEADS, factor=100, cross=cross).eval()  # u >= L and U >= S: every query is exact
    exact = FSSoftmax(E, HEADS, cross=cross).eval()
    exact.load_state_dict(attn.state_dict())
    x = _randn(17, 3, E, seed=1)
    kv = _randn(13, 3, E, seed=2) if cross else x
    kpm = torch.zeros(3, kv.size(0), dtype=torch.bool)
    kpm[0, -4:] = True
    kpm[2, :3] = True
    got, w = attn(query=x, key=kv, value=kv, key_padding_mask=kpm, need_head_weights=True)
    want, w_want = exact(query=x, key=kv, value=kv, key_padding_mask=kpm, need_head_weights=True)
    real = torch.ones(17, 3, dtype=torch.bool) if cross else ~kpm.t()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(w.permute(2, 1, 0, 3)[real], w_want.permute(2, 1, 0, 3)[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_padded_keys_do_not_affect_outputs(cross):
    torch.manual_seed(0)
    attn = FSProbSparse(E, HEADS, factor=1, cross=cross).eval()
    x = _randn(25, 2, E, seed=1)
    kv = _randn(21, 2, E, seed=2) if cross else x
    kpm = torch.zeros(2, kv.size(0), dtype=torch.bool)
    kpm[0, -6:] = True
    kpm[1, :4] = True
    kv2 = kv.clone()
    kv2[kpm.t()] = _randn(int(kpm.sum()), E, seed=3) * 100
    x2 = x if cross else kv2
    out = attn(query=x, key=kv, value=kv, key_padding_mask=kpm, need_weights=False)[0]
    out2, w = attn(query=x2, key=kv2, value=kv2, key_padding_mask=kpm, need_head_weights=True)
    real = torch.ones(25, 2, dtype=torch.bool) if cross else ~kpm.t()
    torch.testing.assert_close(out2[real], out[real], atol=1e-5, rtol=0)
    assert (w.permute(1, 0, 2, 3)[kpm.view(2, 1, 1, -1).expand_as(w.permute(1, 0, 2, 3))] == 0).all()
    torch.testing.assert_close(w.sum(-1)[:, real.t()], torch.ones(HEADS, int(real.sum())), atol=1e-5, rtol=0)


def test_eval_sample_is_strided_over_real_keys_and_training_sample_random():
    kpm = torch.zeros(2, 40, dtype=torch.bool)
    kpm[1, :10] = True  # 30 real keys: U = ceil(ln 30) * 2 = 8
    index, size = sample_keys(kpm, 2, HEADS, 40, 2, random=False, device=torch.device("cpu"))
    assert size.tolist() == [8, 8]
    assert index[1, 0, :8].tolist() == [10 + (2 * t + 1) * 30 // 16 for t in range(8)]
    assert (index[:, :1] == index).all(), "the eval sample is the same for every head"
    torch.manual_seed(0)
    a, _ = sample_keys(kpm, 2, HEADS, 40, 2, random=True, device=torch.device("cpu"))
    b, _ = sample_keys(kpm, 2, HEADS, 40, 2, random=True, device=torch.device("cpu"))
    assert not torch.equal(a, b) and not (a[:, :1] == a).all()
    assert (a[1] >= 10).all(), "padded keys must never be sampled"
    assert all(len(set(row.tolist())) == row.numel() for row in a.reshape(-1, a.size(-1))), "distinct keys"


def test_training_selection_is_random_and_eval_is_not():
    torch.manual_seed(0)
    attn = FSProbSparse(E, HEADS, factor=1).train()  # dropout 0: only the key sample is random
    x = _randn(64, 2, E, seed=1)
    torch.manual_seed(1)
    a = _call(attn, x)
    b = _call(attn, x)
    assert not torch.allclose(a, b, atol=1e-4), "training must draw a new key sample each call"
    torch.manual_seed(1)
    torch.testing.assert_close(_call(attn, x), a, atol=0, rtol=0)  # the global RNG drives it
    attn.eval()
    torch.testing.assert_close(_call(attn, x), _call(attn, x), atol=0, rtol=0)


def test_dropout_applies_to_selected_probabilities_in_training_only():
    torch.manual_seed(0)
    attn = FSProbSparse(E, HEADS, dropout=0.5, factor=100)
    x = _randn(12, 2, E, seed=1)
    evaluated = _call(attn.eval(), x)
    assert not torch.allclose(_call(attn.train(), x), evaluated, atol=1e-4)
    torch.testing.assert_close(_call(attn.eval(), x), evaluated, atol=0, rtol=0)


@pytest.mark.parametrize("factor", [0, -2, 2.5, True, "5"])
def test_factor_validation(factor):
    with pytest.raises(ValueError, match="factor must be an integer >= 1"):
        FSProbSparse(E, HEADS, factor=factor)


def test_causal_patterns_refused():
    for cross in (False, True):
        with pytest.raises(UnsupportedPatternError, match="noncausal self, noncausal cross"):
            FSProbSparse(E, HEADS, causal=True, cross=cross)


def test_single_query_decoding_step_is_exact_attention():
    """fairseq feeds one query per cross-attention call: u = 1 of 1, so that query gets exact attention."""
    torch.manual_seed(0)
    attn = FSProbSparse(E, HEADS, factor=1, cross=True).eval()
    exact = FSSoftmax(E, HEADS, cross=True).eval()
    exact.load_state_dict(attn.state_dict())
    x, src = _randn(6, 2, E, seed=1), _randn(30, 2, E, seed=2)
    kpm = torch.zeros(2, 30, dtype=torch.bool)
    kpm[1, -9:] = True
    got, _ = _decode(attn, x, src, [1] * 6, key_padding_mask=kpm)
    want = exact(query=x, key=src, value=src, key_padding_mask=kpm, need_weights=False)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_fused_path_for_selected_queries_equals_the_explicit_one():
    """Without weights or dropout the selected queries attend through the fused kernel (no (u, S) probabilities
    kept for backward); outputs and gradients must equal the explicit softmax path's, with key padding."""
    torch.manual_seed(0)
    attn = FSProbSparse(E, HEADS, factor=2).double().eval()
    x = torch.randn(40, B, E, dtype=torch.float64)
    pad = torch.zeros(B, 40, dtype=torch.bool)
    pad[1, 30:] = True
    assert_weightless_path_matches_explicit(attn, x, pad)


@pytest.mark.parametrize("need_weights", [False, True])
def test_calls_whose_every_query_is_selected_skip_the_ranking_and_equal_it(need_weights, monkeypatch):
    """With no more queries than u = factor * ceil(ln L) (a decoding step's one, a short target) every query is
    selected: nothing is ranked, gathered or scattered, and the output, the weights and the gradients equal the
    ranked computation's (the same selection through the general path), a row without real keys the mean."""
    from fluence_fairseq.ops import probsparse as ops
    g = torch.Generator().manual_seed(0)
    bsz, heads, tgt_len, src_len, dim = 3, 2, 4, 20, 8
    leaves = [torch.randn(bsz, heads, n, dim, generator=g, dtype=torch.float64).requires_grad_()
              for n in (tgt_len, src_len, src_len)]
    kpm = torch.zeros(bsz, src_len, dtype=torch.bool)
    kpm[1, 12:] = True
    kpm[2] = True  # no real key
    sample, size = sample_keys(kpm, bsz, heads, src_len, 5, random=False, device="cpu")
    assert ops.sample_count(tgt_len, 5) == tgt_len

    def run(query_padding_mask):
        out, weights = ops.probsparse_attention(*leaves, sample=sample, sample_size=size, key_padding_mask=kpm,
                                                query_padding_mask=query_padding_mask, factor=5,
                                                need_weights=need_weights)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
        return [out.detach(), None if weights is None else weights.detach(), *torch.autograd.grad(loss, leaves)]

    ranked = []
    rank = ops._top_queries
    monkeypatch.setattr(ops, "_top_queries", lambda *a: ranked.append(1) or rank(*a))
    fast = run(None)
    assert ranked == []
    general = run(torch.zeros(bsz, tgt_len, dtype=torch.bool))
    assert ranked == [1]
    for got, want in zip(fast, general):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert torch.equal(fast[0][2], torch.zeros(heads, tgt_len, dim, dtype=torch.float64))
