"""``fluence-attn-score``: average attention patterns of a fluence checkpoint over a data split.

    fluence-attn-score DATA-BIN --path CKPT.pt --subset train --out DIR \\
        [--max-len N] [--max-tokens N | --batch-size N] [--types self-enc,enc-dec] [--cpu] \\
        [--overrides '{"source_lang": "de", "target_lang": "en"}'] [--log-format tqdm|simple|none]

(also ``python -m fluence_fairseq.cli.attn_score``). It runs the ``compute_attn_score`` task
(:mod:`fluence_fairseq.tasks.compute_attn_score`, which documents the output files) and writes ``DIR/<type>.npy``
and ``DIR/<type>.json`` for every attention type (``self-enc``, ``self-dec``, ``enc-dec``) the model has, or
those ``--types`` chooses. ``--max-len`` defaults to the model's largest max positions capped at 1024.
"""
import argparse
import logging
import sys
from typing import Optional, Sequence

import torch

from .. import checkpoints
from ..pruning.collect import DEFAULT_MAX_LEN_CAP, TYPES, find_attentions, parse_types
from ..tasks.compute_attn_score import TASK_NAME

logger = logging.getLogger("fluence_fairseq.cli.attn_score")

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fluence-attn-score",
                                description="Average attention patterns (per layer, head, query and key position) "
                                            "of a fluence checkpoint over a data split.")
    p.add_argument("data", help="binarised data directory (read by the checkpoint's own task)")
    p.add_argument("--path", required=True, help="checkpoint (.pt)")
    p.add_argument("--subset", default="train", help="split to run over (default: train)")
    p.add_argument("--out", required=True, help="output directory: <type>.npy and <type>.json per attention type")
    p.add_argument("--max-len", type=int, default=None,
                   help=f"positions collected (default: the model's max positions, at most {DEFAULT_MAX_LEN_CAP}); "
                        "memory is 8*layers*heads*N*N bytes per type")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--max-tokens", type=int, default=None, help="tokens per batch (default 4096)")
    batch.add_argument("--batch-size", type=int, default=None, help="sentences per batch")
    p.add_argument("--types", default=None, help=f"comma-separated: {', '.join(TYPES)} (default: all)")
    p.add_argument("--overrides", default="{}",
                   help="dict literal of overrides for the checkpoint's config, e.g. \"{'source_lang': 'de'}\"")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is available")
    p.add_argument("--log-format", default=None, choices=["tqdm", "simple", "json", "none"],
                   help="progress bar (default: tqdm on a terminal, simple otherwise)")
    p.add_argument("--log-interval", type=int, default=100)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from fairseq import tasks
    from fairseq.logging import progress_bar

    if argv is None:  # the command line (not a call from Python): fairseq's log format on stdout
        logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                            stream=sys.stdout, force=True)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_len is not None and args.max_len < 1:
        parser.error("--max-len must be positive")
    try:
        parse_types(args.types)
        cfg = argparse.Namespace(task=TASK_NAME, data=args.data, attn_checkpoint=args.path, attn_types=args.types,
                                 attn_max_len=args.max_len, attn_out_dir=args.out, task_overrides=args.overrides)
        task = tasks.setup_task(cfg)
    except (ValueError, OSError, checkpoints.CheckpointError) as e:
        parser.error(str(e))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    found = find_attentions(task.model)
    logger.info(f"model {type(task.model).__name__}; attention types {', '.join(f'{t} ({len(e)} layers)' for t, e in found.items())}; "
                f"max_len {task.max_len}; device {device}")
    collected = find_attentions(task.model) if args.types is None else {
        t: e for t, e in find_attentions(task.model).items() if t in parse_types(args.types)}
    need = sum(8 * len(e) * e[0][2].num_heads * task.max_len ** 2 for e in collected.values())
    (logger.warning if need > 2 ** 31 else logger.info)(
        f"the running sums need {need / 2 ** 20:.0f} MiB (float64 layers x heads x {task.max_len}^2 per type); "
        "--max-len lowers it")
    log_format = args.log_format or ("tqdm" if sys.stderr.isatty() else "simple")

    def progress(itr):
        return progress_bar.progress_bar(itr, log_format=log_format, log_interval=args.log_interval,
                                         prefix=f"attention patterns on '{args.subset}'", default_log_format=log_format)
    try:
        accumulators = task.collect(args.subset, max_tokens=args.max_tokens, batch_size=args.batch_size,
                                    device=device, progress=progress)
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    written = task.save(args.out, accumulators)
    for t, paths in written.items():
        logger.info(f"{t}: {accumulators[t].sentences} sentences -> {paths['npy']} ({paths['json']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
