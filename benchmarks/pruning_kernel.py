"""``python -m benchmarks.pruning_kernel``: what PyTorch's CPU flash kernel itself costs the two paths of pruned
attention: the floor under ``make bench-pruning``'s ratios.

    python -m benchmarks.pruning_kernel [--length 1024] [--heads 4] [--head-dim 64] [--batch 2] [--threads 1]
                                        [--repeats 9] [--tau 90] [--patterns noncausal,causal] [--quick]
                                        [--allocator steady|default]

Two tables, one forward+backward of the kernel per entry, at the pruning benchmark's shape, the calls of every
table timed round-robin (repeat r of every call, then r + 1; :func:`benchmarks.common.round_robin`, after its
warm-up under the steady allocator) and their median kept:

* **mask pass** (the dense path of 10-50% masks): the kernel with no mask; with the (1, H, L, L) additive mask the
  dense path passes (the data-informed mask at 50%); with a mask of the same shape whose every row is one row
  (strides 0 along the queries: the kernel's arithmetic on the mask without its memory traffic); and with the full
  mask in calls of one head and 256 query rows each (the mask rows a call reads stay in cache for the batch's
  second sequence). Outputs and gradients of the split calls are checked against the single call.
* **calls** (the block-sparse path at ``--tau``): every fused call of the layout the plan takes (its shape as
  items x batch x queries x keys, forward and backward milliseconds and nanoseconds per computed entry), and
  dense SDPA's nanoseconds per entry in the same run; beside each call the same problem as batched products and
  an explicit softmax (``explicit``: what a kernel-free path for short windows would cost; checked against the
  kernel's output and gradients).
"""
import argparse
import statistics
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from .attention import machine_info
from .common import add_allocator_argument, round_robin, use_allocator
from .pruning import add_problem_arguments, make_mask, problem_of
from fluence_fairseq.ops.common import FLASH_CPU, FLASH_CPU_BACKWARD
from fluence_fairseq.ops.pruned_attention import PrunedPlan, _bucket_problem, _chunks, _rows_first, _to_blocks

LOWEST = torch.finfo(torch.float32).min


def _median_ms(calls: Dict[str, Callable[[], object]], repeats: int, allocator: str) -> Dict[str, float]:
    """Median milliseconds of each call, timed round-robin after the warm-up of
    :func:`benchmarks.common.round_robin`."""
    return {name: s * 1e3 for name, s in round_robin(calls, repeats, allocator, statistics.median).items()}


def _kernel_step(q, k, v, grad, bias=None, causal: bool = False):
    """The kernel's forward and backward: (out, grad_q, grad_k, grad_v)."""
    out, lse = FLASH_CPU(q, k, v, 0.0, causal, attn_mask=bias)
    return (out, *FLASH_CPU_BACKWARD(grad, q, k, v, out, lse, 0.0, causal, attn_mask=bias))


def _split_step(q, k, v, grad, bias, rows: int):
    """:func:`_kernel_step` with ``bias`` (1, H, L, L) in calls of one head and ``rows`` query rows."""
    out, gq = torch.empty_like(q), torch.empty_like(q)
    gk, gv = torch.zeros_like(k), torch.zeros_like(v)
    for h in range(q.size(1)):
        kh, vh = k[:, h:h + 1], v[:, h:h + 1]
        for r in range(0, q.size(2), rows):
            part = (slice(None), slice(h, h + 1), slice(r, r + rows))
            o, a, b, c = _kernel_step(q[part], kh, vh, grad[part], bias[part])
            out[part], gq[part] = o, a
            gk[:, h:h + 1] += b
            gv[:, h:h + 1] += c
    return out, gq, gk, gv


