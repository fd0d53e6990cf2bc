"""ABC (modules/abc.py, ops/abc.py): the shared contract, the prefix formula written out as loops, and the
reference implementation's degenerate causal recurrence (o_t a multiple of v_t) not coming back."""
import pytest
import torch
import torch.nn.functional as F

from attention_contract import AttentionContract, Case
from gradient_reuse import check_query_gradient_reused
from fluence_fairseq.modules.abc import ABC, FSABC
from fluence_fairseq.modules.registry import get_attention
from fluence_fairseq.ops.abc import causal_abc, causal_abc_dense


def _small_chunks(attn, chunk=3, block_chunks=2):
    """Sequences of ~10 tokens then cross chunk and block borders (carried state, checkpointed blocks)."""
    attn.chunk_size, attn.block_chunks = chunk, block_chunks
    return attn


class TestABCContract(AttentionContract):
    case = Case("abc", lambda **kw: _small_chunks(FSABC(32, 4, num_landmarks=3, **kw)), tgt_len=11, src_len=9)


# ----------------------------------------------------------------------------------- explicit references
def _heads(attn, x, src):
    """Projected heads (B, H, L, d) as the module computes them, from (L, B, E) inputs."""
    bsz = x.size(1)
    kv = x if src is None else src
    return attn._heads(attn.q_proj(x), bsz), attn._heads(attn.k_proj(kv), bsz), attn._heads(attn.v_proj(kv), bsz)


def _finish(attn, o):
    """(B, H, L, d) -> module output (L, B, E)."""
    return attn.out_proj(o.permute(2, 0, 1, 3).reshape(o.size(2), o.size(0), -1))


def _reference(attn, q, k, v, kpm=None, causal=False, offset=0):
    """ABC by the paper's formula, one query at a time: slots over the keys the query may see (all, or the
    prefix j <= t + offset), softmax over the slots."""
    bsz, heads, tgt_len, d = q.shape
    out = torch.zeros_like(q)
    for b in range(bsz):
        for h in range(heads):
            a = k[b, h] @ attn.compress_k  # (S, r)
            c = v[b, h] @ attn.compress_v
            real = torch.ones(k.size(2), dtype=torch.bool) if kpm is None else ~kpm[b]
            for t in range(tgt_len):
                sees = real.clone()
                if causal:
                    sees[t + offset + 1:] = False
                if not sees.any():
                    continue
                wk = torch.softmax(a[sees], dim=0)  # (j, r): sum_j exp(a_jr) k_j / sum_j exp(a_jr)
                wv = torch.softmax(c[sees], dim=0)
                k_slots, v_slots = wk.t() @ k[b, h][sees], wv.t() @ v[b, h][sees]
                p = torch.softmax(k_slots @ q[b, h, t] / d ** 0.5, dim=0)
                out[b, h, t] = p @ v_slots
    return out


def _build(causal=False, cross=False, r=3, seed=0, chunk=3, block_chunks=2):
    torch.manual_seed(seed)
    return _small_chunks(FSABC(32, 4, num_landmarks=r, causal=causal, cross=cross).double().eval(), chunk,
                         block_chunks)


