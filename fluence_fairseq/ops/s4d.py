"""Diagonal state space (S4D, Gu et al. 2022) math: discretisation, convolution kernels, FFT convolution and the
recurrent decoding step. Pure tensor functions; the layer is :class:`fluence_fairseq.modules.s4d.S4DAttention`.

Shapes: ``dirs`` kernels (1 = causal, 2 = causal + anti-causal), ``C`` channels, ``N2 = d_state / 2`` complex
modes per channel. Sequences are laid out ``(L, B, C)`` (fairseq's time-major layout, so no transposes are
needed around the projections).

Per mode, with ``dA = exp(dt A)`` and ``dC = C (exp(dt A) - 1) / A`` (zero-order hold), the kernel is
``K[l] = 2 Re sum_n dC_n dA_n^l``. It is never materialised per mode and position: positions are split as
``l = m J + j`` (``J ~ sqrt(L)``) so that ``K[mJ + j] = 2 Re sum_n (dC_n dA_n^{mJ}) dA_n^j`` is one small real
matmul per channel over ``2 N2`` inputs (:func:`kernel_factors`), with ``(C, N2, sqrt(L))`` temporaries only.

Training (:func:`s4d_conv`) goes one channel group at a time: kernel from its factors, FFTs of length
``n >= 2L - 1``, product, inverse FFT, skip and GELU, written into the output; backward recomputes the same per
group. So neither the (C, L) kernel nor any spectrum or pre-activation of full size is ever kept: memory is
the input and output of the layer plus a few MB.
"""
import concurrent.futures
import contextlib
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import LOG2_E, without_autocast

__all__ = ["discretize", "kernel_factors", "s4d_kernel", "two_sided_kernel", "fft_size", "s4d_conv", "ssm_chunk_step"]


def _exp_minus_one(z: Tensor) -> Tensor:
    """exp(z) - 1 for complex z without the cancellation of ``exp(z) - 1`` when |z| is small (dt A ~ 1e-3)."""
    x, y = z.real, z.imag
    real = torch.expm1(x) * torch.cos(y) - 2.0 * torch.sin(0.5 * y).pow(2)
    imag = torch.exp(x) * torch.sin(y)
    return torch.complex(real, imag)


def _complex_exp(z: Tensor) -> Tensor:
    """exp(z) for complex z from real exponentials and sines: torch's complex exp runs about 8x slower on CPU (13.7
    against 1.7 ms for 373k values). The decoding chunks' powers take it; the kernel's factors have their own
    (:func:`_exp_parts`)."""
    magnitude = torch.exp(z.real)
    return torch.complex(magnitude * torch.cos(z.imag), magnitude * torch.sin(z.imag))


def discretize(log_dt: Tensor, log_neg_a_real: Tensor, a_imag: Tensor, c_modes: Tensor) -> Tuple[Tensor, Tensor]:
    """Zero-order-hold discretisation.

    Args:
        log_dt: (..., C) log step sizes.
        log_neg_a_real, a_imag: (..., C, N2): A = -exp(log_neg_a_real) + i a_imag (real part always negative).
        c_modes: (..., C, N2, 2) output coefficients C as (real, imag).
    Returns:
        (dt A, dC) complex (..., C, N2), with dC = C (exp(dt A) - 1) / A; dA = exp(dt A).
    """
    # the state space runs in float32 at least (complex half is barely supported, and A's phases need it)
    dtype = torch.promote_types(log_dt.dtype, torch.float32)
    log_dt, log_neg_a_real, a_imag, c_modes = (t.to(dtype) for t in (log_dt, log_neg_a_real, a_imag, c_modes))
    a = torch.complex(-torch.exp(log_neg_a_real), a_imag)
    dta = a * torch.exp(log_dt).unsqueeze(-1)
    dc = torch.view_as_complex(c_modes.contiguous()) * _exp_minus_one(dta) / a
    return dta, dc


