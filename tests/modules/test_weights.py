"""What ``need_weights`` costs, for every registered attention in every pattern (read from the registry).

fairseq's forward signature defaults to ``need_weights=True``. Attentions whose weights are not a byproduct of their
math would pay an extra O(Lq x Lk) pass for them (local attention: 5x fairseq MHA at L=8192), so a plain
``need_weights=True`` returns None there and runs exactly the ``need_weights=False`` computation; the weights come
on explicit request (``need_head_weights=True``). Softmax (fairseq's contract) and the entmax family (which form
the probabilities anyway) return them by default.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fluence_fairseq.modules.registry import ATTENTIONS

E, H, B, L = 16, 2, 2, 40
CASES = [(name, pattern) for name, spec in sorted(ATTENTIONS.items()) for pattern in sorted(spec.cls.supported_patterns)]


class _Allocations(TorchDispatchMode):
    """The sizes of every tensor the dispatched operations return."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.sizes += [t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        return out


def _run(name, pattern, **kw):
    spec = ATTENTIONS[name]
    cross, causal = pattern
    torch.manual_seed(0)
    attn = spec.build(E, H, causal=causal, cross=cross, **spec.tiny)
    x = torch.randn(L, B, E, requires_grad=True)
    src = torch.randn(L + 3, B, E) if cross else x
    mode = _Allocations()
    with mode:
        out, weights = attn(x, src, src, **kw)
        out.sum().backward()
    return sorted(mode.sizes), weights, attn


@pytest.mark.parametrize("name,pattern", CASES, ids=[f"{n}-{'cross' if c else 'self'}-{'causal' if k else 'full'}"
                                                     for n, (c, k) in CASES])
def test_default_weights_cost_nothing_unless_they_come_with_the_math(name, pattern):
    plain, none, _ = _run(name, pattern, need_weights=False)
    default, weights, attn = _run(name, pattern)  # fairseq's default: need_weights=True
    assert none is None
    if attn.weights_by_default:
        assert weights is not None and weights.shape == (B, L, L + 3 * pattern[0])
        return
    assert weights is None
    assert default == plain  # the same operations: no weights pass, no (Lq, Lk) tensor
    _, head_weights, _ = _run(name, pattern, need_head_weights=True)
    if attn.forms_weights:  # on explicit request the weights are there
        assert head_weights.shape == (H, B, L, L + 3 * pattern[0])
        # rows sum to one (Nystrom's implied matrix up to its iterative pseudo-inverse)
        torch.testing.assert_close(head_weights.sum(-1), torch.ones(H, B, L), atol=1e-2, rtol=0)
    else:
        assert head_weights is None


@pytest.mark.parametrize("name", ["sparsemax", "entmax15", "alpha_entmax"])
@pytest.mark.parametrize("length", [40, 160])  # one block, and causal query blocks
def test_entmax_default_weights_are_averaged_without_every_heads_matrix(name, length):
    """A plain ``need_weights`` wants only the mean over heads: the entmax family averages each query block and
    never writes the (B, H, L, L) matrix; the numbers equal the mean of the per-head weights, and gradients
    through them agree too."""
    spec = ATTENTIONS[name]
    torch.manual_seed(0)
    attn = spec.build(E, H, causal=True, **spec.tiny)
    x = torch.randn(length, B, E)
    probe = torch.randn(B, length, length)
    runs = []
    for kw in ({}, {"need_head_weights": True}):
        leaf = x.clone().requires_grad_()
        mode = _Allocations()
        with mode:
            out, weights = attn(leaf, **kw)
            if kw:
                weights = weights.mean(dim=0)
            (out.sum() + (weights * probe).sum()).backward()
        runs.append((weights.detach(), leaf.grad, mode.sizes))
    (averaged, grad, sizes), (want, want_grad, head_sizes) = runs
    torch.testing.assert_close(averaged, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)
    full = B * H * length * length
    assert full in head_sizes
    assert (full in sizes) == (length == 40)  # one block: the block is the whole matrix, averaged after


@pytest.mark.parametrize("alibi", [False, True])
def test_softmax_default_weights_are_averaged_block_by_block(alibi, monkeypatch):
    """Softmax's banded weights (long causal inputs; the output from SDPA) are averaged over heads a block of
    queries at a time: the same numbers as the mean of the per-head weights, without a (B, H, L, L) tensor."""
    import fluence_fairseq.ops.band as band

    monkeypatch.setattr(band, "_DENSE_PAIRS", 0)  # the banded weight path at this size
    spec = ATTENTIONS["softmax"]
    torch.manual_seed(0)
    attn = spec.build(E, H, causal=True, **spec.tiny)
    attn.set_alibi(alibi)
    length = 300  # more than one 256-query block
    x = torch.randn(length, B, E)
    mode = _Allocations()
    with mode:
        _, averaged = attn(x)
    _, per_head = attn(x, need_head_weights=True)
    torch.testing.assert_close(averaged, per_head.mean(dim=0), rtol=0, atol=1e-6)
    assert B * H * length * length not in mode.sizes
