"""The fairseq glue of FluenceAttention, checked on the softmax baseline against fairseq's MultiheadAttention."""
import pytest
import torch
from fairseq.modules import MultiheadAttention

from fluence_fairseq.modules import (
    PATTERNS,
    FluenceAttention,
    FSAdaptiveSpan,
    FSSoftmax,
    SoftmaxAttention,
    UnsupportedPatternError,
    fsmha,
)

E, H, B, T, S = 32, 4, 3, 7, 5
ATOL = 1e-5


def pair(cross, causal, seed=0):
    torch.manual_seed(seed)
    ref = MultiheadAttention(E, H, self_attention=not cross, encoder_decoder_attention=cross).eval()
    ours = FSSoftmax(E, H, cross=cross, causal=causal).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def inputs(cross, causal, seed=1):
    g = torch.Generator().manual_seed(seed)
    on = torch.get_default_device()  # drawn on the CPU (the same numbers everywhere), used on the test's device
    x = torch.randn(T, B, E, generator=g, device="cpu").to(on)
    src = torch.randn(T if causal else S, B, E, generator=g, device="cpu").to(on) if cross else x
    kpm = torch.zeros(B, src.size(0), dtype=torch.bool)
    kpm[0, -2:] = True  # right padding in sequence 0
    if not cross and causal:
        kpm = torch.zeros(B, T, dtype=torch.bool)
        kpm[1, :2] = True  # left padding for a causal decoder
    return x, src, kpm


def tolerance(device):
    """CUDA kernels (fused attention, other reduction orders) agree with fairseq's to 1e-4, not 1e-5."""
    return ATOL if device.type == "cpu" else 1e-4


def future_mask(tgt, src):
    return torch.triu(torch.full((tgt, src), float("-inf")), 1)


