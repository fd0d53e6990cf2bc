"""ops.common: prefixes (views of the first n rows sharing one backward), lower_blocks, free_memory, matvec,
thin_matmul, cpu_flash_attention."""
import pytest
import torch

from fluence_fairseq.ops import common
from fluence_fairseq.ops.common import (free_memory, linear_grad_over_input, lower_blocks, matvec, prefixes,
                                        thin_matmul)


@pytest.mark.parametrize("lengths", [(3, 7, 10), (10, 4), (2, 5), (6,)])
def test_prefixes_are_views_with_the_slices_gradient(lengths):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 4, dtype=torch.float64, requires_grad=True)
    views = prefixes(x, lengths)
    assert [tuple(v.shape) for v in views] == [(2, 3, n, 4) for n in lengths]
    for view, n in zip(views, lengths):
        assert torch.equal(view, x[:, :, :n])
    weights = [torch.randn(v.shape, dtype=torch.float64) for v in views]
    (grad,) = torch.autograd.grad(sum((v * w).sum() for v, w in zip(views, weights)), x)
    want = torch.zeros_like(x)
    for w, n in zip(weights, lengths):
        want[:, :, :n] += w
    torch.testing.assert_close(grad, want, atol=1e-14, rtol=0)
    assert not grad[:, :, max(lengths):].any()  # rows past the longest prefix: exact zeros


def test_prefixes_with_unused_views_and_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 6, 3, dtype=torch.float64, requires_grad=True)
    a, b, c = prefixes(x, (2, 6, 4))
    (grad,) = torch.autograd.grad((a * 3).sum() + c.square().sum(), x)  # the longest view unused
    want = torch.zeros_like(x)
    want[:, :, :2] += 3
    want[:, :, :4] += 2 * x.detach()[:, :, :4]
    torch.testing.assert_close(grad, want, atol=1e-14, rtol=0)
    assert torch.autograd.gradcheck(lambda t: [v.sin() for v in prefixes(t, (1, 6, 3))], (x,))


def test_prefixes_refuse_bad_lengths_and_in_place_edits():
    x = torch.randn(1, 2, 5, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"lengths in \[1, 5\]"):
        prefixes(x, (2, 6))
    with pytest.raises(ValueError, match="4-d"):
        prefixes(x[0], (2,))
    (view,) = prefixes(x * 1.0, (3,))
    with pytest.raises(RuntimeError):
        view.add_(1.0)  # a custom Function's view: autograd would lose the edit in backward


def test_lower_blocks_place_each_block_and_backward_gives_each_its_part():
    torch.manual_seed(0)
    blocks = [torch.randn(2, 3, n, k, dtype=torch.float64, requires_grad=True) for n, k in ((2, 3), (3, 5), (1, 6))]
    out = lower_blocks(blocks, 6)
    want = torch.zeros(2, 3, 6, 6, dtype=torch.float64)
    want[:, :, 0:2, :3], want[:, :, 2:5, :5], want[:, :, 5:6, :6] = (b.detach() for b in blocks)
    assert torch.equal(out, want)
    assert torch.autograd.gradcheck(lambda *bs: lower_blocks(bs, 7), tuple(blocks))
    with pytest.raises(ValueError, match="at most 4 columns"):
        lower_blocks(blocks, 4)


def test_free_memory_frees_whole_storages_only():
    whole = torch.randn(4, 6).t()  # a permuted view still covers its whole storage
    buffer = torch.randn(3, 4, 6)
    part = buffer[1]  # one of several tensors in a larger buffer: left alone
    free_memory(whole, part, whole)  # a tensor given twice is freed once
    assert whole.untyped_storage().nbytes() == 0
    assert buffer.untyped_storage().nbytes() == 3 * 4 * 6 * 4
    assert torch.isfinite(part).all()
    expanded = torch.randn(1, 6).expand(5, 6)  # one row stored for five
    free_memory(expanded)
    assert expanded.untyped_storage().nbytes() == 6 * 4
    empty = torch.empty(0)
    free_memory(empty)  # nothing to free
    assert empty.numel() == 0