@pytest.mark.parametrize("cross", [False, True])
def test_noncausal_equals_formula_with_padding(cross):
    attn = _build(cross=cross)
    x = torch.randn(7, 2, 32, dtype=torch.double)
    src = torch.randn(9, 2, 32, dtype=torch.double) if cross else None
    kv = x if src is None else src
    kpm = torch.zeros(2, kv.size(0), dtype=torch.bool)
    kpm[1, -3:] = True
    got = attn(x, kv, kv, key_padding_mask=kpm, need_weights=False)[0]
    with torch.no_grad():
        want = _finish(attn, _reference(attn, *_heads(attn, x, src), kpm))
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("chunk,block_chunks", [(1, 1), (2, 3), (4, 2), (64, 16)])
def test_causal_self_equals_prefix_formula(chunk, block_chunks):
    attn = _build(causal=True, chunk=chunk, block_chunks=block_chunks)
    x = torch.randn(13, 2, 32, dtype=torch.double)
    kpm = torch.zeros(2, 13, dtype=torch.bool)
    kpm[1, :3] = True  # left padding
    kpm[0, -2:] = True  # right padding
    got = attn(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
    with torch.no_grad():
        want = _finish(attn, _reference(attn, *_heads(attn, x, None), kpm, causal=True))
    real = ~kpm.t()
    torch.testing.assert_close(got[real], want[real], atol=1e-10, rtol=0)


@pytest.mark.parametrize("tgt_len,src_len", [(11, 9), (5, 9), (9, 9)])
def test_causal_cross_equals_prefix_formula(tgt_len, src_len):
    attn = _build(causal=True, cross=True)
    x = torch.randn(tgt_len, 2, 32, dtype=torch.double)
    src = torch.randn(src_len, 2, 32, dtype=torch.double)
    got = attn(x, src, src, need_weights=False)[0]
    with torch.no_grad():
        want = _finish(attn, _reference(attn, *_heads(attn, x, src), causal=True))
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    # decoding: the cached source, one query step at a time (query_offset = earlier steps)
    state, steps = {}, []
    for t in range(tgt_len):
        steps.append(attn(x[t:t + 1], src, src, incremental_state=state, static_kv=True, need_weights=False)[0])
    torch.testing.assert_close(torch.cat(steps), want, atol=1e-10, rtol=0)


# ------------------------------------------------------------------------------- the reference's bug
def _causal_heads_out(attn, x):
    q, k, v = _heads(attn, x, None)
    out, _ = attn.attend(q, k, v, key_padding_mask=None, attn_mask=None, query_offset=0, need_weights=False)
    return out, v


def test_causal_output_is_not_a_multiple_of_the_current_value():
    """The CAB reference gave o_t = c * v_t (cosine 0.99999976): no sum over earlier keys."""
    attn = _build(causal=True, r=4)
    x = torch.randn(40, 2, 32, dtype=torch.double)
    with torch.no_grad():
        out, v = _causal_heads_out(attn, x)
    cosine = F.cosine_similarity(out[:, :, 5:], v[:, :, 5:], dim=-1).abs()
    assert cosine.mean() < 0.8, f"o_t is (nearly) parallel to v_t: mean |cos| = {cosine.mean():.4f}"


def test_past_tokens_change_the_last_output_substantially():
    """Replacing every earlier token must move o_T like any attention would (the reference moved it by 6e-3)."""
    attn = _build(causal=True, r=4)
    x = torch.randn(40, 2, 32, dtype=torch.double)
    x2 = x.clone()
    x2[:-1] = torch.randn(39, 2, 32, dtype=torch.double)
    with torch.no_grad():
        out, _ = _causal_heads_out(attn, x)
        out2, _ = _causal_heads_out(attn, x2)
    change = (out2[:, :, -1] - out[:, :, -1]).norm() / out[:, :, -1].norm()
    assert change > 0.2, f"o_T barely depends on the past: relative change {change:.4f}"


# --------------------------------------------------------------------------------------- the chunked op
def _op_inputs(bsz=2, heads=2, length=19, dim=5, slots=3, scale=1.0, seed=0, dtype=torch.double):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(bsz, heads, length, dim, generator=g, dtype=dtype) for _ in range(3))
    ak, av = (torch.randn(bsz, heads, length, slots, generator=g, dtype=dtype) * scale for _ in range(2))
    return q, k, v, ak, av


def _slots_of(state):
    """What a state means, independent of its reference: the slots and log of the true denominators."""
    return (state.k_num / state.k_den.unsqueeze(-1), state.v_num / state.v_den.unsqueeze(-1),
            state.k_den.log() + state.k_max, state.v_den.log() + state.v_max)


def test_chunk_sizes_agree_with_each_other_and_with_dense():
    q, k, v, ak, av = _op_inputs()
    want, _ = causal_abc_dense(q, k, v, ak, av)
    results = [causal_abc(q, k, v, ak, av, chunk_size=c, block_chunks=b) for c, b in [(1, 4), (4, 2), (4, 1), (64, 1)]]
    for out, state in results:
        torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
        for got, ref in zip(_slots_of(state), _slots_of(results[0][1])):
            torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)


