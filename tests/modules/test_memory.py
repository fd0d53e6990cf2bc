"""Segment memory (``forward(memory=)``) for every causal self attention, read from the registry: two consecutive
segments with the carried memory equal one pass over their concatenation (restricted to what the memory keeps),
no gradient reaches the earlier segment, memories reorder with the batch, and attentions that cannot stream say so."""
import copy

import pytest
import torch

from fluence_fairseq.modules.registry import ATTENTIONS

E, H, B = 32, 4, 3
CAUSAL = sorted(n for n, s in ATTENTIONS.items() if (False, True) in s.cls.supported_patterns)
STREAMING = [n for n in CAUSAL if ATTENTIONS[n].cls.supports_memory]


def _build(name, **extra):
    spec = ATTENTIONS[name]
    torch.manual_seed(0)
    return spec.build(E, H, causal=True, **{**spec.tiny, **extra}).eval()


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _segments(attn, x, sizes, memory=None):
    memory = {} if memory is None else memory
    outs, t = [], 0
    for n in sizes:
        outs.append(attn(x[t:t + n], memory=memory, need_weights=False)[0])
        t += n
    return torch.cat(outs), memory


def test_every_causal_attention_declares_whether_it_streams():
    assert {"softmax", "adaptive_span", "local", "abc", "performer", "s4d", "longshort"} <= set(STREAMING)
    assert "cosformer" in CAUSAL and "cosformer" not in STREAMING


@pytest.mark.parametrize("name", STREAMING)
def test_segments_with_memory_equal_one_pass_over_the_stream(name):
    attn = _build(name)
    x = _randn(24, B, E, seed=1)
    full = attn(x, need_weights=False)[0]
    out, memory = _segments(attn, x, [10, 8, 6])
    torch.testing.assert_close(out, full, atol=1e-5, rtol=0)
    assert memory and all(t is None or (t.size(0) == B and not t.requires_grad) for t in memory.values())


def test_softmax_memory_keeps_the_last_mem_len_keys():
    attn = _build("softmax")
    attn.set_mem_len(5)
    x = _randn(20, B, E, seed=2)
    out, memory = _segments(attn, x, [8, 12])
    assert memory["prev_key"].size(2) == 5
    # the second segment's queries see the last 5 keys of the first segment and their own prefix
    visible = torch.ones(20, 20, dtype=torch.bool).tril()
    visible[8:, :3] = False
    want = attn(x, attn_mask=~visible, need_weights=False)[0]
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="mem_len must be a positive integer"):
        attn.set_mem_len(0)