def test_covers_storage():
    from fluence_fairseq.ops.common import covers_storage

    x = torch.randn(6, 2, 3, 4)
    assert covers_storage(x) and covers_storage(x.permute(1, 2, 0, 3))
    assert not covers_storage(x[:3])  # a slice: the rest of the storage belongs to others
    assert not covers_storage(torch.randn(2, 1, 4).expand(2, 5, 4))  # expanded: one element seen many times
    # as many elements as the storage holds, but rows overlapping (and the storage's tail never seen)
    assert not covers_storage(torch.randn(12).as_strided((3, 4), (2, 1)))
    assert covers_storage(torch.randn(5).as_strided((5, 1), (1, 7)))  # a size-1 dim's stride does not matter


def test_linear_grad_over_input_equals_linear_and_writes_the_gradient_over_its_input():
    torch.manual_seed(0)
    x = torch.randn(7, 3, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(7, 3, 5, dtype=torch.float64)
    expected = torch.autograd.grad(torch.nn.functional.linear(x, weight, bias), (x, weight, bias), grad)
    inner = x * 1  # the op's own input: nothing else reads it
    out = linear_grad_over_input(inner, weight, bias)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, bias), rtol=0, atol=0)
    seen = []
    inner.register_hook(lambda g: seen.append(g.data_ptr() == inner.data_ptr()))
    got = torch.autograd.grad(out, (x, weight, bias), grad, retain_graph=True)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    assert seen == [True]  # the input's gradient lives in the input's memory
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out, (x, weight, bias), grad)  # its input is gone: a second backward is refused


