"""``python -m benchmarks.decoding``: one decoding step of several attentions and of fairseq's
``MultiheadAttention``, alternated in one process, as beam search takes them::

    python -m benchmarks.decoding softmax sparsemax entmax15 alpha_entmax --positions 16,64,256 --beam 5

A step is one query per beam of each of ``--sentences`` sentences against a cache of ``position`` tokens: causal
self attention (the cache filled token by token once, every timed step taken from a copy of it, reordered first
by a random order of each sentence's beams, as fairseq's beam search does) and cross attention over a source of
``position`` tokens per sentence, repeated for its beams as fairseq's beam search repeats the encoder's output (its
keys cached by the first call with ``static_kv``, passed again at every step as fairseq's decoder does, which also
asks for the cross attention's weights in evaluation: ``need_weights=True``; the self attention's are not asked
for). Every round takes ``--steps`` steps of each case in turn, in the
opposite order to the round before; the report gives each case's median over all its steps and its ratio to
fairseq's attention at the same pattern and position. ``--eager-reorder`` adds, for every attention's self
pattern, the same attention with the cached keys and values selected by every reorder and concatenated by the
step, as fairseq's attention does (:func:`~benchmarks.common.eager_reorder`), and each attention's ratio to it. Decoding runs without gradients (``torch.no_grad``), in
evaluation mode.
"""
import argparse
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

from .attention import machine_info
from .common import add_allocator_argument, bench_spec, build_module, eager_reorder, use_allocator
from fluence_fairseq.modules.registry import ATTENTIONS, get_attention

MHA = "fairseq MHA"
EAGER = ", eager reorder"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("::")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("attentions", nargs="+", metavar="NAME", help="registered attention names")
    parser.add_argument("--patterns", default="self,cross", help="self (causal), cross, or both (default)")
    parser.add_argument("--positions", default="16,64,256", help="tokens in the cache (self) or the source (cross)")
    parser.add_argument("--beam", type=int, default=5, help="beams per sentence")
    parser.add_argument("--sentences", type=int, default=1,
                        help="sentences: the batch of every step is sentences x beam")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each case per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as fairseq-generate "
                                                                "runs one process per core)")
    parser.add_argument("--eager-reorder", action="store_true",
                        help="also time every attention's self steps with its cached keys copied by every reorder "
                             "and again by the step, as fairseq does")
    add_allocator_argument(parser)
    return parser


def _positions(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--positions takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"--positions needs positive integers, got {text!r}")
    return values


class Case:
    """One module decoding at one pattern and position: its cache, and the time of each step taken."""

    def __init__(self, module, cross: bool, position: int, beam: int, dim: int, sentences: int = 1,
                 eager: bool = False):
        self.module, self.cross, self.beam, self.sentences, self.eager = module, cross, beam, sentences, eager
        self.rows = beam * sentences
        self.state: Dict[str, Dict[str, Optional[torch.Tensor]]] = {}
        self.us: List[float] = []
        self.source = torch.randn(position, sentences, dim).repeat_interleave(beam, dim=1) if cross else None
        if cross:  # the source's keys cached by the first call
            self._call(torch.randn(1, self.rows, dim))
        else:
            for _ in range(position):
                self._call(torch.randn(1, self.rows, dim))
        self.filled = self._copy(self.state)

    @staticmethod
    def _copy(state):
        return {key: {name: None if t is None else t.clone() for name, t in buffer.items()}
                for key, buffer in state.items()}

    def _call(self, token: torch.Tensor) -> None:
        kv = self.source if self.cross else token
        # fairseq's decoder layers ask their cross attention for its weights in evaluation (``need_attn``), not
        # their self attention
        self.module(query=token, key=kv, value=kv, incremental_state=self.state, static_kv=self.cross,
                    need_weights=self.cross)

    def step(self, dim: int) -> None:
        """One step from the filled cache (a copy of it, made before the clock starts): every step of a case is
        at its position."""
        self.state = self._copy(self.filled)
        token = torch.randn(1, self.rows, dim)
        # each row continues a beam of its own sentence
        first_beam = torch.arange(self.sentences).repeat_interleave(self.beam) * self.beam
        order = torch.randint(self.beam, (self.rows,)) + first_beam
        start = time.perf_counter()
        if not self.cross:  # beam search reorders the self attention's cache before every step
            with eager_reorder(self.eager):
                self.module.reorder_incremental_state(self.state, order)
        self._call(token)
        self.us.append((time.perf_counter() - start) * 1e6)


