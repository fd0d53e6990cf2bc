"""``fluence-stream-bpc``: where in a segment a stream language model's memory pays, position by position.

    fluence-stream-bpc DATA-BIN --path CKPT.pt [--path CKPT2.pt ...] [--label NAME ...] [--subset test] \\
        [--batch-size 8] [--edges 0,16,32,64,128,256] [--out TABLE.md] [--plot BPC.png] [--json OUT.json]

(also ``python -m fluence_fairseq.cli.stream_bpc``). Every checkpoint of ``--task fluence_lm_stream`` scores the
``--subset`` stream twice, as ``fairseq-eval-lm --task fluence_lm_stream --batch-size B`` does (``B`` rows read
segment by segment): with its memory, and with the memory dropped (every segment from an empty one, as
``--stream-without-memory``). The bits per token of every target are grouped by the position of the target in its
segment (0 = the first token after a segment boundary). Memory can change only what a position's context can
reach beyond the segment, so the gap between the two rows shows how far back each model reads: for local
attention of window ``w`` and ``n`` layers it closes at position ``n * w``; for a recurrent state it may never.

The table has one row per checkpoint and mode, one column per ``--edges`` bucket ``[a, b)`` and the mean over every
target of the ``B`` rows (``fairseq-eval-lm`` leaves out each row's first target, so its mean can differ in the
last decimals).
"""
import argparse
import json
import logging
import math
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch

logger = logging.getLogger("fluence_fairseq.cli.stream_bpc")

MODES = ("memory", "memory dropped")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fluence-stream-bpc",
                                description="Bits per token of fluence_lm_stream checkpoints by position in the "
                                            "segment, with and without their memory.")
    p.add_argument("data", help="binarised data directory of the stream")
    p.add_argument("--path", action="append", required=True, help="checkpoint (.pt); repeat for several")
    p.add_argument("--label", action="append", default=None,
                   help="name of each --path in the table (default: the checkpoint's directory name)")
    p.add_argument("--subset", default="test", help="split to score (default: test)")
    p.add_argument("--batch-size", type=int, default=8, help="rows read in parallel (default 8)")
    p.add_argument("--tokens-per-sample", type=int, default=None,
                   help="segment length (default: the checkpoint's --tokens-per-sample)")
    p.add_argument("--edges", default="0,16,32,64,128,256",
                   help="bucket edges over positions in the segment (default 0,16,32,64,128,256); the last bucket "
                        "runs to the end of the segment")
    p.add_argument("--out", default=None, help="write the Markdown table here (default: print it)")
    p.add_argument("--plot", default=None, help="PNG of bits per token against position in the segment")
    p.add_argument("--json", default=None, help="per-position bits per token of every checkpoint and mode")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is available")
    return p


def parse_edges(text: str) -> List[int]:
    try:
        edges = [int(e) for e in text.split(",")]
    except ValueError:
        raise ValueError(f"--edges must be comma-separated integers, got {text!r}") from None
    if not edges or edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"--edges must start at 0 and increase, e.g. 0,16,64,256; got {text!r}")
    return edges


def position_bits(task, model, subset: str, rows: int, without_memory: bool):
    """(segment,) summed bits of the targets at every position of a segment and (segment,) their counts, over the
    whole ``subset`` stream read in ``rows`` rows with (or without) the memory."""
    segment = task.args.tokens_per_sample
    total = torch.zeros(segment, dtype=torch.float64)
    count = torch.zeros(segment, dtype=torch.float64)
    before = task.args.stream_without_memory
    task.args.stream_without_memory = without_memory
    device = next(model.parameters()).device
    try:
        itr = task.get_batch_iterator(task.dataset(subset), max_sentences=rows).next_epoch_itr(shuffle=False)
        for sample in itr:
            memory = task.memory(sample)
            src = sample["net_input"]["src_tokens"].to(device)
            target = sample["target"].to(device)
            with memory.attached(model), torch.no_grad():
                out = model(src_tokens=src, src_lengths=sample["net_input"]["src_lengths"].to(device))
            lprobs = model.get_normalized_probs(out, log_probs=True).double()
            nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1).cpu() / math.log(2)  # (rows, length)
            length = nll.size(1)
            total[:length] += nll.sum(0)
            count[:length] += nll.size(0)
    finally:
        task.args.stream_without_memory = before
    return total, count


