"""``python -m benchmarks.span_groups``: adaptive span with heads scored in groups of similar span, against every
head scored over the widest head's band (the references' way, ``group_heads = False``).

A training step (forward + backward) of one causal segment with a memory of ``--memory`` keys, the spans of the
heads set to ``--spans`` (tokens, the ramp not included). The default spans are those one layer of the
long-context LM ended with (``examples/language_model/long_context.py``, row ``adaptive_span_mem``: 0, 10, 22 and
1,354 tokens + a 32-token ramp). Both variants give the same outputs (``tests/modules/test_adaptive_span.py``).

    python -m benchmarks.span_groups [--spans 0,10,22,1354] [--attn-span 4096] [--ramp 32] [--memory 1418]
        [--segment 256] [--batch 8] [--dim 160] [--threads 1] [--repeats 5]
"""
import argparse
import platform
import statistics
import time

import torch

from .common import add_allocator_argument, use_allocator


def _step(attn, memory, segment) -> float:
    state = {}
    with torch.no_grad():
        attn(memory, incremental_state=state, need_weights=False)  # the cache a stream's memory holds
    x = segment.clone().requires_grad_()
    start = time.perf_counter()
    out, _ = attn(x, incremental_state=state, need_weights=False)
    out.pow(2).mean().backward()
    return time.perf_counter() - start


def measure(args):
    """(median seconds with one band, median seconds with head groups, the groups)."""
    from fluence_fairseq.modules import FSAdaptiveSpanAttention
    from fluence_fairseq.modules.adaptive_span import head_groups

    spans = [float(s) for s in args.spans.split(",")]
    torch.manual_seed(0)
    attn = FSAdaptiveSpanAttention(args.dim, len(spans), attn_span=args.attn_span, adapt_span_ramp=args.ramp,
                                   causal=True)
    with torch.no_grad():
        attn.adaptive_span.current_val.copy_(torch.tensor(spans).div(args.attn_span).view(-1, 1, 1))
    memory = torch.randn(args.memory, args.batch, args.dim)
    segment = torch.randn(args.segment, args.batch, args.dim)
    times = {False: [], True: []}
    for _ in range(args.repeats + 1):  # interleaved, the first round warms up
        for grouped in (False, True):
            attn.group_heads = grouped
            times[grouped].append(_step(attn, memory, segment))
    reaches = [w - 1 for w in attn.head_windows()]
    groups = head_groups(reaches, args.memory + args.segment - 1)
    return statistics.median(times[False][1:]), statistics.median(times[True][1:]), groups


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spans", default="0,10,22,1354", help="span of every head in tokens (without the ramp)")
    parser.add_argument("--attn-span", type=int, default=4096)
    parser.add_argument("--ramp", type=int, default=32)
    parser.add_argument("--memory", type=int, default=1418, help="cached keys before the segment")
    parser.add_argument("--segment", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dim", type=int, default=160)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    add_allocator_argument(parser)
    args = parser.parse_args(argv)
    allocator = use_allocator(args.allocator)
    torch.set_num_threads(args.threads)
    one, grouped, groups = measure(args)
    print(f"# adaptive span, spans {args.spans} (+ ramp {args.ramp}), attn_span {args.attn_span}, {args.memory} "
          f"cached keys, segment {args.segment} x batch {args.batch}, width {args.dim}, {args.threads} thread(s), "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, allocator {allocator}\n")
    print("| heads scored | groups | training step ms | ratio |\n|---|---|---|---|")
    print(f"| over the widest head's band | 1 | {one * 1e3:.1f} | 1.00 |")
    print(f"| in groups of similar span | {groups} | {grouped * 1e3:.1f} | {grouped / one:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
