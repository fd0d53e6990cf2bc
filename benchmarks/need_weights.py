"""``python -m benchmarks.need_weights``: a training step with ``need_weights=True`` (the default of fairseq's
forward signature) of the banded attentions against fairseq's ``MultiheadAttention`` asked for weights too.

The banded attentions (adaptive span, local) return the output of their banded path and the weights computed
inside the band only, so asking for weights costs about as much as the O(L^2) zero tensor that holds them.

    python -m benchmarks.need_weights [--length 4096] [--threads 1] [--repeats 2]
"""
import argparse
import platform
import time

import torch


def _step(module, x, **kwargs) -> float:
    start = time.perf_counter()
    out, weights = module(x, x, x, need_weights=True, **kwargs)
    loss = out.sum()
    if weights is not None and weights.requires_grad:
        loss = loss + weights.sum()
    loss.backward()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    from fairseq.modules.multihead_attention import MultiheadAttention

    import fluence_fairseq as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    L, D, H = args.length, args.dim, args.heads
    x = torch.randn(L, 1, D, requires_grad=True)
    cases = [
        ("fairseq MHA, causal", MultiheadAttention(D, H, self_attention=True),
         {"attn_mask": torch.triu(torch.full((L, L), float("-inf")), 1)}),
        ("adaptive_span S=1024, z=0", F.FSAdaptiveSpanAttention(D, H, causal=True, attn_span=1024), {}),
        ("adaptive_span S=1024, z=0.25",
         F.FSAdaptiveSpanAttention(D, H, causal=True, attn_span=1024, adapt_span_init=0.25), {}),
        ("local wsize=15", F.FSLocalAttention(D, H, causal=True), {}),
    ]
    print(f"# need_weights=True training step, L={L}, D={D}, H={H}, batch 1, {args.threads} thread(s), "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}\n")
    print("| case | step s | / MHA |\n|---|---|---|")
    baseline = None
    for name, module, kwargs in cases:
        _step(module, x, **kwargs)  # warm-up
        seconds = min(_step(module, x, **kwargs) for _ in range(args.repeats))
        baseline = baseline or seconds
        print(f"| {name} | {seconds:.2f} | {seconds / baseline:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