def buckets(edges: Sequence[int], segment: int) -> List[tuple]:
    """``[lo, hi)`` position ranges of ``edges`` inside a segment of ``segment`` positions (the last to its end)."""
    inside = [e for e in edges if e < segment]
    return list(zip(inside, inside[1:] + [segment]))


def bucket_means(total: torch.Tensor, count: torch.Tensor, edges: Sequence[int]) -> List[Optional[float]]:
    """Mean bits per token of every bucket (None where no target falls), then over everything."""
    means = []
    for lo, hi in buckets(edges, total.numel()):
        n = float(count[lo:hi].sum())
        means.append(float(total[lo:hi].sum()) / n if n else None)
    means.append(float(total.sum() / count.sum()))
    return means


def table(results: Dict[str, Dict[str, dict]], edges: Sequence[int], segment: int) -> str:
    heads = [f"{lo}–{hi - 1}" for lo, hi in buckets(edges, segment)] + ["all"]
    lines = ["| checkpoint | mode | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(heads)]
    for label, modes in results.items():
        for mode in MODES:
            cells = ["-" if m is None else f"{m:.3f}" for m in modes[mode]["buckets"]]
            lines.append(f"| {label} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: Dict[str, Dict[str, dict]], out: str, smooth: int = 8) -> None:
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font search logs pages at DEBUG
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, modes) in enumerate(results.items()):
        color = f"C{i}"
        for mode, style in zip(MODES, ("-", ":")):
            bits = torch.tensor(modes[mode]["per_position"])
            # a running mean over ``smooth`` positions: single positions are noisy (a few thousand targets each)
            kernel = torch.ones(1, 1, smooth) / smooth
            smoothed = torch.nn.functional.conv1d(bits.view(1, 1, -1), kernel).view(-1)
            ax.plot(torch.arange(smoothed.numel()) + (smooth - 1) / 2, smoothed, style, color=color,
                    label=f"{label} ({mode})")
    ax.set_xlabel("position in the segment")
    ax.set_ylabel(f"bits per token (running mean of {smooth})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from fairseq import checkpoint_utils

    from ..tasks.lm_stream import TASK_NAME, StreamLanguageModelingTask

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        edges = parse_edges(args.edges)
    except ValueError as error:
        parser.error(str(error))
    if args.batch_size < 1:
        parser.error(f"--batch-size must be a positive number of rows, got {args.batch_size}")
    labels = args.label or []
    if labels and len(labels) != len(args.path):
        parser.error(f"give one --label per --path ({len(args.path)} paths, {len(labels)} labels), or none")
    labels = labels or [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in args.path]
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    results: Dict[str, Dict[str, dict]] = {}
    segment = None
    for path, label in zip(args.path, labels):
        overrides = {"data": args.data}
        if args.tokens_per_sample is not None:
            overrides["tokens_per_sample"] = args.tokens_per_sample
        models, _, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides=overrides)
        if not isinstance(task, StreamLanguageModelingTask):
            parser.error(f"{path}: trained with --task {getattr(task.args, '_name', None) or type(task).__name__}, not {TASK_NAME}; this "
                         "command scores stream language models")
        model = models[0].to(device).eval()
        task.load_dataset(args.subset)
        segment = task.args.tokens_per_sample
        results[label] = {}
        for mode in MODES:
            total, count = position_bits(task, model, args.subset, args.batch_size, mode != "memory")
            per_position = (total / count.clamp(min=1)).tolist()
            results[label][mode] = {"per_position": per_position, "counts": count.tolist(),
                                    "buckets": bucket_means(total, count, edges)}
            logger.info(f"{label}, {mode}: {results[label][mode]['buckets'][-1]:.4f} bits per token")
    text = (f"Bits per token on `{args.subset}` by position in the {segment}-token segment ({args.batch_size} "
            f"rows; `memory dropped`: every segment from an empty memory).\n\n" + table(results, edges, segment))
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"subset": args.subset, "rows": args.batch_size, "segment": segment, "edges": edges,
                       "results": results}, f, indent=1)
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stdout)
    sys.exit(main())
