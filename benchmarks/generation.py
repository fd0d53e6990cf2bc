"""``python -m benchmarks.generation``: fairseq's beam search (``SequenceGenerator``, as ``fairseq-generate`` runs
it) with whole translation models (``--arch`` names), timed in turn in one process::

    python -m benchmarks.generation transformer fluence_transformer transformer_entmax15 --beam 5

Every model is built with fairseq's ``build_model`` (random weights, a dictionary of ``--vocab`` symbols) and
translates the same batch of random source sentences; the output length is fixed (``min_len`` = ``max_len_b`` =
``--tgt-len``, ``max_len_a`` = 0), so every model takes the same number of decoding steps whatever its weights
say. Every round times one search of each model, in the opposite order to the round before; the report gives
each model's median and its ratio to the first model named.

``--per-beam-source`` adds, for every fluence architecture, the same model searching with the source handled
per beam as fairseq does (each beam's copy projected, cached and read by its own queries, the encoder's output
copied by every reorder), timed in turn with it: the report gives each model's ratio to that variant of itself,
measured moments apart in one process (the machine's speed moves single runs by up to 10%).
``--per-beam-source PART`` switches off one part alone: ``projection`` (each beam's copy projected and cached),
``reads`` (each beam's queries read their own copy) or ``encoder`` (the encoder's output copied by every
reorder).

``--eager-reorder`` adds instead, for every fluence architecture, the same model searching with its causal self
attentions' cached keys and values selected by every reorder and concatenated by the next step (a copy each, as
fairseq does) rather than selected by the next step as it appends (see ``PENDING_ORDER`` in
:mod:`fluence_fairseq.modules.attention_base`), timed in turn with it; the report gives each model's ratio to
that variant.
"""
import argparse
import contextlib
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

from .attention import machine_info
from .common import add_allocator_argument, eager_reorder, use_allocator
from .models import _build
from fluence_fairseq.modules.attention_base import FluenceAttention


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
    parser.add_argument("--per-beam-source", nargs="?", const="all", choices=PARTS, default=None,
                        help="also time every fluence arch with the source handled per beam, as fairseq does (all "
                             "three parts, or only the one named)")
    parser.add_argument("--eager-reorder", action="store_true",
                        help="also time every fluence arch with its cached self-attention keys copied by every "
                             "reorder and again by the next step, as fairseq does")
    add_allocator_argument(parser)
    return parser


PER_BEAM = ", per-beam source"
EAGER = ", eager reorder"


def _fluence_model(model) -> bool:
    return any(isinstance(m, FluenceAttention) for m in model.modules())


#: what ``--per-beam-source`` switches off
PARTS = ("all", "projection", "reads", "encoder")


@contextlib.contextmanager
def _per_beam_source(model, part: Optional[str]):
    """Within the block, ``model`` handles the source per beam as fairseq does (``part`` "all", or the one part
    named; None: nothing changes): every beam's copy is projected and cached (no
    :meth:`FluenceAttention._cache_shared_source`), read by its own queries (no ``shares_source``), and the
    encoder's output copied by every reorder (fairseq's ``reorder_encoder_out``)."""
    if part is None:
        yield
        return
    from fairseq.models.transformer import TransformerEncoder

    from fluence_fairseq.models.layers import FluenceTransformerEncoder
    cross = [m for m in model.modules() if isinstance(m, FluenceAttention) and m.cross] if part in (
        "all", "reads") else []
    own_cache, own_reorder = FluenceAttention._cache_shared_source, FluenceTransformerEncoder.reorder_encoder_out
    if part in ("all", "projection"):
        FluenceAttention._cache_shared_source = lambda self, *args: None
    if part in ("all", "encoder"):
        FluenceTransformerEncoder.reorder_encoder_out = TransformerEncoder.reorder_encoder_out
    for m in cross:
        m.shares_source = False
    try:
        yield
    finally:
        FluenceAttention._cache_shared_source, FluenceTransformerEncoder.reorder_encoder_out = own_cache, own_reorder
        for m in cross:
            del m.shares_source


