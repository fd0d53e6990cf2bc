"""ops.linear_attention: the scans of the carried states over a group's chunks (both ways, loop and cumsum)."""
import pytest
import torch

from fluence_fairseq.ops import linear_attention as ops


def _naive_scan(per_chunk, initial, reverse):
    """State entering each chunk and the final one, as plain Python sums."""
    chunks = per_chunk.size(2)
    order = list(range(chunks))[::-1] if reverse else list(range(chunks))
    states = torch.empty_like(per_chunk)
    state = initial.clone()
    for t in order:
        states[:, :, t] = state
        state = state + per_chunk[:, :, t]
    return states, state


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("chunks", [1, 2, 8])
@pytest.mark.parametrize("tail", [(5,), (5, 3)])  # a denominator's key sums (cumsum) and a numerator's (loop)
def test_scans_match_naive_sums(reverse, chunks, tail, monkeypatch):
    torch.manual_seed(chunks)
    per_chunk = torch.randn(2, 3, chunks, *tail, dtype=torch.float64)
    initial = torch.randn(2, 3, *tail, dtype=torch.float64)
    want_states, want_final = _naive_scan(per_chunk, initial, reverse)
    monkeypatch.setattr(ops, "CUMSUM_STATE_ELEMENTS", 5)  # (5,) takes the cumsum, (5, 3) the loop
    states, final = ops._scan_states(per_chunk, initial, None, reverse=reverse)
    assert states.shape == per_chunk.shape and final.shape == initial.shape
    torch.testing.assert_close(states, want_states, rtol=0, atol=1e-13)
    torch.testing.assert_close(final, want_final, rtol=0, atol=1e-13)


@pytest.mark.parametrize("reverse", [False, True])
def test_cumsum_scan_leaves_its_inputs_alone(reverse):
    torch.manual_seed(0)
    per_chunk, initial = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 4)
    kept = per_chunk.clone(), initial.clone()
    ops._scan_by_cumsum(per_chunk, initial, reverse)
    assert torch.equal(per_chunk, kept[0]) and torch.equal(initial, kept[1])


def test_denominator_states_take_the_cumsum(monkeypatch):
    """The (B, H, T, M) key sums take the cumsum, the (B, H, T, M, d) numerators the loop, decayed states the loop."""
    calls = []
    real = ops._scan_by_cumsum
    monkeypatch.setattr(ops, "_scan_by_cumsum", lambda *a: calls.append(a[0].shape) or real(*a))
    ops._scan_states(torch.randn(1, 8, 8, 128), torch.zeros(1, 8, 128), None)
    ops._scan_states(torch.randn(1, 8, 8, 128, 64), torch.zeros(1, 8, 128, 64), None)
    ops._scan_states(torch.randn(1, 8, 8, 128), torch.zeros(1, 8, 128), torch.rand(1, 8, 8))
    assert calls == [torch.Size([1, 8, 8, 128])]