def _explicit_step(q, k, v, grad, bias):
    """One kernel call's problem, (n, B, bq, D) queries and (n, B, keys, D) keys and values under ``bias`` (n|1,
    B|1, bq, keys), as batched products and a softmax, its probabilities recomputed in backward as the kernel
    does: (out, grad_q, grad_k, grad_v)."""
    n, bsz, bq, dim = q.shape
    keys, scale = k.size(2), dim ** -0.5
    q3, k3, v3, g3 = (x.reshape(n * bsz, -1, dim) for x in (q, k, v, grad))
    mask = bias.expand(n, bsz, bq, keys).reshape(n * bsz, bq, keys)
    scores = torch.baddbmm(mask, q3, k3.transpose(1, 2), alpha=scale)
    lse = torch.logsumexp(scores, -1, keepdim=True)
    out = torch.bmm(scores.sub_(lse).exp_(), v3)
    probs = torch.baddbmm(mask, q3, k3.transpose(1, 2), alpha=scale).sub_(lse).exp_()
    grad_v = torch.bmm(probs.transpose(1, 2), g3)
    grad_s = torch.bmm(g3, v3.transpose(1, 2)).sub_((g3 * out).sum(-1, keepdim=True)).mul_(probs)
    grad_q = torch.bmm(grad_s, k3).mul_(scale)
    grad_k = torch.bmm(grad_s.transpose(1, 2), q3).mul_(scale)
    return tuple(x.view(n, bsz, -1, dim) for x in (out, grad_q, grad_k, grad_v))


def _check(name: str, got, want, tol: float = 1e-4) -> None:
    for label, a, b in zip(("output", "grad q", "grad k", "grad v"), got, want):
        err = (a - b).abs().max().item()
        if err > tol:
            raise AssertionError(f"{name}: {label} differs from the kernel's by {err:.2e}")


def mask_pass(length, heads, head_dim, batch, repeats, causal: bool, rows: int = 256, allocator: str = "") -> List[str]:
    gen = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(batch, heads, length, head_dim, generator=gen) for _ in range(4))
    keep = make_mask("informed", 50.0, heads, length, causal).unsqueeze(0)
    bias = torch.zeros(keep.shape).masked_fill_(~keep, LOWEST)
    one_row = bias[:, :, -1:].expand_as(bias)  # the last row: every key allowed in the causal pattern too
    # causal: ``is_causal`` with the mask, as the dense path calls it (the kernel skips the blocks above the diagonal)
    calls = {"no mask": lambda: _kernel_step(q, k, v, grad, causal=causal),
             "(1, H, L, L) mask": lambda: _kernel_step(q, k, v, grad, bias, causal),
             "one row for every row": lambda: _kernel_step(q, k, v, grad, one_row, causal)}
    if not causal:  # split calls would each need their own diagonal offset, which the kernel does not take
        _check(f"calls of {rows} rows", _split_step(q, k, v, grad, bias, rows), _kernel_step(q, k, v, grad, bias))
        calls[f"mask, calls of 1 head x {rows} rows"] = lambda: _split_step(q, k, v, grad, bias, rows)
    ms = _median_ms(calls, repeats, allocator)
    base = ms["no mask"]
    lines = [f"| {'causal' if causal else 'noncausal'} | {name} | {t:.2f} | {t / base:.3f} |" for name, t in ms.items()]
    return lines


