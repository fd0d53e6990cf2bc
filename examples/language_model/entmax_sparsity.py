"""How sparse trained entmax attention is, and what the support path saves on it.

    PATH="$PWD/.venv/bin:$PATH" python examples/language_model/entmax_sparsity.py      # about 15 minutes on 2 cores

The benchmarks time entmax attention on freshly initialised projections, whose rows keep what random scores give
(sparsemax about 0.2% of 4,096 keys, 1.5-entmax 1.7%, α-entmax per head anything from 0.3% to all). What a trained
model keeps decides whether its (batch, head) pairs work on their support (``SPARSE_BACKWARD_BELOW`` of
:mod:`fluence_fairseq.ops.entmax_attention`). Here each attention (``--attentions``) trains the same character
language model on the bundled Shakespeare (``--layers`` layers of width ``--dim``, 4 heads, no absolute positions,
ALiBi, ``--segment``-character blocks, ``--max-update`` Adam updates), and then, on the test text at each of
``--lengths``:

* the density of every layer and head: the share of the (query, key) pairs a query may attend that get a
  non-zero weight (the attention's own count, ``track_density``), and how many heads are within the support
  path's share;
* one training step of the whole model (forward, loss, backward; ``--batch`` rows) with the support path on and
  off (``SPARSE_BACKWARD_BELOW`` = 0: every pair dense), alternated ``--repeats`` times in one process (one
  thread), and their ratio.

Writes ``--out`` (markdown) and a JSON beside it; checkpoints go to ``WORK/entmax_sparsity/<attention>/``
(``--reuse`` skips training where a checkpoint is there).
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from long_context import prepare  # noqa: E402 (the bundled text, one token per character, binarized once)


def train_command(args, binary: Path, attention: str, save_dir: Path) -> list:
    return ["fairseq-train", binary, "--user-dir", "fluence_fairseq", "--task", "language_modeling",
            "--arch", "fluence_transformer_lm", "--decoder-self-attention", attention,
            "--decoder-layers", args.layers, "--decoder-embed-dim", args.dim, "--decoder-ffn-embed-dim", 4 * args.dim,
            "--decoder-attention-heads", 4, "--share-decoder-input-output-embed", "--no-token-positional-embeddings",
            "--attn-position-bias", "alibi", "--tokens-per-sample", args.segment, "--sample-break-mode", "none",
            "--batch-size", args.train_batch, "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", "2e-3",
            "--lr-scheduler", "inverse_sqrt", "--warmup-updates", 100, "--dropout", "0.0",
            "--max-update", args.max_update, "--cpu", "--num-workers", "0", "--seed", 1, "--save-dir", save_dir,
            "--no-epoch-checkpoints", "--log-format", "simple", "--log-interval", 50,
            "--validate-interval-updates", args.max_update, "--criterion", "cross_entropy"]


def train(args, binary: Path, attention: str, save_dir: Path) -> dict:
    """Train one model (or reuse its checkpoint); returns its last validation loss (bits per character) and the
    training time."""
    log = save_dir / "train.log"
    seconds = None
    if not (args.reuse and (save_dir / "checkpoint_last.pt").exists() and log.exists()):
        save_dir.mkdir(parents=True, exist_ok=True)
        started = time.time()
        with open(log, "w") as f:
            subprocess.run([str(c) for c in train_command(args, binary, attention, save_dir)], check=True,
                           stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        seconds = time.time() - started
    losses = re.findall(r"valid on 'valid' subset \| loss ([0-9.]+)", log.read_text())
    return {"valid_bpc": float(losses[-1]) if losses else None, "train_s": seconds}


def measure(args, binary: Path, checkpoint: Path) -> dict:
    import torch
    import torch.nn.functional as F
    from fairseq import checkpoint_utils
    from fairseq.data import data_utils

    import fluence_fairseq.ops.entmax_attention as ops  # importing the package registers the plugin
    from fluence_fairseq.modules.entmax import EntmaxAttentionBase

    torch.set_num_threads(1)
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)],
                                                                   arg_overrides={"data": str(binary)})
    model = models[0]
    attentions = [m for m in model.modules() if isinstance(m, EntmaxAttentionBase)]
    lines = data_utils.load_indexed_dataset(str(binary / "test"), task.source_dictionary)
    stream = torch.cat([lines[i] for i in range(len(lines))])
    share = ops.SPARSE_BACKWARD_BELOW
    out = {}
    for length in args.lengths:
        rows = args.batch
        need = rows * (length + 1)
        if need > stream.numel():
            raise SystemExit(f"--lengths {length} x --batch {rows} needs {need} test tokens, the test text has "
                             f"{stream.numel()}")
        block = stream[:need].view(rows, length + 1)
        tokens, target = block[:, :-1].contiguous(), block[:, 1:].contiguous()
        model.eval()
        for a in attentions:
            a.track_density(True)
        with torch.no_grad():
            model(tokens)
        density = []
        for a in attentions:
            nonzero, allowed = a.density_counts()
            density.append((nonzero / allowed).tolist())
            a.track_density(False)
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            logits = model(tokens)[0]
            F.cross_entropy(logits.view(-1, logits.size(-1)), target.view(-1)).backward()

        times = {"support": [], "dense": []}
        try:
            for round_ in range(args.repeats + 1):
                for label, below in (("support", share), ("dense", 0.0)):
                    ops.SPARSE_BACKWARD_BELOW = below
                    started = time.perf_counter()
                    step()
                    if round_:  # the first round warms up
                        times[label].append(time.perf_counter() - started)
        finally:
            ops.SPARSE_BACKWARD_BELOW = share
        ratios = [a / b for a, b in zip(times["support"], times["dense"])]
        out[length] = {"density": density, "support_s": statistics.median(times["support"]),
                       "dense_s": statistics.median(times["dense"]), "ratio": statistics.median(ratios),
                       "ratio_range": [min(ratios), max(ratios)],
                       "heads_within_share": sum(d <= share for layer in density for d in layer),
                       "heads": sum(len(layer) for layer in density)}
    alphas = [a.alpha().detach().tolist() for a in attentions if not isinstance(a.alpha(), float)]
    return {"lengths": out, "alpha": alphas or None, "share": share}


def report(args, results: dict) -> str:
    lines = [f"# Trained entmax attention: density and the support path ({args.layers} layers, width {args.dim}, "
             f"4 heads, {args.segment}-character blocks, {args.max_update} updates; one thread)\n",
             f"`python examples/language_model/entmax_sparsity.py {' '.join(sys.argv[1:])}`\n",
             "Density: the share of the (query, key) pairs a query may attend that get a non-zero weight, on the "
             "test text, per layer (the mean over heads, then each head). Step: forward, loss and backward of the "
             f"whole model on {args.batch} rows, the support path on and off, median of {args.repeats} alternated "
             "steps.\n",
             "| attention | valid bpc | length | density by layer (mean: heads) | heads within the share | "
             "step, support on ms | off ms | on / off |", "|---|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        for length, m in row["lengths"].items():
            layers = "; ".join(f"{sum(d) / len(d):.3f}: " + " ".join(f"{x:.3f}" for x in d) for d in m["density"])
            lines.append(f"| {name} | {row['valid_bpc']} | {length} | {layers} | {m['heads_within_share']} of "
                         f"{m['heads']} | {m['support_s'] * 1e3:.0f} | {m['dense_s'] * 1e3:.0f} | "
                         f"{m['ratio']:.3f} ({m['ratio_range'][0]:.3f}-{m['ratio_range'][1]:.3f}) |")
    for name, row in results.items():
        if row.get("alpha"):
            lines.append(f"\n{name}: learned α per layer and head: " + "; ".join(
                " ".join(f"{a:.2f}" for a in layer) for layer in row["alpha"]))
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attentions", nargs="+", default=["sparsemax", "entmax15", "alpha_entmax"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--segment", type=int, default=512)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--max-update", type=int, default=500)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batch", type=int, default=4, help="rows of the measured steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=HERE / "work")
    parser.add_argument("--reuse", action="store_true", help="reuse a model's checkpoint if it is there")
    parser.add_argument("--out", type=Path, default=None, help="markdown report (default WORK/entmax_sparsity.md)")
    args = parser.parse_args(argv)
    for name in ("layers", "dim", "segment", "train_batch", "max_update", "batch", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if any(n < 1 for n in args.lengths):
        parser.error(f"--lengths must be positive, got {args.lengths}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    binary = prepare(args, args.work)
    results = {}
    for attention in args.attentions:
        save_dir = args.work / "entmax_sparsity" / attention
        results[attention] = train(args, binary, attention, save_dir)
        results[attention].update(measure(args, binary, save_dir / "checkpoint_last.pt"))
        print(f"{attention}: done", flush=True)
    out = args.out or args.work / "entmax_sparsity.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(args, results))
    out.with_suffix(".json").write_text(json.dumps({"settings": vars(args) | {"work": str(args.work),
                                                                              "out": str(out)},
                                                    "results": results}, indent=1, default=str))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
