"""``python -m benchmarks.entmax_support``: the recomputing entmax attention with and without its support path.

One weight-free training step (forward + backward) of :func:`fluence_fairseq.ops.entmax_attention.
blocked_entmax_attention` on random (B, H, L, D) queries, keys and values, noncausal, query blocks of 256 rows, for
each normaliser and query scale (``--scales``: larger scores, sparser rows): once as it runs (blocks whose support is
at most ``SPARSE_BACKWARD_BELOW`` of their entries take ``p @ v`` and backward on it alone) and once with that path
off (``SPARSE_BACKWARD_BELOW = 0``: every block dense), timed in turn (:func:`benchmarks.common.round_robin`, the
fastest of ``--repeats``). Reported: the share of non-zero probabilities, how many blocks kept their support, both
times and their ratio, which says where the support path pays and where it is refused::

    python -m benchmarks.entmax_support [--length 2048] [--heads 8] [--scales 0.1 0.25 0.5 1] [--repeats 3] \\
        [--below SHARE]
"""
import argparse
import platform
from typing import List, Optional

import torch

from .common import add_allocator_argument, round_robin, use_allocator

ALPHAS = (2.0, 1.5)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64, help="head dim")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--below", type=float, default=None,
                        help="the support path's share (SPARSE_BACKWARD_BELOW) for this run; default the module's")
    add_allocator_argument(parser)
    args = parser.parse_args(argv)
    allocator = use_allocator(args.allocator)
    torch.set_num_threads(args.threads)
    import fluence_fairseq.ops.entmax_attention as ops

    length, heads, dim = args.length, args.heads, args.dim
    gen = torch.Generator().manual_seed(0)
    q0, k0, v0 = (torch.randn(1, heads, length, dim, generator=gen) for _ in range(3))
    blocks = [(start, min(length, start + 256)) for start in range(0, length, 256)]
    below = ops.SPARSE_BACKWARD_BELOW if args.below is None else args.below
    default_below = ops.SPARSE_BACKWARD_BELOW
    print(f"# weight-free step of blocked_entmax_attention, (1, {heads}, {length}, {dim}), noncausal, query blocks "
          f"of 256, {args.threads} thread(s), torch {torch.__version__}, {platform.processor() or platform.machine()};"
          f" allocator {allocator}; support path for (batch, head) pairs keeping at most {below:.4g} of their "
          "entries\n")
    print("| alpha | scale | non-zero | blocks with pairs on their support | support path ms | dense ms | ratio |\n"
          "|---|---|---|---|---|---|---|")
    for alpha in ALPHAS:
        for scale in args.scales:
            kept = []
            support_backward = ops._support_block_backward

            def counting(*a):
                kept.append(1)
                return support_backward(*a)

            def step(threshold: float):
                ops.SPARSE_BACKWARD_BELOW = threshold
                q, k, v = ((q0 * scale).requires_grad_(), k0.clone().requires_grad_(), v0.clone().requires_grad_())
                ops.blocked_entmax_attention(q, k, v, alpha, blocks=blocks, causal=False).sum().backward()

            try:
                ops._support_block_backward = counting
                step(below)
                on_support = len(kept)
                times = round_robin({"support": lambda: step(below), "dense": lambda: step(0.0)}, args.repeats,
                                    allocator)
            finally:
                ops._support_block_backward, ops.SPARSE_BACKWARD_BELOW = support_backward, default_below
            with torch.no_grad():
                scores = (q0 * scale * dim ** -0.5) @ k0.transpose(-1, -2)
                share = float((ops.entmax_with_stats(scores, alpha, None)[0] > 0).float().mean())
            print(f"| {alpha} | {scale:g} | {share:.4f} | {on_support} of {len(blocks)} | "
                  f"{times['support'] * 1e3:.0f} | {times['dense'] * 1e3:.0f} | "
                  f"{times['support'] / times['dense']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
