"""The band-attention kernels in fluence_fairseq.ops, checked against the dense reference and by gradcheck."""
import pytest
import torch

import fluence_fairseq.ops.band as band
from fluence_fairseq.ops import band_attention, dense_attention


def qkv(B=2, H=3, L=37, D=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU, used on the test's (default) device
    return [torch.randn(B, H, L, D, generator=g, dtype=dtype, device="cpu").to(torch.get_default_device())
            .requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("left,right", [(5, 0), (7, 7), (3, 9)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_blocked_path_equals_dense_path_with_gradients(left, right, with_mask, monkeypatch):
    monkeypatch.setattr(band, "_GROUP_ELEMENTS", 200)  # several block groups
    q, k, v = qkv()
    B, H, L, _ = q.shape
    bias_table = torch.randn(H, 2 * L, dtype=torch.float64, requires_grad=True)
    rel_bias = lambda rel: bias_table[:, (rel + L).clamp(0, 2 * L - 1)]  # noqa: E731
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1, :4] = True
    attn_mask = None
    if with_mask:
        attn_mask = torch.zeros(1, 1, L, L, dtype=torch.float64)
        attn_mask[..., 10:20, 12:15] = -3.0
    kwargs = dict(query_offset=0, left=left, right=right, rel_bias=rel_bias, key_padding_mask=kpm, attn_mask=attn_mask)
    blocked = band.blocked_band_attention(q, k, v, block_size=8, **kwargs)
    dense, _ = dense_attention(q, k, v, **kwargs)
    real = ~kpm.view(B, 1, L, 1).expand_as(blocked) if right == 0 else torch.ones_like(blocked, dtype=torch.bool)
    torch.testing.assert_close(blocked[real], dense[real])
    weights = torch.randn_like(dense)
    grads_b = torch.autograd.grad((blocked * weights)[real].sum(), [q, k, v, bias_table])
    grads_d = torch.autograd.grad((dense * weights)[real].sum(), [q, k, v, bias_table])
    for gb, gd in zip(grads_b, grads_d):
        torch.testing.assert_close(gb, gd)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_blocked_kernel_gradcheck(dropout_p, monkeypatch, device):
    monkeypatch.setattr(band, "_GROUP_ELEMENTS", 100)
    q, k, v = qkv(B=1, H=2, L=13, D=3)
    left, right, bq = 4, 2, 4
    nblocks, kb = 4, bq + left + right
    rel = torch.arange(bq).unsqueeze(1) + left - torch.arange(kb).unsqueeze(0)
    bandmask = (rel <= left) & (rel >= -right)
    bias = torch.randn(2, bq, kb, dtype=torch.float64, requires_grad=True)
    valid = torch.ones(1, nblocks, kb, dtype=torch.bool)
    valid[0, 0, :left] = False  # keys before the sequence start
    fn = lambda q, k, v, bias: band._BlockedBand.apply(  # noqa: E731
        q, k, v, bias, None, valid, bandmask, -left, bq, dropout_p, 1234)
    assert torch.autograd.gradcheck(fn, (q, k, v, bias))


def test_dropout_is_applied_and_reproducible_from_the_global_seed():
    q, k, v = qkv(dtype=torch.float32, L=64)
    kwargs = dict(query_offset=0, left=9, right=0, rel_bias=lambda rel: torch.zeros(3, *rel.shape),
                  dropout_p=0.5, block_size=8)
    torch.manual_seed(7)
    a = band.blocked_band_attention(q, k, v, **kwargs)
    torch.manual_seed(7)
    b = band.blocked_band_attention(q, k, v, **kwargs)
    no_dropout = band.blocked_band_attention(q, k, v, **{**kwargs, "dropout_p": 0.0})
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, no_dropout)


def test_blocked_path_keeps_only_linear_memory_for_backward():
    q, k, v = qkv(B=1, H=2, L=512, D=8, dtype=torch.float32)
    bias = torch.zeros(2, 1, 1, requires_grad=True)
    out, _ = band_attention(q, k, v, query_offset=0, left=31, right=0, rel_bias=lambda rel: bias.expand(2, *rel.shape),
                            block_size=32)
    saved = out.grad_fn.saved_tensors
    biggest = max(t.numel() for t in saved if t is not None)
    assert biggest <= 2 * 512 * 8 * 2, f"backward keeps a tensor of {biggest} elements"


# ------------------------------------------------------------------------------------- narrow-band path
@pytest.mark.parametrize("left,right,block", [(5, 0, 4), (7, 7, 8), (3, 9, 4), (0, 0, 4), (2, 2, 16)])
@pytest.mark.parametrize("tgt_len,cached", [(37, 0), (9, 6), (1, 6)], ids=["self", "cached-queries", "one-query"])
def test_narrow_path_equals_dense_path_with_gradients(left, right, block, tgt_len, cached):
    """All blocks of all heads in one batched op, with query offsets (decoding), padding, masks and a bias."""
    offset = min(cached, left)  # band_attention cuts the keys no query reaches before the narrow path
    src_len = tgt_len + offset
    g = torch.Generator().manual_seed(0)
    B, H, D = 2, 3, 4
    q = torch.randn(B, H, tgt_len, D, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, H, src_len, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    span = 2 * (tgt_len + src_len)
    bias_table = torch.randn(H, span, generator=g, dtype=torch.float64, requires_grad=True)
    rel_bias = lambda rel: bias_table[:, (rel + span // 2).clamp(0, span - 1)]  # noqa: E731
    kpm = torch.zeros(B, src_len, dtype=torch.bool)
    kpm[1, :2] = True
    kpm[0, -1] = True
    attn_mask = torch.randn(1, H, tgt_len, src_len, generator=g, dtype=torch.float64)
    kwargs = dict(query_offset=offset, left=left, right=right, rel_bias=rel_bias, key_padding_mask=kpm,
                  attn_mask=attn_mask)
    narrow = band.narrow_band_attention(q, k, v, block_size=block, **kwargs)
    dense, _ = dense_attention(q, k, v, **kwargs)
    rel = torch.arange(tgt_len).unsqueeze(1) + offset - torch.arange(src_len)
    visible = ((rel <= left) & (rel >= -right)).view(1, 1, tgt_len, src_len) & ~kpm.view(B, 1, 1, src_len)
    real = visible.any(-1, keepdim=True).expand_as(dense)  # rows with no visible key are arbitrary
    torch.testing.assert_close(narrow[real], dense[real])
    weights = torch.randn(dense.shape, generator=g, dtype=torch.float64) * real
    grads_n = torch.autograd.grad((narrow * weights).sum(), [q, k, v, bias_table])
    grads_d = torch.autograd.grad((dense * weights).sum(), [q, k, v, bias_table])
    for gn, gd in zip(grads_n, grads_d):
        torch.testing.assert_close(gn, gd)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_narrow_kernel_gradcheck(dropout_p, device):
    q, k, v = qkv(B=1, H=1, L=9, D=2)
    left, right, bq = 3, 2, 4
    kb, tail, a = 8, 1, 4  # kb: bq + left + right rounded up to whole blocks; a: first real query row
    nbs = (a + 9 + bq - 1) // bq + 1
    rel = torch.arange(bq).unsqueeze(1) + left - torch.arange(kb).unsqueeze(0)
    bandmask = (rel <= left) & (rel >= -right)
    bias = torch.randn(1, bq, kb, dtype=torch.float64, requires_grad=True)
    start = -a - left
    valid = band._windows(torch.ones(1, 9, dtype=torch.bool), 1, start, kb, bq, nbs, False).contiguous()
    fn = lambda q, k, v, bias: band._NarrowBand.apply(  # noqa: E731
        q, k, v, bias, None, valid, bandmask, (bq, a, nbs, 0, left, tail), dropout_p, 1234)
    assert torch.autograd.gradcheck(fn, (q, k, v, bias))


def test_narrow_path_is_chosen_for_narrow_bands_and_keeps_linear_memory():
    q, k, v = qkv(B=1, H=2, L=600, D=16, dtype=torch.float32)
    out, _ = band_attention(q, k, v, query_offset=0, left=7, right=7)
    assert type(out.grad_fn).__name__ == "_NarrowBandBackward"
    saved = [t for t in out.grad_fn.saved_tensors if t is not None]
    # scaled queries, flat keys and values (a few rows of padding each), probabilities (kb = 32 per query)
    assert sum(t.numel() for t in saved) <= 2 * 610 * (3 * 16 + 32) * 1.1
    wide, _ = band_attention(q, k, v, query_offset=0, left=40, right=40)
    assert type(wide.grad_fn).__name__ == "_BlockedBandBackward"


def test_narrow_path_dropout_is_reproducible_from_the_global_seed():
    q, k, v = qkv(dtype=torch.float32, L=64)
    kwargs = dict(query_offset=0, left=3, right=3, dropout_p=0.5, block_size=8)
    torch.manual_seed(7)
    a = band.narrow_band_attention(q, k, v, **kwargs)
    torch.manual_seed(7)
    b = band.narrow_band_attention(q, k, v, **kwargs)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, band.narrow_band_attention(q, k, v, **{**kwargs, "dropout_p": 0.0}))


@pytest.mark.parametrize("left,right,biased", [(7, 7, False), (9, 0, True), (20, 3, True), (None, 0, False),
                                               (None, None, False)])
def test_weights_of_long_inputs_come_from_the_band_without_a_full_score_matrix(left, right, biased, monkeypatch):
    """need_weights on a long input: the output from the banded path (SDPA without a band or bias), the weights
    block by block inside the band; both equal the dense computation, and no (Lq, Lk) score matrix is ever
    multiplied out (without a band the dense path used to keep every head's probabilities for backward)."""
    import fluence_fairseq.ops.band as band

    g = torch.Generator().manual_seed(3)
    B, H, L, D = 2, 2, 300, 8  # 90,000 query-key pairs: above the dense threshold
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for _ in range(3))
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1, :4] = True
    table = torch.randn(H, 2 * L, generator=g, dtype=torch.float64)
    rel_bias = (lambda rel: table[:, rel + L]) if biased else None
    kw = dict(query_offset=0, left=left, right=right, rel_bias=rel_bias, key_padding_mask=kpm)
    want_out, want_w = band.dense_attention(q, k, v, need_weights=True, **kw)
    shapes = []
    real_matmul = torch.matmul
    monkeypatch.setattr(band.torch, "matmul", lambda a, b: shapes.append(tuple(real_matmul(a, b).shape[-2:]))
                        or real_matmul(a, b))
    out, w = band.band_attention(q, k, v, need_weights=True, **kw)
    assert (L, L) not in shapes, "a full score matrix was computed"
    real = ~kpm.view(B, 1, L, 1)
    torch.testing.assert_close(out.masked_fill(~real, 0), want_out.masked_fill(~real, 0), atol=1e-10, rtol=0)
    torch.testing.assert_close(w.masked_fill(~real, 0), want_w.masked_fill(~real, 0), atol=1e-10, rtol=0)


@pytest.mark.parametrize("left, right", [(6, 0), (5, 3)])
def test_narrow_band_reusing_its_buffers_gives_the_same_gradients_once(left, right):
    """reuse_buffers: the narrow path writes the query and value gradients over the flat copies it kept; the
    numbers are the same bitwise (padding, dropout), and a second backward is refused instead of reading them."""
    from fluence_fairseq.ops.band import narrow_band_attention

    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 3, 37, 8, dtype=torch.float64, generator=g) for _ in range(3))
    kpm = torch.zeros(2, 37, dtype=torch.bool)
    kpm[1, -5:] = True
    w = torch.randn(2, 3, 37, 8, dtype=torch.float64, generator=g)
    results = []
    for reuse in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(3)
        out = narrow_band_attention(*leaves, query_offset=0, left=left, right=right, key_padding_mask=kpm,
                                    dropout_p=0.2, block_size=4, reuse_buffers=reuse)
        (out * w).sum().backward(retain_graph=reuse)
        results.append([out.detach()] + [t.grad for t in leaves])
        if reuse:
            with pytest.raises(RuntimeError, match="inplace"):
                (out * w).sum().backward()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _saved_elements(fn):
    """fn() under a saved-tensor hook: (its result, the number of elements autograd kept, by storage)."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(kept.values())


@pytest.mark.parametrize("left, right", [(6, 0), (5, 3)])
def test_narrow_band_in_a_whole_pass_frees_the_heads_and_the_output_gradient(left, right):
    """reuse_buffers also frees the caller's q, k and v once they are copied, recomputes the probabilities in
    backward instead of keeping them, and frees the output's gradient once copied: the same numbers bitwise, and
    only the three flat copies kept. Heads that are views of one larger buffer are never freed."""
    from fluence_fairseq.ops.band import narrow_band_attention

    g = torch.Generator().manual_seed(9)
    B, H, L, D = 2, 3, 37, 8
    base = torch.randn(3, B, H, L, D, dtype=torch.float64, generator=g)
    w = torch.randn(B, H, L, D, dtype=torch.float64, generator=g)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[0, -4:] = True
    kw = dict(query_offset=0, left=left, right=right, key_padding_mask=kpm, block_size=4)
    results, kept = [], []
    for reuse in (False, True):
        leaves = [t.clone().requires_grad_() for t in base]
        heads = [t * 1 for t in leaves]  # each covers its own storage, like a projection's output
        out, n_kept = _saved_elements(lambda: narrow_band_attention(*heads, reuse_buffers=reuse, **kw))
        freed = [h.untyped_storage().nbytes() == 0 for h in heads]
        assert freed == [reuse] * 3
        grad_out = w * 1
        out.backward(grad_out)
        assert (grad_out.untyped_storage().nbytes() == 0) == reuse
        results.append([out.detach()] + [t.grad for t in leaves])
        kept.append(n_kept)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    copies = kept[1]
    assert copies < 3 * B * H * (L + 4 * 4) * D + 2 * 4 * 16 * D  # three padded copies, no probabilities
    assert kept[0] > copies  # without reuse the probabilities are kept as well

    # q, k and v as views of one (3, ...) buffer: nothing is freed (other tensors live in it), same numbers
    leaf = base.clone().requires_grad_()
    fused = leaf * 1
    out = narrow_band_attention(*fused.unbind(0), reuse_buffers=True, **kw)
    assert fused.untyped_storage().nbytes() == base.numel() * 8
    out.backward(w)
    torch.testing.assert_close(out.detach(), results[0][0], rtol=0, atol=0)
    for got, want in zip(leaf.grad.unbind(0), results[0][1:]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _weights_problem(left, right, seed=5):
    """q (2, 3, 40, 8) and k (2, 3, 47, 8) in float64, and band_weights' keywords: queries offset into the keys,
    the band, a fixed relative bias from ``table``, an additive mask and padding."""
    g = torch.Generator().manual_seed(seed)
    B, H, Lq, Lk, D = 2, 3, 40, 47, 8
    q = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, Lk, D, generator=g, dtype=torch.float64)
    kpm = torch.zeros(B, Lk, dtype=torch.bool)
    kpm[1, 20:23] = True
    table = torch.randn(H, 2 * Lk, generator=g, dtype=torch.float64)
    kw = dict(query_offset=Lk - Lq, left=left, right=right, rel_bias=lambda rel: table[:, rel + Lk],
              key_padding_mask=kpm, attn_mask=torch.randn(Lq, Lk, generator=g, dtype=torch.float64))
    return q, k, kw, table


def _dense_weights(q, k, kw, average):
    _, want = band.dense_attention(q, k, torch.zeros_like(k), need_weights=True, **kw)
    return want.mean(dim=1, keepdim=True) if average else want


@pytest.mark.parametrize("left,right", [(None, 0), (5, None), (4, 2), (30, 30), (None, None)])
@pytest.mark.parametrize("average", [False, True])
def test_band_weights_in_small_tiles_equal_the_dense_probabilities(left, right, average, monkeypatch):
    """Tiles of 16 queries (the tile bound forced down), queries offset into the keys, a relative bias, an additive
    mask and padding: every tile's band edges, and the heads' mean accumulated tile by tile, agree with the full
    matrix of :func:`dense_attention`; the weights start as NaN, so every element outside the band is written
    too."""
    import fluence_fairseq.ops.band as band

    monkeypatch.setattr(band, "_WEIGHT_TILE_ELEMENTS", 1)
    new_empty = torch.Tensor.new_empty  # the weights start as NaN: every element must be written
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **kw: new_empty(self, *a, **kw).fill_(float("nan")))
    q, k, kw, _ = _weights_problem(left, right)
    want = _dense_weights(q, k, kw, average)
    got = band.band_weights(q, k, average_heads=average, **kw)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("left,right", [(None, 0), (5, None), (4, 2), (None, None)])
@pytest.mark.parametrize("average", [False, True])
def test_band_weights_are_differentiable_by_recomputation(left, right, average, monkeypatch):
    """The tiled weights' gradients in q and k (tiles of 16 queries, offsets, a fixed relative bias, an additive
    mask, padding) equal those of the dense probabilities; nothing but q and k is kept for backward. A bias that
    needs a gradient of its own leaves the weights detached instead."""
    import fluence_fairseq.ops.band as band

    monkeypatch.setattr(band, "_WEIGHT_TILE_ELEMENTS", 1)
    q, k, kw, table = _weights_problem(left, right)
    q.requires_grad_(), k.requires_grad_()
    want = _dense_weights(q, k, kw, average)
    got = band.band_weights(q, k, average_heads=average, **kw)
    assert got.requires_grad
    probe = torch.randn(want.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    grads = torch.autograd.grad((got * probe).sum(), (q, k))
    for a, b in zip(grads, torch.autograd.grad((want * probe).sum(), (q, k))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    learned = table.clone().requires_grad_()
    detached = band.band_weights(q, k, average_heads=average,
                                 **{**kw, "rel_bias": lambda rel: learned[:, rel + table.size(1) // 2]})
    assert not detached.requires_grad
    torch.testing.assert_close(detached, got.detach(), atol=1e-12, rtol=0)
    with torch.no_grad():
        assert not band.band_weights(q, k, average_heads=average, **kw).requires_grad


def _fused_problem(causal, padded, biased, offset, seed=7):
    """q (2, 3, 40, 8), k and v (2, 3, 40 + offset, 8) in float64 and band_attention's keywords (no band but
    causality): padding that leaves every query a key, a fixed relative bias and an additive mask."""
    g = torch.Generator().manual_seed(seed)
    B, H, Lq, D = 2, 3, 40, 8
    Lk = Lq + offset
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64).requires_grad_() for n in (Lq, Lk, Lk))
    kpm = None
    if padded:
        kpm = torch.zeros(B, Lk, dtype=torch.bool)
        kpm[1, 4:7] = True
        kpm[0, -2:] = True
    table = torch.randn(H, 2 * Lk + 2, generator=g, dtype=torch.float64)
    kw = dict(query_offset=offset, right=0 if causal else None, key_padding_mask=kpm,
              rel_bias=(lambda rel: table[:, rel + Lk]) if biased else None,
              attn_mask=torch.randn(Lq, Lk, generator=g, dtype=torch.float64) if biased else None)
    return q, k, v, kw


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded,biased,offset", [(False, False, 0), (True, False, 0), (False, True, 7),
                                                  (True, True, 5)])
@pytest.mark.parametrize("average", [True, False])
def test_long_softmax_weights_and_output_from_one_pass_of_tiles(causal, padded, biased, offset, average,
                                                                monkeypatch):
    """need_weights without a band (tiles of 16 queries, the dense threshold forced down): the output comes from
    the weights' tiles and backward from the fused kernel with their log-sum-exp (or, with the weights in the loss
    too, from one pass of tiles for both); output, weights and the gradients of q, k and v (a loss on the output,
    on both, on the weights alone) equal the dense computation's."""
    monkeypatch.setattr(band, "_DENSE_PAIRS", 0)
    monkeypatch.setattr(band, "_WEIGHT_TILE_ELEMENTS", 1)
    q, k, v, kw = _fused_problem(causal, padded, biased, offset)
    out, w = band.band_attention(q, k, v, need_weights=True, average_heads=average, **kw)
    assert type(out.grad_fn).__name__ == "_SoftmaxWithWeightsBackward"
    want_out, want_w = band.dense_attention(q, k, v, need_weights=True, **kw)
    if average:
        want_w = want_w.mean(dim=1, keepdim=True)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(w, want_w, atol=1e-12, rtol=0)
    g = torch.Generator().manual_seed(8)
    probe_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    probe_w = torch.randn(w.shape, generator=g, dtype=torch.float64)
    for uses in ("output", "both", "weights"):  # the kernel's backward; one pass of tiles; the weights' tiles
        def loss(o, weights):
            return ((o * probe_out).sum() if uses != "weights" else 0) + ((weights * probe_w).sum()
                                                                          if uses != "output" else 0)
        got = torch.autograd.grad(loss(out, w), (q, k, v), retain_graph=True, allow_unused=True)
        want = torch.autograd.grad(loss(want_out, want_w), (q, k, v), retain_graph=True, allow_unused=True)
        if uses == "weights":
            assert got[2] is None
            want = want[:2] + (None,)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-11, rtol=0)


