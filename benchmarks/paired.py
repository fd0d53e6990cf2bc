"""``python -m benchmarks.paired``: training steps of several attentions and of the projections alone, alternated in
one process, so each attention's time bound (``bench_time_bound`` of its registry entry: its step at most that
many times the projections-only step) is judged on ratios of steps taken moments apart::

    python -m benchmarks.paired abc cosformer performer --pattern causal --length 8192 --rounds 12
    python -m benchmarks.paired longshort longshort:block_size=32 longshort:block_size=128 --rounds 6

The efficient presets of :mod:`benchmarks.attention` run every case in a fresh process, one after another. On a
machine whose speed drifts by a few percent within minutes, a ratio of two such cases moves by about 0.05 between
runs of the same code (causal cosFormer 1.41 and 1.48, causal ABC 1.35 and 1.45 times the projections, two runs on
an AMD EPYC), which decides a bound of 1.4 either way. Here every round times each case once, in the opposite
order to the round before, and the report gives the median of the rounds' ratios with their range. Each attention
is built with its benchmark options (``bench_options``) and, written ``NAME:KEY=VALUE[,KEY=VALUE]``, with
constructor keywords of its own (flag options or not: ``block_size``, ``chunk_size``) or values for its class
attributes (``KEY`` a class attribute: ``abc:block_chunks=16``, ``entmax15:RECOMPUTE_BLOCK_ELEMENTS=4194304``).
``--need-weights`` calls the attentions as fairseq does by default (the weights returned, not used);
``--attention-dropout P`` gives every attention that dropout (the modules train). ``--memory``
also measures each case's peak memory as the presets do (the first step's RSS increase, in a fresh process per case
with glibc's mmap threshold fixed).
"""
import argparse
import ast
import statistics
import sys
from typing import Dict, List, Optional, Tuple

import torch

from .attention import machine_info
from .common import (MEMORY_ENV, PATTERN_FLAGS, add_allocator_argument, bench_spec, build_module, run_in_fresh_process,
                     training_step, use_allocator, warm_up)
from fluence_fairseq.modules.registry import ATTENTIONS, get_attention

PROJECTIONS = "projections only"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("attentions", nargs="+", metavar="NAME[:KEY=VALUE,...]",
                        help="registered attention names, each optionally with constructor keywords")
    parser.add_argument("--pattern", default="causal", choices=sorted(PATTERN_FLAGS))
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (each times every case once)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--need-weights", action="store_true",
                        help="call the attentions with fairseq's default need_weights=True (the weights returned, "
                             "not used) instead of need_weights=False")
    parser.add_argument("--attention-dropout", type=float, default=0.0, metavar="P",
                        help="attention dropout of every attention (training mode; default 0)")
    parser.add_argument("--memory", action="store_true", help="also the peak memory of each case's first step, "
                        "each in a fresh process")
    add_allocator_argument(parser)
    return parser


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a string option (act_fun=elu)


def parse_variant(text: str, pattern: str) -> Tuple[str, dict]:
    """``NAME`` or ``NAME:KEY=VALUE[,KEY=VALUE]`` -> (name, module spec with the benchmark options): a ``KEY`` that
    is a class attribute of the attention is set on the built module, any other is a constructor keyword."""
    name, _, extra = text.partition(":")
    if name not in ATTENTIONS:
        raise SystemExit(f"unknown attention {name!r}; choose from {sorted(ATTENTIONS)}")
    if PATTERN_FLAGS[pattern] not in get_attention(name).cls.supported_patterns:
        raise SystemExit(f"--pattern {pattern}: {name} does not support it")
    spec = bench_spec(name)
    cls = get_attention(name).cls
    for pair in filter(None, extra.split(",")):
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise SystemExit(f"{text!r}: keywords are written NAME:KEY=VALUE[,KEY=VALUE], got {pair!r}")
        target = spec.setdefault("attributes", {}) if hasattr(cls, key) else spec["options"]
        target[key] = _value(value)
    return name, spec


