"""``fluence-prune-weights``: prune the weights of a fairseq checkpoint (see :mod:`fluence_fairseq.pruning.weights`).

    fluence-prune-weights CHECKPOINT OUT.pt --amount 0.3 [--method l1|random|ln] [--scope global|layer] ...
"""
import argparse
import contextlib
import sys

import torch

from .. import checkpoints
from ..pruning import weights
from ..pruning.weights import (
    DEFAULT_EXCLUDE,
    DEFAULT_TYPES,
    TYPE_NAMES,
    PruningError,
    build_model_from_checkpoint,
    format_report,
    list_modules,
    parse_amount,
    prune_checkpoint,
    sparsity_report,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fluence-prune-weights",
                                description=weights.__doc__.strip().split("\n\n")[0],
                                epilog="Default selection: every nn.Linear weight except *output_projection* "
                                       "(tied to the embeddings). See the module docstring for details.")
    p.add_argument("checkpoint", help="fairseq checkpoint to prune (read-only)")
    p.add_argument("output", nargs="?", help="where to write the pruned checkpoint")
    p.add_argument("--amount", default=None,
                   help="fraction in [0, 1) of the selected weights to zero, or an integer count")
    p.add_argument("--method", default="l1", help="l1 (smallest magnitudes), random, or ln (structured rows/columns)")
    p.add_argument("--scope", default="global", help="global (one threshold over the selection) or layer")
    p.add_argument("--types", nargs="+", default=list(DEFAULT_TYPES), help=f"module types: {', '.join(TYPE_NAMES)}")
    p.add_argument("--include", nargs="+", default=None, metavar="PATTERN",
                   help="only modules matching one of these (glob, or re:<regex>)")
    p.add_argument("--exclude", nargs="*", default=None, metavar="PATTERN",
                   help=f"skip modules matching these (default {' '.join(DEFAULT_EXCLUDE)}; giving --exclude "
                        f"replaces the default, and --exclude alone excludes nothing)")
    p.add_argument("--params", nargs="+", default=["weight"], help="parameter names to prune (add bias to prune it)")
    p.add_argument("--n", default="2", help="norm order of --method ln (1, 2, inf, fro, ...)")
    p.add_argument("--dim", type=int, default=0, help="--method ln: 0 = rows (output features), 1 = columns")
    heads = p.add_mutually_exclusive_group()
    heads.add_argument("--heads", nargs="+", default=None, metavar="MODULE:I,J",
                       help="remove these heads, e.g. encoder.layers.0.self_attn:1,3")
    heads.add_argument("--prune-heads", type=float, default=None, metavar="FRACTION",
                       help="remove this fraction of the heads of every attention module (lowest L1 norm)")
    p.add_argument("--head-modules", nargs="+", default=None, metavar="PATTERN",
                   help="with --prune-heads: only attention modules matching these")
    p.add_argument("--seed", type=int, default=1, help="seed of --method random (default 1)")
    p.add_argument("--list", action="store_true", help="print the module names and exit")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        state = checkpoints.load(args.checkpoint, prog="fluence-prune-weights")
    except checkpoints.CheckpointError as error:
        raise SystemExit(str(error)) from None
    try:
        if args.list:
            print(list_modules(build_model_from_checkpoint(state)))
            return 0
        if args.output is None:
            raise PruningError("give the output checkpoint path (OUT.pt)")
        amount = parse_amount(args.amount) if args.amount is not None else None
        n = args.n
        with contextlib.suppress(ValueError):
            n = float(n)
        prune_checkpoint(state, amount=amount, method=args.method, scope=args.scope, types=args.types,
                         include=args.include,
                         exclude=args.exclude if args.exclude is not None else DEFAULT_EXCLUDE,
                         strict_exclude=args.exclude or (), params=args.params, n=n, dim=args.dim,
                         heads=args.heads, prune_heads=args.prune_heads, head_modules=args.head_modules,
                         seed=args.seed if args.method == "random" else None)
    except PruningError as error:
        p.error(str(error))
    torch.save(state, args.output)
    # the table is computed from the file as written, not from the model in memory or the requested amount
    saved = torch.load(args.output, map_location="cpu", weights_only=True)
    record = saved["extra_state"]["weight_pruning"][-1]
    report = sparsity_report(saved["model"], record["tensors"])
    report.update(heads=record["heads"], shared=record["shared"])
    print(format_report(report))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