def test_state_continues_a_sequence():
    q, k, v, ak, av = _op_inputs(length=23)
    full, full_state = causal_abc(q, k, v, ak, av, chunk_size=4)
    state, outs = None, []
    for start, stop in [(0, 1), (1, 6), (6, 7), (7, 23)]:
        part = slice(start, stop)
        out, state = causal_abc(q[:, :, part], k[:, :, part], v[:, :, part], ak[:, :, part], av[:, :, part], state,
                                chunk_size=4)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 2), full, atol=1e-12, rtol=0)
    for got, ref in zip(_slots_of(state), _slots_of(full_state)):
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_and_jumping_scores_stay_exact(dtype):
    """Scores of +-1e3 and a 300-nat jump inside one chunk: finite, and equal to the logcumsumexp reference."""
    q, k, v, ak, av = _op_inputs(length=24, scale=1e3, dtype=dtype)
    ak[:, :, 10:] += 300.0  # rows 8..9 of the chunk [8, 12) sit far below its maximum
    av[:, :, :12] -= 5000.0
    want, _ = causal_abc_dense(q.double(), k.double(), v.double(), ak.double(), av.double())
    out, state = causal_abc(q, k, v, ak, av, chunk_size=4)
    assert torch.isfinite(out).all() and all(torch.isfinite(t).all() for t in state)
    torch.testing.assert_close(out.double(), want, atol=1e-4 if dtype == torch.float32 else 1e-10, rtol=0)


def test_gradcheck_float64():
    """The fused function's hand-written backward, and the fallback path (checkpointed blocks, autograd)."""
    inputs = [t.requires_grad_() for t in _op_inputs(bsz=1, heads=2, length=7, dim=3, slots=2)]
    # chunks of 2: carried state, masked chunk matrices, a padded tail
    assert torch.autograd.gradcheck(lambda *a: causal_abc(*a, chunk_size=2)[0], inputs)
    fallback = lambda *a: causal_abc(*a, chunk_size=2, block_chunks=2, fused=False)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fallback, inputs, fast_mode=True)


def test_fused_backward_equals_autograd_with_padding():
    inputs = [t.requires_grad_() for t in _op_inputs(length=30)]
    with torch.no_grad():
        inputs[3][0, :, :5] = inputs[4][0, :, :5] = torch.finfo(torch.double).min  # left-padded keys
    grad = torch.randn(2, 2, 30, 5, dtype=torch.double)
    fused = torch.autograd.grad((causal_abc(*inputs, chunk_size=7)[0] * grad).sum(), inputs)
    plain = torch.autograd.grad((causal_abc(*inputs, chunk_size=7, fused=False)[0] * grad).sum(), inputs)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_fused_groups_of_chunks_backward_and_state():
    """The fused function walks the chunks in groups of ``block_chunks`` (state carried forward, its gradient
    backward): several groups, a ragged last group and a padded tail agree with one group and with autograd."""
    inputs = [t.requires_grad_() for t in _op_inputs(length=31)]
    with torch.no_grad():
        inputs[3][0, :, :5] = inputs[4][0, :, :5] = torch.finfo(torch.double).min  # left-padded keys
    grad = torch.randn(2, 2, 31, 5, dtype=torch.double)
    one_out, one_state = causal_abc(*inputs, chunk_size=3, block_chunks=64)
    one = torch.autograd.grad((one_out * grad).sum(), inputs)
    plain = torch.autograd.grad((causal_abc(*inputs, chunk_size=3, fused=False)[0] * grad).sum(), inputs)
    for groups in (1, 2, 4):
        out, state = causal_abc(*inputs, chunk_size=3, block_chunks=groups)
        torch.testing.assert_close(out, one_out, atol=1e-12, rtol=0)
        for a, b in zip(state, one_state):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
        for a, b, c in zip(torch.autograd.grad((out * grad).sum(), inputs), one, plain):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
            torch.testing.assert_close(a, c, atol=1e-12, rtol=0)
    small = [t.detach()[:1, :1, :9, :3].clone().requires_grad_() for t in inputs[:3]]
    small += [t.detach()[:1, :1, 5:14].clone().requires_grad_() for t in inputs[3:]]
    assert torch.autograd.gradcheck(lambda *a: causal_abc(*a, chunk_size=2, block_chunks=2)[0], small)


