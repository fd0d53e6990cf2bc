"""``fluence-prune-layers``: keep some layers of a (LayerDrop-trained) checkpoint (see
:mod:`fluence_fairseq.pruning.layers`).

    fluence-prune-layers CHECKPOINT OUT.pt [--encoder-layers-to-keep 0,2] [--decoder-layers-to-keep 1]
"""
import argparse
import sys

import torch

from .. import checkpoints
from ..pruning import layers
from ..pruning.layers import (
    prune_checkpoint,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fluence-prune-layers",
                                description=layers.__doc__.strip().split("\n\n")[0])
    p.add_argument("checkpoint", help="fairseq checkpoint to prune (read-only)")
    p.add_argument("output", help="where to write the pruned checkpoint")
    p.add_argument("--encoder-layers-to-keep", default=None, metavar="I,J,...",
                   help="comma-separated 0-based encoder layers to keep (default: keep all)")
    p.add_argument("--decoder-layers-to-keep", default=None, metavar="I,J,...",
                   help="comma-separated 0-based decoder layers to keep (default: keep all)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        state = checkpoints.load(args.checkpoint, prog="fluence-prune-layers")
    except checkpoints.CheckpointError as error:
        raise SystemExit(str(error)) from None
    try:
        prune_checkpoint(state, {"encoder": args.encoder_layers_to_keep, "decoder": args.decoder_layers_to_keep})
    except ValueError as error:
        p.error(str(error))
    torch.save(state, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
