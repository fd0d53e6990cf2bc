"""LocalAttention: the shared contract (dense and narrow-band kernels), the window semantics against an explicit
masked-softmax reference, exactness where the window covers the sequence, padding, the bounded decoding cache."""
import pytest
import torch

import fluence_fairseq.ops.band as band
from attention_contract import AttentionContract, Case
from attention_reference import heads
from fluence_fairseq.modules import FSLocalAttention, FSSoftmax, LocalAttention

E, H = 32, 4


class TestLocalContract(AttentionContract):
    """A window of 3 on 11 tokens: most keys are outside every window (the dense path runs at this size)."""

    case = Case("local", lambda **kw: FSLocalAttention(E, H, wsize=3, **kw), tgt_len=11)


class TestLocalNarrowKernelContract(AttentionContract):
    """The same contract through the narrow-band kernel that long sequences use (forced at every size)."""

    case = Case("local", lambda **kw: FSLocalAttention(E, H, wsize=3, **kw), tgt_len=23)

    @pytest.fixture(autouse=True)
    def _narrow_kernel_everywhere(self, monkeypatch):
        monkeypatch.setattr(band, "_DENSE_PAIRS", 0)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _build(wsize, causal, seed=0):
    torch.manual_seed(seed)
    return FSLocalAttention(E, H, wsize=wsize, causal=causal).eval()


def window_reference(attn, x, *, wsize, causal, key_padding_mask=None, attn_mask=None):
    """Softmax over an explicit (L, L) window mask, one query row at a time (slow, obviously right)."""
    length, bsz, _ = x.shape
    q = heads(attn, attn.q_proj(x)) * attn.head_dim**-0.5
    k, v = heads(attn, attn.k_proj(x)), heads(attn, attn.v_proj(x))
    rows = []
    for i in range(length):
        lo, hi = (i - wsize + 1, i) if causal else (i - wsize, i + wsize)
        allowed = torch.tensor([lo <= j <= hi for j in range(length)])
        allowed = allowed.view(1, length).expand(bsz, length)
        if key_padding_mask is not None:
            allowed = allowed & ~key_padding_mask  # `|` of the masked sets: padding never leaks
        scores = torch.einsum("bhd,bhjd->bhj", q[:, :, i], k)
        if attn_mask is not None:
            scores = scores + attn_mask[i]
        scores = scores.masked_fill(~allowed.view(bsz, 1, length), torch.finfo(scores.dtype).min)
        rows.append(torch.einsum("bhj,bhjd->bhd", scores.softmax(-1), v))
    out = torch.stack(rows, 2)  # (B, H, L, Dh)
    return attn.out_proj(out.permute(2, 0, 1, 3).reshape(length, bsz, E))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("narrow", [False, True], ids=["dense-kernel", "narrow-kernel"])
