"""A shared check for ops that may write an input's gradient over the input (``reuse_query`` and the like)."""
import pytest
import torch


def check_query_gradient_reused(op, inputs, weight):
    """``op(q, *rest, reuse)`` -> output. With and without reuse: bitwise the same output and gradients; with
    reuse, q's memory holds q's gradient afterwards and a second backward through the graph is refused (autograd's
    in-place check), without it q is untouched."""
    results = []
    for reuse in (False, True):
        leaves = [t.clone().requires_grad_() for t in inputs]
        given = leaves[0] * 1.0  # a memory nothing else reads, as the attention base's heads
        out = op(given, *leaves[1:], reuse)
        (out * weight).sum().backward(retain_graph=reuse)
        results.append([out.detach()] + [t.grad for t in leaves])
        torch.testing.assert_close(given.detach(), leaves[0].grad if reuse else inputs[0], rtol=0, atol=0)
        if reuse:
            with pytest.raises(RuntimeError, match="inplace"):
                (out * weight).sum().backward()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
