"""BLEU against weight sparsity: prune a trained en->es model with ``python -m fluence_fairseq.cli.prune_weights`` at
several amounts and score each pruned checkpoint on the test set.

    OMP_NUM_THREADS=1 PATH="$PWD/.venv/bin:$PATH" python examples/translation/weight_pruning.py
    OMP_NUM_THREADS=1 PATH="$PWD/.venv/bin:$PATH" python examples/translation/weight_pruning.py \\
        --checkpoint examples/translation/work/compare/softmax/checkpoints/checkpoint_last.pt --beam 1 \\
        --max-len-b 10 --variants l1-global --amounts 0 0.9          # smoke run: does it work?

The model is the dense softmax ``fluence_transformer_small`` (width 128, 3+3 layers, 4 heads, shared embeddings)
trained for 1000 updates in ``WORK/pruning/dense`` (``--checkpoint`` to use another). What is pruned: the weights
of every ``nn.Linear`` inside the encoder and decoder layers (attention q/k/v/out projections, fc1, fc2), i.e.
``--include 'encoder.layers.*' 'decoder.layers.*'``; embeddings (tied to the output projection), layer norms and
biases stay dense, so the whole model's sparsity is lower than the amount (the table gives both, counted from the
written checkpoints). Variants (``--variants``):

* ``l1-global``: smallest magnitudes, one threshold across all those weights (Fluence's ``Pruner``);
* ``l1-layer``: smallest magnitudes, the same fraction in every weight matrix;
* ``random-global``: uniformly random weights (seed 1), the baseline magnitude pruning should beat;
* ``heads-l1``: structured: the given fraction of the heads of every attention module (smallest L1 norm) removed,
  no unstructured pruning (amounts are fractions of heads: 0.25 = 1 of 4 heads, 0.5 = 2 of 4).

Generation: beam 5, ``--max-len-b 200``, batch 64, sentencepiece removed, scored with sacrebleu (BLEU, chrF)
against ``WORK/raw/test.es``. Writes ``WORK/weight_pruning/`` (``<variant>-<amount>/`` logs and outputs,
``results.json``, ``results.md``); pruned checkpoints are deleted after scoring unless ``--keep-checkpoints``.
"""
import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from compare import run, translate_and_score, write_markdown  # noqa: E402  (same subprocess conventions as compare.py)

DEFAULT_CHECKPOINT = HERE / "work" / "pruning" / "dense" / "checkpoints" / "checkpoint_last.pt"
LAYERS = ["encoder.layers.*", "decoder.layers.*"]
#: variant -> (method, scope, structured heads?)
VARIANTS = {"l1-global": ("l1", "global", False), "l1-layer": ("l1", "layer", False),
            "random-global": ("random", "global", False), "heads-l1": (None, None, True)}
DEFAULT_AMOUNTS = {"heads-l1": [0.25, 0.5]}


def prune_command(checkpoint, out, variant, amount):
    method, scope, heads = VARIANTS[variant]
    cmd = [sys.executable, "-m", "fluence_fairseq.cli.prune_weights", checkpoint, out]
    if heads:
        return cmd + ["--prune-heads", amount]
    return cmd + ["--amount", amount, "--method", method, "--scope", scope, "--include", *LAYERS, "--seed", "1"]


def achieved(path):
    """Sparsity counted from the written checkpoint: of the pruned tensors, and of the whole model."""
    import torch

    import fluence_fairseq  # noqa: F401  (safe globals for the weights-only load)
    from fluence_fairseq.pruning.weights import sparsity_report

    state = torch.load(path, map_location="cpu", weights_only=True)
    record = state["extra_state"]["weight_pruning"][-1]
    layer_tensors = [k for k in state["model"] if k.startswith(("encoder.layers.", "decoder.layers."))
                     and k.endswith(("_proj.weight", "fc1.weight", "fc2.weight"))]
    report = sparsity_report(state["model"], layer_tensors)
    return report["overall"]["sparsity"], report["model"]["sparsity"], record


def score(args, binary, checkpoint, out_txt, ref):
    return translate_and_score(binary, checkpoint, out_txt, ref, args.beam, args.max_len_b)


