"""S4D: the shared attention contract, plus the layer against explicit formulas written out here."""
import math

import pytest
import torch
import torch.nn.functional as F
from attention_contract import AttentionContract, Case

from fluence_fairseq.modules import FSS4D
from fluence_fairseq.modules.attention_base import UnsupportedPatternError
from fluence_fairseq.modules.registry import get_attention
import fluence_fairseq.ops.s4d as s4d_ops
from fluence_fairseq.ops.s4d import discretize, fft_size, s4d_conv, s4d_kernel, ssm_chunk_step


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run many tiny operations: on a busy shared machine, thread hand-offs would dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TestS4DContract(AttentionContract):
    case = Case("s4d", lambda **kw: FSS4D(32, 4, d_state=4, s4d_dt_min=0.05, s4d_dt_max=0.5, **kw))


# ------------------------------------------------------------------------------------------- references
def explicit_kernels(attn, length):
    """K[dir, c, l] = 2 Re sum_n C_n (exp(dt A_n) - 1) / A_n exp(dt A_n l), term by term in complex128."""
    dt = attn.log_dt.detach().double().exp()
    a = torch.complex(-attn.log_neg_a_real.detach().double().exp(), attn.a_imag.detach().double())
    c = torch.view_as_complex(attn.c_modes.detach().double().contiguous())
    out = torch.zeros(*dt.shape, length, dtype=torch.float64)
    for l in range(length):
        dta = dt.unsqueeze(-1) * a
        out[..., l] = 2 * (c * (torch.exp(dta) - 1) / a * torch.exp(dta * l)).sum(-1).real
    return out


def explicit_layer(attn, x, key_padding_mask=None):
    """The whole layer with an O(L^2) convolution loop, float64. x: (L, B, D)."""
    x = x.double()
    length = x.size(0)
    u = F.linear(x, attn.v_proj.weight.double(), attn.v_proj.bias.double())
    if key_padding_mask is not None:
        u = u.masked_fill(key_padding_mask.t().unsqueeze(-1), 0.0)
    kernels = explicit_kernels(attn, length)
    y = torch.zeros_like(u)
    for i in range(length):
        for j in range(length):
            if j <= i:
                y[i] += kernels[0, :, i - j] * u[j]
            elif not attn.causal:
                y[i] += kernels[1, :, j - i - 1] * u[j]
    y = F.gelu(y + attn.d_skip.detach().double() * u)
    return F.linear(y, attn.out_proj.weight.double(), attn.out_proj.bias.double())


def _attn(causal, seed=0, **kw):
    torch.manual_seed(seed)
    return FSS4D(16, 2, causal=causal, **kw).eval()


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("length", [1, 2, 7, 50, 64])
def test_kernel_equals_vandermonde(length):
    attn = _attn(False, d_state=8, s4d_dt_max=0.5).double()
    torch.testing.assert_close(attn.kernels(length).detach(), explicit_kernels(attn, length), atol=1e-10, rtol=1e-9)