@torch.no_grad()
def main(argv: Optional[List[str]] = None) -> Dict[tuple, dict]:
    args = build_parser().parse_args(argv)
    patterns = [p for p in args.patterns.split(",") if p]
    if not patterns or set(patterns) - {"self", "cross"}:
        raise SystemExit(f"--patterns takes self, cross or self,cross, got {args.patterns!r}")
    for name in args.attentions:
        if name not in ATTENTIONS:
            raise SystemExit(f"unknown attention {name!r}; choose from {sorted(ATTENTIONS)}")
    for value, flag in ((args.beam, "--beam"), (args.sentences, "--sentences"), (args.steps, "--steps"),
                        (args.rounds, "--rounds"), (args.threads, "--threads")):
        if value < 1:
            raise SystemExit(f"{flag} must be >= 1, got {value}")
    positions = _positions(args.positions)
    allocator = use_allocator(args.allocator)
    torch.set_num_threads(args.threads)
    cases: Dict[tuple, Case] = {}
    for pattern in patterns:
        cross = pattern == "cross"
        labels = {MHA: {"kind": "fairseq_mha"}, **{name: bench_spec(name) for name in args.attentions}}
        for label, spec in labels.items():
            if spec["kind"] == "attention":
                supported = get_attention(label).cls.supported_patterns
                if (cross, not cross) not in supported:
                    raise SystemExit(f"{label} does not decode as {pattern} attention")
            torch.manual_seed(0)
            module = build_module(spec, args.dim, args.heads, cross=cross, causal=not cross).eval()
            for position in positions:
                cases[(pattern, position, label)] = Case(module, cross, position, args.beam, args.dim, args.sentences)
                if args.eager_reorder and not cross and label != MHA:
                    cases[(pattern, position, label + EAGER)] = Case(module, cross, position, args.beam, args.dim,
                                                                     args.sentences, eager=True)
    order = list(cases)
    for case in cases.values():  # warm-up
        for _ in range(3):
            case.step(args.dim)
        case.us.clear()
    for r in range(args.rounds):
        for key in (order if r % 2 == 0 else order[::-1]):
            for _ in range(args.steps):
                cases[key].step(args.dim)
    result = {}
    for (pattern, position, label), case in cases.items():
        median = statistics.median(case.us)
        baseline = statistics.median(cases[(pattern, position, MHA)].us)
        result[(pattern, position, label)] = {"us": median, "ratio": median / baseline}
    for (pattern, position, label), row in result.items():
        variant = result.get((pattern, position, label + EAGER))
        if variant is not None:
            row["eager_ratio"] = row["us"] / variant["us"]
    machine = machine_info()
    print(f"Decoding steps without gradients: {args.sentences} sentence(s) x beam {args.beam}, D={args.dim}, "
          f"H={args.heads}; {args.rounds} rounds of "
          f"{args.steps} steps per case; {machine['cpu']}, {args.threads} thread(s), torch {machine['torch']}; load "
          f"average {machine['load_avg_1min']:.2f} at the end; allocator {allocator}\n")
    eager = " / eager reorder |" if args.eager_reorder else ""
    print(f"| pattern | position | case | median us per step | / fairseq MHA |{eager}\n"
          f"|---|---|---|---|---|{'---|' if eager else ''}")
    for (pattern, position, label), row in result.items():
        line = f"| {pattern} | {position} | {label} | {row['us']:.1f} | {row['ratio']:.2f} |"
        if eager:
            line += f" {row['eager_ratio']:.3f} |" if "eager_ratio" in row else " |"
        print(line)
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