@pytest.mark.parametrize("scaled", [False, True])  # Performer's key log scales, or none (cosFormer)
@pytest.mark.parametrize("mixed", [False, True])  # cosFormer's sin/cos multipliers
def test_a_decoding_step_equals_the_chunked_function_with_its_gradients(scaled, mixed, monkeypatch):
    """One query with its own key after a state (a decoding step) takes a few products instead of the chunked
    function's groups: the output, the next state and every gradient (q, k, v, the log scales) are the chunked
    function's, with a key scale above the running maximum (the state rescaled), one far below it, and a padded
    key."""
    g = torch.Generator().manual_seed(0)
    bsz, heads, m, d = 3, 2, 4, 5

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    mix_prefix = rand(1, 1, 6, 2) if mixed else None
    prefix = ops.causal_linear_attention(rand(bsz, heads, 6, m), rand(bsz, heads, 6, m), rand(bsz, heads, 6, d),
                                         key_log_scale=rand(bsz, heads, 6) if scaled else None, eps=1e-12,
                                         query_mix=mix_prefix, key_mix=mix_prefix)[1]
    leaves = [rand(bsz, heads, 1, m).requires_grad_(), rand(bsz, heads, 1, m).requires_grad_(),
              rand(bsz, heads, 1, d).requires_grad_()]
    if scaled:  # above the running maximum in row 0, far below it in row 1
        leaves.append(torch.tensor([[3.0, 0.5], [-40.0, 0.2], [0.1, 0.3]], dtype=torch.float64).view(bsz, heads, 1)
                      .requires_grad_())
    mix = rand(1, 1, 1, 2) if mixed else None
    padding = torch.tensor([[False], [False], [True]])

    def run():
        q, k, v = leaves[:3]
        out, state = ops.causal_linear_attention(q, k, v, key_log_scale=leaves[3] if scaled else None,
                                                 key_padding_mask=padding, state=prefix, eps=1e-12, query_mix=mix,
                                                 key_mix=mix)
        weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        return [out.detach(), *state, *torch.autograd.grad((out * weight).sum(), leaves)]

    steps = []
    original = ops._single_step
    monkeypatch.setattr(ops, "_single_step", lambda *a: steps.append(1) or original(*a))
    fast = run()
    assert steps == [1]
    monkeypatch.setattr(ops, "_single_step_applies", lambda *a: False)
    chunked = run()
    assert steps == [1]
    for got, want in zip(fast, chunked):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert not any(t.requires_grad for t in fast[1:4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_raw_grad_is_relus_backward_in_place(dtype):
    """dL/d raw input from dL/d features: the gradient where x > 0, exactly 0 where x <= 0 (0 itself included, as
    torch's relu), written over the gradient (a strided view of fairseq's heads too)."""
    from fluence_fairseq.ops.linear_attention import _raw_grad

    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 2, 3, 8, generator=g).to(dtype).permute(1, 2, 0, 3)
    x[0, 0, :4] = 0.0
    grad = torch.randn(2, 3, 37, 8, generator=g).to(dtype)
    leaf = x.detach().clone().requires_grad_()
    torch.relu(leaf).backward(grad)
    want = leaf.grad
    got = _raw_grad(grad.clone(), x, relu=True)
    assert torch.equal(got, want)
    assert bool((got[0, 0, :4] == 0).all()) and bool((got[x <= 0] == 0).all())
    same = grad.clone()
    assert _raw_grad(same, x, relu=True).data_ptr() == same.data_ptr()
    assert _raw_grad(same, x, relu=False) is same
    # written straight into the caller's strided rows (fairseq's heads layout), the gradient itself untouched
    for relu in (True, False):
        rows = torch.full((37, 2, 3, 8), float("nan"), dtype=dtype).permute(1, 2, 0, 3)
        kept = grad.clone()
        got = _raw_grad(kept[:, :, 5:20], x[:, :, 5:20], relu=relu, out=rows[:, :, 5:20])
        assert got.data_ptr() == rows[:, :, 5:20].data_ptr()
        assert torch.equal(rows[:, :, 5:20], (want if relu else grad)[:, :, 5:20])
        assert bool(rows[:, :, :5].isnan().all()) and bool(rows[:, :, 20:].isnan().all())
        assert torch.equal(kept, grad)


@pytest.mark.parametrize("causal,keys", [(False, 12), (True, 12), (True, 8)])
def test_denominator_floor_in_forward_and_backward(causal, keys, monkeypatch):
    """Queries whose denominator falls under ``eps`` (all features zero after relu, or tiny) take ``num / eps``,
    and the floor passes no gradient to the denominator: outputs and gradients equal autograd through the explicit
    formula (relu features, float64), in blocks of 4 positions (several blocks, the floored rows inside them);
    with 8 keys for 12 causal queries the floored rows lie in the tail that sees every key."""
    monkeypatch.setattr(ops, "GROUP", 4)
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 2, 12, 4, dtype=torch.float64, generator=gen)
    k, v = (torch.randn(1, 2, keys, 4, dtype=torch.float64, generator=gen) for _ in range(2))
    floored = (3, 6) if keys == 12 else (9, 10)
    q[:, :, floored[0]] = -q[:, :, floored[0]].abs()  # features exactly 0: den = 0
    q[:, :, floored[1]] = 1e-9 * q[:, :, floored[1]].abs()  # den about 1e-8 < eps
    k[:, :, 0] = k[:, :, 0].abs()  # the first key has features, so causal rows have keys
    eps = 1e-6
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    fq, fk = torch.relu(leaves[0]), torch.relu(leaves[1])
    scores = fq @ fk.transpose(-1, -2)
    if causal:
        scores = scores.tril()
    want = (scores @ leaves[2]) / scores.sum(-1, keepdim=True).clamp_min(eps)
    den = scores.sum(-1).detach()
    assert (den[:, :, floored[0]] == 0).all()
    assert (den[:, :, floored[1]] > 0).all() and (den[:, :, floored[1]] < eps).all()
    grad = torch.randn(want.shape, dtype=torch.float64, generator=gen)
    want_grads = torch.autograd.grad(want, leaves, grad)
    owned = [t.clone().requires_grad_(True) for t in (q, k, v)]
    got = ops.linear_attention(*owned, causal=causal, eps=eps, relu=True, chunk_size=2)
    torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
    for g, w in zip(torch.autograd.grad(got, owned, grad), want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def _naive_decayed_scan(per_chunk, initial, decay, reverse):
    chunks = per_chunk.size(2)
    order = list(range(chunks))[::-1] if reverse else list(range(chunks))
    states = torch.empty_like(per_chunk)
    state = initial.clone()
    shape = decay.shape + (1,) * (per_chunk.dim() - 3)
    for t in order:
        states[:, :, t] = state
        state = state * decay.view(shape)[:, :, t] + per_chunk[:, :, t]
    return states, state


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("chunks", [1, 2, 8])
@pytest.mark.parametrize("tail", [(5,), (5, 3)])
def test_decayed_scans_match_naive_sums(reverse, chunks, tail):
    """The decayed scan (Performer's key scales) against a plain loop: decays of 1, of 0 (a state wiped by a far
    larger scale: exp underflowed) and between."""
    gen = torch.Generator().manual_seed(chunks + 10 * len(tail))
    per_chunk = torch.randn(2, 3, chunks, *tail, dtype=torch.float64, generator=gen)
    initial = torch.randn(2, 3, *tail, dtype=torch.float64, generator=gen)
    decay = torch.rand(2, 3, chunks, dtype=torch.float64, generator=gen)
    decay[0, 0] = 1.0
    decay[1, 2, chunks // 2] = 0.0
    want_states, want_final = _naive_decayed_scan(per_chunk, initial, decay, reverse)
    states, final = ops._scan_states(per_chunk, initial, decay, reverse=reverse)
    assert states.shape == per_chunk.shape and final.shape == initial.shape
    torch.testing.assert_close(states, want_states, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(final, want_final, rtol=1e-13, atol=1e-13)


def _explicit_linear_attention(q, k, v, *, relu, qmix, kmix, log_scale, padding, eps, causal=False):
    """Autograd reference: the features made and mixed in full, the weights formed as an L x S matrix."""
    fq, fk = (torch.relu(q), torch.relu(k)) if relu else (q, k)
    if qmix is not None:
        fq = (fq.unsqueeze(-2) * qmix.unsqueeze(-1)).flatten(-2)
        fk = (fk.unsqueeze(-2) * kmix.unsqueeze(-1)).flatten(-2)
    scores = fq @ fk.transpose(-1, -2)
    if log_scale is not None:
        scores = scores * torch.exp(log_scale - log_scale.amax(-1, keepdim=True)).unsqueeze(-2)
    if padding is not None:
        scores = scores.masked_fill(padding[:, None, None, :], 0.0)
    if causal:
        scores = scores.tril()
    return (scores @ v) / scores.sum(-1, keepdim=True).clamp_min(eps)


@pytest.mark.parametrize("mixes", [0, 1, 2, 3])  # no multipliers; r = 1, 2 (cosFormer's sin/cos), 3
@pytest.mark.parametrize("relu,reuse", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("weighted", [False, True])  # per-key log scales (Performer) and padding
def test_noncausal_gradients_match_the_explicit_formula(mixes, relu, reuse, weighted, monkeypatch):
    """The noncausal function's outputs and gradients against autograd through the explicit formula (float64), in
    blocks of 4 positions over 11 queries and 9 keys: its backward forms neither the mixed query features nor the
    numerator (the multipliers act on the output's gradient and on the values) and reads the forward's
    denominators, so each of the r multipliers, the key weights, the floor and relu's mask must enter exactly as
    there. With ``reuse`` (relu applied to the inputs in place, the gradients written over them) the caller's
    tensors are the op's, so the op gets copies."""
    monkeypatch.setattr(ops, "GROUP", 4)
    gen = torch.Generator().manual_seed(11 + mixes)
    q = torch.randn(2, 3, 11, 5, dtype=torch.float64, generator=gen)
    k, v = torch.randn(2, 3, 9, 5, dtype=torch.float64, generator=gen), torch.randn(2, 3, 9, 4, dtype=torch.float64,
                                                                                   generator=gen)
    if not relu:  # given features are nonnegative
        q, k = q.abs(), k.abs()
    q[0, 1, 2] = -q[0, 1, 2].abs() if relu else 0.0  # a row with no features: its denominator floored
    qmix = kmix = None
    if mixes:
        qmix = torch.rand(2, 1, 11, mixes, dtype=torch.float64, generator=gen)
        kmix = torch.rand(1, 1, 9, mixes, dtype=torch.float64, generator=gen)
    log_scale = padding = None
    if weighted:
        log_scale = 3 * torch.randn(2, 3, 9, dtype=torch.float64, generator=gen)
        padding = torch.zeros(2, 9, dtype=torch.bool)
        padding[1, 6:] = True
    if reuse and weighted:  # reuse refuses log scales (their gradient reads the keys)
        log_scale = None
    eps = 1e-6
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    scale_leaf = None if log_scale is None else log_scale.clone().requires_grad_(True)
    want = _explicit_linear_attention(*leaves, relu=relu, qmix=qmix, kmix=kmix, log_scale=scale_leaf,
                                      padding=padding, eps=eps)
    grad = torch.randn(want.shape, dtype=torch.float64, generator=gen)
    inputs = leaves + ([scale_leaf] if scale_leaf is not None else [])
    want_grads = torch.autograd.grad(want, inputs, grad)
    owned = [t.clone().requires_grad_(True) for t in (q, k, v)]
    scale_own = None if log_scale is None else log_scale.clone().requires_grad_(True)
    # reuse: three memories of the op's own (a view of each leaf, as fairseq's heads are views of projections)
    args = [t * 1.0 for t in owned] if reuse else owned
    got = ops.linear_attention(*args, causal=False, eps=eps, relu=relu, query_mix=qmix, key_mix=kmix,
                               key_log_scale=scale_own, key_padding_mask=padding, reuse_inputs=reuse)
    torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
    got_grads = torch.autograd.grad(got, owned + ([scale_own] if scale_own is not None else []), grad)
    for name, g, w in zip(("q", "k", "v", "log_scale"), got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