def _factor_lengths(length: int) -> Tuple[int, int]:
    """(M, J): ``J = ceil(sqrt(L))`` inner and ``M = ceil(L / J)`` outer positions, ``M J >= L``."""
    length = max(1, length)
    inner_len = math.isqrt(length - 1) + 1
    return -(-length // inner_len), inner_len


def _flush_log2(dtype: torch.dtype) -> float:
    """log2 of the smallest factor magnitude kept: 0.4 log2 of the dtype's smallest normal (2^-50.4 in float32,
    2^-409 in float64). Smaller magnitudes (modes decayed over thousands of positions) are set to zero: left
    unflushed, they and their products were subnormal numbers, which x86 CPUs multiply through a slow microcode
    path (the kernel's matmul took 2.3x as long). At this bound the products of two factors and a coefficient
    ``2 dC`` down to 2^-25 (float32) stay normal, and what is dropped is below 1e-15 of the factor's largest
    value."""
    return 0.4 * math.log2(torch.finfo(dtype).tiny)


def _exp_parts(dta: Tensor, steps: Tensor, coefficient: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """``coefficient * exp(dta t)`` for every ``t`` in ``steps`` as magnitude, cosine and sine of the phase,
    real (..., C, N2, T); ``coefficient`` (..., C, N2) complex, 1 if None. Where ``|exp(dta t)|`` is below
    :func:`_flush_log2` the magnitude is 0 (the same entries with or without the coefficient, so backward's
    factors match forward's).

    The magnitude goes through ``exp2``: most of ``exp(Re(dta) t)`` underflows at long lengths (Re(dta) ~ -0.05, t in
    the thousands), and torch's ``exp`` takes a slow path for such arguments on some CPUs. The coefficient enters
    as a log-magnitude and a phase, in the same passes."""
    log2_mag = dta.real.unsqueeze(-1) * (steps * LOG2_E)
    flushed = log2_mag < _flush_log2(log2_mag.dtype)
    phase = dta.imag.unsqueeze(-1) * steps
    if coefficient is not None:
        log2_mag += torch.log2(coefficient.abs()).unsqueeze(-1)
        phase += coefficient.angle().unsqueeze(-1)
    return torch.exp2(log2_mag.masked_fill_(flushed, -math.inf)), torch.cos(phase), torch.sin(phase)


class _KernelFactors(torch.autograd.Function):
    """The kernel factors of :func:`kernel_factors` with a backward written out: only ``dta`` and ``dc`` (a few
    thousand numbers) are kept, and backward recomputes the exponentials once. Through autograd (complex
    exponentials, their products, the joins and transposes; the forward twice, under a checkpoint) the factors
    cost the noncausal step at L = 8192 with 512 channels about 30 ms: 336 against 304 ms with this function
    (``benchmarks/results/ab_s4d_kernel_factors_s31.md``)."""

    @staticmethod
    @without_autocast
    def forward(ctx, dta, dc, length):
        outer_len, inner_len = _factor_lengths(length)
        ctx.lengths = outer_len, inner_len
        ctx.save_for_backward(dta, dc)
        real_dtype, modes = dta.real.dtype, dta.size(-1)
        j = torch.arange(inner_len, device=dta.device, dtype=real_dtype)
        m = torch.arange(outer_len, device=dta.device, dtype=real_dtype) * inner_len
        # right[..., :, j] = (Re, -Im) of dA^j
        magnitude, cos, sin = _exp_parts(dta, j)
        right = dta.real.new_empty(*dta.shape[:-1], 2 * modes, inner_len)
        torch.mul(magnitude, cos, out=right[..., :modes, :])
        torch.mul(magnitude, sin, out=right[..., modes:, :]).neg_()
        # left[..., m, :] = (Re, Im) of 2 dC dA^{mJ} = 2 |dC| exp(Re(dta) m) e^{i (Im(dta) m + arg dC)}
        magnitude, cos, sin = _exp_parts(dta, m, 2.0 * dc)
        left = dta.real.new_empty(*dta.shape[:-1], 2 * modes, outer_len)
        torch.mul(magnitude, cos, out=left[..., :modes, :])
        torch.mul(magnitude, sin, out=left[..., modes:, :])
        return left.transpose(-1, -2), right

    @staticmethod
    @without_autocast
    def backward(ctx, grad_left, grad_right):
        dta, dc = ctx.saved_tensors
        outer_len, inner_len = ctx.lengths
        modes = dta.size(-1)
        real_dtype = dta.real.dtype
        grad_dta = grad_dc = None
        # For a holomorphic f, a complex input's gradient is conj(f'(z)) times the output's (d/dRe + i d/dIm).
        # left = 2 dc dA^m: d/ddc = 2 dA^m, d/ddta = m left; right = conj(dA^j): its (Re, Im) gradient is
        # (g_re, -g_im) on dA^j, and d/ddta dA^j = j dA^j.
        if grad_right is not None and ctx.needs_input_grad[0]:
            j = torch.arange(inner_len, device=dta.device, dtype=real_dtype)
            magnitude, cos, sin = _exp_parts(dta, j)
            g_re, g_im = grad_right[..., :modes, :], grad_right[..., modes:, :]
            # conj(dA^j) (g_re - i g_im) = |dA^j| ((cos g_re - sin g_im) - i (cos g_im + sin g_re)), weight j
            weighted_re = (cos * g_re - sin * g_im).mul_(magnitude)
            weighted_im = (cos * g_im + sin * g_re).mul_(magnitude)
            grad_dta = torch.complex(weighted_re @ j, (weighted_im @ j).neg_())
        if grad_left is not None:
            m = torch.arange(outer_len, device=dta.device, dtype=real_dtype) * inner_len
            magnitude, cos, sin = _exp_parts(dta, m)
            g = grad_left.transpose(-1, -2)
            g_re, g_im = g[..., :modes, :], g[..., modes:, :]
            # conj(dA^m) (g_re + i g_im), summed plain (for dc) and with weight m (for dta)
            weighted_re = (cos * g_re + sin * g_im).mul_(magnitude)
            weighted_im = (cos * g_im - sin * g_re).mul_(magnitude)
            sums = torch.stack([torch.ones_like(m), m], dim=-1)  # (M, 2)
            re, im = weighted_re @ sums, weighted_im @ sums  # (..., C, N2, 2)
            if ctx.needs_input_grad[1]:
                grad_dc = 2.0 * torch.complex(re[..., 0], im[..., 0])
            if ctx.needs_input_grad[0]:
                from_left = 2.0 * dc.conj() * torch.complex(re[..., 1], im[..., 1])
                grad_dta = from_left if grad_dta is None else grad_dta + from_left
        return grad_dta, grad_dc, None


def kernel_factors(dta: Tensor, dc: Tensor, length: int) -> Tuple[Tensor, Tensor]:
    """Real factors of the kernel: ``(left @ right).flatten(-2)[..., :length]`` is :func:`s4d_kernel`.

    Positions are split as ``l = m J + j`` (``J = ceil(sqrt(L))``): ``left[..., c, m, :]`` holds
    ``2 dC dA^{mJ}`` (real and imaginary parts), ``right[..., c, :, j]`` holds ``dA^j`` (real, -imaginary), so
    that ``Re(2 dC dA^{mJ} dA^j)`` summed over modes is one real matmul over ``2 N2``. Differentiable in ``dta``
    and ``dc``, keeping only those for backward.

    Returns:
        left (..., C, M, 2 N2) and right (..., C, 2 N2, J), real, with ``M J >= length``.
    """
    return _KernelFactors.apply(dta, dc, length)


def s4d_kernel(dta: Tensor, dc: Tensor, length: int) -> Tensor:
    """K[..., c, l] = 2 Re sum_n dc[..., c, n] exp(dta[..., c, n] l) for l < ``length``, real (..., C, length).

    Costs O(C N2 L) multiply-adds in one batched matmul and O(C N2 sqrt(L)) complex exponentials. The layer
    itself never calls this: :func:`s4d_conv` builds the kernel a channel group at a time from the factors.
    """
    left, right = kernel_factors(dta, dc, length)
    return torch.matmul(left, right).flatten(-2)[..., :length]


def fft_size(length: int) -> int:
    """Smallest 5-smooth n >= 2 L - 1: a linear (not circular) convolution over offsets -(L-1)..L-1, fast FFT."""
    n = max(1, 2 * length - 1)
    while True:
        rest = n
        for p in (2, 3, 5):
            while rest % p == 0:
                rest //= p
        if rest == 1:
            return n
        n += 1


def two_sided_kernel(kernels: Tensor, n: int, length: Optional[int] = None) -> Tensor:
    """Lay out per-channel kernels (dirs, C, >= L) as one circular kernel (C, n_used).

    ``kernels[0]`` is causal (offset ``i - j = l >= 0``); ``kernels[1]``, if present, is anti-causal with
    ``kernels[1][s]`` at offset ``-(s + 1)`` (strictly later tokens, so the present token is counted once),
    stored at the end of the period. A causal kernel is returned unpadded (``rfft`` pads it).
    """
    length = kernels.size(-1) if length is None else length
    causal = kernels[0, :, :length]
    if kernels.size(0) == 1:
        return causal
    anti = kernels[1, :, : length - 1].flip(-1)  # offsets -(L-1) .. -1
    gap = causal.new_zeros(causal.size(0), n - 2 * length + 1)
    return torch.cat([causal, gap, anti], dim=-1)


def _two_sided_adjoint(grad_two: Tensor, dirs: int, n: int, length: int, kernel_len: int) -> Tensor:
    """Gradient of :func:`two_sided_kernel`: (C, n) -> (dirs, C, kernel_len)."""
    out = grad_two.new_zeros(dirs, grad_two.size(0), kernel_len)
    out[0, :, :length] = grad_two[:, :length]
    if dirs == 2 and length > 1:
        out[1, :, : length - 1] = grad_two[:, n - length + 1:].flip(-1)
    return out


#: complex elements per FFT temporary; channels are processed in groups this size (a few MB: the spectra stay
#: in cache, and no temporary approaches the size of the input)
CHUNK_ELEMENTS = 1 << 18
#: fewest channels per group (pocketfft transforms several strided lanes at once)
MIN_GROUP = 16


#: threads for the channel-group loops (None: torch's setting). The loops issue many FFTs of a few MB each; with
#: OpenMP/MKL threads every call pays a thread hand-off, which on a busy machine costs far more than the FFT
#: (measured 3.5-20 s instead of 1.5 s for a 8192-token step on 2 shared cores). The projections around the
#: layer keep all threads.
GROUP_LOOP_THREADS: Optional[int] = 1


@contextlib.contextmanager
def _loop_threads():
    """Runs the group loop with :data:`GROUP_LOOP_THREADS` intra-op threads; yields torch's own setting."""
    threads = torch.get_num_threads()
    if GROUP_LOOP_THREADS is None or GROUP_LOOP_THREADS == threads:
        yield threads
        return
    torch.set_num_threads(GROUP_LOOP_THREADS)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


#: at most this many Python threads run the channel groups side by side on CPU (None: torch's thread setting).
#: Each works on its own groups with one intra-op thread and writes disjoint channels of the outputs, so the
#: numbers are the same however the groups are split; unlike intra-op threads, no call waits on a hand-off. Two
#: threads on two cores: the S4D step at L=8192 0.71x of one thread's time (docs/benchmarks.md)
GROUP_WORKERS: Optional[int] = None


def _for_groups(groups, body, threads: int, device: torch.device) -> None:
    """``body(g)`` for every channel group, on up to ``threads`` Python threads on CPU (see
    :data:`GROUP_WORKERS`); in order on one thread elsewhere."""
    workers = min(len(groups), threads if GROUP_WORKERS is None else GROUP_WORKERS) if device.type == "cpu" else 1
    if workers <= 1:
        for g in groups:
            body(g)
        return

    def run(share):
        with torch.no_grad():  # grad mode is per thread: a new thread starts with it on
            for g in share:
                body(g)

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(run, groups[i::workers]) for i in range(workers)]:
            future.result()


def _channel_groups(channels: int, rows: int):
    size = max(MIN_GROUP, CHUNK_ELEMENTS // max(1, rows))
    return [slice(start, min(start + size, channels)) for start in range(0, channels, size)]


def _group_spectra(u_g: Tensor, left_g: Tensor, right_g: Tensor, d_g: Tensor, n: int) -> Tuple[Tensor, Tensor]:
    """Spectra of one channel group, channel-major: input (B, c, F) from ``u_g`` (B, c, L), and the two-sided
    kernel with the skip ``d`` at offset 0 (``K * u + d u = (K + d delta) * u``), (c, F)."""
    length = u_g.size(-1)
    kernel = torch.matmul(left_g, right_g).flatten(-2)  # (dirs, c, M J), a fresh tensor
    two = two_sided_kernel(kernel, n, length)  # (c, <= n): a view of ``kernel`` or a new tensor
    two[:, 0] += d_g
    kernel_f = torch.fft.rfft(two, n=n, dim=-1)  # (c, F)
    return torch.fft.rfft(u_g, n=n, dim=-1), kernel_f


def _channel_major(x: Tensor, g: slice) -> Tensor:
    """Channels ``g`` of an (L, B, C) tensor as a contiguous (B, c, L) block, so that the group's FFTs and
    elementwise passes run over contiguous rows (on the strided (L, B, c) slice an ``addcmul`` of 262k entries
    took 1.9 ms). Copied in two steps, the slice's rows and then a 2-d transpose, because torch transposes a
    contiguous matrix blockwise but a strided slice element by element (0.35 against 2.1 ms)."""
    length, bsz = x.shape[:2]
    return x[:, :, g].contiguous().view(length, -1).t().contiguous().view(bsz, -1, length)


def _conv(u: Tensor, left: Tensor, right: Tensor, d: Tensor, n: int, activation: bool, threads: int = 1) -> Tensor:
    length, bsz, channels = u.shape
    out = u.new_empty(length, bsz, channels)

    def group(g):
        u_spec, kernel_f = _group_spectra(_channel_major(u, g), left[:, g], right[:, g], d[g], n)
        y = torch.fft.irfft(u_spec.mul_(kernel_f), n=n, dim=-1)[..., :length]
        out[:, :, g] = (F.gelu(y) if activation else y).permute(2, 0, 1)

    _for_groups(_channel_groups(channels, (n // 2 + 1) * bsz), group, threads, u.device)
    return out


class _S4DConv(torch.autograd.Function):
    """``act(conv(u, K) + d u)`` with K generated from its factors a channel group at a time.

    Neither the kernel (C, L), nor the spectra, nor the pre-activation are kept: backward recomputes them per
    channel group from ``u`` and the small factors. Memory: the output plus O(group) temporaries. The skip ``d u``
    rides in the kernel (``d`` added at offset 0), so its gradient is the kernel gradient's offset 0.
    """

    # the work dtype is float32 or wider: autocast must not lower the kernel's product (cuFFT takes half precision
    # only at power-of-two sizes, bfloat16 not at all)
    @staticmethod
    @without_autocast
    def forward(ctx, u, left, right, d, n, activation):
        ctx.n, ctx.activation = n, activation
        ctx.save_for_backward(u, left, right, d)
        with _loop_threads() as threads:
            return _conv(u, left, right, d, n, activation, threads)

    @staticmethod
    @without_autocast
    def backward(ctx, grad):
        with _loop_threads() as threads:
            return _S4DConv._backward(ctx, grad, threads)

    @staticmethod
    def _backward(ctx, grad, threads):
        u, left, right, d = ctx.saved_tensors
        n, activation = ctx.n, ctx.activation
        length, bsz, channels = u.shape
        dirs, kernel_len = left.size(0), left.size(-2) * right.size(-1)
        grad_u, grad_left, grad_right, grad_d = (torch.empty_like(t) for t in (u, left, right, d))

        def group(g):
            grad_g = _channel_major(grad, g)
            u_spec, kernel_f = _group_spectra(_channel_major(u, g), left[:, g], right[:, g], d[g], n)
            if activation:
                pre = torch.fft.irfft(u_spec * kernel_f, n=n, dim=-1)[..., :length]
                grad_g = torch.ops.aten.gelu_backward(grad_g, pre)
                del pre
            g_spec = torch.fft.rfft(grad_g, n=n, dim=-1)
            del grad_g
            # the correlations below take the conjugate spectra, conjugated in place: a product with a lazily
            # conjugated tensor (``.conj()``) copies it first, 0.9 ms a group here
            kernel_f.conj_physical_()
            u_spec.conj_physical_()
            # dL/du[j] = sum_i g[i] k[(i - j) mod n]: a correlation, the conjugate spectrum of k
            grad_u[:, :, g] = torch.fft.irfft(g_spec * kernel_f, n=n, dim=-1)[..., :length].permute(2, 0, 1)
            # dL/dk[m] = sum_b sum_j g[(j + m) mod n] u[j]; offset 0 is also dL/dd
            g_spec.mul_(u_spec)
            batch_sum = g_spec[0] if bsz == 1 else g_spec.sum(dim=0)  # a sum over one row still copies it
            grad_two = torch.fft.irfft(batch_sum, n=n, dim=-1)  # (c, n)
            grad_d[g] = grad_two[:, 0]
            grad_kernel = _two_sided_adjoint(grad_two, dirs, n, length, kernel_len).unflatten(-1, (left.size(-2), -1))
            grad_left[:, g] = torch.matmul(grad_kernel, right[:, g].transpose(-1, -2))
            grad_right[:, g] = torch.matmul(left[:, g].transpose(-1, -2), grad_kernel)

        _for_groups(_channel_groups(channels, (n // 2 + 1) * bsz), group, threads, u.device)
        return grad_u, grad_left, grad_right, grad_d, None, None


def s4d_conv(u: Tensor, dta: Tensor, dc: Tensor, d: Tensor, *, activation: bool = True,
             n: Optional[int] = None) -> Tensor:
    """The S4D layer's sequence map: ``GELU(K_causal * u + K_anti * u + d u)`` along the first dimension.

    Args:
        u: (L, B, C) input.
        dta, dc: (dirs, C, N2) complex from :func:`discretize`; direction 0 is the causal kernel (offsets
            ``0..L-1``), direction 1 (if present) the anti-causal one (strictly later tokens, see
            :func:`two_sided_kernel`).
        d: (C,) skip coefficients.
        activation: apply GELU (exact, erf form).
        n: FFT size, >= 2 L - 1 (default :func:`fft_size`).
    Returns:
        (L, B, C), in ``u``'s dtype (half precision runs in float32: CPU FFTs need it).
    """
    length = u.size(0)
    n = fft_size(length) if n is None else n
    if n < 2 * length - 1:
        raise ValueError(f"FFT size {n} is too small for a linear convolution of length {length}; need >= {2 * length - 1}")
    left, right = kernel_factors(dta, dc, length)  # keeps only dta and dc for backward
    dtype = torch.promote_types(torch.promote_types(u.dtype, left.dtype), torch.float32)
    out = _S4DConv.apply(u.to(dtype), left.to(dtype), right.to(dtype), d.to(dtype), n, activation)
    return out.to(u.dtype)


def ssm_chunk_step(u: Tensor, state: Tensor, dta: Tensor, dc: Tensor, d: Tensor) -> Tuple[Tensor, Tensor]:
    """Run the causal recurrence over a chunk of ``T`` new inputs from ``state``.

    ``x_t = dA x_{t-1} + u_t``, ``y_t = 2 Re sum_n dC_n x_t,n + d u_t``; equal to the causal convolution of the
    whole history. Costs O(T C N2) plus an FFT convolution of the chunk, independent of the history length.

    Args:
        u: (T, B, C) new inputs.
        state: (B, C, N2) complex state after the previous inputs.
        dta, dc: (C, N2) complex from :func:`discretize`; d: (C,).
    Returns:
        (y (T, B, C) in the dtype of ``u``, new state (B, C, N2) complex).
    """
    with torch.autocast(u.device.type, enabled=False):  # float32 or wider work, as in s4d_conv
        return _ssm_chunk_step(u, state, dta, dc, d)


def _ssm_chunk_step(u: Tensor, state: Tensor, dta: Tensor, dc: Tensor, d: Tensor) -> Tuple[Tensor, Tensor]:
    steps = u.size(0)
    cdtype = state.dtype
    uc = u.to(state.real.dtype)
    dta, dc = dta.to(cdtype), dc.to(cdtype)
    d = d.to(uc.dtype)
    t = torch.arange(steps + 1, device=u.device, dtype=uc.dtype)
    powers = _complex_exp(dta * t.view(-1, 1, 1))  # (T + 1, C, N2): dA^t
    if steps == 1:  # the plain recurrence: one multiply-add per mode
        new_state = powers[1] * state + uc[0].unsqueeze(-1)
        y = 2.0 * (dc * new_state).sum(-1).real + d * uc[0]
        return y.unsqueeze(0).to(u.dtype), new_state
    # the history reaches y_t through dA^{t+1} x_prev; the chunk itself through the kernel
    from_state = 2.0 * torch.einsum("tcn,bcn->tbc", powers[1:] * dc, state).real
    left, right = kernel_factors(dta.unsqueeze(0), dc.unsqueeze(0), steps)
    y = _conv(uc, left, right, d, fft_size(steps), activation=False) + from_state
    # x_new = dA^T x_prev + sum_s dA^{T-1-s} u_s
    new_state = powers[steps] * state + torch.einsum("scn,sbc->bcn", powers[:steps].flip(0), uc.to(cdtype))
    return y.to(u.dtype), new_state
