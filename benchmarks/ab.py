"""``python -m benchmarks.ab``: paired A/B of one attention's training step, the working tree against a git revision
of the ``fluence_fairseq/ops`` modules it uses.

On a shared machine whose speed drifts by 10-50% within minutes, two separate benchmark runs cannot tell a 10%
change from the drift. Here one process builds the attention once and alternates training steps between the
revision's copy of the named ops modules and the working tree's, so both sides of every pair see the same machine
state; the report is the median of the per-pair ratios (new / old), with their range, and each side's median time::

    python -m benchmarks.ab cosformer --opt cosformer_max_len=16384 --ops linear_attention --against HEAD~1
    python -m benchmarks.ab longshort --ops longshort --pattern noncausal --length 4096 --pairs 10

Only ops modules can be swapped (pure torch, imported by the attentions as module attributes): every name the
attention modules import from them is pointed at the revision's function for the "old" steps. When a change
also changed how the attention calls its op (new arguments), ``--with-attend`` runs the revision's methods of
the attention's class (the one that defines ``attend``, with its helpers) on the old side too, loaded from its
module file at that revision with its op names pointed at the revision's ops; inherited methods stay the
working tree's::

    python -m benchmarks.ab lara --ops landmarks --pattern noncausal --with-attend --against HEAD~1

Several ops modules swap together, each revision calling the others' revisions
(``--ops entmax,entmax_attention``).

``--need-weights`` times fairseq's default call (``need_weights=True``, the weights returned and not used);
``--attention-dropout P`` gives the attention that dropout (its paths with dropout: ``ops.softmax_dropout``).
``--decoding POSITION`` times decoding steps instead (no gradients, evaluation mode, ``--beam`` rows, each from a
copy of one filled cache of ``POSITION`` tokens, causal self steps reordered as beam search reorders them, cross
steps against a source of ``POSITION`` tokens asking for the weights; :class:`benchmarks.decoding.Case`): each
side of a pair is the median of ``--steps`` steps::

    python -m benchmarks.ab sparsemax --ops entmax --pattern cross --decoding 16 --threads 1 --pairs 12

Threads: torch's default unless ``--threads``.
"""
import argparse
import importlib
import statistics
import subprocess
import sys
import types
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Tuple

import torch

from .attention import _key_values, _typed_options
from .common import PATTERN_FLAGS, add_allocator_argument, build_module, training_step, use_allocator, warm_up

REPO = Path(__file__).resolve().parent.parent


def load_revision(ops_module: str, revision: str, package: str = "ops") -> ModuleType:
    """``fluence_fairseq/<package>/<ops_module>.py`` as it is at ``revision``, loaded as a sibling of the package's
    modules (its relative imports resolve to the working tree's other modules)."""
    path = f"fluence_fairseq/{package}/{ops_module}.py"
    try:
        source = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise SystemExit(f"--against {revision}: cannot read {path} at that revision ({err}); give a revision of "
                         "this git checkout that has the file") from err
    module = ModuleType(f"fluence_fairseq.{package}._ab_{ops_module}")
    module.__package__ = f"fluence_fairseq.{package}"
    exec(compile(source, f"{revision}:{path}", "exec"), module.__dict__)
    return module


def _taken_from(importer: ModuleType, source: ModuleType) -> List[str]:
    """The names under which ``importer`` holds a function of ``source`` (``from .source import name``)."""
    return [name for name, value in list(vars(importer).items())
            if callable(value) and getattr(source, name, None) is value]


def bindings(new: ModuleType) -> List[Tuple[ModuleType, str]]:
    """(importer, name) for every name an attention module took from ``new`` (``from ..ops.x import name``)."""
    found = []
    for importer in list(sys.modules.values()):
        if importer is None or not getattr(importer, "__name__", "").startswith("fluence_fairseq.modules"):
            continue
        found += [(importer, name) for name in _taken_from(importer, new)
                  if getattr(getattr(new, name), "__module__", "") == new.__name__]
    return found


def _imported_by_ops(new: ModuleType, others: List[str]) -> bool:
    """Whether one of the ops modules named ``others`` took a function from ``new``."""
    modules = (sys.modules.get(f"fluence_fairseq.ops.{other}") for other in others)
    return any(module is not None and _taken_from(module, new) for module in modules)


