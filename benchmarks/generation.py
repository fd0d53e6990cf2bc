"""``python -m benchmarks.generation``: fairseq's beam search (``SequenceGenerator``, as ``fairseq-generate`` runs
it) with whole translation models (``--arch`` names), timed in turn in one process::

    python -m benchmarks.generation transformer fluence_transformer transformer_entmax15 --beam 5

Every model is built with fairseq's ``build_model`` (random weights, a dictionary of ``--vocab`` symbols) and
translates the same batch of random source sentences; the output length is fixed (``min_len`` = ``max_len_b`` =
``--tgt-len``, ``max_len_a`` = 0), so every model takes the same number of decoding steps whatever its weights
say. Every round times one search of each model, in the opposite order to the round before; the report gives
each model's median and its ratio to the first model named.
"""
import argparse
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

from .attention import machine_info
from .common import add_allocator_argument, use_allocator
from .models import _build


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("::")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archs", nargs="+", metavar="ARCH", help="--arch names; the first is the baseline")
    parser.add_argument("--sentences", type=int, default=8, help="source sentences per search (one batch)")
    parser.add_argument("--src-len", type=int, default=30)
    parser.add_argument("--tgt-len", type=int, default=30, help="decoding steps (the fixed output length)")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model-args", default="", help="model flags for every arch (one quoted string)")
    add_allocator_argument(parser)
    return parser


@torch.no_grad()
def main(argv: Optional[List[str]] = None) -> Dict[str, dict]:
    args = build_parser().parse_args(argv)
    for value, flag in ((args.sentences, "--sentences"), (args.src_len, "--src-len"), (args.tgt_len, "--tgt-len"),
                        (args.beam, "--beam"), (args.rounds, "--rounds"), (args.threads, "--threads")):
        if value < 1:
            raise SystemExit(f"{flag} must be >= 1, got {value}")
    from fairseq.models import ARCH_MODEL_REGISTRY
    from fairseq.sequence_generator import SequenceGenerator

    import fluence_fairseq  # noqa: F401  (registers the archs)

    for arch in args.archs:
        if arch not in ARCH_MODEL_REGISTRY:
            raise SystemExit(f"unknown --arch {arch!r}")
    allocator = use_allocator(args.allocator)
    torch.set_num_threads(args.threads)
    searches, dictionary = {}, None
    for arch in args.archs:
        torch.manual_seed(0)
        model, dictionary = _build(arch, args.model_args.split(), args.vocab)
        model.eval()
        generator = SequenceGenerator([model], dictionary, beam_size=args.beam, max_len_a=0, max_len_b=args.tgt_len,
                                      min_len=args.tgt_len)
        searches[arch] = (model, generator)
    tokens = torch.randint(dictionary.nspecial, len(dictionary), (args.sentences, args.src_len))
    tokens[:, -1] = dictionary.eos()
    sample = {"net_input": {"src_tokens": tokens,
                            "src_lengths": torch.full((args.sentences,), args.src_len, dtype=torch.long)}}

    def search(arch: str) -> float:
        model, generator = searches[arch]
        start = time.perf_counter()
        hypotheses = generator.generate([model], sample)
        seconds = time.perf_counter() - start
        lengths = {len(h[0]["tokens"]) for h in hypotheses}
        if lengths != {args.tgt_len + 1}:  # the fixed length and its end of sentence
            raise RuntimeError(f"{arch}: outputs of lengths {sorted(lengths)}, expected {args.tgt_len + 1}")
        return seconds

    for arch in args.archs:  # warm-up
        search(arch)
    times: Dict[str, List[float]] = {arch: [] for arch in args.archs}
    for r in range(args.rounds):
        for arch in (args.archs if r % 2 == 0 else args.archs[::-1]):
            times[arch].append(search(arch))
    baseline = statistics.median(times[args.archs[0]])
    result = {arch: {"s": statistics.median(t), "ratio": statistics.median(t) / baseline,
                     "sentences_per_s": args.sentences / statistics.median(t)} for arch, t in times.items()}
    machine = machine_info()
    print(f"Beam search (fairseq SequenceGenerator, no gradients): {args.sentences} sentences of {args.src_len} source "
          f"tokens, {args.tgt_len} decoding steps, beam {args.beam}, vocabulary {args.vocab}; {args.rounds} rounds; "
          f"{machine['cpu']}, {args.threads} thread(s), torch {machine['torch']}; load average "
          f"{machine['load_avg_1min']:.2f} at the end; allocator {allocator}\n")
    print(f"| arch | median s per search | sentences / s | / {args.archs[0]} |\n|---|---|---|---|")
    for arch, row in result.items():
        print(f"| {arch} | {row['s']:.3f} | {row['sentences_per_s']:.1f} | {row['ratio']:.2f} |")
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
