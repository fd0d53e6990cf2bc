"""Does LayerDrop make a decoder prunable? Four ways to get a 2-layer decoder (and two 4-layer references), BLEU.

    PATH="$PWD/.venv/bin:$PATH" python examples/translation/layerdrop.py                 # ~4 trainings of ~5 min
    PATH="$PWD/.venv/bin:$PATH" python examples/translation/layerdrop.py --max-update 20 --beam 1 --max-len-b 10
                                                                                          # smoke run: does it work?

The setup of ``compare.py`` (same data, budget, optimiser, seed and scoring; softmax ``fluence_transformer_small``
at width ``--dim``, 3 encoder layers, shared embeddings), with the decoder depth varied:

* ``layerdrop4``: 4 decoder layers trained with ``--decoder-layerdrop P``, scored as trained (4 layers) and pruned
  to every other layer (``--keep``, default ``0,2``) with ``python -m fluence_fairseq.cli.prune_layers``;
* ``plain2``: 2 decoder layers, no LayerDrop: what the same budget gives a model built small;
* ``plain4``: 4 decoder layers, no LayerDrop, scored as trained and pruned the same way: pruning a model that never
  learnt to work without some of its layers (expected to collapse: this is why LayerDrop matters).

P defaults to 0.5: fairseq's LayerDrop README recommends 0.1-0.2 for the best accuracy of the full model and
"about 0.5" to prune aggressively, i.e. half of the network or more, which is what is done here (4 -> 2). Dropout
stays 0.1 for every model (the README's advice to lower dropout by 0.1 with LayerDrop is for its 0.3-dropout
models), so LayerDrop is the only difference between ``layerdrop4`` and ``plain4``.

Writes ``WORK/layerdrop/<model>/`` (logs, checkpoints, pruned checkpoint, generate outputs, ``result.json``) and the
table to ``WORK/layerdrop/results.md`` (or ``--out``). The data are those of ``run.sh`` (``WORK/bin``), prepared
if missing.
"""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from compare import run, training_seconds, translate_and_score, write_markdown  # noqa: E402  (same helpers and conventions as compare.py)

#: name -> (decoder layers trained, decoder LayerDrop)
MODELS = {"layerdrop4": (4, True), "plain2": (2, False), "plain4": (4, False)}


def train_command(args, binary, save_dir, decoder_layers, layerdrop):
    cmd = ["fairseq-train", binary, "--user-dir", "fluence_fairseq", "--arch", "fluence_transformer_small",
           "--encoder-embed-dim", args.dim, "--decoder-embed-dim", args.dim,
           "--encoder-ffn-embed-dim", 4 * args.dim, "--decoder-ffn-embed-dim", 4 * args.dim,
           "--decoder-layers", decoder_layers,
           "--share-all-embeddings", "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
           "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", "2e-3", "--lr-scheduler",
           "inverse_sqrt", "--warmup-updates", args.warmup_updates, "--dropout", "0.1", "--max-tokens", "4096",
           "--required-batch-size-multiple", "1", "--max-update", args.max_update, "--cpu", "--num-workers",
           "0", "--seed", "1", "--save-dir", save_dir, "--no-epoch-checkpoints",
           "--log-format", "simple", "--log-interval", "100"]
    if layerdrop:
        cmd += ["--decoder-layerdrop", args.p]
    return cmd


def score(args, binary, checkpoint, out_txt, ref):
    return translate_and_score(binary, checkpoint, out_txt, ref, args.beam, args.max_len_b)[:2]