@pytest.mark.parametrize("cross,causal", sorted(PATTERNS))
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.float32])
def test_full_forward_matches_fairseq(cross, causal, mask_dtype, device):
    ATOL = tolerance(device)
    ref, ours = pair(cross, causal)
    x, src, kpm = inputs(cross, causal)
    attn_mask = future_mask(T, src.size(0)) if causal else None
    out_ref, w_ref = ref(x, src, src, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=True)
    kpm_in = kpm.to(mask_dtype)
    out, w = ours(query=x, key=src, value=src, key_padding_mask=kpm_in, need_weights=True)
    out_fast, none = ours(query=x, key=src, value=src, key_padding_mask=kpm_in, need_weights=False)
    # padded queries of a left-padded causal decoder see only padding: their output is meaningless in both
    # (fairseq gives NaN there, we give finite numbers), so compare real queries only
    real = ~kpm.t() if (causal and not cross) else torch.ones(T, B, dtype=torch.bool)
    torch.testing.assert_close(out[real], out_ref[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(out_fast[real], out_ref[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(w[real.t()], w_ref[real.t()], atol=ATOL, rtol=0)
    assert none is None and torch.isfinite(out).all()


@pytest.mark.parametrize("cross,causal", sorted(PATTERNS))
def test_gradients_match_fairseq(cross, causal, device):
    ref, ours = pair(cross, causal)
    ref.train(), ours.train()
    x, src, _ = inputs(cross, causal)
    attn_mask = future_mask(T, src.size(0)) if causal else None
    ref(x, src, src, attn_mask=attn_mask, need_weights=False)[0].pow(2).sum().backward()
    ours(query=x, key=src, value=src, need_weights=False)[0].pow(2).sum().backward()
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        torch.testing.assert_close(getattr(ours, name).weight.grad, getattr(ref, name).weight.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cross,causal", [(False, True), (True, False), (True, True)])
def test_incremental_matches_fairseq(cross, causal, device):
    ATOL = tolerance(device)
    ref, ours = pair(cross, causal)
    x, src, kpm = inputs(cross, causal)
    st_ref, st = {}, {}
    for t in range(T):
        step = x[t : t + 1]
        kv = src if cross else step
        kpm_step = kpm if cross else kpm[:, t : t + 1]
        mask_row = future_mask(T, src.size(0))[t : t + 1] if (cross and causal) else None
        o_ref, _ = ref(step, kv, kv, key_padding_mask=kpm_step, incremental_state=st_ref, static_kv=cross,
                       attn_mask=mask_row, need_weights=False)
        o, _ = ours(query=step, key=kv, value=kv, key_padding_mask=kpm_step, incremental_state=st,
                    static_kv=cross, need_weights=False)
        real = ~kpm[:, t] if not cross else torch.ones(B, dtype=torch.bool)
        torch.testing.assert_close(o[:, real], o_ref[:, real], atol=ATOL, rtol=0)


def test_incremental_equals_full_forward():
    _, ours = pair(False, True)
    x, _, _ = inputs(False, True)
    full, _ = ours(query=x, need_weights=False)
    st = {}
    steps = [ours(query=x[t : t + 1], incremental_state=st, need_weights=False)[0] for t in range(T)]
    torch.testing.assert_close(torch.cat(steps), full, atol=ATOL, rtol=0)
    # a multi-token chunk after a prefix (prompt forcing) is aligned bottom-right, too
    st = {}
    a, _ = ours(query=x[:3], incremental_state=st, need_weights=False)
    b, _ = ours(query=x[3:], incremental_state=st, need_weights=False)
    torch.testing.assert_close(torch.cat([a, b]), full, atol=ATOL, rtol=0)


def test_sdpa_for_decoding_leaves_cudnn_out():
    from fluence_fairseq.ops.common import sdpa_for_decoding

    assert torch.backends.cuda.cudnn_sdp_enabled()
    with sdpa_for_decoding():
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.parametrize("cross", [False, True])
def test_decoding_steps_leave_cudnn_out_of_sdpa_on_cuda(cross, monkeypatch, device):
    """cuDNN's SDPA kernel builds a graph for every new shape, and a decoding step's key length is new at every
    step (60 ms a step on an H200 in bf16): on CUDA decoding steps run without it, full passes keep it. On the
    CPU, which has no cuDNN kernel, nothing changes."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    _, ours = pair(cross, True)
    x, src, _ = inputs(cross, True)
    ours(query=x, key=src, value=src, need_weights=False)
    assert seen == [True]
    state = {}
    for t in range(3):
        ours(query=x[t:t + 1], key=src, value=src, incremental_state=state, static_kv=cross, need_weights=False)
    on_cuda = device.type == "cuda"
    assert seen == [True, not on_cuda, not on_cuda, not on_cuda]
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored after each step


@pytest.mark.parametrize("cross", [False, True])
def test_beam_reorder_selects_every_cached_tensor(cross):
    _, ours = pair(cross, True)
    x, src, _ = inputs(cross, True)
    order = torch.tensor([2, 0, 2])
    kv = lambda t: src if cross else x[t : t + 1]  # noqa: E731
    st = {}
    for t in range(3):
        ours(query=x[t : t + 1], key=kv(t), value=kv(t), incremental_state=st, static_kv=cross)
    ours.reorder_incremental_state(st, order)
    buffer = ours._get_input_buffer(st)
    assert buffer and all(v.size(0) == B for v in buffer.values())
    got = [ours(query=x[t : t + 1, order], key=kv(t)[:, order] if cross else x[t : t + 1, order],
                value=kv(t)[:, order] if cross else x[t : t + 1, order], incremental_state=st, static_kv=cross)[0]
           for t in range(3, T)]
    # the same as decoding the reordered batch from the start
    st2 = {}
    for t in range(3):
        ours(query=x[t : t + 1, order], key=kv(t)[:, order], value=kv(t)[:, order], incremental_state=st2,
             static_kv=cross)
    want = [ours(query=x[t : t + 1, order], key=kv(t)[:, order], value=kv(t)[:, order], incremental_state=st2,
                 static_kv=cross)[0] for t in range(3, T)]
    torch.testing.assert_close(torch.cat(got), torch.cat(want), atol=ATOL, rtol=0)


@pytest.mark.parametrize("grad", [False, True])
def test_beam_reorder_of_cached_keys_is_taken_by_the_next_step(grad, device):
    """A causal self attention's cached keys and values are not copied by a reorder: the order waits in the cache
    (reordered by a second reorder, which composes the two, and cut with a finished hypothesis) and the next step
    selects the rows as it appends its keys; the decoding equals that of the reordered history from the start,
    under autograd too (where the step selects and concatenates as before)."""
    from fluence_fairseq.modules.attention_base import PENDING_ORDER

    _, ours = pair(False, True)
    x, _, _ = inputs(False, True)
    first, second = torch.tensor([2, 0, 2]), torch.tensor([1, 2])  # a reorder, then a hypothesis finished
    ours = ours.to(device)
    with torch.set_grad_enabled(grad):
        st = {}
        for t in range(3):
            ours(query=x[t : t + 1], incremental_state=st)
        cached = dict(ours._get_input_buffer(st))
        ours.reorder_incremental_state(st, first)
        ours.reorder_incremental_state(st, second)
        buffer = ours._get_input_buffer(st)
        assert buffer["prev_key"] is cached["prev_key"] and buffer["prev_value"] is cached["prev_value"]
        order = first[second]  # the rows the two reorders leave, in the cache before them
        assert torch.equal(buffer[PENDING_ORDER], order)
        got = [ours(query=x[t : t + 1, order], incremental_state=st)[0] for t in range(3, T)]
        buffer = ours._get_input_buffer(st)
        assert PENDING_ORDER not in buffer
        assert torch.equal(buffer["prev_key"][:, :, :3], cached["prev_key"][order])
        assert torch.equal(buffer["prev_value"][:, :, :3], cached["prev_value"][order])
        st2 = {}
        for t in range(3):
            ours(query=x[t : t + 1, order], incremental_state=st2)
        want = [ours(query=x[t : t + 1, order], incremental_state=st2)[0] for t in range(3, T)]
    torch.testing.assert_close(torch.cat(got), torch.cat(want), atol=tolerance(device), rtol=0)
    assert all(out.requires_grad == grad for out in got)


def test_appending_to_reordered_keys_equals_selecting_and_concatenating():
    """The step's one copy of the cached keys: the rows the order selects, then the new keys; mixed dtypes (a cache
    from another precision) are promoted as ``torch.cat`` promotes them."""
    from fluence_fairseq.modules.attention_base import _append_keys

    cached, new, order = torch.randn(3, 2, 5, 4), torch.randn(2, 2, 1, 4), torch.tensor([2, 0])
    with torch.no_grad():
        assert torch.equal(_append_keys(cached, new, order), torch.cat([cached[order], new], dim=2))
        assert torch.equal(_append_keys(cached, new[:, :, :0], order), cached[order])
        mixed = _append_keys(cached.double(), new, order)
    assert mixed.dtype == torch.float64 and torch.equal(mixed, torch.cat([cached.double()[order], new], dim=2))


def test_a_decoding_step_of_its_own_gets_its_cache_reordered():
    """An attention whose decoding step is its own (it may read the cached keys itself) gets every cached
    tensor selected by the reorder: only the base's own step takes the order over."""
    from fluence_fairseq.modules.attention_base import PENDING_ORDER

    class ReadsItsCache(FSSoftmax):
        def attend_incremental(self, q, k, v, *, buffer, **kwargs):
            assert buffer.get("prev_key") is None or buffer["prev_key"].size(0) == q.size(0)
            return super().attend_incremental(q, k, v, buffer=buffer, **kwargs)

    _, ours = pair(False, True)
    attn = ReadsItsCache(E, H, causal=True).eval()
    attn.load_state_dict(ours.state_dict())
    x, _, _ = inputs(False, True)
    order = torch.tensor([1, 2])
    st, st2 = {}, {}
    for t in range(3):
        attn(query=x[t : t + 1], incremental_state=st)
        ours(query=x[t : t + 1], incremental_state=st2)
    attn.reorder_incremental_state(st, order)
    ours.reorder_incremental_state(st2, order)
    assert PENDING_ORDER not in attn._get_input_buffer(st) and PENDING_ORDER in ours._get_input_buffer(st2)
    torch.testing.assert_close(attn(query=x[3:4, order], incremental_state=st)[0],
                               ours(query=x[3:4, order], incremental_state=st2)[0], atol=ATOL, rtol=0)


def test_two_modules_keep_separate_caches():
    _, a = pair(False, True, seed=0)
    _, b = pair(False, True, seed=1)
    x, _, _ = inputs(False, True)
    st = {}
    a(query=x[:1], incremental_state=st)
    b(query=x[:1], incremental_state=st)
    b(query=x[1:2], incremental_state=st)
    assert a._get_input_buffer(st)["prev_key"].size(2) == 1
    assert b._get_input_buffer(st)["prev_key"].size(2) == 2


def test_batch_first_and_head_weights():
    _, ours = pair(True, False)
    x, src, kpm = inputs(True, False)
    out, w = ours(query=x, key=src, value=src, key_padding_mask=kpm, need_head_weights=True)
    out_bf, w_bf = ours(query=x.transpose(0, 1), key=src.transpose(0, 1), value=src.transpose(0, 1),
                        key_padding_mask=kpm, need_head_weights=True, batch_first=True)
    assert w.shape == (H, B, T, S)
    torch.testing.assert_close(out_bf.transpose(0, 1), out)
    torch.testing.assert_close(w_bf, w)
    assert torch.all(w[:, 0, :, -2:] == 0), "padded keys got attention weight"


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_attn_mask_bool_and_float_agree(dtype):
    _, ours = pair(False, False)
    x, _, _ = inputs(False, False)
    banned = torch.rand(T, T, generator=torch.Generator().manual_seed(3)) < 0.3
    banned.fill_diagonal_(False)
    mask = banned if dtype == torch.bool else torch.zeros(T, T).masked_fill(banned, float("-inf"))
    out, w = ours(query=x, attn_mask=mask, need_weights=True)
    assert torch.all(w[:, banned] == 0)
    out_fast, _ = ours(query=x, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(out_fast, out, atol=ATOL, rtol=0)
    per_head = mask.unsqueeze(0).expand(B * H, T, T)
    torch.testing.assert_close(ours(query=x, attn_mask=per_head)[0], out, atol=ATOL, rtol=0)


def test_query_padding_mask_zeroes_padded_outputs():
    _, ours = pair(False, False)
    x, _, kpm = inputs(False, False)
    out, _ = ours(query=x, key_padding_mask=kpm, query_padding_mask=kpm)
    assert torch.all(out[-2:, 0] == 0) and torch.all(out[:, 1:] != 0)


def test_state_dict_is_stock_fairseq():
    ref, ours = pair(False, False)
    assert set(ours.state_dict()) == set(ref.state_dict())
    ref.load_state_dict(FSAdaptiveSpan(E, H).state_dict(), strict=False)
    keys = set(FSAdaptiveSpan(E, H).state_dict())
    assert {"q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight"} <= keys


def test_unsupported_pattern_names_supported_ones():
    with pytest.raises(AssertionError) as err:
        FSAdaptiveSpan(E, H, cross=True)
    assert isinstance(err.value, UnsupportedPatternError)
    assert "noncausal cross" in str(err.value)
    assert "noncausal self, causal self" in str(err.value)


def test_bad_inputs_raise_clear_errors():
    _, ours = pair(False, False)
    x, _, _ = inputs(False, False)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(batch, length\) = \(3, 7\)"):
        ours(query=x, key_padding_mask=torch.zeros(B, T + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        ours(query=x, attn_mask=torch.zeros(T, T + 2))
    with pytest.raises(ValueError, match="query must be"):
        ours(query=torch.randn(T, B, E + 1))
    with pytest.raises(ValueError, match="incremental decoding needs causal=True"):
        ours(query=x[:1], incremental_state={})
    with pytest.raises(ValueError, match="before_softmax"):
        ours(query=x, before_softmax=True)
    with pytest.raises(TypeError, match="unexpected arguments"):
        ours(query=x, bogus=1)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        FSSoftmax(30, 4)


def test_fsmha_translates_fairseq_constructor_keywords():
    attn = FSSoftmax(E, H, self_attention=False, encoder_decoder_attention=True, q_noise=0.0, qn_block_size=8)
    assert attn.cross and not attn.causal and attn.encoder_decoder_attention
    with pytest.raises(ValueError, match="add_bias_kv"):
        FSSoftmax(E, H, add_bias_kv=True)
    with pytest.raises(ValueError, match="contradicts"):
        FSSoftmax(E, H, cross=False, encoder_decoder_attention=True)
    with pytest.raises(TypeError, match="FluenceAttention"):
        fsmha(torch.nn.Linear)

    @fsmha
    class FSMine(SoftmaxAttention):
        pass

    assert issubclass(FSMine, FluenceAttention) and FSMine(E, H, encoder_decoder_attention=True).cross


@pytest.mark.parametrize("cls,kwargs", [(FSSoftmax, {}), (FSAdaptiveSpan, {"attn_span": 4, "adapt_span_ramp": 2})])
def test_causal_attention_never_sees_the_future(cls, kwargs):
    torch.manual_seed(0)
    attn = cls(E, H, causal=True, **kwargs).eval()
    x = torch.randn(12, B, E)
    y = x.clone()
    y[6:] = torch.randn(6, B, E)
    torch.testing.assert_close(attn(query=x)[0][:6], attn(query=y)[0][:6])
    # the gradient of early outputs w.r.t. later inputs is exactly zero
    x.requires_grad_(True)
    attn(query=x)[0][:6].sum().backward()
    assert torch.all(x.grad[6:] == 0)


def test_an_attention_without_math_is_refused_at_construction():
    class NoMath(FluenceAttention):
        pass

    with pytest.raises(TypeError, match="must implement attend"):
        NoMath(E, H)


def test_beams_share_a_source_only_from_the_cache_size_where_it_pays(monkeypatch):
    """A sentence's beams read one shared copy of its source only where the cross cache holds at least
    ``SHARE_FROM_ELEMENTS`` elements (below, the folding costs more than the reads it saves): the same outputs
    either way."""
    from fluence_fairseq.modules import attention_base
    from fluence_fairseq.modules.attention_base import SHARED_SOURCE
    torch.manual_seed(0)
    attn = FSSoftmax(E, H, cross=True).eval()
    src = torch.randn(S, 2, E).repeat_interleave(3, dim=1)
    x = torch.randn(3, 6, E)
    cached = 2 * 6 * S * E  # prev_key and prev_value
    outs = {}
    for bound in (cached + 1, cached):
        monkeypatch.setattr(attention_base, "SHARE_FROM_ELEMENTS", bound)
        state = {}
        outs[bound] = torch.cat([attn(query=x[t : t + 1], key=src, value=src, incremental_state=state, static_kv=True,
                                      need_weights=False)[0] for t in range(3)])
        (buffer,) = state.values()
        assert any(name.startswith(SHARED_SOURCE) for name in buffer) == (bound == cached)
    torch.testing.assert_close(outs[cached], outs[cached + 1], atol=ATOL, rtol=0)


def test_call_flags_hold_during_attend_and_are_reset_after_it_even_when_it_raises(monkeypatch):
    """``heads_exclusive`` and ``head_average_weights`` are set for the whole pass's ``attend`` (a training pass
    asking for the averaged weights: both True), read False outside it, and are reset when ``attend`` raises;
    they are instance attributes, not parameters, buffers or submodules."""
    attn = FSSoftmax(E, H, causal=True)
    seen = []
    real = FSSoftmax.attend

    def attend(self, *args, **kwargs):
        seen.append((self.heads_exclusive, self.head_average_weights))
        if kwargs.get("need_weights") and len(seen) == 2:
            raise RuntimeError("attend failed")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FSSoftmax, "attend", attend)
    attn(torch.randn(5, 2, E), need_weights=True)
    assert seen == [(True, True)] and (attn.heads_exclusive, attn.head_average_weights) == (False, False)
    with pytest.raises(RuntimeError, match="attend failed"):
        attn(torch.randn(5, 2, E), need_weights=True)
    assert (attn.heads_exclusive, attn.head_average_weights) == (False, False)
    names = {n for n, _ in attn.named_parameters()} | {n for n, _ in attn.named_buffers()} | set(attn._modules)
    assert not names & {"heads_exclusive", "head_average_weights"}
    assert vars(attn)["heads_exclusive"] is False
