"""Diagonal state space (S4D, Gu et al. 2022) math: discretisation, convolution kernels, FFT convolution and the
recurrent decoding step. Pure tensor functions; the layer is :class:`fluence_fairseq.modules.s4d.S4D`.

Shapes: ``dirs`` kernels (1 = causal, 2 = causal + anti-causal), ``C`` channels, ``N2 = d_state / 2`` complex
modes per channel. Sequences are laid out ``(L, B, C)`` (fairseq's time-major layout, so no transposes are
needed around the projections).

Per mode, with ``dA = exp(dt A)`` and ``dC = C (exp(dt A) - 1) / A`` (zero-order hold), the kernel is
``K[l] = 2 Re sum_n dC_n dA_n^l``. It is never materialised per mode and position: positions are split as
``l = m J + j`` (``J ~ sqrt(L)``) so that ``K[mJ + j] = 2 Re sum_n (dC_n dA_n^{mJ}) dA_n^j`` is one small real
matmul per channel over ``2 N2`` inputs, with ``(C, N2, sqrt(L))`` temporaries only.
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["discretize", "s4d_kernel", "two_sided_kernel", "fft_size", "fft_conv", "ssm_chunk_step"]


def _exp_minus_one(z: Tensor) -> Tensor:
    """exp(z) - 1 for complex z without the cancellation of ``exp(z) - 1`` when |z| is small (dt A ~ 1e-3)."""
    x, y = z.real, z.imag
    real = torch.expm1(x) * torch.cos(y) - 2.0 * torch.sin(0.5 * y).pow(2)
    imag = torch.exp(x) * torch.sin(y)
    return torch.complex(real, imag)


def discretize(log_dt: Tensor, log_neg_a_real: Tensor, a_imag: Tensor, c_modes: Tensor) -> Tuple[Tensor, Tensor]:
    """Zero-order-hold discretisation.

    Args:
        log_dt: (..., C) log step sizes.
        log_neg_a_real, a_imag: (..., C, N2): A = -exp(log_neg_a_real) + i a_imag (real part always negative).
        c_modes: (..., C, N2, 2) output coefficients C as (real, imag).
    Returns:
        (dt A, dC) complex (..., C, N2), with dC = C (exp(dt A) - 1) / A; dA = exp(dt A).
    """
    a = torch.complex(-torch.exp(log_neg_a_real), a_imag)
    dta = a * torch.exp(log_dt).unsqueeze(-1)
    dc = torch.view_as_complex(c_modes.contiguous()) * _exp_minus_one(dta) / a
    return dta, dc


def s4d_kernel(dta: Tensor, dc: Tensor, length: int) -> Tensor:
    """K[..., c, l] = 2 Re sum_n dc[..., c, n] exp(dta[..., c, n] l) for l < ``length``, real (..., C, length).

    Costs O(C N2 L) multiply-adds in one batched matmul and O(C N2 sqrt(L)) complex exponentials and memory.
    """
    if length <= 0:
        return dta.real.new_zeros(*dta.shape[:-1], 0)
    inner_len = max(1, math.isqrt(length - 1) + 1)  # J = ceil(sqrt(L))
    outer_len = -(-length // inner_len)  # M = ceil(L / J)
    real_dtype = dta.real.dtype
    j = torch.arange(inner_len, device=dta.device, dtype=real_dtype)
    m = torch.arange(outer_len, device=dta.device, dtype=real_dtype) * inner_len
    inner = torch.exp(dta.unsqueeze(-1) * j)  # (..., C, N2, J): dA^j
    outer = dc.unsqueeze(-1) * torch.exp(dta.unsqueeze(-1) * m)  # (..., C, N2, M): dC dA^{mJ}
    # Re(o i) = o.re i.re - o.im i.im, as one real matmul over 2 N2
    left = torch.cat([outer.real, outer.imag], dim=-2).transpose(-1, -2)  # (..., C, M, 2 N2)
    right = torch.cat([inner.real, -inner.imag], dim=-2)  # (..., C, 2 N2, J)
    kernel = 2.0 * torch.matmul(left, right)  # (..., C, M, J)
    return kernel.flatten(-2)[..., :length]


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


def two_sided_kernel(kernels: Tensor, n: int) -> Tensor:
    """Lay out per-channel kernels (dirs, C, L) as one circular kernel (n_used, C) for :func:`fft_conv`.

    ``kernels[0]`` is causal (offset ``i - j = l >= 0``); ``kernels[1]``, if present, is anti-causal with
    ``kernels[1][s]`` at offset ``-(s + 1)`` (strictly future tokens, so the present token is counted once),
    stored at the end of the period. A causal kernel is returned unpadded (``rfft`` pads it).
    """
    causal = kernels[0].t()
    if kernels.size(0) == 1:
        return causal
    length = kernels.size(-1)
    anti = kernels[1, :, : length - 1].flip(-1).t()  # offsets -(L-1) .. -1
    gap = causal.new_zeros(n - 2 * length + 1, causal.size(1))
    return torch.cat([causal, gap, anti], dim=0)


class _FFTConv(torch.autograd.Function):
    """y = circular_conv_n(u, k)[:L] + d u along dim 0. Saves only u and k: the spectra (2x the size of u each)
    are recomputed in backward instead of kept."""

    @staticmethod
    def forward(ctx, u: Tensor, k: Tensor, d: Tensor, n: int) -> Tensor:
        ctx.n = n
        ctx.save_for_backward(u, k, d)
        return _conv_forward(u, k, d, n)

    @staticmethod
    def backward(ctx, grad: Tensor):
        u, k, d = ctx.saved_tensors
        n, length = ctx.n, u.size(0)
        need_u, need_k, need_d = ctx.needs_input_grad[:3]
        grad_u = grad_k = grad_d = None
        g = torch.fft.rfft(grad, n=n, dim=0)  # (F, B, C)
        if need_u:
            kf = torch.fft.rfft(k, n=n, dim=0)
            # dL/du[j] = sum_i g[i] k[(i - j) mod n]: a correlation = conj spectrum of k
            grad_u = torch.fft.irfft(g * kf.conj().unsqueeze(1), n=n, dim=0)[:length]
            del kf
            grad_u = grad_u + grad * d
        if need_k:
            uf = torch.fft.rfft(u, n=n, dim=0)
            # dL/dk[m] = sum_b sum_j g[(j + m) mod n] u[j]
            grad_k = torch.fft.irfft((g * uf.conj()).sum(dim=1), n=n, dim=0)[: k.size(0)]
        if need_d:
            grad_d = (grad * u).sum(dim=(0, 1))
        return grad_u, grad_k, grad_d, None


def _conv_forward(u: Tensor, k: Tensor, d: Tensor, n: int) -> Tensor:
    spectrum = torch.fft.rfft(u, n=n, dim=0)  # (F, B, C)
    spectrum.mul_(torch.fft.rfft(k, n=n, dim=0).unsqueeze(1))
    out = torch.fft.irfft(spectrum, n=n, dim=0)[: u.size(0)]
    del spectrum
    return out.addcmul_(u, d)


def fft_conv(u: Tensor, kernel: Tensor, d: Tensor, n: Optional[int] = None) -> Tensor:
    """Per-channel convolution ``y[i] = sum_j k[(i - j) mod n] u[j] + d u[i]`` along the first dimension.

    Args:
        u: (L, B, C) input.
        kernel: (Lk, C) circular kernel (``Lk <= n``; from :func:`two_sided_kernel`).
        d: (C,) skip coefficients.
        n: FFT size, >= 2 L - 1 for a linear convolution (default :func:`fft_size`).
    Returns:
        (L, B, C), in ``u``'s dtype (half precision runs in float32: CPU FFTs need it).
    """
    n = fft_size(u.size(0)) if n is None else n
    if kernel.size(0) > n:
        raise ValueError(f"kernel of length {kernel.size(0)} does not fit in an FFT of size {n}")
    dtype = torch.promote_types(torch.promote_types(u.dtype, kernel.dtype), torch.float32)
    out = _FFTConv.apply(u.to(dtype), kernel.to(dtype), d.to(dtype), n)
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
    steps = u.size(0)
    cdtype = state.dtype
    uc = u.to(state.real.dtype)
    dta, dc = dta.to(cdtype), dc.to(cdtype)
    d = d.to(uc.dtype)
    t = torch.arange(steps + 1, device=u.device, dtype=uc.dtype)
    powers = torch.exp(dta * t.view(-1, 1, 1))  # (T + 1, C, N2): dA^t
    if steps == 1:  # the plain recurrence: one multiply-add per mode
        new_state = powers[1] * state + uc[0].unsqueeze(-1)
        y = 2.0 * (dc * new_state).sum(-1).real + d * uc[0]
        return y.unsqueeze(0).to(u.dtype), new_state
    # the history reaches y_t through dA^{t+1} x_prev; the chunk itself through the kernel
    from_state = 2.0 * torch.einsum("tcn,bcn->tbc", powers[1:] * dc, state).real
    kernel = s4d_kernel(dta, dc, steps).t()
    y = _conv_forward(uc, kernel, d, fft_size(steps)) + from_state
    # x_new = dA^T x_prev + sum_s dA^{T-1-s} u_s
    new_state = powers[steps] * state + torch.einsum("scn,sbc->bcn", powers[:steps].flip(0), uc.to(cdtype))
    return y.to(u.dtype), new_state