def write_table(args, rows, target):
    keep = args.keep
    lines = [f"Bible en->es test set (311 verses), beam {args.beam}, sacrebleu; softmax `fluence_transformer_small` at "
             f"width {args.dim}, 3 encoder layers, {args.max_update} updates, {args.warmup_updates} warm-up updates, "
             f"seed 1; LayerDrop p = {args.p} on the decoder; pruned = decoder layers {keep} kept "
             f"(`python examples/translation/layerdrop.py --max-update {args.max_update} --dim {args.dim} "
             f"--p {args.p} --beam {args.beam}`).", "",
             "| | model | decoder layers trained | LayerDrop | decoder layers at test | params at test | train wall s "
             "| BLEU | chrF |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['model']} | {r['trained_layers']} | {r['layerdrop']} | {r['test_layers']} "
                     f"| {r['params']} | {r['train_s']:.0f} | {r['bleu']:.2f} | {r['chrf']:.2f} |")
    write_markdown(lines, target)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-update", type=int, default=400)
    p.add_argument("--warmup-updates", type=int, default=100)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--p", type=float, default=0.5, help="decoder LayerDrop of the layerdrop4 model")
    p.add_argument("--keep", default="0,2", help="decoder layers kept when pruning the 4-layer models")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--max-len-b", type=int, default=200, help="fairseq-generate --max-len-b (small for smoke runs)")
    p.add_argument("--work", default=str(HERE / "work"))
    p.add_argument("--reuse", action="store_true", help="keep models already trained in WORK/layerdrop/<model>/")
    p.add_argument("--out", default=None, help="markdown table (default: WORK/layerdrop/results.md)")
    args = p.parse_args(argv)
    work = Path(args.work)
    binary = work / "bin"
    if not (binary / "test.en-es.es.bin").exists():
        subprocess.run(["bash", str(HERE / "run.sh")], cwd=ROOT, check=True, env={**os.environ, "PREPARE_ONLY": "1", "WORK": str(work)})
    from evaluate import read_lines

    ref = read_lines(work / "raw" / "test.es")
    kept = len(args.keep.split(","))
    results = {}
    for name, (layers, layerdrop) in MODELS.items():
        out = work / "layerdrop" / name
        out.mkdir(parents=True, exist_ok=True)
        log_path, ckpt = out / "train.log", out / "checkpoints" / "checkpoint_last.pt"
        print(f"== {name}: {layers} decoder layers" + (f", decoder LayerDrop {args.p}" if layerdrop else ""),
              flush=True)
        if args.reuse and log_path.exists() and "done training" in log_path.read_text() and ckpt.exists():
            print("   reusing the trained checkpoint", flush=True)
        else:
            run(train_command(args, binary, out / "checkpoints", layers, layerdrop), log_path)
        log = log_path.read_text()
        params = re.search(r"num\. (?:shared )?model params: ([\d,]+)", log).group(1)
        common = {"model": name, "trained_layers": layers, "layerdrop": args.p if layerdrop else "-",
                  "train_s": training_seconds(log)}
        bleu, chrf = score(args, binary, ckpt, out / "generate-test.txt", ref)
        results[name] = {**common, "test_layers": layers, "params": params, "bleu": bleu, "chrf": chrf}
        print(f"   as trained: BLEU {bleu:.2f} chrF {chrf:.2f}", flush=True)
        if layers > kept:
            pruned = out / "checkpoints" / "pruned.pt"
            prune_log = out / "prune.log"
            run([sys.executable, "-m", "fluence_fairseq.cli.prune_layers", ckpt, pruned,
                 "--decoder-layers-to-keep", args.keep], prune_log)
            small_params = re.search(r"parameters: [\d,]+ -> ([\d,]+)", prune_log.read_text()).group(1)
            bleu, chrf = score(args, binary, pruned, out / "generate-test-pruned.txt", ref)
            results[f"{name}_pruned"] = {**common, "test_layers": f"{kept} (pruned: {args.keep})",
                                         "params": small_params, "bleu": bleu, "chrf": chrf}
            print(f"   pruned to decoder layers {args.keep}: BLEU {bleu:.2f} chrF {chrf:.2f}", flush=True)
    (work / "layerdrop" / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    # the order: (a) LayerDrop pruned, (b) built small, (c) LayerDrop unpruned, (d) plain pruned
    order = [("(a)", "layerdrop4_pruned"), ("(b)", "plain2"), ("(c)", "layerdrop4"), ("(d)", "plain4_pruned"),
             ("ref", "plain4")]
    rows = [{**results[key], "label": label} for label, key in order if key in results]
    write_table(args, rows, Path(args.out) if args.out else work / "layerdrop" / "results.md")


if __name__ == "__main__":
    main()
