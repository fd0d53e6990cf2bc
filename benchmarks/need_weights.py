"""``python -m benchmarks.need_weights``: what fairseq's default ``need_weights=True`` costs each attention.

One training step (forward + backward, batch 1) of every registered attention, as causal self attention where it
has that pattern (else noncausal self; ``--patterns both``: each self pattern it has), called three ways:
``need_weights=False``, fairseq's default ``need_weights=True``, and the explicit ``need_head_weights=True``; and
fairseq's ``MultiheadAttention`` with ``need_weights=True`` (its default) on the same input in the same pattern
(the causal one with fairseq's future mask). The returned weights are ignored (what the default costs a caller that
does not use them) unless ``--weights-in-loss`` adds them to the loss, as an alignment loss would. Each attention's
calls and fairseq MHA's are timed in turn (repeat r of every call, then r + 1), the fastest of ``--repeats`` kept:
MHA forms (L, L) matrices that stream through memory, and its step moved by half between runs minutes apart
(1.60 s and 2.42 s on the AMD EPYC), so a ratio to an MHA timed once per run measured the machine. Reported:
seconds and the ratios the issue sets bounds on, default / ``need_weights=False`` (at most 1.2) and default /
fairseq MHA (at most 1), and each head's learned α where the attention has one: an α-entmax step's cost
depends on it (heads near α = 1 keep most entries), and every module is built after ``torch.manual_seed(0)``, so
both patterns draw the same α. Memory is not measured here:
``tests/modules/test_weights.py`` checks that the default allocates exactly what ``need_weights=False`` does. A
plain ``need_weights=True`` returns weights only where they come with the math (softmax, the entmax family); the
others return None and run their ``need_weights=False`` computation (see ``weights_by_default``), so their
default equals their weight-free step.

    python -m benchmarks.need_weights [--length 4096] [--threads 1] [--repeats 2] [--only NAME ...]
                                      [--patterns causal|both] [--weights-in-loss] [--head-weights]
"""
import argparse
import platform
import time

import torch

from .common import add_allocator_argument, use_allocator, warm_up

def _step(module, x, weights_in_loss, **kwargs):
    """Seconds of one forward and backward of ``module`` on ``x`` (self attention)."""
    start = time.perf_counter()
    out, weights = module(x, x, x, **kwargs)
    loss = out.sum()
    if weights_in_loss and weights is not None and weights.requires_grad:
        loss = loss + weights.sum()
    loss.backward()
    return time.perf_counter() - start


def _alphas(module) -> str:
    """The learned α of every head (what an α-entmax step's cost depends on), or "-" for a module without (a
    fixed α is a number, not a tensor of heads)."""
    alpha = getattr(module, "alpha", None)
    with torch.no_grad():
        values = alpha() if callable(alpha) else None
    if not torch.is_tensor(values):
        return "-"
    return " ".join(f"{a:.2f}" for a in values.flatten().tolist())


def _measure_interleaved(x, repeats, calls, allocator=""):
    """The fastest of ``repeats`` steps of each ``(module, weights_in_loss, kwargs)`` call after one warm-up each
    (under the steady ``allocator``, until a round of all calls takes no page fault), the calls taken in turn
    (repeat r of every call, then repeat r + 1): the machine's drift, which moves single steps by 10-25% on this
    CPU, hits the calls whose ratio is reported alike."""
    def one_round():
        for module, in_loss, kwargs in calls:
            _step(module, x, in_loss, **kwargs)

    warm_up(one_round, allocator)
    times = [[] for _ in calls]
    for _ in range(repeats):
        for spent, (module, in_loss, kwargs) in zip(times, calls):
            spent.append(_step(module, x, in_loss, **kwargs))
    return [min(spent) for spent in times]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", nargs="+", default=None, help="attentions to measure (default: every one)")
    parser.add_argument("--patterns", choices=("causal", "both"), default="causal",
                        help="self-attention patterns of an attention that has both: the causal one (default) or "
                             "both (fairseq MHA stays causal)")
    parser.add_argument("--weights-in-loss", action="store_true",
                        help="add the returned weights (where differentiable) to the loss, as an alignment loss "
                             "would; by default they are returned and ignored, what fairseq's default costs a caller "
                             "that does not use them")
    parser.add_argument("--head-weights", action="store_true",
                        help="also time need_head_weights=True (the dense weights some attentions form on request "
                             "take minutes at L=4096)")
    add_allocator_argument(parser)
    args = parser.parse_args(argv)
    from fairseq.modules.multihead_attention import MultiheadAttention

    from fluence_fairseq.modules.registry import ATTENTIONS

    allocator = use_allocator(args.allocator)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    L, D, H = args.length, args.dim, args.heads
    x = torch.randn(L, 1, D, requires_grad=True)
    mha = MultiheadAttention(D, H, self_attention=True)
    # fairseq's decoder passes its future mask; the default need_weights=True forms the weights either way
    mha_kwargs = {True: {"attn_mask": torch.triu(torch.full((L, L), float("-inf")), 1)}, False: {}}
    in_loss = args.weights_in_loss
    print(f"# training step, L={L}, D={D}, H={H}, batch 1, {args.threads} thread(s), torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}; "
          f"weights {'in the loss' if in_loss else 'returned, not used'}; allocator {allocator}; "
          "fairseq MHA with need_weights=True in the attention's pattern, timed in turn with it\n")
    print("| attention | pattern | weights=False s | default s | head weights s | MHA s | default / False "
          "| default / MHA | default returns | α per head |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, spec in sorted(ATTENTIONS.items()):
        if args.only and name not in args.only:
            continue
        for causal in (True, False):
            if (False, causal) not in spec.cls.supported_patterns or (
                    args.patterns == "causal" and not causal and (False, True) in spec.cls.supported_patterns):
                continue  # by default the causal pattern where an attention has both
            extra = {"cosformer_max_len": L + 1} if name == "cosformer" else {}
            # the same initial parameters in both patterns: a learned α drawn at random per head moves the step by
            # half (α-entmax noncausal at L=4096: 3.26 s with one draw, 2.2 s with another; Intel Xeon)
            torch.manual_seed(0)
            module = spec.build(D, H, causal=causal, **extra)
            calls = [(module, False, {"need_weights": False}), (module, in_loss, {}),
                     (mha, in_loss, mha_kwargs[causal])]
            if args.head_weights:
                calls.append((module, in_loss, {"need_head_weights": True}))
            plain_s, default_s, mha_s, *head = _measure_interleaved(x, args.repeats, calls, allocator)
            head_s = head[0] if head else float("nan")
            returned = module(x[:8], x[:8], x[:8])[1]
            print(f"| {name} | {'causal' if causal else 'noncausal'} self | {plain_s:.2f} | {default_s:.2f} | "
                  f"{head_s:.2f} | {mha_s:.2f} | {default_s / plain_s:.2f} | {default_s / mha_s:.2f} | "
                  f"{'None' if returned is None else 'weights'} | {_alphas(module)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