def calls_table(length, heads, head_dim, batch, block, repeats, causal: bool, tau: float,
                allocator: str = "") -> List[str]:
    gen = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(batch, heads, length, head_dim, generator=gen) for _ in range(4))
    keep = make_mask("informed", tau, heads, length, causal)
    plan = PrunedPlan(keep, block, tune=True)
    qr = q.clone().requires_grad_()
    _, layout, _ = plan.choice(qr, k.requires_grad_(), v.requires_grad_(), None, 0.0)
    k, v = k.detach(), v.detach()
    dense = _median_ms({"dense": lambda: F.scaled_dot_product_attention(qr, k, v, is_causal=causal).backward(grad)},
                       repeats, allocator)["dense"]
    entries = batch * heads * length * (length + 1) // 2 if causal else batch * heads * length * length
    lines = [f"| {'causal' if causal else 'noncausal'} | dense SDPA, fwd+bwd {dense:.2f} ms | "
             f"{batch}x{heads}x{length}x{length} | | | {dense * 1e6 / entries:.2f} | |"]
    if layout is None:  # the layout estimated cheapest, for the kernel's efficiency on its calls
        layout = next(lay for lay, _ in plan.estimates() if lay is not None)
        lines.append(f"| | (the plan took the dense path at {tau:g}%; below, the layout estimated cheapest, "
                     f"{layout.q_block}x{layout.k_block}) | | | | | |")
    else:
        lines.append(f"| | (the plan's layout: {layout.q_block}x{layout.k_block}) | | | | | |")
    nq, nk = layout.q_blocks, layout.k_blocks
    qp, kp, vp, gp = (_to_blocks(x, n, b) for x, n, b in ((q, nq, layout.q_block), (k, nk, layout.k_block),
                                                           (v, nk, layout.k_block), (grad, nq, layout.q_block)))
    for bucket, lo, hi in _chunks(layout, batch, head_dim):
        kb, vb, bias, _ = _bucket_problem(bucket, lo, hi, kp, vp, None, q.dtype)
        qc, kc, vc, bc = (x.contiguous() for x in _rows_first(bucket.take(qp, lo, hi), kb, vb, bias))
        gc = bucket.take(gp, lo, hi).transpose(0, 1).contiguous()
        out, lse = FLASH_CPU(qc, kc, vc, attn_mask=bc)
        _check(f"explicit {tuple(qc.shape)}", _explicit_step(qc, kc, vc, gc, bc), _kernel_step(qc, kc, vc, gc, bc))
        ms = _median_ms({"forward": lambda: FLASH_CPU(qc, kc, vc, attn_mask=bc),
                         "backward": lambda: FLASH_CPU_BACKWARD(gc, qc, kc, vc, out, lse, 0.0, False, attn_mask=bc),
                         "explicit": lambda: _explicit_step(qc, kc, vc, gc, bc)}, repeats, allocator)
        n_entries = qc.size(0) * qc.size(1) * qc.size(2) * kc.size(2)
        kind = type(bucket).__name__.strip("_").lower()
        lines.append(f"| | {kind} | {qc.size(0)}x{qc.size(1)}x{qc.size(2)}x{kc.size(2)} | {ms['forward']:.3f} | "
                     f"{ms['backward']:.3f} | {(ms['forward'] + ms['backward']) * 1e6 / n_entries:.2f} | "
                     f"{ms['explicit'] * 1e6 / n_entries:.2f} |")
    return lines


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_problem_arguments(parser)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--tau", type=float, default=90.0, help="the block-sparse calls' pruning percentage")
    add_allocator_argument(parser)
    args = parser.parse_args(argv)
    if FLASH_CPU_BACKWARD is None:
        raise SystemExit("this torch has no CPU flash-attention kernels")
    sizes, patterns = problem_of(args)
    block = sizes.pop("block")
    repeats, rows = (1, 32) if args.quick else (args.repeats, 256)
    allocator = use_allocator(args.allocator)
    torch.set_num_threads(args.threads)
    machine = machine_info()
    print(f"CPU flash kernel, forward+backward, B={sizes['batch']}, H={sizes['heads']}, L={sizes['length']}, "
          f"D={sizes['head_dim']}, on {machine['cpu']}, {args.threads} thread(s), torch {machine['torch']}; median "
          f"of {repeats}, round-robin; allocator {allocator}\n")
    print("Mask pass (the data-informed 50% mask as the dense path's additive mask):\n")
    print("| pattern | kernel call | fwd+bwd ms | vs no mask |\n|---|---|---|---|")
    for pattern in patterns:
        for line in mask_pass(**sizes, repeats=repeats, causal=pattern == "causal", rows=rows,
                              allocator=args.allocator):
            print(line, flush=True)
    print(f"\nCalls of the block-sparse path at {args.tau:g}% (items x batch x queries x keys; ns per computed "
          "entry, forward+backward):\n")
    print("| pattern | call | shape | fwd ms | bwd ms | ns / entry | explicit ns / entry |\n"
          "|---|---|---|---|---|---|---|")
    for pattern in patterns:
        for line in calls_table(**sizes, block=block, repeats=repeats, causal=pattern == "causal", tau=args.tau,
                                allocator=args.allocator):
            print(line, flush=True)
    print(f"\n1-min load {machine_info()['load_avg_1min']:.2f} at the end")


if __name__ == "__main__":
    main()