def test_kernel_float32_close_to_float64_at_long_length():
    """The blocked kernel keeps fp32 accuracy over thousands of positions (phases reach thousands of radians)."""
    attn = _attn(True, d_state=16, s4d_dt_min=1e-3, s4d_dt_max=1e-2)
    k32 = attn.kernels(3000).detach()
    k64 = attn.double().kernels(3000).detach()
    torch.testing.assert_close(k32.double(), k64, atol=2e-4, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_layer_equals_explicit_convolution_loop(causal):
    attn = _attn(causal, d_state=4, s4d_dt_min=0.05, s4d_dt_max=0.5)
    x = torch.randn(9, 2, 16, generator=torch.Generator().manual_seed(3))
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, -2:] = True
    want = explicit_layer(attn, x, kpm)
    got = attn.double()(x.double(), x.double(), x.double(), key_padding_mask=kpm, need_weights=False)[0]
    torch.testing.assert_close(got[:, 0], want[:, 0], atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(got[:-2, 1], want[:-2, 1], atol=1e-10, rtol=1e-9)


def test_value_only_parameters():
    attn = _attn(False)
    names = {name for name, _ in attn.named_parameters()}
    assert not any(name.startswith(("q_proj", "k_proj")) for name in names)
    assert {"log_dt", "log_neg_a_real", "a_imag", "c_modes", "d_skip"} <= names
    assert attn.log_dt.shape == (2, 16) and _attn(True).log_dt.shape == (1, 16)


def test_s4d_inv_initialisation():
    attn = _attn(False, d_state=8, s4d_dt_min=1e-3, s4d_dt_max=1e-1)
    n = torch.arange(4, dtype=torch.float32)
    torch.testing.assert_close(attn.a_imag[0, 5], 8 / math.pi * (8 / (1 + 2 * n) - 1))
    torch.testing.assert_close(-attn.log_neg_a_real.exp(), torch.full_like(attn.log_neg_a_real, -0.5))
    dt = attn.log_dt.exp()
    assert (dt >= 1e-3 * (1 - 1e-6)).all() and (dt <= 1e-1 * (1 + 1e-6)).all()


def test_causal_flag_decides_direction():
    """The reference ignored ``causal`` (causal unless bidirectional=True); here causal=False is bidirectional."""
    x = torch.randn(12, 2, 16)
    x2 = x.clone()
    x2[6:] = torch.randn(6, 2, 16)
    for causal in (True, False):
        attn = _attn(causal, s4d_dt_min=0.05, s4d_dt_max=0.5)
        first = attn(x, x, x, need_weights=False)[0][0]
        first2 = attn(x2, x2, x2, need_weights=False)[0][0]
        if causal:
            torch.testing.assert_close(first2, first, atol=1e-6, rtol=0)
        else:
            assert (first2 - first).abs().max() > 1e-3, "noncausal S4D ignores later tokens"


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-11), (torch.float32, 1e-5)])
def test_recurrence_equals_convolution_long(dtype, atol):
    """Token-by-token and uneven chunks over 200 steps agree with the full causal convolution."""
    attn = _attn(True, d_state=16, s4d_dt_min=1e-3, s4d_dt_max=0.3).to(dtype)
    length = 200
    u = torch.randn(length, 2, 16, dtype=dtype)
    dta, dc = (t[0] for t in attn.discretized())
    full = s4d_conv(u, *attn.discretized(), attn.d_skip, activation=False)
    for sizes in ([1] * length, [37, 1, 1, 100, 5, 56]):
        state = torch.zeros(2, 16, 8, dtype=torch.complex128 if dtype == torch.float64 else torch.complex64)
        outs, t = [], 0
        for size in sizes:
            y, state = ssm_chunk_step(u[t:t + size], state, dta, dc, attn.d_skip)
            outs.append(y)
            t += size
        torch.testing.assert_close(torch.cat(outs).detach(), full.detach(), atol=atol, rtol=0)


def test_decoding_state_layout_and_constant_size():
    attn = _attn(True, d_state=8)
    state = {}
    x = torch.randn(5, 3, 16)
    for i in range(5):
        attn(x[i:i + 1], x[i:i + 1], x[i:i + 1], incremental_state=state, need_weights=False)
        (buf,) = state.values()
        assert set(buf) == {"s4d_state"}
        assert buf["s4d_state"].shape == (3, 16, 4, 2) and buf["s4d_state"].dtype == torch.float32


def _random_ssm(dirs, channels, modes, gen):
    """Random S4D parameters in the range the layer uses (decaying modes, dt around 0.2), float64."""
    def rand(*shape, scale=1.0):
        return scale * torch.randn(*shape, dtype=torch.float64, generator=gen)

    return (rand(dirs, channels, scale=0.3) - 1.5, rand(dirs, channels, modes, scale=0.1) - 0.7,
            rand(dirs, channels, modes, scale=3.0), rand(dirs, channels, modes, 2))