def test_long_softmax_weights_take_the_kernel_and_tiles_where_one_pass_does_not_apply(monkeypatch):
    """Where the one-pass tiles would differ from the kernel (a causal query whose every visible key is padding:
    the kernel's row is uniform over all keys, a tile's over its own), or cannot run (dropout, a bias that needs a
    gradient of its own), need_weights keeps the kernel's output and the tiles' weights."""
    monkeypatch.setattr(band, "_DENSE_PAIRS", 0)
    q, k, v, kw = _fused_problem(True, True, False, 0)
    kw["key_padding_mask"][1, 0] = True  # query 0 of sequence 1 sees only padding
    out, _ = band.band_attention(q, k, v, need_weights=True, average_heads=True, **kw)
    assert type(out.grad_fn).__name__ != "_SoftmaxWithWeightsBackward"
    want = band.band_attention(q, k, v, **kw)[0]
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    q, k, v, kw = _fused_problem(False, False, False, 0)
    out, _ = band.band_attention(q, k, v, need_weights=True, dropout_p=0.1, **kw)
    assert type(out.grad_fn).__name__ != "_SoftmaxWithWeightsBackward"
    learned = torch.zeros(3, 100, dtype=torch.float64, requires_grad=True)
    kw["rel_bias"] = lambda rel: learned[:, rel + 50]
    out, w = band.band_attention(q, k, v, need_weights=True, **kw)
    assert type(out.grad_fn).__name__ != "_SoftmaxWithWeightsBackward"
    assert not w.requires_grad  # detached: the bias needs a gradient of its own


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_sum_exp_from_the_softmax_is_exact_where_the_sampled_columns_underflow(dtype):
    """The tiles' log-sum-exp (read off the softmax at a sample of columns) equals ``torch.logsumexp``: on plain
    rows, on rows whose every sampled column is far below the maximum (probabilities that underflow: the rows
    fall back to their largest entry), and with masked columns at the dtype's most negative value."""
    g = torch.Generator().manual_seed(11)
    scores = torch.randn(2, 6, 300, generator=g, dtype=dtype)
    scores[0, 1] *= 200.0  # peaked: most columns underflow
    scores[0, 2, ::band._LSE_SAMPLE_STEP] = -500.0  # every sampled column far below the rest
    scores[1, 3, :150] = torch.finfo(dtype).min  # masked columns, sampled ones among them
    probs = torch.softmax(scores, dim=-1)
    assert bool((probs[0, 2, ::band._LSE_SAMPLE_STEP] < band._LSE_SAFE_PROBABILITY).all())
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(band._log_sum_exp(scores, probs), torch.logsumexp(scores, dim=-1), atol=tol,
                               rtol=tol)
