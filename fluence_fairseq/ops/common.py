"""Small helpers every op shares."""
import contextlib
import functools
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel


def without_autocast(method):
    """Run an autograd Function's ``forward`` or ``backward`` with autocast off on the devices of its tensors.

    Backward runs under the autocast state of the thread that called ``.backward()``: inside an autocast region,
    the products of a hand-written backward would drop to 16 bits and meet the float32 accumulators it writes
    into in place (``baddbmm_``, ``out=``), which torch refuses. The Functions that keep float32 work say so
    with this."""

    @functools.wraps(method)
    def wrapped(ctx, *args):
        devices = {a.device.type for a in args if isinstance(a, Tensor)}
        with contextlib.ExitStack() as stack:
            for device in devices:
                stack.enter_context(torch.autocast(device, enabled=False))
            return method(ctx, *args)

    return wrapped


def sdpa_for_decoding():
    """A context in which ``scaled_dot_product_attention`` leaves out cuDNN's kernel, for decoding steps.

    cuDNN builds an execution graph for every new shape and the key length grows by one at every step: on an H200
    (torch 2.11, bf16) a softmax decoding step took 60 ms against 0.3 ms in float32, where cuDNN does not run.
    The flash, memory-efficient and plain kernels need no such build. Training keeps cuDNN (its shapes repeat)."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


#: log2(e): ``exp(x) = exp2(x * LOG2_E)``; the ops take ``exp2`` where arguments may underflow, since torch's ``exp``
#: takes a slow path for them on some CPUs
LOG2_E = 1.0 / math.log(2.0)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of scores, softmax statistics and other sums: float32 for half types, else the input's own."""
    return torch.promote_types(dtype, torch.float32)


#: elements of a dropout mask drawn from one generator (:func:`dropout_keep_mask`): the chunks are fixed, so the
#: masks do not depend on how many threads draw them
MASK_CHUNK = 1 << 20
_GOLDEN = 0x9E3779B97F4A7C15  # spreads the chunks' seeds over the generator's 64-bit seed space
_mask_pool = None  # (threads, process id, ThreadPoolExecutor) drawing chunks side by side on the CPU


def _chunk_seed(seed: int, stream: int, chunk: int) -> int:
    return (seed + (stream * MASK_CHUNK + chunk + 1) * _GOLDEN) % (1 << 64)


def _draw_pool(threads: int):
    """The pool drawing mask chunks, made again when the thread count changes or in a forked process (whose copy
    of the pool has no threads)."""
    global _mask_pool
    import os

    if _mask_pool is None or _mask_pool[:2] != (threads, os.getpid()):
        from concurrent.futures import ThreadPoolExecutor

        _mask_pool = (threads, os.getpid(), ThreadPoolExecutor(threads, thread_name_prefix="fluence-dropout"))
    return _mask_pool[2]


def dropout_keep_mask(shape, dropout_p: float, seed: int, like: Tensor, stream: int = 0) -> Tensor:
    """Attention dropout's multiplier for each element of ``shape``: 1 / (1 - dropout_p) where kept (probability
    1 - dropout_p), 0 where dropped, in ``like``'s dtype and device; the same numbers whenever it is drawn with the
    same ``seed`` and ``stream`` (a caller's second mask from one seed takes another stream).

    Each chunk of :data:`MASK_CHUNK` elements is a uniform draw from a generator of its own, compared in place
    (``bernoulli_`` took 2.5x as long on the CPU); on the CPU the chunks are drawn on torch's threads side by side
    (its generators draw on one thread each: 16.7M elements took 37 ms on two threads against 64 on one). The
    chunks are fixed, so the numbers do not depend on the number of threads."""
    keep = 1.0 - dropout_p
    out = torch.empty(shape, dtype=like.dtype, device=like.device)
    flat = out.view(-1)
    chunks = [flat[start:start + MASK_CHUNK] for start in range(0, flat.numel(), MASK_CHUNK)]

    def draw(index: int) -> None:
        generator = torch.Generator(like.device).manual_seed(_chunk_seed(seed, stream, index))
        chunks[index].uniform_(generator=generator).lt_(keep).div_(keep)

    threads = torch.get_num_threads()
    if like.device.type == "cpu" and threads > 1 and len(chunks) > 1:
        list(_draw_pool(threads).map(draw, range(len(chunks))))
    else:
        for index in range(len(chunks)):
            draw(index)
    return out


