"""Data-informed attention pruning (Rugina et al. 2020) on the Bible corpus, end to end, in one command.

    PATH="$PWD/.venv/bin:$PATH" python examples/translation/pruning.py            # ~1 h on 2 cores
    PATH="$PWD/.venv/bin:$PATH" python examples/translation/pruning.py --dense work/compare/softmax/checkpoints/checkpoint_last.pt
    PATH="$PWD/.venv/bin:$PATH" python examples/translation/pruning.py --max-update 10 --finetune-updates 5 \\
        --beam 1 --max-len-b 10 --collect-subset valid                           # smoke run: does it work?

1. **dense**: the softmax ``fluence_transformer_small`` of ``compare.py`` (3+3 layers, 4 heads, width ``--dim``,
   ``--max-update`` updates), or the checkpoint given with ``--dense``;
2. **collect**: ``python -m fluence_fairseq.cli.attn_score`` over the training split (``--collect-subset``)
   writes the average pattern of every attention type (``self-enc``, ``self-dec``, ``enc-dec``);
3. **fine-tune** the dense checkpoint for ``--finetune-updates`` updates (fresh Adam, lr 1e-3, 50 warm-up updates,
   same data and seed) four ways: unpruned (the baseline: same extra budget), data-informed masks at tau = 50% and
   90% of the allowed entries of every attention type (one threshold per layer, the paper's scope), and random
   masks at 90% (the same number of entries per layer, ``--attn-prune-seed 1``);
4. **score**: beam-``--beam`` translation of the 311 test verses (sacrebleu BLEU and chrF), fine-tuning wall time and
   peak resident memory of the fine-tuning process, and translation wall time.

Writes ``WORK/pruning/`` (patterns, logs, checkpoints, ``results.json``) and the table to
``WORK/pruning/results.md`` (or ``--out``). Sentences here are short (33 tokens on average), so the block-sparse
kernel (which pays off from a few blocks of 32 positions) rarely runs: the masks are applied exactly, but the time
column shows their cost at short lengths, not the kernel's savings (``python -m benchmarks.pruning``
measures those at length 1024).
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

from compare import training_seconds, translate_and_score, write_markdown  # noqa: E402

sys.path.insert(0, str(HERE.parent))
from measure import run_measured  # noqa: E402

#: name -> (tau or None, random)
VARIANTS = {"unpruned": (None, False), "ap50": (50, False), "ap90": (90, False), "random90": (90, True)}
TYPES = ("self-enc", "self-dec", "enc-dec")



def train_command(args, binary, save_dir, max_update, extra):
    return ["fairseq-train", binary, "--user-dir", "fluence_fairseq", "--arch", "fluence_transformer_small",
            "--encoder-embed-dim", args.dim, "--decoder-embed-dim", args.dim,
            "--encoder-ffn-embed-dim", 4 * args.dim, "--decoder-ffn-embed-dim", 4 * args.dim,
            "--share-all-embeddings", "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
            "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr-scheduler", "inverse_sqrt",
            "--dropout", "0.1", "--max-tokens", "4096", "--required-batch-size-multiple", "1",
            "--max-update", max_update, "--cpu", "--num-workers", "0", "--seed", "1", "--save-dir", save_dir,
            "--no-epoch-checkpoints", "--no-save-optimizer-state", "--log-format", "simple", "--log-interval", "100",
            *extra]


def score(args, binary, checkpoint, out_txt, ref):
    return translate_and_score(binary, checkpoint, out_txt, ref, args.beam, args.max_len_b)


def kept_shares(log):
    """'self-enc keeps 10.3% of its entries' lines of the fine-tuning log -> {type: percent}."""
    return {m[1]: float(m[2]) for m in re.finditer(r"attention pruning: (\S+) keeps ([\d.]+)%", log)}


def write_table(args, rows, target):
    lines = [f"Bible en->es test set (311 verses), beam {args.beam}, sacrebleu. Softmax `fluence_transformer_small` "
             f"(3+3 layers, 4 heads, width {args.dim}) trained dense, patterns collected on the "
             f"`{args.collect_subset}` split, then fine-tuned {args.finetune_updates} updates per row "
             f"(`python examples/translation/pruning.py"
             + (f" --max-update {args.max_update}" if not args.dense else " --dense <checkpoint>")
             + f" --finetune-updates {args.finetune_updates} --beam {args.beam}`). Pruned: tau percent of the allowed "
             "entries of every attention type, one threshold per layer; kept = share of the (query, key) pairs of "
             "the collected data that stay computed, averaged over the three types; time and peak RSS of the "
             "fine-tuning process.", "",
             "| model | pruned | kept | BLEU | chrF | fine-tune s | peak RSS MB | translate s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['pruned']} | {r['kept']} | {r['bleu']:.2f} | {r['chrf']:.2f} | "
                     f"{r['train_s']:.0f} | {r['rss_mb']:.0f} | {r['translate_s']:.1f} |")
    write_markdown(lines, target)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dense", default=None, help="a trained dense checkpoint to start from (default: train one)")
    p.add_argument("--max-update", type=int, default=1000, help="updates of the dense model")
    p.add_argument("--warmup-updates", type=int, default=300)
    p.add_argument("--finetune-updates", type=int, default=300)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--collect-subset", default="train")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--max-len-b", type=int, default=200, help="fairseq-generate --max-len-b (small for smoke runs)")
    p.add_argument("--work", default=str(HERE / "work"))
    p.add_argument("--reuse", action="store_true", help="keep results already in WORK/pruning/")
    p.add_argument("--out", default=None, help="markdown table (default: WORK/pruning/results.md)")
    args = p.parse_args(argv)
    work = Path(args.work)
    binary = work / "bin"
    out_dir = work / "pruning"
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (binary / "test.en-es.es.bin").exists():
        subprocess.run(["bash", str(HERE / "run.sh")], cwd=ROOT, check=True, env={**os.environ, "PREPARE_ONLY": "1", "WORK": str(work)})
    from evaluate import read_lines

    ref = read_lines(work / "raw" / "test.es")
    # the dense model lives in WORK/pruning/dense/; each fine-tuned variant in its own WORK/pruning/<variant>/
    dense = Path(args.dense) if args.dense else out_dir / "dense" / "checkpoints" / "checkpoint_last.pt"
    if not args.dense and not (args.reuse and dense.exists()):
        print(f"== dense: {args.max_update} updates", flush=True)
        (out_dir / "dense").mkdir(exist_ok=True)
        run_measured(train_command(args, binary, dense.parent, args.max_update,
                                   ["--lr", "2e-3", "--warmup-updates", args.warmup_updates]),
                     out_dir / "dense" / "train.log")
    patterns = out_dir / "patterns"
    if not (args.reuse and all((patterns / f"{t}.npy").exists() for t in TYPES)):
        print(f"== collecting attention patterns on '{args.collect_subset}'", flush=True)
        seconds, _ = run_measured([sys.executable, "-m", "fluence_fairseq.cli.attn_score", binary, "--path", dense,
                                   "--subset", args.collect_subset, "--out", patterns, "--max-tokens", "4096",
                                   "--cpu", "--log-format", "simple"], out_dir / "collect.log")
        print(f"   {seconds:.0f} s", flush=True)
    results = {}
    for name in args.variants.split(","):
        tau, random = VARIANTS[name]
        run_dir = out_dir / name
        run_dir.mkdir(exist_ok=True)
        result_path = run_dir / "result.json"
        if args.reuse and result_path.exists():
            results[name] = json.loads(result_path.read_text())
            continue
        extra = ["--restore-file", dense, "--reset-optimizer", "--reset-dataloader", "--reset-meters",
                 "--reset-lr-scheduler", "--lr", "1e-3", "--warmup-updates", "50"]
        if tau is not None:
            for kind in TYPES:
                extra += [f"--attn-patterns-{kind}", patterns / f"{kind}.npy"]
            extra += ["--attn-prune-tau", tau]
            if random:
                extra += ["--attn-prune-random", "--attn-prune-seed", "1"]
        print(f"== {name}: fine-tune {args.finetune_updates} updates", flush=True)
        log_path = run_dir / "train.log"
        _, rss = run_measured(train_command(args, binary, run_dir / "checkpoints", args.finetune_updates, extra),
                              log_path)
        log = log_path.read_text()
        shares = kept_shares(log)
        bleu, chrf, translate_s = score(args, binary, run_dir / "checkpoints" / "checkpoint_last.pt",
                                        run_dir / "generate-test.txt", ref)
        results[name] = {
            "name": name, "pruned": "-" if tau is None else f"{'random ' if random else ''}{tau}%",
            "kept": "100%" if not shares else f"{sum(shares.values()) / len(shares):.1f}%",
            "kept_by_type": shares, "bleu": bleu, "chrf": chrf, "train_s": training_seconds(log), "rss_mb": rss,
            "translate_s": translate_s,
        }
        result_path.write_text(json.dumps(results[name], indent=1))
        print(f"   BLEU {bleu:.2f} chrF {chrf:.2f}", flush=True)
    (out_dir / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    write_table(args, [results[n] for n in VARIANTS if n in results],
                Path(args.out) if args.out else out_dir / "results.md")


if __name__ == "__main__":
    main()