def test_fused_backward_from_a_carried_state_equals_autograd():
    """A segment that starts from the previous segment's state (memory over a stream): backward rebuilds each
    group's carried numerators from the state entering it, so the state must enter the first group too."""
    inputs = _op_inputs(length=40)
    _, state = causal_abc(*(t[:, :, :17] for t in inputs), chunk_size=3)
    inputs = [t[:, :, 17:].clone().requires_grad_() for t in inputs]
    grad = torch.randn(2, 2, 23, 5, dtype=torch.double)
    plain = torch.autograd.grad((causal_abc(*inputs, state, chunk_size=3, fused=False)[0] * grad).sum(), inputs)
    for groups in (1, 3, 64):
        out, _ = causal_abc(*inputs, state, chunk_size=3, block_chunks=groups)
        for a, b in zip(torch.autograd.grad((out * grad).sum(), inputs), plain):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def _rising_inputs(length, slope, seed):
    """Op inputs whose slot scores rise by ``slope`` per position (as ALiBi's decay makes them), and an output
    gradient."""
    q, k, v, ak, av = _op_inputs(length=length, dim=8, slots=4, seed=seed)
    rising = slope * torch.arange(length, dtype=torch.double).view(1, 1, -1, 1)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.double)
    return q, k, v, ak + rising, av + rising, grad


def _grads_in(dtype, inputs, grad, state=None, fused=True):
    """Input gradients of ``causal_abc`` (chunks of 64) computed in ``dtype``."""
    inputs = [t.to(dtype).requires_grad_() for t in inputs]
    state = None if state is None else type(state)(*(t.to(dtype) for t in state))
    out, _ = causal_abc(*inputs, state, chunk_size=64, fused=fused)
    return torch.autograd.grad((out * grad.to(dtype)).sum(), inputs)


@pytest.mark.parametrize("carried", [False, True])
def test_fused_float32_gradients_with_scores_rising_through_a_chunk(carried):
    """ALiBi's decay adds ``slope * j`` to every slot score: with slope 1/4 and chunks of 64 the first rows of a
    chunk sit ~16 nats below its reference, so their denominators are ~1e-7 and their score gradients ~1e7. The
    backward's reverse cumulative sums must add those from the end: computed as ``total - cumsum`` they lost
    the later rows' sums to float32 rounding (slot-score gradients off by 0.6 against a norm of 4; a language
    model with memory diverged after ~2,000 updates). float32 must agree with float64 to float32 precision."""
    *inputs, grad = _rising_inputs(256, 0.25, seed=3)
    state = None
    if carried:
        _, state = causal_abc(*(t[:, :, :128] for t in inputs))
        inputs, grad = [t[:, :, 128:] for t in inputs], grad[:, :, 128:]
    got, want = (_grads_in(dtype, inputs, grad, state) for dtype in (torch.float32, torch.float64))
    for name, a, b in zip("q k v alpha_k alpha_v".split(), got, want):
        assert (a.double() - b).norm() <= 1e-5 * b.norm(), name


@pytest.mark.parametrize("slope,fused", [(0.8, False), (7.0, True)])
def test_fallback_float32_gradients_stay_finite_near_the_gap_limit(slope, fused):
    """The plain-autograd path (``fused=False``, and the fallback for scores jumping > ~60 nats in a chunk, which
    redoes blocks in chunks 8x smaller) divides by row denominators whose square its backward forms: a chunk's
    first rows 45-60 nats below its reference (slope 0.8 over 64 rows; slope 7 over the redone 8-row chunks)
    made them underflow and the slot gradients NaN. That path now redoes chunks past half the range."""
    *inputs, grad = _rising_inputs(128, slope, seed=5)
    got, want = (_grads_in(dtype, inputs, grad, fused=fused) for dtype in (torch.float32, torch.float64))
    scale = max(b.norm() for b in want)  # slope 7 leaves q almost no influence: its gradient is ~1e-3 of v's
    for name, a, b in zip("q k v alpha_k alpha_v".split(), got, want):
        assert torch.isfinite(a).all(), name
        assert (a.double() - b).norm() <= 1e-5 * scale, name