def test_adaptive_span_memory_holds_at_most_span_plus_ramp_keys():
    attn = _build("adaptive_span", attn_span=64, adapt_span_ramp=4)
    with torch.no_grad():
        attn.adaptive_span.current_val.fill_(6 / 64)
    x = _randn(40, B, E, seed=3)
    full = attn(x, need_weights=False)[0]
    memory = {}
    for t in range(0, 40, 10):
        attn(x[t:t + 10], memory=memory, need_weights=False)
        assert memory["prev_key"].size(2) <= attn.window() <= 6 + 4 + 1
    torch.testing.assert_close(_segments(attn, x, [10] * 4)[0], full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", STREAMING)
def test_no_gradient_reaches_the_previous_segment(name):
    attn = _build(name).train()
    x = _randn(16, B, E, seed=4).requires_grad_()
    memory = {}
    attn(x[:8], memory=memory, need_weights=False)
    second = attn(x[8:], memory=memory, need_weights=False)[0]
    second.pow(2).sum().backward()
    assert torch.all(x.grad[:8] == 0), "the memory must be detached (truncated backpropagation through time)"
    assert x.grad[8:].abs().sum() > 0


@pytest.mark.parametrize("name", STREAMING)
def test_memory_reorders_with_the_batch(name):
    attn = _build(name)
    x = _randn(12, B, E, seed=5)
    _, memory = _segments(attn, x[:7], [7])
    order = torch.tensor([2, 0, 2])
    reordered = {k: None if t is None else t.index_select(0, order) for k, t in memory.items()}
    got = attn(x[7:, order], memory=reordered, need_weights=False)[0]
    want = attn(x[:, order], need_weights=False)[0][7:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_attentions_that_cannot_stream_or_take_no_memory_say_why():
    with pytest.raises(ValueError, match="cosformer_max_len.*Attentions that can: .*softmax"):
        _build("cosformer")(torch.randn(4, 1, E), memory={})
    noncausal = ATTENTIONS["softmax"].build(E, H)
    with pytest.raises(ValueError, match="segment memory is for causal self attention"):
        noncausal(torch.randn(4, 1, E), memory={})
    with pytest.raises(ValueError, match="either memory .* or incremental_state"):
        _build("softmax")(torch.randn(4, 1, E), memory={}, incremental_state={})


ALIBI = [n for n in STREAMING if ATTENTIONS[n].cls.position_scheme == "alibi"]


def test_alibi_is_offered_where_the_math_takes_a_relative_bias():
    assert {"softmax", "adaptive_span", "local", "sparsemax", "entmax15", "alpha_entmax"} <= set(ALIBI)
    assert ATTENTIONS["s4d"].cls.position_scheme == "state"  # its decaying convolution orders the prefix
    # prefix sums are order-free by themselves; ALiBi enters them as a decay (causal self attention only)
    assert {"performer", "abc"} <= set(ALIBI)
    assert {"performer", "abc", "longshort"} <= set(ALIBI)
    with pytest.raises(ValueError, match="takes no relative position bias.*ALiBi is for .*softmax"):
        _build("s4d").set_alibi()
    for name, why in (("performer", "decay of the causal prefix sums"), ("abc", "decay of the causal slot sums"),
                      ("longshort", "landmarks .* have no position")):
        noncausal = ATTENTIONS[name].build(E, H, **ATTENTIONS[name].tiny)
        with pytest.raises(ValueError, match=f"only as causal self attention \\(.*{why}\\); this one is noncausal self"):
            noncausal.set_alibi()


@pytest.mark.parametrize("name", ALIBI)
def test_alibi_survives_memory_and_penalises_distance(name):
    """With ALiBi the bias of a key depends on its distance to the query only, so segments with memory still equal
    one pass; and it is the documented bias: -slope_h * |i - j| added to the scores."""
    attn = _build(name)
    attn.set_alibi()
    x = _randn(24, B, E, seed=6)
    full = attn(x, need_weights=False)[0]
    torch.testing.assert_close(_segments(attn, x, [9, 15])[0], full, atol=1e-5, rtol=0)
    plain = _build(name)
    assert not torch.allclose(plain(x, need_weights=False)[0], full, atol=1e-3)
    if name == "softmax":  # against the explicit formula, through an additive attn_mask on the plain attention
        rel = torch.arange(24).view(-1, 1) - torch.arange(24)
        slopes = attn.alibi_slopes.view(-1, 1, 1)
        bias = (-slopes * rel.abs()).masked_fill(rel < 0, float("-inf"))  # (H, L, L)
        want = plain(x, attn_mask=bias.repeat(B, 1, 1), need_weights=False)[0]
        torch.testing.assert_close(full, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ALIBI)
def test_alibi_decodes_token_by_token_as_one_pass(name):
    attn = _build(name)
    attn.set_alibi()
    x = _randn(20, B, E, seed=7)
    torch.testing.assert_close(_segments(attn, x, [1] * 20)[0], attn(x, need_weights=False)[0], atol=1e-5, rtol=0)


def _heads(attn, x):
    """(B, H, L, Dh) projections of x (L, B, E) by the attention's own in-projections."""
    def split(t):
        return t.view(t.size(0), t.size(1), H, -1).permute(1, 2, 0, 3)
    return split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x))


def _out(attn, o):
    return attn.out_proj(o.permute(2, 0, 1, 3).reshape(o.size(2), o.size(0), E))