def test_linear_grad_over_input_with_create_graph_and_without_bias():
    """Double backward differentiates through the input, so nothing is overwritten (gradgradcheck: its first
    derivatives come with create_graph). Plain gradcheck would backward twice through one graph, which the op
    refuses by design (above)."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    for bias in (None, torch.randn(3, dtype=torch.float64, requires_grad=True)):
        inputs = (x, weight) if bias is None else (x, weight, bias)

        def fn(*args):
            return linear_grad_over_input(args[0] * 1, args[1], args[2] if len(args) > 2 else None)

        assert torch.autograd.gradgradcheck(fn, inputs)
    with pytest.raises(ValueError, match="contiguous"):
        linear_grad_over_input(torch.randn(6, 4).t(), weight, None)


def test_dropout_keep_mask_is_zero_or_the_rescale_at_the_rate_and_repeats_with_the_seed(monkeypatch):
    """0 or 1 / (1 - p) at the rate, unbiased; the same numbers for the same seed and stream whatever the number of
    threads drawing the chunks; another stream or seed, other numbers."""
    import fluence_fairseq.ops.common as common

    monkeypatch.setattr(common, "MASK_CHUNK", 1 << 14)  # several chunks
    like = torch.zeros(1, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        masks = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            masks.append(common.dropout_keep_mask((200, 500), 0.3, 4, like))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(masks[0], m) for m in masks[1:]) and masks[0].dtype == torch.float64
    assert set(masks[0].unique().tolist()) == {0.0, 1 / 0.7}
    assert abs(float((masks[0] == 0).double().mean()) - 0.3) < 0.01  # 100,000 draws: 5 standard deviations
    assert abs(float(masks[0].mean()) - 1.0) < 0.02  # unbiased
    for other in (common.dropout_keep_mask((200, 500), 0.3, 4, like, stream=1),
                  common.dropout_keep_mask((200, 500), 0.3, 5, like)):
        assert float((other != masks[0]).double().mean()) > 0.3  # independent draws differ in ~42% of places
    flat = masks[0].view(-1)
    assert not torch.equal(flat[: 1 << 14], flat[1 << 14: 2 << 14])  # each chunk from a generator of its own


def test_dropout_masks_are_drawn_in_a_forked_process(monkeypatch):
    """A process forked after the pool that draws mask chunks was made gets a pool of its own (the inherited one has
    no threads, and waiting on it would hang)."""
    import multiprocessing

    import fluence_fairseq.ops.common as common

    monkeypatch.setattr(common, "MASK_CHUNK", 1 << 10)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = common.dropout_keep_mask(4096, 0.5, 3, torch.zeros(1))  # makes the pool here
        context = multiprocessing.get_context("fork")
        with context.Pool(1) as pool:
            drawn = pool.apply_async(_draw_in_child, (common.MASK_CHUNK,)).get(timeout=60)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(drawn, expected)


def _draw_in_child(chunk):
    import fluence_fairseq.ops.common as common

    common.MASK_CHUNK = chunk
    torch.set_num_threads(2)
    return common.dropout_keep_mask(4096, 0.5, 3, torch.zeros(1))


@pytest.mark.parametrize("a_shape, x_shape", [((2, 3, 5, 4), (2, 3, 4)), ((2, 3, 5, 4), (1, 3, 4)),
                                              ((3, 1, 4), (2, 3, 4)), ((5, 4), (4,)), ((1, 4), (2, 4))])
def test_matvec_is_the_matrix_vector_product_with_broadcast_batches_and_its_gradients(a_shape, x_shape):
    torch.manual_seed(0)
    a = torch.randn(a_shape, dtype=torch.float64, requires_grad=True)
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    got = matvec(a, x)
    want = torch.matmul(a, x.unsqueeze(-1)).squeeze(-1)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-13, rtol=0)
    assert torch.autograd.gradcheck(matvec, (a, x))
    # a transposed (strided) matrix, as the causal linear attention's backward passes its queries
    torch.testing.assert_close(matvec(a.detach().transpose(-1, -2), got.detach()),
                               torch.matmul(a.detach().transpose(-1, -2), got.detach().unsqueeze(-1)).squeeze(-1),
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize("a_shape, b_shape", [
    ((2, 3, 7, 5), (3, 5, 1)),        # one output column: the row form
    ((2, 3, 7, 1), (1, 3, 1, 4)),     # one inner dimension: the outer product
    ((2, 3, 1, 1), (2, 3, 1, 1)),     # both
    ((2, 3, 7, 5), (2, 3, 5, 4)),     # neither: torch.matmul
    ((7, 1), (1, 4)), ((7, 5), (5, 1)),
])
def test_thin_matmul_equals_matmul_with_broadcast_batches_and_its_gradients(a_shape, b_shape):
    torch.manual_seed(0)
    a = torch.randn(a_shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(b_shape, dtype=torch.float64, requires_grad=True)
    got, want = thin_matmul(a, b), torch.matmul(a, b)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-13, rtol=0)
    assert torch.autograd.gradcheck(thin_matmul, (a, b))


@pytest.mark.skipif(common.FLASH_CPU_BACKWARD is None, reason="this torch build has no CPU flash kernels")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bias_items", [1, 2])
def test_cpu_flash_zero_rows_are_zero_in_the_kernels_own_output_and_pass_no_gradient(causal, bias_items,
                                                                                      monkeypatch):
    """Rows whose every key the bias masks: zeroed in the tensor the kernel returned (no zeroed copy beside it),
    their output's gradient (nonzero here) reaching nothing; the other rows and every gradient as the plain masked
    softmax's. A bias shared by the batch's items (``bias_items`` 1) goes to the kernel with heads as its batch
    (transposed views), one per item (2, the same bias repeated) in the usual order."""
    torch.manual_seed(0)
    bsz, heads, length, dim = 2, 3, 40, 8
    q, k, v = (torch.randn(bsz, heads, length, dim, dtype=torch.float64, requires_grad=True) for _ in range(3))
    allowed = torch.rand(1, heads, length, length) < 0.3
    if causal:
        allowed &= torch.ones(length, length, dtype=torch.bool).tril()
    allowed[0, 1, 5:9] = False  # rows without a key (and, drawn at 0.3, a few more)
    allowed[0, 2, :, 0] = True  # ... none in head 2 (key 0 is visible to every query, causal or not)
    no_key = ~allowed.any(-1, keepdim=True)
    assert no_key.any() and not no_key[0, 2].any()
    bias = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill_(~allowed, torch.finfo(torch.float64).min)
    bias = bias.repeat(bias_items, 1, 1, 1)
    returned = []
    kernel = common.FLASH_CPU
    monkeypatch.setattr(common, "FLASH_CPU", lambda *a, **kw: returned.append(kernel(*a, **kw)) or returned[-1])
    out = common.cpu_flash_attention(q, k, v, causal=causal, bias=bias, zero_rows=no_key)
    assert out.data_ptr() == returned[0][0].data_ptr()  # the kernel's own output, zeroed in place
    assert returned[0][0].shape[:2] == ((heads, bsz) if bias_items == 1 else (bsz, heads))
    scores = torch.matmul(q, k.transpose(-1, -2)) * dim ** -0.5
    probs = torch.softmax(scores.masked_fill(~allowed, torch.finfo(scores.dtype).min), -1)
    probs = torch.where(no_key, torch.zeros_like(probs), probs)
    want = torch.matmul(probs, v)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    assert out.masked_select(no_key).abs().max() == 0
    grad = torch.randn_like(out)  # nonzero on the zeroed rows too
    for got, expected in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