def relative_positions(tgt_len: int, src_len: int, query_offset: int, device) -> Tensor:
    """(tgt, src) long tensor of query position minus key position; query ``i`` sits at ``i + query_offset``."""
    q = torch.arange(tgt_len, device=device).unsqueeze(1) + query_offset
    return q - torch.arange(src_len, device=device).unsqueeze(0)


def element_blocks(per_row: int, tgt_len: int, src_len: int, *, causal: bool, query_offset: int,
                   elements: int) -> List[Tuple[int, int]]:
    """Query ranges ``[start, end)`` covering ``0..tgt_len`` whose scores (``per_row`` = B x H of them for each
    query and key) hold at most ``elements``, at least one row each; causal ranges counted over the keys their last
    query sees (query ``i`` sees keys ``j <= i + query_offset``), so later ranges are shorter."""
    blocks, start = [], 0
    while start < tgt_len:
        keys = max(1, min(src_len, query_offset + start + 1) if causal else src_len)
        rows = max(1, elements // (per_row * keys))
        if causal:  # the range's later rows see more keys: size it for its last row
            while rows > 1 and per_row * rows * min(src_len, query_offset + start + rows) > elements:
                rows //= 2
        blocks.append((start, min(tgt_len, start + rows)))
        start += rows
    return blocks


def query_block_scores(q_block: Tensor, k: Tensor, start: int, end: int, keys: int, query_offset: int,
                       causal: bool, key_padding_mask: Optional[Tensor], rel_bias,
                       pairs: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """Scores of queries ``start..end-1`` (``q_block``, scaled) against keys ``0..keys-1`` with a fixed relative
    bias (``rel_bias(query - key offsets) -> (H, rows, keys)``, or None), and the mask of what they may not see
    (the causal future, padding) or None; forward and backward of the blocked passes make them alike. ``q_block``
    (B, H, rows, D) and ``k`` (B, H, Lk, D), or with ``pairs`` (the batch and head indices of some (batch, head)
    pairs) those pairs' rows, (pairs, rows, D) and (pairs, Lk, D)."""
    scores = torch.matmul(q_block, k[..., :keys, :].transpose(-1, -2))
    rel = None
    if causal or rel_bias is not None:
        rel = relative_positions(end - start, keys, query_offset + start, scores.device)
    if rel_bias is not None:
        bias = rel_bias(rel).to(scores.dtype)  # (H, rows, keys)
        scores += bias if pairs is None else bias.index_select(0, pairs[1])
    lead = (1,) * (scores.dim() - 2)
    mask = (rel < 0).view(*lead, end - start, keys) if causal else None
    if key_padding_mask is not None:
        padded = key_padding_mask[:, :keys]
        padded = padded.view(-1, 1, 1, keys) if pairs is None else padded.index_select(0, pairs[0]).view(-1, 1, keys)
        mask = padded if mask is None else mask | padded
    return scores, mask


def matmul_in_projection_layout(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for (B, H, n, k) @ (B, H, k, D), written into a (B, H, n, D) tensor stored as (n, B, H, D): the
    layout of fairseq's (L, B, H * D) projections, so the result goes back to them (or to their gradients)
    as a view instead of a full-size copy."""
    bsz, heads, rows, _ = a.shape
    out = a.new_empty(rows, bsz, heads, b.size(-1)).permute(1, 2, 0, 3)
    torch.bmm(a.reshape(bsz * heads, rows, -1), b.reshape(bsz * heads, *b.shape[2:]),
              out=out.reshape(bsz * heads, rows, b.size(-1)))
    return out


def fold_windows(grad_windows: Tensor, grad_rows: Tensor, first_block: int, block: int) -> None:
    """Add the gradients of overlapping key windows back onto the rows they were taken from, in place.

    ``grad_windows`` (B, H, n, w, D): window ``b`` covers rows ``(first_block + b) * block ...`` of ``grad_rows``
    (B, H, R, D), ``w`` rows each (consecutive windows overlap when ``w > block``). With fewer windows than
    ``block``-row pieces per window, one add per window; otherwise one add per piece, each over every window at
    once (piece ``t`` of consecutive windows covers consecutive rows). The fewer, larger adds win on CPU, where
    each call costs tens of microseconds."""
    bsz, heads, count, width, dim = grad_windows.shape
    pieces = -(-width // block)
    if count <= pieces:
        for b in range(count):
            start = (first_block + b) * block
            grad_rows[:, :, start : start + width] += grad_windows[:, :, b]
        return
    padded = torch.nn.functional.pad(grad_windows, (0, 0, 0, pieces * block - width))
    padded = padded.view(bsz, heads, count, pieces, block, dim)
    for t in range(pieces):
        start = (first_block + t) * block
        grad_rows[:, :, start : start + count * block] += padded[:, :, :, t].reshape(bsz, heads, count * block, dim)


def free_memory(*tensors: Tensor) -> None:
    """Give back the memory of tensors that nothing reads again, while references to them remain (a caller's
    frame, autograd's): their storage shrinks to zero bytes. Reading such a tensor afterwards is undefined (on
    CPU it crashes the process), so the caller must know that nothing does: the attention base's whole passes
    (see ``FluenceAttention.heads_exclusive``). Only a tensor that covers its whole storage is freed; a view of a
    larger buffer (a slice, one of several heads in one projection's output) is left alone, since other tensors
    may live in the rest of it; an expanded tensor is left alone too."""
    seen = set()
    for t in tensors:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in seen or not covers_storage(t):
            continue
        seen.add(ptr)
        storage.resize_(0)


def covers_storage(x: Tensor) -> bool:
    """Whether ``x`` covers its whole storage with distinct elements (not a view into a larger buffer, no expanded
    or overlapping strides): then nothing but ``x`` and its views can live in that memory."""
    if x.untyped_storage().nbytes() != x.numel() * x.element_size():
        return False
    extent = 1
    for stride, size in sorted((st, sz) for st, sz in zip(x.stride(), x.size()) if sz > 1):
        if stride < extent:
            return False
        extent = stride * size
    return True


class _Prefixes(torch.autograd.Function):
    """Views ``x[..., :n, :]`` (along dim 2) for several ``n``, with one gradient buffer for all of them.

    Slicing a tensor once per query block makes autograd zero a full-size gradient for every slice and add them
    up (``SliceBackward``): on (4, 8, 512, 64) keys in 8 blocks, 16 full-size fills and adds a step. Here backward
    writes the sum of the two longest prefixes' gradients in one pass (zeros only past the longest) and adds the
    others onto their rows. The views may not be modified in place (autograd refuses it for a custom Function's
    views)."""

    @staticmethod
    def forward(ctx, x, lengths):
        ctx.lengths, ctx.full = lengths, x.size(2)
        return tuple(x.narrow(2, 0, n) for n in lengths)

    @staticmethod
    def backward(ctx, *grads):
        present = [(n, g) for n, g in zip(ctx.lengths, grads) if g is not None]
        if not present:
            return None, None
        present.sort(key=lambda item: -item[0])
        (n, g), rest = present[0], present[1:]
        total = g.new_empty(g.shape[:2] + (ctx.full,) + g.shape[3:])
        total[:, :, n:].zero_()
        if rest:  # the two longest in one pass, the others added onto their rows
            m = rest[0][0]
            torch.add(g[:, :, :m], rest[0][1], out=total[:, :, :m])
            total[:, :, m:n] = g[:, :, m:]
            rest = rest[1:]
        else:
            total[:, :, :n] = g
        for m, h in rest:
            total[:, :, :m] += h
        return total, None


def prefixes(x: Tensor, lengths) -> tuple:
    """``x[:, :, :n]`` for every ``n`` in ``lengths`` (4-d ``x``), sharing one backward (see :class:`_Prefixes`)."""
    lengths = tuple(int(n) for n in lengths)
    if x.dim() != 4 or not all(1 <= n <= x.size(2) for n in lengths):
        raise ValueError(f"prefixes needs a 4-d tensor and lengths in [1, {x.size(2) if x.dim() == 4 else '?'}], "
                         f"got shape {tuple(x.shape)} and lengths {lengths}")
    return _Prefixes.apply(x, lengths)


class _LowerBlocks(torch.autograd.Function):
    """A (B, H, Lq, Lk) matrix from row blocks that each fill the first columns of their rows (zeros elsewhere).
    Writing the blocks into a zero tensor one slice at a time would make autograd clone the whole gradient once
    per block in backward (``CopySlices``); here backward hands each block a view of its part."""

    @staticmethod
    def forward(ctx, width, *blocks):
        bsz, heads = blocks[0].shape[:2]
        rows = sum(b.size(2) for b in blocks)
        out = blocks[0].new_empty(bsz, heads, rows, width)
        start = 0
        for b in blocks:  # each entry written once: the block, or the zeros right of it
            out[:, :, start : start + b.size(2), : b.size(3)] = b
            out[:, :, start : start + b.size(2), b.size(3) :].zero_()
            start += b.size(2)
        ctx.shapes = [tuple(b.shape[2:]) for b in blocks]
        return out

    @staticmethod
    def backward(ctx, grad):
        parts, start = [], 0
        for rows, cols in ctx.shapes:
            parts.append(grad[:, :, start : start + rows, :cols])
            start += rows
        return (None, *parts)


def lower_blocks(blocks, width: int) -> Tensor:
    """Stack row blocks (B, H, n_i, k_i) with k_i <= ``width`` into one (B, H, sum n_i, width) matrix, each block
    in the first k_i columns of its rows and zeros elsewhere, with a backward that costs views only."""
    blocks = list(blocks)
    if not blocks or any(b.dim() != 4 or b.shape[:2] != blocks[0].shape[:2] or b.size(3) > width for b in blocks):
        raise ValueError(f"lower_blocks needs 4-d blocks sharing (B, H) and at most {width} columns, got "
                         f"{[tuple(b.shape) for b in blocks]}")
    return _LowerBlocks.apply(int(width), *blocks)


#: PyTorch's CPU flash-attention kernels (None on builds without them): the fused kernel that
#: ``F.scaled_dot_product_attention`` runs on CPU, called directly for what that function does not give:
#: ``is_causal`` together with an additive mask, and (pruned attention's buckets) the rows' log-sum-exp
FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
FLASH_CPU_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def cpu_flash_applies(q: Tensor, dropout_p: float) -> bool:
    """Whether :func:`cpu_flash_attention` can run this call (a CPU tensor, no dropout, kernels present)."""
    return q.device.type == "cpu" and dropout_p == 0 and FLASH_CPU_BACKWARD is not None


def _heads_first(bias: Optional[Tensor], q: Tensor) -> bool:
    """Whether the kernel should see heads as its batch: a bias shared by the batch's items but not by the heads.
    The kernel walks batch, then heads, then query blocks, so in the usual order an item re-reads every head's bias
    after all the others; with heads as the batch it re-reads one head's bias at once, from the caches (pruned
    attention's masked dense path, L=1024, B=2, H=4, one thread, Intel Xeon: 0.984-0.991x the forward and backward
    in the usual order, ``python -m benchmarks.pruning --bias-order``)."""
    return bias is not None and bias.size(0) == 1 < q.size(0) and bias.size(1) > 1


def _swap(*xs):
    return tuple(None if x is None else x.transpose(0, 1) for x in xs)


class _CpuFlash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, bias, zero_rows):
        swap = _heads_first(bias, q)
        if swap:  # transposed views: the kernel reads strides, and its results are views of the same memory
            q, k, v, bias = _swap(q, k, v, bias)
            if zero_rows is not None:
                zero_rows = zero_rows.expand(q.size(1), q.size(0), q.size(2), 1).transpose(0, 1)
        out, lse = FLASH_CPU(q, k, v, 0.0, causal, attn_mask=bias)
        if zero_rows is not None:
            # backward recomputes a row's probabilities as exp(s - lse): an infinite log-sum-exp makes them 0, so
            # the row passes no gradient (and its output's gradient needs no zeroed copy)
            out.masked_fill_(zero_rows, 0.0)
            lse.masked_fill_(zero_rows.squeeze(-1), math.inf)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.causal, ctx.swap = causal, swap
        return out.transpose(0, 1) if swap else out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, bias, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        if ctx.swap:
            grad_out = grad_out.transpose(0, 1)
        gq, gk, gv = FLASH_CPU_BACKWARD(grad_out, q, k, v, out, lse, 0.0, ctx.causal, attn_mask=bias)
        if ctx.swap:
            gq, gk, gv = _swap(gq, gk, gv)
        return gq, gk, gv, None, None, None


def cpu_flash_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, bias=None,
                        zero_rows: Optional[Tensor] = None) -> Tensor:
    """Softmax attention of (B, H, L, D) tensors through the CPU flash kernel (scale ``D ** -0.5``; the same numbers
    as ``F.scaled_dot_product_attention``). ``causal`` masks keys after the query's own index (aligned at 0) and,
    unlike ``F.scaled_dot_product_attention``, may be combined with an additive ``bias`` (B|1, H|1, Lq, Lk) of q's
    dtype: the kernel then skips the blocks above the diagonal. ``zero_rows`` (bool, broadcasting to (B, H, Lq,
    1)): query rows whose output is 0 and which pass no gradient (rows whose every key the bias masks), zeroed in
    the kernel's own output and log-sum-exp rather than in copies of the output and its gradient. Only where
    :func:`cpu_flash_applies`."""
    return _CpuFlash.apply(q, k, v, causal, bias, zero_rows)


class _LinearGradOverInput(torch.autograd.Function):
    """``x @ weight.T + bias`` whose backward writes x's gradient over x itself (x's own last use is the weight's
    gradient, computed first). x is saved, so autograd refuses a second backward through a graph whose x is
    overwritten; with ``create_graph`` (grad mode on in backward) nothing is overwritten."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.size(-1))
        x_rows = x.view(-1, x.size(-1))
        grad_weight = rows.t().mm(x_rows) if ctx.needs_input_grad[1] else None
        grad_bias = rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            if torch.is_grad_enabled():  # double backward differentiates through x: leave it alone
                grad_x = grad.matmul(weight)
            else:
                grad_x = torch.mm(rows, weight, out=x_rows).view_as(x)
        return grad_x, grad_weight, grad_bias


def linear_grad_over_input(x: Tensor, weight: Tensor, bias) -> Tensor:
    """``torch.nn.functional.linear`` for an input that nothing but this product holds (a fresh, contiguous
    tensor): its gradient is written over it in backward, so the input, kept for the weight's gradient, and its
    gradient never take memory side by side (an output projection's backward, where several attentions' training
    peak lies). The caller guarantees that nothing else reads x, saves it for backward or returns it."""
    if not x.is_contiguous():
        raise ValueError("linear_grad_over_input needs a contiguous input (it writes the gradient over it)")
    return _LinearGradOverInput.apply(x, weight, bias)


def matvec(a: Tensor, x: Tensor) -> Tensor:
    """``a @ x`` for matrices ``a`` (..., n, m) and vectors ``x`` (..., m) (batch dimensions broadcast) -> (..., n),
    taken as the row ``x`` times ``a``\ :sup:`T`: torch's CPU batched product with a single column ran 6-9x slower
    than the same product with a single row (64 products of (64 x 128) by 128: 147 against 22 us; torch 2.13, AMD
    EPYC, two threads)."""
    return torch.matmul(x.unsqueeze(-2), a.transpose(-1, -2)).squeeze(-2)


def thin_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (batch dimensions broadcast) where one side may be a single column: a product with one output
    column is taken as a row times the transposed matrix (:func:`matvec`'s reason; (8, 7936, 64) by (8, 64, 1): 997
    against 142 us) and one with a single inner dimension (an outer product) as a broadcast product (89 against 25
    us for (8, 2048, 1) by (8, 1, 64)); any other shape is ``torch.matmul``. LongShort's causal chunks have one
    compressed vector each by default (``chunk_rank`` 1), so its chunk maps are such products."""
    if b.size(-1) == 1 and a.size(-1) > 1:
        return torch.matmul(b.transpose(-1, -2), a.transpose(-1, -2)).transpose(-1, -2)
    if a.size(-1) == 1:
        return a * b
    return torch.matmul(a, b)


def add_matmul_(acc: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``acc += a @ b`` over the leading batch dimensions (broadcast ones included), without a temporary for the
    product or a pass to add it (``acc`` contiguous)."""
    shape = acc.shape
    a, b = a.expand(shape[:-2] + a.shape[-2:]), b.expand(shape[:-2] + b.shape[-2:])
    acc.view(-1, *shape[-2:]).baddbmm_(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return acc