def link_revisions(loaded: List[Tuple[ModuleType, ModuleType]]) -> None:
    """Point the names each revision's module imported from another swapped ops module (the working tree's, as
    :func:`load_revision` resolves them) at that module's revision, so the old side runs the revision's functions
    through and through (``--ops entmax,entmax_attention``: the old blocked pass calls the old normaliser)."""
    for _, old in loaded:
        for new_other, old_other in loaded:
            for attr in _taken_from(old, new_other):
                if hasattr(old_other, attr):
                    setattr(old, attr, getattr(old_other, attr))


def revision_methods(module, swaps, revision: str) -> Dict[str, types.FunctionType]:
    """The methods of the class that defines ``attend`` for ``module`` (``attend`` and its helpers), from its
    module file at ``revision``, with the names that file imported from the swapped ops modules pointed at the
    revision's functions."""
    owner = next(cls for cls in type(module).__mro__ if "attend" in vars(cls))
    package, _, stem = owner.__module__.rpartition(".")
    if package != "fluence_fairseq.modules":
        raise SystemExit(f"--with-attend: {owner.__name__}.attend is not defined in fluence_fairseq/modules")
    old_module = load_revision(stem, revision, package="modules")
    for _, attr, new_fn, old_fn in swaps:
        if vars(old_module).get(attr) is new_fn:
            setattr(old_module, attr, old_fn)
    old_cls = getattr(old_module, owner.__name__, None)
    if old_cls is None or "attend" not in vars(old_cls):
        raise SystemExit(f"--with-attend: fluence_fairseq/modules/{stem}.py at {revision} has no "
                         f"{owner.__name__}.attend")
    def taken_from_owner(name):  # a subclass's overrides (alpha() of a learned-alpha entmax) stay the module's own
        if name in vars(owner):
            return getattr(type(module), name) is vars(owner)[name]
        return not hasattr(type(module), name)  # a helper the revision had and the class no longer has

    return {name: fn for name, fn in vars(old_cls).items()
            if isinstance(fn, types.FunctionType) and not name.startswith("__") and taken_from_owner(name)}


def _decoding_step(module, cross: bool, position: int, beam: int, dim: int, steps: int):
    """A function taking ``steps`` decoding steps of ``module`` from one filled cache; returns their median
    seconds."""
    from .decoding import Case

    with torch.no_grad():
        case = Case(module, cross, position, beam, dim)

    def step() -> float:
        case.us.clear()
        with torch.no_grad():
            for _ in range(steps):
                case.step(dim)
        return statistics.median(case.us) / 1e6

    return step


