"""AdaptiveSpan (the mask module) and AdaptiveSpanAttention (the attention with real savings)."""
import math

import pytest
import torch

from attention_reference import reference_attention
import randomized
from fluence_fairseq.modules import AdaptiveSpan, AdaptiveSpanAttention, FSAdaptiveSpan
from fluence_fairseq.modules.adaptive_span import head_groups

E, H = 32, 4
SPANS = torch.tensor([0.03, 0.11, 0.27, 0.41])  # z * S never lands on an integer: no kinks at the ramp edges


def make_span(S=100, R=10, init=0.3, heads=H, causal=True, **kw):
    return AdaptiveSpan(S, 2e-6, R, init, True, heads, causal=causal, **kw)


# ------------------------------------------------------------------------------------------ the mask
def test_mask_values_at_the_ramp_edges():
    span = make_span(S=100, R=10, init=0.3, heads=1)
    d = torch.tensor([0, 29, 30, 35, 39, 40, 41, 99, 100])
    m = span.mask(d)[0]
    # m(x) = clamp((R + zS - x) / R, 0, 1) with zS = 30: 1 up to the span, linear over the ramp, 0 after it
    torch.testing.assert_close(m, torch.tensor([1, 1, 1, 0.5, 0.1, 0, 0, 0, 0]).float())
    assert torch.all(span.mask(torch.tensor([-1, -5]))[0] == 0), "causal span must mask future keys"
    noncausal = make_span(S=100, R=10, init=0.3, heads=1, causal=False)
    torch.testing.assert_close(noncausal.mask(torch.tensor([-35, 35]))[0], torch.tensor([0.5, 0.5]))


def test_forward_masks_and_renormalises_any_batch_and_length():
    span = make_span(S=64, R=8)
    with torch.no_grad():
        span.current_val.copy_(SPANS.view(H, 1, 1))
    for batch, tgt, src in [(1, 5, 5), (3, 7, 20), (8, 1, 70)]:
        probs = torch.rand(batch, H, tgt, src).softmax(-1)
        out = span(probs)
        torch.testing.assert_close(out.sum(-1), torch.ones(batch, H, tgt), atol=1e-5, rtol=0)
        raw = span(probs, normalize=False)
        rel = torch.arange(tgt).unsqueeze(1) + src - tgt - torch.arange(src)
        torch.testing.assert_close(raw, probs * span.mask(rel).unsqueeze(0))
    with pytest.raises(ValueError, match="heads=4"):
        span(torch.rand(2, 3, 4, 4))


def test_span_gradient_matches_finite_differences():
    torch.manual_seed(0)
    span = make_span(S=64, R=8)
    probs = torch.rand(2, H, 10, 40).softmax(-1)
    weights = torch.randn(2, H, 10, 40)
    with torch.no_grad():  # z * S half-way between integers: the +-eps probes stay on one linear piece
        span.current_val.copy_(torch.tensor([2.5, 7.5, 17.5, 26.5]).view(H, 1, 1) / 64)
    (span(probs) * weights).sum().backward()
    grad = span.current_val.grad.view(-1).clone()
    assert torch.all(grad != 0)
    eps = 1e-3
    for h in range(H):
        vals = []
        for sign in (1, -1):
            with torch.no_grad():
                span.current_val[h] += sign * eps
                vals.append((span(probs) * weights).sum().item())
                span.current_val[h] -= sign * eps
        assert math.isclose(grad[h].item(), (vals[0] - vals[1]) / (2 * eps), rel_tol=2e-2, abs_tol=1e-3)


def test_loss_and_its_gradient():
    span = AdaptiveSpan(8192, 2e-6, 32, 0.0, True, 4)
    with torch.no_grad():
        span.current_val.copy_(SPANS.view(4, 1, 1))
    loss = span.get_loss()
    assert math.isclose(loss.item(), 2e-6 * 8192 * SPANS.mean().item(), rel_tol=1e-6)
    loss.backward()
    torch.testing.assert_close(span.current_val.grad.view(-1), torch.full((4,), 2e-6 * 8192 / 4))