@pytest.mark.parametrize("heads", [4, 16])  # 16 heads: slopes up to 2^-0.5, ~45 nats across a 64-key chunk
def test_performer_alibi_is_alibi_on_the_estimated_kernel(heads):
    """Against the dense formula: weight(i, j) = phi(q_i) . phi(k_j) exp(c_j) exp(-slope_h (i - j)), j <= i."""
    spec = ATTENTIONS["performer"]
    torch.manual_seed(0)
    attn = spec.build(64, heads, causal=True, approx_attn_dim=8).eval()
    attn.set_alibi()
    x = _randn(150, 2, 64, seed=8)
    split = lambda t: t.view(150, 2, heads, -1).permute(1, 2, 0, 3)  # noqa: E731
    q, k, v = split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x))
    phi_q = attn.query_features(q).double()
    phi_k, c = attn.key_features(k)
    rel = torch.arange(150).view(-1, 1) - torch.arange(150)
    log_w = (c.double().unsqueeze(-2) - attn.alibi_slopes.double().view(-1, 1, 1) * rel).masked_fill(rel < 0, -1e300)
    w = torch.einsum("bhim,bhjm->bhij", phi_q, phi_k.double()) * torch.exp(log_w - log_w.amax(-1, keepdim=True))
    o = torch.matmul(w / w.sum(-1, keepdim=True), v.double()).float()
    want = attn.out_proj(o.permute(2, 0, 1, 3).reshape(150, 2, 64))
    torch.testing.assert_close(attn(x, need_weights=False)[0], want, atol=1e-5, rtol=1e-4)