def write_table(args, rows, target):
    ckpt = Path(args.checkpoint)
    flag = "" if ckpt.resolve() == DEFAULT_CHECKPOINT.resolve() else f" --checkpoint {args.checkpoint}"
    try:
        ckpt = ckpt.resolve().relative_to(ROOT)
    except ValueError:
        pass
    lines = [f"Bible en->es test set (311 verses), beam {args.beam}, `--max-len-b {args.max_len_b}`, sacrebleu; "
             f"dense softmax `fluence_transformer_small` (width 128, 3+3 layers, 4 heads, shared embeddings) from "
             f"`{ckpt}`, pruned with `python -m fluence_fairseq.cli.prune_weights` (no fine-tuning). Pruned: every "
             f"Linear weight of the encoder and decoder layers (q/k/v/out_proj, fc1, fc2); embeddings, layer norms "
             f"and biases dense. Sparsity is counted from the written checkpoints. "
             f"(`OMP_NUM_THREADS=1 python examples/translation/weight_pruning.py{flag} --variants "
             f"{' '.join(args.variants)}`)", "",
             "| variant | amount | layer-weight sparsity | whole-model sparsity | BLEU | chrF |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        amount = f"{r['amount']:.0%} of heads" if r["variant"] == "heads-l1" else f"{r['amount']:.0%}"
        lines.append(f"| {r['variant']} | {amount} | {r['layer_sparsity']:.2%} | {r['model_sparsity']:.2%} "
                     f"| {r['bleu']:.2f} | {r['chrf']:.2f} |")
    write_markdown(lines, target)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="dense fairseq checkpoint to prune")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--amounts", nargs="+", type=float, default=None,
                   help="fractions to prune (default 0 0.3 0.5 0.7 0.9; heads-l1: 0.25 0.5)")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--max-len-b", type=int, default=200, help="fairseq-generate --max-len-b (small for smoke runs)")
    p.add_argument("--work", default=str(HERE / "work"))
    p.add_argument("--out", default=None, help="markdown table (default: WORK/weight_pruning/results.md)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the pruned checkpoints")
    args = p.parse_args(argv)
    if not Path(args.checkpoint).exists():
        raise SystemExit(f"{args.checkpoint} does not exist: train the dense model first (see "
                         f"examples/translation/README.md) or pass --checkpoint")
    work = Path(args.work)
    binary = work / "bin"
    if not (binary / "test.en-es.es.bin").exists():
        import subprocess

        subprocess.run(["bash", str(HERE / "run.sh")], cwd=ROOT, check=True,
                       env={**os.environ, "PREPARE_ONLY": "1", "WORK": str(work)})
    from evaluate import read_lines

    ref = read_lines(work / "raw" / "test.es")
    out_dir = work / "weight_pruning"
    rows = []
    for variant in args.variants:
        amounts = args.amounts or DEFAULT_AMOUNTS.get(variant, [0.0, 0.3, 0.5, 0.7, 0.9])
        for amount in amounts:
            if variant != "l1-global" and amount == 0 and any(r["amount"] == 0 for r in rows):
                continue  # 0% is the dense model whatever the method: scored once
            run_dir = out_dir / f"{variant}-{amount:g}"
            run_dir.mkdir(parents=True, exist_ok=True)
            pruned = run_dir / "pruned.pt"
            run(prune_command(args.checkpoint, pruned, variant, f"{amount:g}"), run_dir / "prune.log")
            layer_sp, model_sp, record = achieved(pruned)
            bleu, chrf, secs = score(args, binary, pruned, run_dir / "generate-test.txt", ref)
            row = {"variant": variant, "amount": amount, "layer_sparsity": layer_sp, "model_sparsity": model_sp,
                   "bleu": bleu, "chrf": chrf, "generate_s": secs, "heads": record["heads"]}
            rows.append(row)
            print(f"{variant} {amount:g}: layer sparsity {layer_sp:.2%}, model {model_sp:.2%}: BLEU {bleu:.2f} "
                  f"chrF {chrf:.2f} ({secs:.0f} s)", flush=True)
            if not args.keep_checkpoints:
                pruned.unlink()
            (out_dir / "results.json").write_text(json.dumps({"args": vars(args), "results": rows}, indent=1))
    write_table(args, rows, Path(args.out) if args.out else out_dir / "results.md")


if __name__ == "__main__":
    main()
