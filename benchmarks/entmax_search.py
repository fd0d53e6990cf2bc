"""``python -m benchmarks.entmax_search``: the entmax normalisers alone on one query block of attention scores.

The scores are those of the need_weights benchmark's first query block (``(1, H, L / 8, L)``: queries and keys
projected by a freshly built attention from ``N(0, 1)`` inputs, width 512), optionally scaled (``--scales``: larger
scales give sparser rows, smaller ones denser). For sparsemax, 1.5-entmax, one α per head (1.1 ... 1.9) and the
attention's own random initial α per head (``random``: 1 + sigmoid(N(0, 1)), seed 0), each
row reports the share of non-zero probabilities, the Newton steps over whole rows per row (steps on a gathered
subset of rows count by their share), the forward (``ops.entmax.entmax_with_stats``) and backward
(``entmax_backward``) milliseconds, the fastest of ``--repeats`` rounds (:func:`benchmarks.common.round_robin`),
and softmax's forward and backward on the same scores. ``--against REV`` times ``fluence_fairseq/ops/entmax.py``
as it is at that git revision in the same process, alternating with the working tree's::

    python -m benchmarks.entmax_search [--length 4096] [--scales 1 0.1 3] [--against HEAD~1] [--threads 1]
                                       [--start-group 32] [--listed] [--halves-below 0.35]
                                       [--set GATHER_BELOW=0.25 ...]
"""
import argparse
import platform
from typing import List, Optional

import torch

from .common import add_allocator_argument, round_robin, use_allocator

ALPHAS = (2.0, 1.5, "per-head", "random")


def _row_steps(ops, scores, alpha) -> float:
    """Newton steps over whole rows per row (a step on a gathered subset of k rows counts k / rows)."""
    width, rows = scores.size(-1), scores.numel() // scores.size(-1)
    counted = []
    step = ops._newton_step

    def counting(u, *args):
        if u.size(-1) == width:
            counted.append(u.size(0))
        return step(u, *args)

    ops._newton_step = counting
    try:
        ops.entmax_with_stats(scores, alpha, None)
    finally:
        ops._newton_step = step
    return sum(counted) / rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.1, 3.0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--against", default=None, help="a git revision whose ops/entmax.py is timed alongside")
    parser.add_argument("--start-group", type=int, default=None,
                        help="entries per group of the working tree's group-maxima start (ops.entmax.START_GROUP)")
    parser.add_argument("--listed", action="store_true",
                        help="ask for the support as the attention's CPU passes do (with_support=1/16, one group of "
                             "rows per head), which lists it")
    parser.add_argument("--halves-below", type=float, default=None,
                        help="the working tree's share below which a chunk is searched through halves of its groups "
                             "(ops.entmax.HALVES_BELOW with --listed, else UNLISTED_HALVES_BELOW; 0: never)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="set a numeric constant of the working tree's ops.entmax (e.g. GATHER_BELOW=0.25); "
                             "repeatable")
    add_allocator_argument(parser)
    args = parser.parse_args(argv)
    allocator = use_allocator(args.allocator)
    torch.set_num_threads(args.threads)
    from fluence_fairseq.modules.registry import ATTENTIONS
    from fluence_fairseq.ops import entmax as new
    from fluence_fairseq.ops.entmax_attention import SPARSE_BACKWARD_BELOW

    if args.start_group is not None:
        new.START_GROUP = args.start_group
    if args.halves_below is not None:
        setattr(new, "HALVES_BELOW" if args.listed else "UNLISTED_HALVES_BELOW", args.halves_below)
    for item in args.set:
        name, _, value = item.partition("=")
        current = getattr(new, name, None)
        if not name.isupper() or isinstance(current, bool) or not isinstance(current, (int, float)):
            raise SystemExit(f"--set {item}: ops.entmax has no numeric constant {name!r}")
        try:
            setattr(new, name, type(current)(float(value)) if isinstance(current, int) else float(value))
        except ValueError:
            raise SystemExit(f"--set {item}: {value!r} is not a number") from None
    sides = [("new", new)]
    if args.against:
        from .ab import load_revision
        sides.append((f"at {args.against}", load_revision("entmax", args.against)))
    torch.manual_seed(0)
    L, H, D = args.length, args.heads, 512
    with torch.no_grad():
        module = ATTENTIONS["sparsemax"].build(D, H, causal=False)
        x = torch.randn(L, 1, D)
        rows = max(1, L // 8)
        q = module.q_proj(x[:rows]).view(rows, H, D // H).transpose(0, 1) * (D // H) ** -0.5
        k = module.k_proj(x).view(L, H, D // H).transpose(0, 1)
        base = torch.bmm(q, k.transpose(1, 2)).unsqueeze(0)
    per_head = torch.linspace(1.1, 1.9, H).view(1, H, 1, 1)
    # the attention's own initial α (the paper's: 1 + sigmoid(N(0, 1)) per head), as the need_weights benchmark's
    # α-entmax module has it: heads from sparse to dense in one block
    from fluence_fairseq.modules.entmax import learned_alpha
    random_alpha = learned_alpha(torch.randn(H, generator=torch.Generator().manual_seed(0))).view(1, H, 1, 1)
    # --listed: the support asked for as the attention's CPU passes ask (ops.entmax_attention)
    listing = dict(with_support=SPARSE_BACKWARD_BELOW, support_rows=rows) if args.listed else {}
    print(f"# entmax normalisers on one (1, {H}, {rows}, {L}) query block, {args.threads} thread(s), torch "
          f"{torch.__version__}, {platform.processor() or platform.machine()}; allocator {allocator}; ms are the "
          f"fastest of {args.repeats}; support {'listed' if listing else 'not asked for'}\n")
    print("| scale | alpha | non-zero | " + " | ".join(f"steps {n} | fwd ms {n} | bwd ms {n}" for n, _ in sides)
          + " |\n|---|---|---|" + "---|---|---|" * len(sides))
    with torch.no_grad():  # (the process's grad mode is left as it was)
        for scale in args.scales:
            scores = base * scale
            grad = torch.randn_like(scores)
            for alpha in ALPHAS:
                a = {"per-head": per_head, "random": random_alpha}.get(alpha, alpha)
                p = new.entmax_with_stats(scores, a, None)[0]
                calls = {}
                for name, ops in sides:
                    calls[name, "fwd"] = lambda ops=ops: ops.entmax_with_stats(scores, a, None, **listing)
                    calls[name, "bwd"] = lambda ops=ops: ops.entmax_backward(p, grad, a,
                                                                             with_alpha=isinstance(a, torch.Tensor))
                ms = {key: 1e3 * t for key, t in round_robin(calls, args.repeats, allocator).items()}
                cells = []
                for name, ops in sides:
                    cells += [f"{_row_steps(ops, scores, a):.2f}", f"{ms[name, 'fwd']:.1f}", f"{ms[name, 'bwd']:.1f}"]
                print(f"| {scale:g} | {alpha} | {float((p > 0).float().mean()):.4f} | " + " | ".join(cells) + " |",
                      flush=True)
            probs = torch.softmax(scores, -1)
            softmax_calls = {"fwd": lambda: torch.softmax(scores, -1),
                             "bwd": lambda: torch._softmax_backward_data(grad, probs, -1, scores.dtype)}
            fwd, bwd = (1e3 * t for t in round_robin(softmax_calls, args.repeats, allocator).values())
            print(f"| {scale:g} | softmax | 1.0000 | " + " | ".join(f"- | {fwd:.1f} | {bwd:.1f}" for _ in sides) + " |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