@pytest.mark.parametrize("dirs,activation,bsz", [(1, False, 2), (2, True, 2), (2, True, 1)])
def test_s4d_conv_gradcheck(dirs, activation, bsz):
    """The custom autograd function (kernel, spectra and pre-activation recomputed in backward) against finite
    differences, through the discretisation to every parameter; 5 channels in groups of 2, 2 and 1, a batch of 2
    (the groups run channel-major, (B, c, L); the skip rides in the kernel) or of 1 (no sum over the batch)."""
    gen = torch.Generator().manual_seed(0)
    length, channels = 4, 5
    u = torch.randn(length, bsz, channels, dtype=torch.float64, generator=gen).requires_grad_(True)
    d = torch.randn(channels, dtype=torch.float64, generator=gen).requires_grad_(True)
    params = tuple(p.requires_grad_(True) for p in _random_ssm(dirs, channels, 2, gen))

    def layer(u, d, *params):
        return s4d_conv(u, *discretize(*params), d, activation=activation)

    old = s4d_ops.CHUNK_ELEMENTS, s4d_ops.MIN_GROUP
    s4d_ops.CHUNK_ELEMENTS, s4d_ops.MIN_GROUP = 1, 2
    try:
        assert len(s4d_ops._channel_groups(channels, 100)) == 3
        assert torch.autograd.gradcheck(layer, (u, d, *params))
    finally:
        s4d_ops.CHUNK_ELEMENTS, s4d_ops.MIN_GROUP = old


@pytest.mark.parametrize("length", [1, 2, 9])
def test_s4d_conv_equals_explicit_linear_convolution(length):
    gen = torch.Generator().manual_seed(1)
    dta, dc = discretize(*_random_ssm(2, 3, 2, gen))
    u = torch.randn(length, 2, 3, dtype=torch.float64, generator=gen)
    d = torch.randn(3, dtype=torch.float64, generator=gen)
    kernels = s4d_kernel(dta, dc, length)
    want = d * u
    for i in range(length):
        for j in range(length):
            want[i] += kernels[0, :, i - j] * u[j] if j <= i else kernels[1, :, j - i - 1] * u[j]
    torch.testing.assert_close(s4d_conv(u, dta, dc, d, activation=False), want)
    torch.testing.assert_close(s4d_conv(u, dta, dc, d), F.gelu(want))
    want_causal = d * u
    for i in range(length):
        for j in range(i + 1):
            want_causal[i] += kernels[0, :, i - j] * u[j]
    torch.testing.assert_close(s4d_conv(u, dta[:1], dc[:1], d, activation=False), want_causal)


def test_fft_size():
    for length in (1, 2, 3, 100, 4097, 8192):
        n = fft_size(length)
        assert n >= 2 * length - 1 and n <= 2 * (2 * length - 1)
    assert fft_size(8192) == 16384


@pytest.mark.parametrize("bad", [0, 3, 15, -2, 2.0, True])
def test_d_state_validation(bad):
    with pytest.raises(ValueError, match="d_state must be an even integer"):
        FSS4D(16, 2, d_state=bad)


def test_dt_validation():
    with pytest.raises(ValueError, match="s4d_dt_min"):
        FSS4D(16, 2, s4d_dt_min=0.2, s4d_dt_max=0.1)
    with pytest.raises(ValueError, match="s4d_dt_min"):
        FSS4D(16, 2, s4d_dt_min=0.0)


def test_cross_attention_refused():
    with pytest.raises(UnsupportedPatternError, match="supports"):
        FSS4D(16, 2, cross=True)
    with pytest.raises(UnsupportedPatternError):
        FSS4D(16, 2, encoder_decoder_attention=True)


def test_registry_and_half_precision_input():
    spec = get_attention("s4d")
    attn = spec.build(16, 2, causal=True, **spec.tiny).eval()
    x = torch.randn(6, 1, 16)
    want = attn(x, x, x, need_weights=False)[0]
    got = attn.to(torch.bfloat16)(x.bfloat16(), need_weights=False)[0]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)


