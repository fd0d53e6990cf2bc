"""S4D's kernel factors (ops/s4d.py ``kernel_factors``, a custom autograd function keeping only ``dta`` and ``dc``)
against the complex formula written out here and differentiated by autograd."""
import math

import pytest
import torch

from fluence_fairseq.ops.s4d import discretize, kernel_factors


def reference_factors(dta, dc, length):
    """left (..., C, M, 2 N2) = (Re, Im) of 2 dc dA^{mJ}; right (..., C, 2 N2, J) = (Re, -Im) of dA^j, through
    torch's complex exp (so autograd gives the reference gradients)."""
    inner_len = math.isqrt(max(1, length) - 1) + 1
    outer_len = -(-max(1, length) // inner_len)
    j = torch.arange(inner_len, dtype=dta.real.dtype)
    m = torch.arange(outer_len, dtype=dta.real.dtype) * inner_len
    inner = torch.exp(dta.unsqueeze(-1) * j)
    outer = 2 * dc.unsqueeze(-1) * torch.exp(dta.unsqueeze(-1) * m)
    left = torch.cat([outer.real, outer.imag], dim=-2).transpose(-1, -2)
    right = torch.cat([inner.real, -inner.imag], dim=-2)
    return left, right


def _ssm(dirs=2, channels=3, modes=2, seed=0, dtype=torch.float64):
    """Parameters in the layer's range; one mode with no rotation (Im(A) = 0) and one with C = 0, the awkward
    points of the magnitude-and-phase form (log2 |dc| = -inf, angle of 0)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return scale * torch.randn(*shape, dtype=dtype, generator=gen)

    log_dt, log_neg_a_real = rand(dirs, channels, scale=0.3) - 1.5, rand(dirs, channels, modes, scale=0.1) - 0.7
    a_imag, c_modes = rand(dirs, channels, modes, scale=3.0), rand(dirs, channels, modes, 2)
    a_imag[0, 0, 0] = 0.0
    c_modes[-1, -1, -1] = 0.0
    return [p.requires_grad_(True) for p in (log_dt, log_neg_a_real, a_imag, c_modes)]


@pytest.mark.parametrize("length", [1, 2, 9, 10, 50])
def test_factors_and_gradients_equal_complex_autograd(length):
    """Values and gradients to every parameter in float64: one position (M = J = 1), squares (M J = L) and not."""
    params = _ssm()
    gen = torch.Generator().manual_seed(length)
    dta, dc = discretize(*params)
    want = reference_factors(dta, dc, length)
    got = kernel_factors(dta, dc, length)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-13)
    weights = [torch.randn(w.shape, dtype=torch.float64, generator=gen) for w in want]
    grads_want = torch.autograd.grad(sum((w * c).sum() for w, c in zip(want, weights)), params, retain_graph=True)
    grads_got = torch.autograd.grad(sum((g * c).sum() for g, c in zip(got, weights)), params)
    for g, w in zip(grads_got, grads_want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_gradcheck_through_discretisation():
    params = _ssm(dirs=1, channels=2)
    assert torch.autograd.gradcheck(lambda *p: kernel_factors(*discretize(*p), 7), tuple(params))


@pytest.mark.parametrize("used", ["left", "right"])
def test_one_factor_used(used):
    """Backward with one factor's gradient absent (None to the function) equals autograd's."""
    params = _ssm(seed=2)
    dta, dc = discretize(*params)
    pick = 0 if used == "left" else 1
    want = reference_factors(dta, dc, 20)[pick].square().sum()
    got = kernel_factors(dta, dc, 20)[pick].square().sum()
    grads_got = torch.autograd.grad(got, params, retain_graph=True, allow_unused=True)
    grads_want = torch.autograd.grad(want, params, allow_unused=True)
    assert [w is None for w in grads_want] == [False] * 3 + [used == "right"]  # right does not depend on C
    for g, w, p in zip(grads_got, grads_want, params):
        torch.testing.assert_close(g, torch.zeros_like(p) if w is None else w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("needs", ["dta", "dc"])
def test_gradient_to_one_input(needs):
    """Only the input that needs a gradient gets one; it equals autograd's."""
    params = _ssm(seed=3)
    dta, dc = (t.detach() for t in discretize(*params))
    dta.requires_grad_(needs == "dta")
    dc.requires_grad_(needs == "dc")
    target = dta if needs == "dta" else dc
    (got,) = torch.autograd.grad(sum(t.sum() for t in kernel_factors(dta, dc, 12)), [target])
    (want,) = torch.autograd.grad(sum(t.sum() for t in reference_factors(dta, dc, 12)), [target])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_float32_at_long_length_close_to_float64():
    """At L = 8192 most of exp(Re(dta) m) underflows in float32 and phases reach thousands of radians: values and
    gradients stay close to float64's (the same parameters rounded)."""
    params64 = _ssm(dirs=1, channels=4, modes=8, seed=4)
    params32 = [p.detach().float().requires_grad_(True) for p in params64]
    out = {}
    for name, params in (("64", params64), ("32", params32)):
        left, right = kernel_factors(*discretize(*params), 8192)
        kernel = (left @ right).flatten(-2)[..., :8192]
        gen = torch.Generator().manual_seed(5)
        weight = torch.randn(kernel.shape, dtype=torch.float64, generator=gen).to(kernel.dtype)
        out[name] = (kernel.detach(), torch.autograd.grad((kernel * weight).sum(), params))
    assert torch.isfinite(out["32"][0]).all()
    scale = out["64"][0].abs().max()
    torch.testing.assert_close(out["32"][0].double(), out["64"][0], atol=2e-5 * scale, rtol=0)
    for g32, g64 in zip(out["32"][1], out["64"][1]):
        torch.testing.assert_close(g32.double(), g64, atol=1e-3 * g64.abs().max(), rtol=0)


def _subnormal(t):
    return ((t.abs() < torch.finfo(t.dtype).tiny) & (t != 0)).sum().item()


def test_no_subnormal_factors_or_kernel_at_long_length():
    """Modes decayed over thousands of positions are flushed to zero rather than left subnormal (x86 multiplies
    subnormal numbers through a slow path: the kernel's matmul took 2.3x as long); what is dropped is far below
    float32's resolution of the kernel."""
    from fluence_fairseq.modules.s4d import S4DAttention
    torch.manual_seed(0)
    attn = S4DAttention(64, 4, causal=False)  # the layer's initialisation: dt in [1e-3, 1e-1]
    with torch.no_grad():
        dta, dc = attn.discretized()
        left, right = kernel_factors(dta, dc, 8192)
        want_left, want_right = reference_factors(dta.to(torch.complex128), dc.to(torch.complex128), 8192)
    assert (left == 0).sum() > (want_left == 0).sum()  # the long decays are flushed here
    assert _subnormal(left) == _subnormal(right) == _subnormal(left @ right) == 0
    # float32's phases of thousands of radians bound the agreement, not the flush (below 1e-15 of the largest)
    torch.testing.assert_close(left.double(), want_left, atol=1e-4 * want_left.abs().max(), rtol=0)
    torch.testing.assert_close(right.double(), want_right, atol=1e-4, rtol=0)


def test_gradients_where_factors_are_flushed():
    """float64 flushes below 2^-409: with dt = 1 the outer factors pass it within 1,000 positions. The values equal
    the unflushed formula (to far below float64's resolution) and the gradients are the flushed function's
    (gradcheck), the same entries flushed in forward and backward."""
    params = _ssm(dirs=1, channels=2, modes=2, seed=6)
    with torch.no_grad():
        params[0].fill_(0.0)  # log dt = 0: Re(dt A) about -0.5
    dta, dc = discretize(*params)
    left, _ = kernel_factors(dta, dc, 1000)
    assert (left == 0).any()
    torch.testing.assert_close(left, reference_factors(dta, dc, 1000)[0], rtol=1e-11, atol=1e-100)
    assert torch.autograd.gradcheck(lambda *p: kernel_factors(*discretize(*p), 1000), tuple(params))