def peak_memory_mb(spec: dict, args) -> float:
    """The peak RSS increase of the first full-size training step, in a fresh worker of benchmarks.attention."""
    job = {"module": spec, "pattern": args.pattern, "dim": args.dim, "heads": args.heads, "batch": args.batch,
           "length": args.length, "src_len": args.length, "repeats": 1, "warmup": 1, "memory_only": True}
    return run_in_fresh_process("benchmarks.attention", job, f"memory of {spec}", MEMORY_ENV)["peak_mem_mb"]


def main(argv: Optional[List[str]] = None) -> Dict[str, dict]:
    args = build_parser().parse_args(argv)
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")
    if not 0.0 <= args.attention_dropout < 1.0:
        raise SystemExit(f"--attention-dropout must be in [0, 1), got {args.attention_dropout}")
    variants = {text: parse_variant(text, args.pattern) for text in args.attentions}
    allocator = use_allocator(args.allocator)
    if args.threads:
        torch.set_num_threads(args.threads)
    cross, causal = PATTERN_FLAGS[args.pattern]
    specs = {PROJECTIONS: {"kind": "projections"}, **{text: spec for text, (_, spec) in variants.items()}}
    if args.attention_dropout:  # in the spec, so the memory workers build the attentions with it too
        for label, spec in specs.items():
            if label != PROJECTIONS:
                spec.setdefault("setup", {})["attention_dropout"] = args.attention_dropout
    steps = {}
    for label, spec in specs.items():
        torch.manual_seed(0)
        try:
            module = build_module(spec, args.dim, args.heads, cross, causal)
        except (TypeError, ValueError) as error:  # a keyword the constructor does not take, or a bad value
            raise SystemExit(f"{label}: {error}") from None
        steps[label] = training_step(module, args.dim, args.batch, args.length, args.length, cross, causal,
                                     need_weights=args.need_weights)
    order = list(steps)

    def one_round(labels=order):
        return {label: steps[label]() for label in labels}

    one_round()
    warm_up(one_round, allocator)
    rounds = [one_round(order if r % 2 == 0 else order[::-1]) for r in range(args.rounds)]
    result = {}
    for label in order:
        ratios = [r[label] / r[PROJECTIONS] for r in rounds]
        entry = None if label == PROJECTIONS else get_attention(variants[label][0])
        # the time bounds are the efficient attentions'; dense ones (softmax, entmax) have none against projections
        bound = entry.bench_time_bound if entry is not None and entry.family == "efficient" else None
        result[label] = {"ms": statistics.median(r[label] for r in rounds) * 1e3,
                         "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                         "bound": bound}
        if args.memory:
            result[label]["peak_mb"] = peak_memory_mb(specs[label], args)
    machine = machine_info()
    weights = "need_weights=True (weights returned, not used)" if args.need_weights else "need_weights=False"
    if args.attention_dropout:
        weights += f", attention dropout {args.attention_dropout:g}"
    print(f"Training step (forward + backward), {args.pattern} pattern, L={args.length}, D={args.dim}, H={args.heads}, "
          f"batch {args.batch}, {weights}; {args.rounds} rounds; {machine['cpu']}, {machine['threads']} threads, torch "
          f"{machine['torch']}; load average {machine['load_avg_1min']:.2f} at the end; allocator {allocator}\n")
    memory = " peak MiB | memory / projections |" if args.memory else ""
    print(f"| case | median ms | median ratio to projections | range | bound | |{memory}\n"
          f"|---|---|---|---|---|---|{'---|---|' if args.memory else ''}")
    for label, row in result.items():
        verdict = "" if row["bound"] is None else ("met" if row["ratio"] <= row["bound"] else "**missed**")
        bound = "" if row["bound"] is None else f"{row['bound']:g}"
        line = (f"| {label} | {row['ms']:.1f} | {row['ratio']:.3f} | {row['ratio_min']:.3f}-{row['ratio_max']:.3f} | "
                f"{bound} | {verdict} |")
        if args.memory:
            floor = result[PROJECTIONS]["peak_mb"]
            line += f" {row['peak_mb']:.1f} | " + (f"{row['peak_mb'] / floor:.3f} |" if floor > 0 else "- |")
        print(line)
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