@torch.no_grad()
def main(argv: Optional[List[str]] = None) -> Dict[str, dict]:
    args = build_parser().parse_args(argv)
    for value, flag in ((args.sentences, "--sentences"), (args.src_len, "--src-len"), (args.tgt_len, "--tgt-len"),
                        (args.beam, "--beam"), (args.rounds, "--rounds"), (args.threads, "--threads")):
        if value < 1:
            raise SystemExit(f"{flag} must be >= 1, got {value}")
    if args.per_beam_source and args.eager_reorder:
        raise SystemExit("--per-beam-source and --eager-reorder: one variant at a time")
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

    labels = list(args.archs)
    suffix, ratio_key = (PER_BEAM, "per_beam_ratio") if args.per_beam_source else (EAGER, "eager_ratio")
    variants = bool(args.per_beam_source or args.eager_reorder)
    if variants:
        labels += [arch + suffix for arch in args.archs if _fluence_model(searches[arch][0])]

    def search(label: str) -> float:
        arch = label[: -len(suffix)] if label.endswith(suffix) else label
        model, generator = searches[arch]
        variant = label != arch
        with _per_beam_source(model, args.per_beam_source if variant else None), eager_reorder(
                variant and args.eager_reorder):
            start = time.perf_counter()
            hypotheses = generator.generate([model], sample)
            seconds = time.perf_counter() - start
        lengths = {len(h[0]["tokens"]) for h in hypotheses}
        if lengths != {args.tgt_len + 1}:  # the fixed length and its end of sentence
            raise RuntimeError(f"{arch}: outputs of lengths {sorted(lengths)}, expected {args.tgt_len + 1}")
        return seconds

    for label in labels:  # warm-up
        search(label)
    times: Dict[str, List[float]] = {label: [] for label in labels}
    for r in range(args.rounds):
        for label in (labels if r % 2 == 0 else labels[::-1]):
            times[label].append(search(label))
    baseline = statistics.median(times[args.archs[0]])
    result = {label: {"s": statistics.median(t), "ratio": statistics.median(t) / baseline,
                      "sentences_per_s": args.sentences / statistics.median(t)} for label, t in times.items()}
    for label in labels:
        if label + suffix in times:  # each round's pair, moments apart
            ratios = [a / b for a, b in zip(times[label], times[label + suffix])]
            result[label][ratio_key] = statistics.median(ratios)
            result[label]["variant_range"] = (min(ratios), max(ratios))
    machine = machine_info()
    print(f"Beam search (fairseq SequenceGenerator, no gradients): {args.sentences} sentences of {args.src_len} source "
          f"tokens, {args.tgt_len} decoding steps, beam {args.beam}, vocabulary {args.vocab}; {args.rounds} rounds; "
          f"{machine['cpu']}, {args.threads} thread(s), torch {machine['torch']}; load average "
          f"{machine['load_avg_1min']:.2f} at the end; allocator {allocator}"
          + (f"; per-beam variants: {args.per_beam_source} switched off" if args.per_beam_source else "")
          + ("; eager-reorder variants: cached self-attention keys copied by every reorder" if args.eager_reorder
             else "") + "\n")
    paired = f" / {suffix[2:]} variant (rounds' median, range) |" if variants else ""
    print(f"| arch | median s per search | sentences / s | / {args.archs[0]} |{paired}\n"
          f"|---|---|---|---|{'---|' if paired else ''}")
    for label, row in result.items():
        line = f"| {label} | {row['s']:.3f} | {row['sentences_per_s']:.1f} | {row['ratio']:.2f} |"
        if paired:
            line += (f" {row[ratio_key]:.3f} ({row['variant_range'][0]:.3f}-{row['variant_range'][1]:.3f}) |"
                     if ratio_key in row else " |")
        print(line)
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