def test_equals_explicit_window_reference_with_padding_and_gradients(causal, narrow, monkeypatch):
    if narrow:
        monkeypatch.setattr(band, "_DENSE_PAIRS", 0)
    wsize, length = 4, 29
    attn = _build(wsize, causal)
    x = _randn(length, 2, E, seed=1).requires_grad_(True)
    kpm = torch.zeros(2, length, dtype=torch.bool)
    kpm[1, -5:] = True  # right padding: real queries near the end have padded keys in their window
    if not causal:
        kpm[0, :3] = True  # left padding
    got = attn(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
    want = window_reference(attn, x, wsize=wsize, causal=causal, key_padding_mask=kpm)
    real = ~kpm.t()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
    weights = _randn(*got.shape, seed=2) * real.unsqueeze(-1)
    grad_got = torch.autograd.grad((got * weights).sum(), [x] + list(attn.parameters()))
    grad_want = torch.autograd.grad((want * weights).sum(), [x] + list(attn.parameters()))
    for g, w in zip(grad_got, grad_want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_attn_mask_is_added_on_top_of_the_window(causal, monkeypatch):
    monkeypatch.setattr(band, "_DENSE_PAIRS", 0)
    wsize, length = 3, 20
    attn = _build(wsize, causal)
    x = _randn(length, 2, E, seed=3)
    mask = _randn(length, length, seed=4)
    mask[5:9, 4:6] = float("-inf")  # forbid some in-window keys; every row keeps one
    got = attn(x, x, x, attn_mask=mask, need_weights=False)[0]
    want = window_reference(attn, x, wsize=wsize, causal=causal, attn_mask=mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_equals_softmax_when_the_window_covers_the_sequence(causal):
    length = 12
    local = _build(length if causal else length - 1, causal)  # the smallest window that still sees every key
    softmax = FSSoftmax(E, H, causal=causal).eval()
    softmax.load_state_dict(local.state_dict())
    x = _randn(length, 3, E, seed=5)
    kpm = torch.zeros(3, length, dtype=torch.bool)
    kpm[2, -4:] = True
    for mask in (None, kpm):
        torch.testing.assert_close(
            local(x, x, x, key_padding_mask=mask, need_weights=False)[0],
            softmax(x, x, x, key_padding_mask=mask, need_weights=False)[0], atol=1e-6, rtol=0)
    # one token less and the first/last queries lose a key: no longer softmax
    narrower = _build(length - 1 if causal else length - 2, causal)
    narrower.load_state_dict(local.state_dict())
    assert not torch.allclose(narrower(x, x, x, need_weights=False)[0], softmax(x, x, x, need_weights=False)[0],
                              atol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("narrow", [False, True], ids=["dense-kernel", "narrow-kernel"])
def test_padded_keys_never_change_real_outputs(causal, narrow, monkeypatch):
    """The reference AND-ed the padding mask with the window mask, so padding leaked (0.69 on a real token)."""
    if narrow:
        monkeypatch.setattr(band, "_DENSE_PAIRS", 0)
    wsize, n, pad = 5, 17, 6
    attn = _build(wsize, causal)
    real = _randn(n, 1, E, seed=6)
    want = attn(real, real, real, need_weights=False)[0]
    sides = ["right"] if causal else ["right", "left"]  # causal left padding: early queries see only padding
    for side in sides:
        for seed in (7, 8):
            junk = _randn(pad, 1, E, seed=seed) * 100
            x = torch.cat([real, junk]) if side == "right" else torch.cat([junk, real])
            kpm = torch.zeros(1, n + pad, dtype=torch.bool)
            kpm[0, n:] = side == "right"
            kpm[0, :pad] = side == "left"
            got = attn(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
            got = got[:n] if side == "right" else got[pad:]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_need_weights_are_banded():
    wsize, length = 3, 10
    for causal in (False, True):
        attn = _build(wsize, causal)
        x = _randn(length, 2, E, seed=9)
        _, weights = attn(x, x, x, need_head_weights=True)  # (H, B, L, L)
        rel = torch.arange(length).unsqueeze(1) - torch.arange(length)
        inside = (rel >= 0) & (rel < wsize) if causal else rel.abs() <= wsize
        assert torch.all(weights[..., ~inside] == 0)
        assert torch.all(weights[..., inside] > 0)
        torch.testing.assert_close(weights.sum(-1), torch.ones(H, 2, length))


@pytest.mark.parametrize("narrow", [False, True], ids=["dense-kernel", "narrow-kernel"])
def test_decoding_cache_holds_at_most_wsize_keys(narrow, monkeypatch):
    if narrow:
        monkeypatch.setattr(band, "_DENSE_PAIRS", 0)
    wsize, length = 4, 40
    attn = _build(wsize, causal=True)
    x = _randn(length, 2, E, seed=10)
    full = attn(x, x, x, need_weights=False)[0]
    state, outs, t = {}, [], 0
    for size in [1, 1, 3, 1, 5, 2] * 10:
        if t >= length:
            break
        piece = x[t : t + size]
        outs.append(attn(piece, piece, piece, incremental_state=state, need_weights=False)[0])
        t += piece.size(0)
        (buffer,) = state.values()
        assert buffer["prev_key"].shape == (2, H, min(t, wsize), E // H)
        assert buffer["prev_value"].shape == buffer["prev_key"].shape
    torch.testing.assert_close(torch.cat(outs), full, atol=1e-5, rtol=0)
    assert attn.max_cached_keys() == wsize


@pytest.mark.parametrize("bad", [0, -3, 2.5, "15", True, None])
def test_wsize_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="wsize must be an integer >= 1"):
        LocalAttention(E, H, wsize=bad)


def test_cross_attention_is_refused_with_the_pattern_error():
    from fluence_fairseq.modules.attention_base import UnsupportedPatternError

    with pytest.raises(UnsupportedPatternError, match="noncausal self, causal self"):
        FSLocalAttention(E, H, cross=True)
    with pytest.raises(UnsupportedPatternError):
        FSLocalAttention(E, H, encoder_decoder_attention=True, causal=True)


def test_registry_entry_builds_with_the_window_option():
    from fluence_fairseq.modules.registry import get_attention

    spec = get_attention("local")
    attn = spec.build(64, 4, causal=True, **spec.tiny)
    assert isinstance(attn, FSLocalAttention) and attn.wsize == spec.tiny["wsize"]
    assert {o.name: o.default for o in spec.options} == {"wsize": 15}


@pytest.mark.parametrize("causal", [False, True])
def test_a_whole_pass_frees_the_heads_and_gives_the_same_gradients(causal, monkeypatch):
    """In a whole pass the narrow kernel frees q, k and v once copied and recomputes its probabilities in
    backward (``heads_exclusive``): the base reads nothing freed, and outputs and gradients equal those of the
    same pass with the flag off, to float64 rounding (padding, dropout, ALiBi)."""
    monkeypatch.setattr(band, "_DENSE_PAIRS", 0)
    freed = []
    real = band.free_memory
    monkeypatch.setattr(band, "free_memory", lambda *ts: freed.append(len(ts)) or real(*ts))
    torch.manual_seed(0)
    attn = FSLocalAttention(E, H, wsize=3, causal=causal, dropout=0.1).double()
    attn.set_alibi()
    x = torch.randn(19, 2, E, dtype=torch.float64)
    kpm = torch.zeros(2, 19, dtype=torch.bool)
    kpm[1, -4:] = True
    results = []
    for exclusive in (True, False):
        if not exclusive:
            monkeypatch.setattr(type(attn), "heads_exclusive", property(lambda self: False, lambda self, v: None))
        attn.zero_grad()
        leaf = x.clone().requires_grad_()
        torch.manual_seed(5)
        out, _ = attn(leaf, key_padding_mask=kpm, need_weights=False)
        out.pow(2).sum().backward()
        results.append([out.detach(), leaf.grad] + [p.grad.clone() for p in attn.parameters()])
    assert freed == [3, 1]  # the heads in forward, the output's gradient in backward: only with the flag on
    # to float64 rounding: bitwise on an Intel Xeon, within an ulp (2.2e-16) on an AMD EPYC, whose BLAS rounds the
    # products over the copied and the caller's layouts differently; a freed head read or a changed mask moves
    # these by 1e-3 or more
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