def main(argv=None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("attention", help="registered attention name")
    parser.add_argument("--ops", required=True, help="comma-separated modules of fluence_fairseq/ops to swap")
    parser.add_argument("--against", default="HEAD", help="git revision of the old side (default HEAD)")
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="attention option")
    parser.add_argument("--pattern", default="causal", choices=sorted(PATTERN_FLAGS))
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--with-attend", action="store_true", help="also run the revision's methods of the "
                        "attention's class (attend and its helpers) on the old side, when the change altered how "
                        "it calls its op")
    parser.add_argument("--need-weights", action="store_true", help="call the attention with fairseq's default "
                        "need_weights=True (the weights returned, not used) instead of need_weights=False")
    parser.add_argument("--decoding", type=int, default=None, metavar="POSITION",
                        help="time decoding steps against a cache (causal self) or source (cross) of POSITION tokens "
                             "instead of training steps")
    parser.add_argument("--attention-dropout", type=float, default=0.0, metavar="P",
                        help="attention dropout of the attention (training mode; default 0)")
    parser.add_argument("--beam", type=int, default=5, help="--decoding: rows of every step")
    parser.add_argument("--steps", type=int, default=20, help="--decoding: steps per side of a pair (their median)")
    add_allocator_argument(parser)
    args = parser.parse_args(argv)
    allocator = use_allocator(args.allocator)
    if args.threads:
        torch.set_num_threads(args.threads)
    cross, causal = PATTERN_FLAGS[args.pattern]
    if args.decoding is not None and (args.decoding < 1 or not (cross or causal)):
        raise SystemExit(f"--decoding needs a positive number of tokens and a causal or cross --pattern, got "
                         f"{args.decoding} and {args.pattern}")
    if not 0.0 <= args.attention_dropout < 1.0:
        raise SystemExit(f"--attention-dropout must be in [0, 1), got {args.attention_dropout}")
    options = _typed_options(args.attention, _key_values(args.opt, "--opt"))
    torch.manual_seed(0)
    spec = {"kind": "attention", "name": args.attention, "options": options}
    if args.attention_dropout:
        spec["setup"] = {"attention_dropout": args.attention_dropout}
    module = build_module(spec, args.dim, args.heads, cross, causal)
    swaps, loaded = [], []
    names = args.ops.split(",")
    for name in names:
        try:
            new = importlib.import_module(f"fluence_fairseq.ops.{name}")
        except ModuleNotFoundError:
            ops = sorted(p.stem for p in (REPO / "fluence_fairseq" / "ops").glob("*.py") if p.stem != "__init__")
            raise SystemExit(f"--ops {name}: fluence_fairseq/ops has no such module; choose from {ops}") from None
        old = load_revision(name, args.against)
        loaded.append((new, old))
        found = bindings(new)
        # an ops module the attentions reach only through another swapped one (``--ops band,softmax_dropout``)
        if not found and not _imported_by_ops(new, [n for n in names if n != name]):
            raise SystemExit(f"--ops {name}: no attention module imports a function from fluence_fairseq.ops.{name}"
                             + " (nor another module of --ops)" * (len(names) > 1))
        missing = sorted({attr for _, attr in found if not hasattr(old, attr)})
        if missing and not args.with_attend:
            raise SystemExit(f"--against {args.against}: its fluence_fairseq/ops/{name}.py has no {missing}, which "
                             "the attentions import now; compare against a revision that has them, or add "
                             "--with-attend if the revision's attend did not call them")
        # with --with-attend a function new since the revision stays on both sides: the old attend does not call it
        swaps += [(importer, attr, getattr(new, attr), getattr(old, attr, getattr(new, attr)))
                  for importer, attr in found]
    link_revisions(loaded)
    old_methods = revision_methods(module, swaps, args.against) if args.with_attend else {}

    def use(side: int) -> None:
        for importer, attr, *fns in swaps:
            setattr(importer, attr, fns[side])
        for name, fn in old_methods.items():  # instance attributes shadow the class's methods for the old steps
            if side:
                setattr(module, name, types.MethodType(fn, module))
            else:
                vars(module).pop(name, None)

    if args.decoding is None:
        step = training_step(module, args.dim, args.batch, args.length, args.length, cross, causal,
                             need_weights=args.need_weights)
    else:
        step = _decoding_step(module.eval(), cross, args.decoding, args.beam, args.dim, args.steps)
    times = {0: [], 1: []}
    def one_round():  # warm-up of both
        for side in (1, 0):
            use(side)
            step()

    warm_up(one_round, allocator)
    for _ in range(args.pairs):
        for side in (1, 0):
            use(side)
            times[side].append(step())
    use(0)
    ratios = [new / old for new, old in zip(times[0], times[1])]
    result = {"ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
              "old_ms": statistics.median(times[1]) * 1e3, "new_ms": statistics.median(times[0]) * 1e3}
    what = f"L={args.length}" if args.decoding is None else f"decoding at {args.decoding} tokens, beam {args.beam}"
    digits = 0 if args.decoding is None else 3  # a decoding step takes a fraction of a millisecond
    print(f"{args.attention} ({args.pattern}, {what}, {torch.get_num_threads()} threads), working tree / "
          f"{args.against} over {args.pairs} pairs: median {result['ratio_median']:.3f} (range "
          f"{result['ratio_min']:.3f}-{result['ratio_max']:.3f}); medians {result['old_ms']:.{digits}f} ms -> "
          f"{result['new_ms']:.{digits}f} ms; allocator {allocator}")
    return result


if __name__ == "__main__":
    main()