def test_clamp_by_hand_and_after_every_optimizer_step():
    span = make_span()
    with torch.no_grad():
        span.current_val.copy_(torch.tensor([-0.5, 0.2, 1.7, 0.9]).view(H, 1, 1))
    span.clamp_param()
    torch.testing.assert_close(span.current_val.view(-1), torch.tensor([0.0, 0.2, 1.0, 0.9]))
    # a training loop needs no clamp call of its own: every optimizer step that updates a span clamps it
    opt = torch.optim.SGD(span.parameters(), lr=10.0)
    (-span.current_val.sum()).backward()
    opt.step()
    assert torch.all(span.current_val == 1.0)


def test_span_statistics_trim_and_cache_sizes():
    span = AdaptiveSpan(1024, 2e-6, 32, 0.25, True, 4)
    assert span.get_current_max_span() == 256 + 32 and span.get_current_avg_span() == 288
    assert span.get_current_max_span(include_ramp=False) == 256
    assert span.get_trim_len() == 704  # min(1023, 1024 - 288) floored to a multiple of 64
    assert span.get_cache_size() == 384  # 1024 - 704 + 64
    assert AdaptiveSpan(1024, 2e-6, 32, 0.25, False, 4).get_cache_size() == 1024
    full = AdaptiveSpan(1024, 2e-6, 32, 1.0, True, 4)
    assert full.get_current_max_span() == 1024 and full.get_trim_len() == 0 and full.get_cache_size() == 1024
    with torch.no_grad():
        span.current_val.copy_(torch.tensor([0.0, 0.1, 0.2, 0.5]).view(4, 1, 1))
    assert span.get_current_max_span() == 512 + 32
    assert span.get_current_avg_span() == math.ceil(0.2 * 1024) + 32
    torch.testing.assert_close(span.get_spans(), torch.tensor([0.0, 102.4, 204.8, 512.0]))