def test_complex_exp_from_real_parts_equals_torch_exp():
    """The kernel factors' exp(z) from exp, cos and sin of the parts (8x faster on CPU than torch's complex exp):
    the same values and, through autograd, the same gradients."""
    gen = torch.Generator().manual_seed(3)
    z = torch.complex(-3 * torch.rand(6, 5, dtype=torch.float64, generator=gen),
                      20 * torch.randn(6, 5, dtype=torch.float64, generator=gen)).requires_grad_(True)
    torch.testing.assert_close(s4d_ops._complex_exp(z), torch.exp(z), rtol=1e-14, atol=1e-14)
    w = torch.randn(6, 5, dtype=torch.complex128, generator=gen)
    (got,) = torch.autograd.grad((s4d_ops._complex_exp(z) * w).real.sum(), z)
    (want,) = torch.autograd.grad((torch.exp(z) * w).real.sum(), z)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    z32 = z.detach().to(torch.complex64)
    torch.testing.assert_close(s4d_ops._complex_exp(z32), torch.exp(z32), rtol=1e-5, atol=1e-6)


def test_channel_groups_on_several_threads_give_the_same_numbers(monkeypatch):
    """The groups split over Python threads (GROUP_WORKERS) write disjoint channels: outputs and every gradient
    equal the one-thread loop's bitwise."""
    gen = torch.Generator().manual_seed(4)
    length, channels = 6, 7
    u0 = torch.randn(length, 3, channels, dtype=torch.float64, generator=gen)
    d0 = torch.randn(channels, dtype=torch.float64, generator=gen)
    params0 = _random_ssm(2, channels, 2, gen)
    monkeypatch.setattr(s4d_ops, "CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(s4d_ops, "MIN_GROUP", 2)
    monkeypatch.setattr(s4d_ops, "GROUP_LOOP_THREADS", 1)
    results = []
    for workers in (1, 3):
        monkeypatch.setattr(s4d_ops, "GROUP_WORKERS", workers)
        u, d = u0.clone().requires_grad_(), d0.clone().requires_grad_()
        params = [p.clone().requires_grad_() for p in params0]
        out = s4d_conv(u, *discretize(*params), d)
        out.pow(2).sum().backward()
        results.append([out.detach(), u.grad, d.grad] + [p.grad for p in params])
    assert len(s4d_ops._channel_groups(channels, 100)) == 4
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_convolution_and_recurrence_keep_float32_work_under_autocast(dtype):
    """Under autocast the kernel's factor product must not drop to 16 bits: the FFTs then refuse it (cuFFT takes
    half precision only at power-of-two sizes and bfloat16 not at all; the CPU FFT takes neither). On the first
    GPU run the convolution failed so for every signal size but a power of two. Here, on the CPU: the same
    numbers as without autocast, through the convolution, its gradient and the recurrence."""
    attn = _attn(True, d_state=8)
    u = torch.randn(24, 2, 16, requires_grad=True)
    dta, dc = attn.discretized()
    want = s4d_conv(u, dta, dc, attn.d_skip, activation=True)
    grad_want, = torch.autograd.grad(want.sum(), u)
    state = torch.zeros(2, 16, 4, dtype=torch.complex64)
    step_want, _ = ssm_chunk_step(u[:5].detach(), state, dta[0], dc[0], attn.d_skip)
    with torch.autocast("cpu", dtype=dtype):
        got = s4d_conv(u, dta, dc, attn.d_skip, activation=True)
        grad_got, = torch.autograd.grad(got.sum(), u)
        step_got, _ = ssm_chunk_step(u[:5].detach(), state, dta[0], dc[0], attn.d_skip)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad_got, grad_want, atol=1e-5, rtol=0)
    torch.testing.assert_close(step_got, step_want, atol=1e-5, rtol=0)