def test_fused_dropout_backward_matches_its_forward():
    """With dropout the fused backward uses the mask its forward drew: a finite-difference check of the same
    draw (the RNG reseeded before every call)."""
    inputs = [t.requires_grad_() for t in _op_inputs(bsz=1, heads=1, length=9, dim=3, slots=3)]

    def run(*a):
        torch.manual_seed(5)
        return causal_abc(*a, chunk_size=2, block_chunks=2, dropout_p=0.3)[0]

    out = run(*inputs)
    assert (out != run(*[t.detach() for t in inputs])).sum() == 0
    assert torch.autograd.gradcheck(run, inputs)


# ----------------------------------------------------------------------------------- module behaviour
def test_decoding_state_has_constant_size():
    attn = _build(causal=True, chunk=4)
    x = torch.randn(30, 2, 32, dtype=torch.double)
    state, sizes = {}, set()
    with torch.no_grad():
        for t in range(30):
            attn(x[t:t + 1], incremental_state=state, need_weights=False)
            (buf,) = state.values()
            sizes.add(tuple((name, tuple(b.shape)) for name, b in sorted(buf.items())))
    assert len(sizes) == 1 and "prev_key" not in dict(next(iter(sizes)))


@pytest.mark.parametrize("causal", [False, True])
def test_weights_are_the_equivalent_attention(causal):
    attn = _build(causal=causal)
    x = torch.randn(9, 2, 32, dtype=torch.double)
    q, k, v = _heads(attn, x, None)
    with torch.no_grad():
        out, weights = attn.attend(q, k, v, key_padding_mask=None, attn_mask=None, query_offset=0, need_weights=True)
        plain, _ = attn.attend(q, k, v, key_padding_mask=None, attn_mask=None, query_offset=0, need_weights=False)
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)), atol=1e-10, rtol=0)
    torch.testing.assert_close(weights @ v, out, atol=1e-10, rtol=0)
    torch.testing.assert_close(plain, out, atol=1e-10, rtol=0)
    if causal:
        assert (weights.triu(1) == 0).all()


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "16"])
def test_num_landmarks_validated(bad):
    with pytest.raises(ValueError, match="num_landmarks"):
        ABC(32, 4, num_landmarks=bad)


def test_registry_and_parameters():
    spec = get_attention("abc")
    attn = spec.build(32, 4, causal=True, **spec.tiny)
    assert isinstance(attn, FSABC) and attn.compress_k.shape == (8, spec.tiny["num_landmarks"])
    assert [o.default for o in spec.options if o.name == "num_landmarks"] == [16]
    bound = 2 ** -0.5 * (6 / (8 + 16)) ** 0.5  # Xavier-uniform with gain 2^-1/2 on (head_dim, r)
    default = FSABC(32, 4)
    assert default.compress_v.abs().max() <= bound and default.compress_k.std() > bound / 4


