"""Softmax attention under attention dropout in query blocks (ops.softmax_dropout): the plain computation under the
same masks, the masks drawn again in backward, nothing of size (Lq, Lk) kept, and when band_attention takes it."""
import pytest
import torch
import torch.nn.functional as F

import fluence_fairseq.ops.softmax_dropout as ops
from fluence_fairseq.ops.band import band_attention
from fluence_fairseq.ops.softmax_dropout import blocked_softmax_dropout


def _case(causal, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H, Lq, D = 2, 3, 70, 8
    Lk = Lq + 9 if causal else 83
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64).requires_grad_() for n in (Lq, Lk, Lk))
    kpm = torch.zeros(B, Lk, dtype=torch.bool)
    kpm[1, -6:] = True
    if not causal:
        kpm[0, :] = True  # every key padded: a uniform row, as the fused kernel gives
        kpm[0, 3] = False
    slopes = torch.tensor([0.5, 0.25, 0.125], dtype=torch.float64)

    def alibi(rel):
        return -slopes.view(-1, 1, 1) * rel.abs().to(torch.float64)

    attn_mask = torch.randn(Lq, Lk, generator=g, dtype=torch.float64) * 0.3
    w = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64)
    offset = Lk - Lq if causal else 0
    return (q, k, v), w, dict(causal=causal, query_offset=offset, key_padding_mask=kpm, attn_mask=attn_mask,
                              bias=alibi)


def _reference_scores(q, k, causal, query_offset, key_padding_mask, attn_mask, bias):
    """The fused kernel's problem: scores with the bias and mask added, disallowed entries at the most negative
    float."""
    Lq, Lk = q.size(2), k.size(2)
    scores = torch.matmul(q * q.size(-1) ** -0.5, k.transpose(-1, -2))
    rel = torch.arange(Lq).view(-1, 1) + query_offset - torch.arange(Lk).view(1, -1)
    scores = scores + bias(rel) + attn_mask
    disallowed = key_padding_mask.view(-1, 1, 1, Lk)
    if causal:
        disallowed = disallowed | (rel < 0).view(1, 1, Lq, Lk)
    return scores.masked_fill(disallowed, torch.finfo(scores.dtype).min)


@pytest.mark.parametrize("causal", [False, True])
def test_blocks_equal_the_plain_computation_under_the_same_masks_drawn_again_in_backward(causal, monkeypatch):
    """Output and the gradients of q, k and v equal ``(softmax(scores) * mask) @ v`` under the masks the blocks
    drew (float64, several blocks, causal with more keys than queries, padding with a row whose keys are all
    padding, ALiBi, an additive mask); backward draws each block's mask again, the same numbers; about the
    dropout rate of the entries is dropped."""
    monkeypatch.setattr(ops, "BLOCK_ELEMENTS", 2 * 3 * 16 * 83)  # blocks of 16 rows (fewer where causal sees less)
    drawn = []
    draw = ops.dropout_keep_mask
    monkeypatch.setattr(ops, "dropout_keep_mask", lambda shape, p, seed, like: drawn.append((seed, draw(shape, p, seed,
                                                                                                           like))) or
                        drawn[-1][1])
    inputs, w, kwargs = _case(causal)
    out = blocked_softmax_dropout(*inputs, dropout_p=0.3, seed=5, **kwargs)
    forward = list(drawn)
    grads = torch.autograd.grad((out * w).sum(), inputs)
    assert len(forward) >= 5 and [s for s, _ in drawn[len(forward):]] == [s for s, _ in forward]
    for (_, a), (_, b) in zip(forward, drawn[len(forward):]):
        assert torch.equal(a, b)
    q, k, v = inputs
    mask = torch.zeros(2, 3, q.size(2), k.size(2), dtype=torch.float64)
    problem = ops._Problem(q, k, causal, kwargs["query_offset"], None, None, None)
    for (start, end, keys), (_, kept) in zip(problem.blocks, forward):
        mask[:, :, start:end, :keys] = kept
    # the keys no block scores are in each of its rows' future: probability 0 there, whatever the mask
    ref = torch.matmul(torch.softmax(_reference_scores(q, k, **kwargs), dim=-1) * mask, v)
    ref_grads = torch.autograd.grad((ref * w).sum(), inputs)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    dropped = float(torch.cat([kept.flatten() for _, kept in forward]).eq(0).double().mean())
    assert 0.27 < dropped < 0.33


def test_without_dropout_the_blocks_give_the_fused_kernels_numbers(monkeypatch):
    """At dropout 0 (every mask 1) the blocks equal ``F.scaled_dot_product_attention`` on the same problem, the
    uniform row of a query whose keys are all padding included."""
    monkeypatch.setattr(ops, "BLOCK_ELEMENTS", 2 * 3 * 16 * 83)
    for causal in (False, True):
        inputs, w, kwargs = _case(causal)
        q, k, v = inputs
        out = blocked_softmax_dropout(q, k, v, dropout_p=0.0, **kwargs)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=_reference_scores(q, k, **kwargs) - torch.matmul(
            q * q.size(-1) ** -0.5, k.transpose(-1, -2)))
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_gradcheck_through_the_redrawn_masks(monkeypatch):
    monkeypatch.setattr(ops, "BLOCK_ELEMENTS", 1 * 2 * 4 * 13)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 11, 3, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    for causal in (False, True):
        torch.autograd.gradcheck(lambda *t: blocked_softmax_dropout(*t, dropout_p=0.4, causal=causal, seed=3),
                                 (q, k, v))