def test_one_deterministic_span_per_head_whatever_bs_and_mask_size():
    a = AdaptiveSpan(1024, 5e-6, 32, 0.002, True, 12, bs=128, mask_size=[20, 36])
    b = AdaptiveSpan(attn_span=1024, adapt_span_loss_coeff=5e-6, adapt_span_ramp=32, adapt_span_init=0.002,
                     adapt_span_cache=True, nb_heads=12)
    assert a.current_val.shape == (12, 1, 1)
    assert torch.all(a.current_val == 0.002) and torch.equal(a.current_val, b.current_val)
    # Fluence's own usage: probabilities of any batch size and key length are masked, never silently skipped
    for batch, keys in [(128, 36), (5, 20), (1, 7)]:
        probs = torch.rand(batch, 12, 26, keys).softmax(-1)
        assert not torch.allclose(a(probs), probs)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(attn_span=0), "attn_span must be a positive integer"),
        (dict(attn_span=-5), "attn_span must be a positive integer"),
        (dict(adapt_span_ramp=200), "cannot be longer than the span"),
        (dict(adapt_span_ramp=0), "adapt_span_ramp must be in"),
        (dict(adapt_span_init=1.5), r"adapt_span_init must be in \[0, 1\]"),
        (dict(adapt_span_init=-0.1), r"adapt_span_init must be in \[0, 1\]"),
        (dict(nb_heads=0), "nb_heads must be a positive integer"),
    ],
)
def test_bad_span_arguments(kwargs, message):
    args = dict(attn_span=100, adapt_span_loss_coeff=0.0, adapt_span_ramp=10, adapt_span_init=0.5,
                adapt_span_cache=True, nb_heads=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        AdaptiveSpan(**args)
    if "nb_heads" not in kwargs:
        options = {k: v for k, v in args.items() if k != "nb_heads"}
        with pytest.raises(ValueError, match=message):
            FSAdaptiveSpan(E, H, **options)


@pytest.mark.parametrize("causal", [True, False])
def test_the_log_mask_read_from_its_table_is_the_log_mask_and_follows_the_spans(causal):
    """Without a gradient (evaluation, decoding) the log mask comes from a table of its values at every distance:
    bit for bit :meth:`log_mask`, for future keys, the ramp, its end and keys beyond the maximum span; made again
    when the spans change, also through ``.data`` (fairseq's fp16 optimizer), which no version counter sees."""
    span = make_span(S=100, R=10, init=0.3, causal=causal)
    with torch.no_grad():
        span.current_val.copy_(SPANS.view(H, 1, 1))
    rel = torch.arange(-5, 130).view(5, 27)
    assert torch.equal(span.log_mask_lookup(rel), span.log_mask(rel).detach())
    span.current_val.data.mul_(2)  # no version bump
    assert torch.equal(span.log_mask_lookup(rel), span.log_mask(rel).detach())
    span.current_val.data[-1] = 1.0  # a full span: its ramp reaches past the maximum span, which still ends it
    assert torch.equal(span.log_mask_lookup(rel), span.log_mask(rel).detach())
    assert torch.equal(span.log_mask_lookup(rel[:1, :3]), span.log_mask(rel[:1, :3]).detach())


@pytest.mark.parametrize("causal", [True, False])
def test_evaluation_without_gradients_gives_the_outputs_with_them(causal):
    attn = make_attention(causal)
    x = torch.randn(150, 2, E)
    graded, _ = attn(query=x, need_weights=False)
    lookups = []
    lookup = attn.adaptive_span.log_mask_lookup
    attn.adaptive_span.log_mask_lookup = lambda rel, *a: lookups.append(rel.shape) or lookup(rel, *a)
    with torch.no_grad():
        free, _ = attn(query=x, need_weights=False)
    assert lookups and graded.grad_fn is not None
    torch.testing.assert_close(free, graded.detach(), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------- the attention
def make_attention(causal, S=128, R=16, block_size=None, spans=SPANS):
    torch.manual_seed(0)
    attn = FSAdaptiveSpan(E, H, attn_span=S, adapt_span_ramp=R, causal=causal, block_size=block_size).eval()
    with torch.no_grad():
        attn.adaptive_span.current_val.copy_(spans.view(H, 1, 1))
    return attn


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block_size", [None, 16, 48])
def test_banded_attention_matches_masked_softmax_reference(causal, block_size):
    attn = make_attention(causal, block_size=block_size)
    T, B = 300, 2
    x = torch.randn(T, B, E)
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[1, :5] = True
    real = ~kpm.t()
    span = attn.adaptive_span
    ref = reference_attention(attn, x, x, causal=causal, key_padding_mask=kpm, span=span)
    g_ref = torch.autograd.grad(ref[real].pow(2).sum(), span.current_val)[0]
    out, _ = attn(query=x, key_padding_mask=kpm, need_weights=False)
    g = torch.autograd.grad(out[real].pow(2).sum(), span.current_val)[0]
    dense, w = attn(query=x, key_padding_mask=kpm, need_head_weights=True)
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(dense[real], ref[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(g, g_ref, atol=1e-3, rtol=1e-4)
    assert torch.all(g != 0), "every head's span must get a gradient"
    # keys beyond max span + ramp get exactly zero weight
    reach = attn.window()
    far = (torch.arange(T).unsqueeze(1) - torch.arange(T)).abs() >= reach
    assert torch.all(w[:, 0][:, far] == 0) and torch.all(w[:, 1, 5:][:, far[5:]] == 0)


def test_head_groups_split_only_where_it_pays():
    assert head_groups([40, 41, 45, 38], 1000) == [[0, 1, 2, 3]]  # similar spans: one call
    assert head_groups([272, 21, 26, 21], 1000) == [[1, 2, 3], [0]]  # one wide head is scored alone
    assert head_groups([2000, 20, 500, 20], 5000) == [[1, 3], [2], [0]]
    assert head_groups([272, 21, 26, 21], 30) == [[0, 1, 2, 3]]  # a short input: every band reaches all of it
    assert head_groups([5], 100) == [[0]]


# spans far apart, widest heads not first: heads 1 and 3 (21 keys) and 0 and 2 (220 and 118) are scored apart
MIXED = torch.tensor([0.8, 0.02, 0.4, 0.02])


@pytest.mark.parametrize("causal", [True, False])
def test_heads_scored_in_groups_match_the_reference(causal):
    attn = make_attention(causal, S=256, R=16, spans=MIXED).train()
    attn.dropout_module.p = 0.0
    T, B = 300, 2
    assert head_groups([w - 1 for w in attn.head_windows()], T - 1) == [[1, 3], [0, 2]]
    x = torch.randn(T, B, E, requires_grad=True)
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[1, :7] = True
    real = ~kpm.t()
    span = attn.adaptive_span
    ref = reference_attention(attn, x, x, causal=causal, key_padding_mask=kpm, span=span)
    g_ref = torch.autograd.grad(ref[real].pow(2).sum(), [span.current_val, x, attn.q_proj.weight])
    out, _ = attn(query=x, key_padding_mask=kpm, need_weights=False)
    g = torch.autograd.grad(out[real].pow(2).sum(), [span.current_val, x, attn.q_proj.weight])
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=0)
    for got, want in zip(g, g_ref):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)
    assert torch.all(g[0] != 0), "every head's span must get a gradient"


def test_heads_scored_in_groups_decode_as_the_full_pass():
    attn = make_attention(True, S=256, R=16, spans=MIXED)
    T, B = 260, 2
    x = torch.randn(T, B, E)
    full, _ = attn(query=x, need_weights=False)
    st, steps = {}, []
    for t in range(0, T, 20):  # several tokens per call, as a stream's segments with memory
        steps.append(attn(query=x[t : t + 20], incremental_state=st)[0])
    torch.testing.assert_close(torch.cat(steps), full, atol=1e-5, rtol=0)
    assert attn._get_input_buffer(st)["prev_key"].size(2) <= attn.window()


def test_real_savings_only_the_band_is_scored(monkeypatch):
    """The blocked path scores O(T * window) keys, not O(T^2)."""
    import fluence_fairseq.ops.band as band

    scored = []
    real_matmul = torch.matmul

    def counting_matmul(a, b):
        out = real_matmul(a, b)
        scored.append(out.numel())
        return out

    monkeypatch.setattr(band.torch, "matmul", counting_matmul)
    attn = make_attention(True, S=1024, spans=torch.full((H,), 40 / 1024))
    T = 1024
    attn(query=torch.randn(T, 1, E), need_weights=False)
    assert attn.window() == 40 + 16 + 1  # distances 0..56: the last has mask 0 but moves the span (z S is whole)
    assert max(scored) < H * T * T / 8, "scores for the whole sequence were computed"


def test_spans_at_maximum_use_the_unmasked_path_and_stay_exact():
    attn = make_attention(True, S=64, R=16, spans=torch.ones(H))
    x = torch.randn(50, 2, E)
    ref = reference_attention(attn, x, x, causal=True, span=attn.adaptive_span)
    torch.testing.assert_close(attn(query=x, need_weights=False)[0], ref, atol=1e-5, rtol=0)


def test_incremental_decoding_equals_full_forward_with_a_bounded_cache():
    attn = make_attention(True)
    T, B = 200, 3
    x = torch.randn(T, B, E)
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[2, :4] = True  # left padding
    full, _ = attn(query=x, key_padding_mask=kpm, need_weights=False)
    st, steps = {}, []
    for t in range(T):
        out, _ = attn(query=x[t : t + 1], key_padding_mask=kpm[:, t : t + 1], incremental_state=st)
        steps.append(out)
        cached = attn._get_input_buffer(st)["prev_key"].size(2)
        assert cached <= attn.window(), f"cache holds {cached} keys, more than the span {attn.window()}"
    real = ~kpm.t()
    torch.testing.assert_close(torch.cat(steps)[real], full[real], atol=1e-5, rtol=0)
    assert attn._get_input_buffer(st)["prev_key_padding_mask"].shape == (B, attn.window())


def test_without_adaptive_cache_decoding_keeps_attn_span_keys_and_same_outputs():
    attn = make_attention(True)
    attn.adaptive_span.cache = False
    x = torch.randn(150, 1, E)
    full, _ = attn(query=x)
    st = {}
    steps = torch.cat([attn(query=x[t : t + 1], incremental_state=st)[0] for t in range(150)])
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)
    assert attn._get_input_buffer(st)["prev_key"].size(2) == 128


def test_beam_reorder_of_the_span_cache():
    attn = make_attention(True)
    x = torch.randn(90, 3, E)
    order = torch.tensor([1, 1, 0])
    st = {}
    for t in range(80):
        attn(query=x[t : t + 1], incremental_state=st)
    attn.reorder_incremental_state(st, order)
    got = torch.cat([attn(query=x[t : t + 1, order], incremental_state=st)[0] for t in range(80, 90)])
    full, _ = attn(query=x[:, order])
    torch.testing.assert_close(got, full[80:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_left_and_right_padding_give_the_same_outputs(causal):
    attn = make_attention(causal, S=64, R=8)
    T, pad = 40, 6
    tokens = torch.randn(T, 1, E)
    padding = torch.randn(pad, 1, E)
    right = torch.cat([tokens, padding])
    left = torch.cat([padding, tokens])
    mask_right = torch.zeros(1, T + pad, dtype=torch.bool)
    mask_right[:, T:] = True
    mask_left = torch.zeros(1, T + pad, dtype=torch.bool)
    mask_left[:, :pad] = True
    out_right, _ = attn(query=right, key_padding_mask=mask_right)
    out_left, _ = attn(query=left, key_padding_mask=mask_left)
    alone, _ = attn(query=tokens)
    torch.testing.assert_close(out_right[:T], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_left[pad:], alone, atol=1e-5, rtol=0)


def test_span_loss_flows_from_the_attention():
    attn = make_attention(True)
    assert attn.get_loss().item() == pytest.approx(2e-6 * 128 * SPANS.mean().item())
    assert isinstance(attn, AdaptiveSpanAttention)


def test_out_of_range_parameter_acts_clamped_but_keeps_its_gradient():
    """fairseq --fp16 steps a flat fp32 copy of the weights, so the model's span may briefly leave [0, 1]."""
    span = make_span(S=64, R=8)
    inside = make_span(S=64, R=8)
    with torch.no_grad():
        span.current_val.copy_(torch.tensor([-0.3, 0.2, 1.4, 0.5]).view(H, 1, 1))
        inside.current_val.copy_(torch.tensor([0.0, 0.2, 1.0, 0.5]).view(H, 1, 1))
    probs = torch.rand(2, H, 6, 70).softmax(-1)
    torch.testing.assert_close(span(probs), inside(probs))
    assert span.get_current_max_span() == 64 and span.get_loss().item() == pytest.approx(inside.get_loss().item())
    span.get_loss().backward()
    assert torch.all(span.current_val.grad != 0), "a span outside [0, 1] must still be trainable"


@pytest.mark.parametrize("S,R,T", [(32, 8, 48), (1024, 32, 300)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("z", [0.0, 0.25, 0.5, 0.3, 0.0071])  # z S whole (0, S/4, S/2) and not
def test_span_gradient_equals_the_reference_at_whole_and_fractional_spans(S, R, T, causal, z):
    """At z S whole the key at distance R + z S has mask 0 but clamp passes its gradient: the reference (mask
    multiplied into the probabilities) gives z the gradient S/R through it; the banded log-mask path must too."""
    attn = make_attention(causal, S=S, R=R, spans=torch.full((H,), z))
    attn.double()
    x = torch.randn(T, 2, E, dtype=torch.float64)
    kpm = torch.zeros(2, T, dtype=torch.bool)
    kpm[1, :3] = True
    real = ~kpm.t()
    span = attn.adaptive_span
    ref = reference_attention(attn, x, x, causal=causal, key_padding_mask=kpm, span=span)
    g_ref = torch.autograd.grad(ref[real].sum(), span.current_val)[0]
    out, _ = attn(query=x, key_padding_mask=kpm, need_weights=False)
    g = torch.autograd.grad(out[real].sum(), span.current_val, allow_unused=True)[0]
    g = torch.zeros_like(g_ref) if g is None else g  # every key inside every span: the mask is 1, no gradient
    torch.testing.assert_close(out[real], ref[real], atol=1e-6, rtol=0)
    # the mask is computed in float32 (as the reference's is): with S/R = 32 its rounding shows at 1e-4
    torch.testing.assert_close(g, g_ref, rtol=2e-3, atol=1e-6)
    if z * S + R < T:
        assert g_ref.abs().min() > 0  # the ramp (and at whole z S its far key) really moves every span


@pytest.mark.parametrize("seed,small", randomized.seeds(10))
def test_random_spans_match_the_reference_with_their_gradients(seed, small):
    """Spans at random, whole-token, zero and full values, both patterns, padding: outputs and gradients (the
    spans' included) equal the reference computation in float64 (:func:`randomized.adaptive_span_case`)."""
    randomized.check(randomized.adaptive_span_case, seed, small)
