"""``python -m benchmarks.memory``: the cost of carrying memory, per causal attention.

A training step (forward + backward) of one segment with the memory of all the segments before it, against the
same step with an empty memory (the first segment), after ``--segments`` segments of the stream: the issue's
bounds are at most 1.1x for the constant-state methods, however far the stream has gone, and at most 1.2x for
adaptive span with ``attn_span`` 8192 and spans at 64. Softmax keeps ``--mem-len`` keys (Transformer-XL), so its
step grows with that length by design; LongShort's compressed chunks grow with the stream unless ``mem_len`` keeps
those of the last N tokens (both rows are measured).

    python -m benchmarks.memory [--segment 256] [--batch 8] [--dim 256] [--heads 4] [--segments 8] [--threads 1]
"""
import argparse
import platform
import statistics
import time

import torch

CASES = [
    ("softmax, mem-len 2048", "softmax", {}, 2048, None),
    ("adaptive_span, S=8192, spans 64", "adaptive_span", {"attn_span": 8192, "adapt_span_init": 64 / 8192}, None,
     1.2),
    ("local, wsize 64", "local", {"wsize": 64}, None, None),
    ("abc", "abc", {}, None, 1.1),
    ("performer", "performer", {}, None, 1.1),
    ("s4d", "s4d", {}, None, 1.1),
    ("longshort, no mem-len", "longshort", {}, None, None),
    ("longshort, mem-len 512", "longshort", {}, 512, None),
]


def _step(attn, x, memory) -> float:
    start = time.perf_counter()
    out, _ = attn(x, memory=memory, need_weights=False)
    out.pow(2).mean().backward()
    return time.perf_counter() - start


def measure(name, options, mem_len, args):
    from fluence_fairseq.modules import get_attention

    torch.manual_seed(0)
    attn = get_attention(name).build(args.dim, args.heads, causal=True, **options)
    if mem_len is not None:
        attn.set_mem_len(mem_len)
    segments = [torch.randn(args.segment, args.batch, args.dim) for _ in range(args.segments + 1)]
    fresh, carried = [], []
    for _ in range(args.repeats + 1):  # the first round warms up (allocator, thread pools, first-call caches)
        fresh.append(_step(attn, segments[0], {}))
        memory = {}
        for x in segments[:-1]:
            with torch.no_grad():
                attn(x, memory=memory, need_weights=False)
        carried.append(_step(attn, segments[-1], memory))
    return statistics.median(fresh[1:]), statistics.median(carried[1:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segment", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--segments", type=int, default=8, help="segments of the stream before the measured one")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import fluence_fairseq  # noqa: F401  (registers the attentions)

    torch.set_num_threads(args.threads)
    print(f"# memory cost: training step of a {args.segment}-token segment after {args.segments} segments vs the "
          f"first; batch {args.batch}, width {args.dim}, {args.heads} heads, {args.threads} thread(s), "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}\n")
    print("| attention | first segment ms | with memory ms | ratio | bound |\n|---|---|---|---|---|")
    for label, name, options, mem_len, bound in CASES:
        fresh, carried = measure(name, options, mem_len, args)
        ratio = carried / fresh
        verdict = "-" if bound is None else f"{bound}x {'met' if ratio <= bound else 'MISSED'}"
        print(f"| {label} | {fresh * 1e3:.1f} | {carried * 1e3:.1f} | {ratio:.2f} | {verdict} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