def test_only_q_k_v_and_a_number_per_row_are_kept_for_backward(monkeypatch):
    monkeypatch.setattr(ops, "BLOCK_ELEMENTS", 1 << 12)
    q, k, v = (torch.randn(1, 2, 128, 8, requires_grad=True) for _ in range(3))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = blocked_softmax_dropout(q, k, v, dropout_p=0.1, causal=True)
    assert saved and max(torch.Size(s).numel() for s in saved) <= 2 * 128 * 8
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_bad_arguments_are_refused():
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        blocked_softmax_dropout(q, q, q, dropout_p=1.0, causal=False)
    with pytest.raises(ValueError, match="query_offset must be >= 0"):
        blocked_softmax_dropout(q, q, q, dropout_p=0.1, causal=True, query_offset=-1)


def test_band_attention_takes_the_blocks_for_long_dropout_on_the_cpu_only(monkeypatch):
    """With attention dropout on the CPU, from FROM_ELEMENTS probabilities, with no bias that needs a gradient and
    no causal query seeing only padding: the blocks; otherwise the fused kernel's call."""
    import fluence_fairseq.ops.band as band

    calls = []
    monkeypatch.setattr(band, "blocked_softmax_dropout", lambda *a, **kw: calls.append(kw) or a[0])
    monkeypatch.setattr(ops, "FROM_ELEMENTS", 2 * 2 * 64 * 64)
    monkeypatch.setattr(ops, "NONCAUSAL_FROM_ELEMENTS", 2 * 2 * 64 * 64 + 1)
    q = torch.randn(2, 2, 64, 8)
    kpm = torch.zeros(2, 64, dtype=torch.bool)
    band_attention(q, q, q, query_offset=0, right=0, dropout_p=0.1, key_padding_mask=kpm)
    assert len(calls) == 1 and calls[0]["causal"] and calls[0]["dropout_p"] == 0.1
    band_attention(q, q, q, query_offset=0, dropout_p=0.1)  # noncausal: from its own, larger number
    assert len(calls) == 1
    monkeypatch.setattr(ops, "NONCAUSAL_FROM_ELEMENTS", 2 * 2 * 64 * 64)
    band_attention(q, q, q, query_offset=0, dropout_p=0.1)
    assert len(calls) == 2 and not calls[1]["causal"]
    band_attention(q, q, q, query_offset=0, dropout_p=0.0)  # no dropout
    band_attention(q[:, :, :32], q, q, query_offset=0, dropout_p=0.1)  # fewer probabilities
    kpm[0, 0] = True  # query 0 of the causal pattern sees only padding
    band_attention(q, q, q, query_offset=0, right=0, dropout_p=0.1, key_padding_mask=kpm)
    learned = torch.zeros(2, requires_grad=True)
    band_attention(q, q, q, query_offset=0, right=0, dropout_p=0.1,
                   rel_bias=lambda rel: learned.view(-1, 1, 1) * rel.abs())  # a bias with a gradient
    band_attention(q.double(), q.double(), q.double(), query_offset=0, dropout_p=0.1)  # float64: blocks
    band_attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), query_offset=0, dropout_p=0.1)  # bf16: the kernel
    assert len(calls) == 3


def test_softmax_attention_trains_with_the_blocks_unbiased(monkeypatch):
    """The softmax attention in training with attention dropout takes the blocks, and the mean of 100 outputs is
    within 6 standard errors of its output without dropout at each value (dropout without 1 / (1 - p): far
    outside)."""
    from fluence_fairseq import FSSoftmaxAttention

    monkeypatch.setattr(ops, "FROM_ELEMENTS", 1 << 14)
    torch.manual_seed(0)
    attn = FSSoftmaxAttention(16, 2, dropout=0.3, causal=True).double()
    x = torch.randn(64, 2, 16, dtype=torch.float64)
    problems = []
    real = ops._BlockedSoftmaxDropout.apply
    monkeypatch.setattr(ops._BlockedSoftmaxDropout, "apply", lambda *a: problems.append(a[3]) or real(*a))
    attn.eval()
    with torch.no_grad():
        reference = attn(x, x, x, need_weights=False)[0]
        attn.train()
        outs = torch.stack([attn(x, x, x, need_weights=False)[0] for _ in range(100)])
    assert len(problems) == 100
    standard_error = outs.std(dim=0) / 10
    assert float(standard_error.max()) > 0.01
    assert bool(((outs.mean(dim=0) - reference).abs() <= 6 * standard_error + 1e-9).all())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-7), (torch.float64, 1e-15)])
def test_shifted_exponentials_in_base_two_equal_exp_and_zero_the_disallowed(dtype, tol):
    """``_exp_shifted`` (``exp2`` of the shifted scores times log2 e, in place) against ``torch.exp``: within
    ``tol`` absolutely on exponents from -40 to 0, exactly 1 at the row maximum, exactly 0 where a score sits at the
    most negative float (the causal future, padding), and written over its input."""
    gen = torch.Generator().manual_seed(0)
    shift = torch.linspace(-2, 2, 6, dtype=dtype).view(6, 1)
    scores = (torch.rand(6, 300, generator=gen, dtype=torch.float64) * 40 - 40).to(dtype) + shift
    scores[:, :1] = shift  # each row's maximum
    scores[:, 5::7] = torch.finfo(dtype).min
    want = torch.exp(scores.double() - shift.double())
    out = ops._exp_shifted(scores, shift)
    assert out.data_ptr() == scores.data_ptr() and out.dtype == dtype
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=0)
    assert (out[:, 0] == 1).all() and (out[:, 5::7] == 0).all() and (out >= 0).all()
