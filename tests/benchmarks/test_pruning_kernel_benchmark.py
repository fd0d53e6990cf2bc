"""The pruned-attention kernel benchmark at tiny sizes: its alternative computations give the kernel's numbers (they
check themselves, and a wrong one must fail), and its report has every row; no timing thresholds."""
import pytest
import torch

from benchmarks import pruning_kernel as pk

pytestmark = pytest.mark.skipif(pk.FLASH_CPU_BACKWARD is None, reason="no CPU flash-attention kernels in this torch")


def _problem(seed=0, batch=2, heads=3, length=40, dim=8):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(batch, heads, length, dim, generator=gen) for _ in range(4))
    keep = torch.rand(1, heads, length, length, generator=gen) > 0.4
    keep |= torch.eye(length, dtype=torch.bool)  # every row keeps a key
    bias = torch.zeros(keep.shape).masked_fill_(~keep, pk.LOWEST)
    return q, k, v, grad, keep, bias


def _autograd_reference(q, k, v, grad, keep):
    q, k, v = (x.double().requires_grad_() for x in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) * q.size(-1) ** -0.5
    out = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1) @ v
    out.backward(grad.double())
    return out, q.grad, k.grad, v.grad


def test_split_calls_and_explicit_products_match_autograd():
    q, k, v, grad, keep, bias = _problem()
    want = _autograd_reference(q, k, v, grad, keep)
    for got in (pk._kernel_step(q, k, v, grad, bias), pk._split_step(q, k, v, grad, bias, rows=16),
                pk._explicit_step(q, k, v, grad, bias)):
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-4)


def test_check_refuses_a_wrong_gradient():
    q, k, v, grad, _, bias = _problem(seed=1)
    good = pk._kernel_step(q, k, v, grad, bias)
    bad = list(good)
    bad[2] = bad[2].clone()
    bad[2][0, 0, 0, 0] += 1e-2
    pk._check("same", good, good)
    with pytest.raises(AssertionError, match="grad k"):
        pk._check("tampered", bad, good)


def test_quick_report_has_every_table(capsys):
    threads = torch.get_num_threads()
    try:
        pk.main(["--quick", "--allocator", "default"])
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    for pattern in ("noncausal", "causal"):
        assert f"| {pattern} | no mask |" in text and f"| {pattern} | (1, H, L, L) mask |" in text
        assert f"| {pattern} | one row for every row |" in text
        assert f"| {pattern} | dense SDPA, fwd+bwd" in text
    assert "| noncausal | mask, calls of 1 head x 32 rows |" in text
    assert "| causal | mask, calls of" not in text  # split calls cannot keep the causal diagonal
    calls = [line for line in text.splitlines() if line.startswith("| | bucket |") or line.startswith("| | band |")]
    assert calls and all(float(line.split("|")[6]) > 0 and float(line.split("|")[7]) > 0 for line in calls)


def test_refuses_unknown_patterns():
    with pytest.raises(SystemExit, match="--patterns"):
        pk.main(["--quick", "--patterns", "diagonal", "--allocator", "default"])