def test_compressed_slots_and_slot_attention_in_layout_match_plain_autograd():
    """The noncausal training path's two functions (slots scored by x W, and attention over the slots written in
    the projections' layout) keep less for backward; their values and gradients must be those of the plain
    expressions, with padding, a fully padded row and strided heads views as the attention passes them."""
    from fluence_fairseq.ops.abc import attend_slots, attend_slots_in_layout, compressed_slots, slot_memory

    gen = torch.Generator().manual_seed(0)
    bsz, heads, length, dim, slots = 2, 3, 7, 4, 5

    def heads_view(seed):  # (L, B, H*d) projection output -> (B, H, L, d) view
        t = torch.randn(length, bsz, heads * dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return t.view(length, bsz, heads, dim).permute(1, 2, 0, 3).requires_grad_()

    q, k, v = heads_view(1), heads_view(2), heads_view(3)
    w_k = torch.randn(dim, slots, generator=gen, dtype=torch.float64, requires_grad=True)
    w_v = torch.randn(dim, slots, generator=gen, dtype=torch.float64, requires_grad=True)
    pad = torch.zeros(bsz, length, dtype=torch.bool)
    pad[1, 4:] = True

    def fused(q, k, v, w_k, w_v):
        return attend_slots_in_layout(q, compressed_slots(k, w_k, pad), compressed_slots(v, w_v, pad))

    def plain(q, k, v, w_k, w_v):
        low = torch.finfo(torch.float64).min
        a_k = torch.matmul(k, w_k).masked_fill(pad.view(bsz, 1, length, 1), low)
        a_v = torch.matmul(v, w_v).masked_fill(pad.view(bsz, 1, length, 1), low)
        return attend_slots(q, *slot_memory(k, v, a_k, a_v))[0]

    inputs = (q, k, v, w_k, w_v)
    out = fused(*inputs)
    torch.testing.assert_close(out, plain(*inputs), atol=1e-12, rtol=0)
    assert out.permute(2, 0, 1, 3).is_contiguous()  # stored as (L, B, H, d): the way back to (L, B, D) is a view
    assert torch.autograd.gradcheck(fused, inputs)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = [torch.autograd.grad(fn(*inputs), inputs, g) for fn in (fused, plain)]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert grads[0][0].permute(2, 0, 1, 3).is_contiguous() and grads[0][1].permute(2, 0, 1, 3).is_contiguous()
    all_padded = torch.ones(bsz, length, dtype=torch.bool)  # no key at all: uniform slots, finite gradients
    grads = torch.autograd.grad(compressed_slots(k, w_k, all_padded).sum(), (k, w_k))
    assert all(bool(t.isfinite().all()) for t in grads)


def test_reuse_query_writes_the_query_gradient_over_q():
    """reuse_query (fused causal path): the same output and gradients, the query gradient in q's own memory, a
    second backward refused."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 2, 24, 4, dtype=torch.float64, generator=g) for _ in range(3))
    ak, av = (torch.randn(2, 2, 24, 3, dtype=torch.float64, generator=g) for _ in range(2))
    w = torch.randn(2, 2, 24, 4, dtype=torch.float64, generator=g)
    check_query_gradient_reused(
        lambda q, k, v, ak, av, reuse: causal_abc(q, k, v, ak, av, chunk_size=4, block_chunks=2,
                                                  reuse_query=reuse)[0], (q, k, v, ak, av), w)


@pytest.mark.parametrize("length", [24, 26])  # 26: a tail that the fused path pads
@pytest.mark.parametrize("mode", ["fused", "fused-reuse", "plain"])
def test_slot_maps_make_the_scores_and_take_their_gradient(length, mode):
    """slot_maps: the op makes the slot scores x @ w + shift (finfo.min at padding) itself and takes their
    gradient into k, v and the maps: the same output and gradients (maps included) as scores made by autograd
    outside, on the fused path (with and without writing over the inputs) and on the plain fallback."""
    g = torch.Generator().manual_seed(9)
    heads, dim, slots = 2, 4, 3
    q, k, v = (torch.randn(2, heads, length, dim, dtype=torch.float64, generator=g) for _ in range(3))
    maps = [torch.randn(dim, slots, dtype=torch.float64, generator=g) for _ in range(2)]
    shift = torch.randn(heads, length, dtype=torch.float64, generator=g)
    pad = torch.zeros(2, length, dtype=torch.bool)
    pad[1, :3] = True
    w = torch.randn(2, heads, length, dim, dtype=torch.float64, generator=g)
    low = torch.finfo(torch.float64).min

    def run(outside):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, *maps)]
        if outside:
            ak, av = ((x @ m + shift[None, :, :, None]).masked_fill(pad[:, None, :, None], low)
                      for x, m in ((leaves[1], leaves[3]), (leaves[2], leaves[4])))
            out = causal_abc(*leaves[:3], ak, av, chunk_size=4, block_chunks=2)[0]
        else:
            given = [t * 1.0 for t in leaves[:3]]
            out = causal_abc(*given, None, None, chunk_size=4, block_chunks=2, slot_maps=tuple(leaves[3:]),
                             slot_shift=shift, slot_pad=pad, reuse_inputs=mode == "fused-reuse",
                             fused=mode != "plain")[0]
            if mode == "fused-reuse":
                (out * w).sum().backward()
                # the gradients were written over the inputs (over its padded copies when the length needs a tail)
                for inside, leaf, original in zip(given, leaves[:3], (q, k, v)):
                    torch.testing.assert_close(inside.detach(), leaf.grad if length % 4 == 0 else original,
                                               rtol=0, atol=0)
                return [out.detach()] + [t.grad for t in leaves]
        (out * w).sum().backward()
        return [out.detach()] + [t.grad for t in leaves]

    for got, want in zip(run(False), run(True)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="not both"):
        causal_abc(q, k, v, q[..., :slots], v[..., :slots], slot_maps=tuple(maps))