def test_abc_alibi_decays_the_slot_writes():
    """Against the dense formula: query t reads slots K~_t[r] = sum_{j<=t} w_tjr k_j / sum_j w_tjr with
    w_tjr = exp(a_jr - slope_h (t - j)), likewise for the values."""
    attn = _build("abc")
    attn.set_alibi()
    x = _randn(40, B, E, seed=9)
    q, k, v = _heads(attn, x)
    plain_k = torch.matmul(k, attn.compress_k)
    plain_v = torch.matmul(v, attn.compress_v)
    rel = torch.arange(40).view(-1, 1) - torch.arange(40)
    decay = (-attn.alibi_slopes.view(-1, 1, 1) * rel).masked_fill(rel < 0, float("-inf"))  # (H, t, j)

    def slots(alpha, x):  # (B, H, t, r, d)
        w = torch.softmax(alpha.unsqueeze(2) + decay.view(1, H, 40, 40, 1), dim=3)  # over j
        return torch.einsum("bhtjr,bhjd->bhtrd", w, x)

    ks, vs = slots(plain_k, k), slots(plain_v, v)
    p = torch.softmax(torch.einsum("bhtd,bhtrd->bhtr", q, ks) * k.size(-1) ** -0.5, dim=-1)
    want = _out(attn, torch.einsum("bhtr,bhtrd->bhtd", p, vs))
    torch.testing.assert_close(attn(x, need_weights=False)[0], want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", STREAMING)
def test_float32_gradients_over_segments_with_alibi_match_float64(name):
    """Every streaming attention, ALiBi on where it takes it, two 128-token segments with memory and inputs of
    std 3: the float32 parameter gradients equal float64's to float32 precision. A fused backward that cancels
    large terms (causal ABC's did: relative error 2.2 on the key bias) fails here, not only after hours of
    training."""
    attn = ATTENTIONS[name].build(E, H, causal=True, dropout=0.0).train()
    if attn.position_scheme == "alibi":
        attn.set_alibi(True)
    x = _randn(256, B, E, seed=5).double() * 3
    weight = _randn(256, B, E, seed=6).double()
    grads = {}
    for dtype in (torch.float32, torch.float64):
        a = copy.deepcopy(attn).to(dtype)
        memory, loss = {}, 0
        for part in (slice(0, 128), slice(128, 256)):
            xs = x[part].to(dtype)
            loss = loss + (a(xs, memory=memory, need_weights=False)[0] * weight[part].to(dtype)).sum()
        loss.backward()
        grads[dtype] = {n: p.grad.double() for n, p in a.named_parameters() if p.grad is not None}
    assert grads[torch.float64]
    for n, want in grads[torch.float64].items():
        assert (grads[torch.float32][n] - want).norm() <= 1e-4 * want.norm() + 1e-6, n


@pytest.mark.parametrize("name", STREAMING)
def test_memory_follows_parameters_updated_through_data(name):
    """fairseq's optimizers step through ``p.data``, which has its own version counter: nothing the memory or
    decoding path computes from the parameters may be cached across such an update (S4D's discretised
    coefficients were, and validation with memory used those of the first validation)."""
    attn = _build(name)
    x = _randn(12, B, E, seed=10)
    with torch.no_grad():
        _segments(attn, x, [6, 6])  # warm every cache
        for p in attn.parameters():
            p.data.mul_(0.8).add_(0.05)
        want = attn(x, need_weights=False)[0]
        torch.testing.assert_close(_segments(attn, x, [6, 6])[0], want, atol=1e-5, rtol=0)
        torch.testing.assert_close(_segments(attn, x, [1] * 12)[0], want, atol=1e-5, rtol=0)


def test_longshort_memory_keeps_the_chunks_of_the_last_mem_len_tokens():
    """With mem_len the compressed chunks between segments cover the last mem_len tokens: the memory stops
    growing, what it dropped no longer matters, what it kept still does; without mem_len it grows."""
    spec = ATTENTIONS["longshort"]
    torch.manual_seed(0)
    attn = spec.build(E, H, causal=True, ls_window_size=4, chunk_size=4, chunk_rank=2).eval()
    x = _randn(64, B, E, seed=11)
    sizes = [8] * 8
    grown = _segments(attn, x, sizes)[1]
    assert grown["ls_chunk_key"].size(2) == 16 * 2  # every chunk of the stream
    assert attn.unbounded_memory()
    attn.set_mem_len(10)  # 3 chunks of 4 tokens
    assert not attn.unbounded_memory()
    out, memory = _segments(attn, x, sizes)
    assert memory["ls_chunk_key"].size(2) == 3 * 2 and int(memory["ls_chunk_first"][0]) == 13
    assert memory["ls_chunk_valid"].shape == (B, 6) and memory["ls_chunk_first"].shape == (B,)
    # the last segment (56..63) remembers chunks 11..13 (tokens 44..55) and its window: tokens before 44 do not
    # matter to it any more, token 44 still does
    for changed, matters in ((slice(0, 44), False), (slice(44, 45), True)):
        y = x.clone()
        y[changed] += 1.0
        other = _segments(attn, y, sizes)[0]
        assert torch.allclose(other[56:], out[56:], atol=1e-6) != matters
    # within a segment nothing is dropped: the first segments equal the unbounded pass
    attn.set_mem_len(None)
    torch.testing.assert_close(out[:16], _segments(attn, x, sizes)[0][:16], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", STREAMING)
def test_parameter_gradients_with_a_carried_memory_are_exact(name):
    """Truncated BPTT treats the carried memory as a constant input. So the gradient of the second segment's loss
    with respect to each parameter tensor, along a random direction, must equal the central difference of that
    loss with the memory held fixed (float64, ALiBi on where the attention takes it, ``mem_len`` below the first
    segment's length so that trimming is exercised). A memory path that detaches something computed from the
    parameters (a decay, a discretisation, a slot score) fails here; the memory must also matter to the
    gradient, so the check is not about a zero contribution."""
    spec = ATTENTIONS[name]
    torch.manual_seed(0)
    attn = spec.build(E, H, causal=True, dropout=0.0, **spec.tiny).double().train()
    if attn.position_scheme == "alibi":
        attn.set_alibi(True)
    if hasattr(attn, "set_mem_len"):
        attn.set_mem_len(7)
    if name == "adaptive_span":  # spans start at 0, where the clamp makes the central difference one-sided
        with torch.no_grad():
            attn.adaptive_span.current_val.copy_(torch.tensor([0.13, 0.31, 0.22, 0.47]).view_as(
                attn.adaptive_span.current_val))
    x = _randn(20, B, E, seed=12).double()
    weight = _randn(8, B, E, seed=13).double()
    carried = {}
    with torch.no_grad():
        attn(x[:12], memory=carried, need_weights=False)

    def loss(memory):
        memory = {n: t for n, t in memory.items()}  # the attention writes its update into the dict it gets
        return (attn(x[12:], memory=memory, need_weights=False)[0] * weight).sum()

    attn.zero_grad()
    loss(carried).backward()
    grads = {n: p.grad.clone() for n, p in attn.named_parameters() if p.grad is not None}
    attn.zero_grad()
    loss({}).backward()
    without = {n: p.grad.clone() for n, p in attn.named_parameters() if p.grad is not None}
    assert any(not torch.allclose(grads[n], without[n]) for n in grads), "the memory does not reach the gradient"
    gen = torch.Generator().manual_seed(14)
    for n, p in attn.named_parameters():
        if n not in grads:
            continue
        direction = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        eps = 1e-6
        with torch.no_grad():
            p.add_(eps * direction)
            up = loss(carried)
            p.sub_(2 * eps * direction)
            down = loss(carried)
            p.add_(eps * direction)
        numeric = float((up - down) / (2 * eps))
        analytic = float((grads[n] * direction).sum())
        assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (n, analytic, numeric)
