"""Importance sampling on the Bible corpus: train on a 30% k-means subset and on a 30% random subset, same budget.

    PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1 python examples/translation/sampling.py
    PATH="$PWD/.venv/bin:$PATH" python examples/translation/sampling.py --arms random --max-update 20   # smoke run

1. ``work/sampling/bin``: links to the binarised corpus in ``work/bin`` (that folder is never written to); the
   subsets are written next to the links by ``python -m fluence_fairseq.cli.sample`` as new splits
   ``train30-<arm>`` (both languages, aligned), with ``train30-<arm>.sampling.json`` (indices, cluster sizes, seed).
2. Embeddings: mean encoder output of the trained dense model (``--embed-checkpoint``, default the 1000-update
   ``work/pruning/dense`` model), computed once and cached in ``work/sampling/embeddings.npy``.
3. Every arm trains the same ``fluence_transformer_small`` (width 128, 3+3 layers, the flags of ``compare.py``) with
   ``--train-subset train30-<arm>``, ``--max-update`` updates of at most 4,096 tokens, seed 1, then beam-5
   translation of the 311 test verses scored with sacrebleu (BLEU, chrF). Table: ``work/sampling/results.md``.

Arms (``--arms``, default all four, ~15 min each on one thread): ``random`` (seeded baseline), ``per-cluster`` (30%
of every one of ``--clusters`` clusters, nearest to the centroid first: the subset keeps the corpus' cluster
proportions), ``centroid`` and ``diverse`` (equal counts per cluster: nearest-first, or a seeded random order
inside each cluster).
"""
import argparse
import json
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))


from compare import run, translate_and_score  # noqa: E402  (same subprocess and scoring conventions)


def link_data(source: Path, target: Path):
    """A data dir of symlinks to the prepared corpus, so new splits go to our folder and never into work/bin."""
    target.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.suffix in (".bin", ".idx", ".txt") and not (target / f.name).exists():
            (target / f.name).symlink_to(f.resolve())


def subset_stats(data: Path, split: str):
    from fairseq.data import Dictionary, data_utils

    stats = {}
    for lang in ("en", "es"):
        ds = data_utils.load_indexed_dataset(str(data / f"{split}.en-es.{lang}"), Dictionary.load(
            str(data / f"dict.{lang}.txt")))
        stats[lang] = int(ds.sizes.sum())
        stats["n"] = len(ds)
    return stats


def train_flags(args, data, subset, save_dir):
    dim = args.dim
    return ["fairseq-train", data, "--user-dir", "fluence_fairseq", "--arch", "fluence_transformer_small",
            "--encoder-embed-dim", dim, "--decoder-embed-dim", dim,
            "--encoder-ffn-embed-dim", 4 * dim, "--decoder-ffn-embed-dim", 4 * dim,
            "--share-all-embeddings", "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
            "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", "2e-3", "--lr-scheduler",
            "inverse_sqrt", "--warmup-updates", args.warmup_updates, "--dropout", "0.1", "--max-tokens", "4096",
            "--required-batch-size-multiple", "1", "--max-update", args.max_update, "--cpu", "--num-workers",
            "0", "--seed", "1", "--save-dir", save_dir, "--no-epoch-checkpoints", "--no-save-optimizer-state",
            "--train-subset", subset, "--valid-subset", "valid", "--log-format", "simple", "--log-interval", "100"]


def write_table(args, out_dir):
    order = ["full", "per-cluster", "centroid", "diverse", "random"]
    results = [json.loads(f.read_text()) for f in out_dir.glob("*/result.json")]
    results = [r for r in results if (r["max_update"], r["warmup_updates"], r["dim"]) ==
               (args.max_update, args.warmup_updates, args.dim)]
    results.sort(key=lambda r: order.index(r["arm"]) if r["arm"] in order else len(order))
    lines = [f"Bible en->es, 30% training subsets ({args.clusters} k-means clusters over the mean encoder output of "
             f"`{args.embed_checkpoint_label}`, seed {args.seed}); every model `fluence_transformer_small` width "
             f"{args.dim}, {args.max_update} updates of <= 4096 tokens, {args.warmup_updates} warm-up, seed 1; "
             f"beam 5 on the 311 test verses, sacrebleu (`python examples/translation/sampling.py`).", "",
             "| subset | sentences | en tokens | es tokens | epochs | valid loss | BLEU | chrF |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        epochs = int(r["epochs"]) if str(r["epochs"]).isdigit() else r["epochs"]  # older results stored "007"
        lines.append(f"| {r['arm']} | {r['n']:,} | {r['en']:,} | {r['es']:,} | {epochs} | {r['valid_loss']} | "
                     f"{r['bleu']:.2f} | {r['chrf']:.2f} |")
    text = "\n".join(lines) + "\n"
    (out_dir / "results.md").write_text(text)
    print(text, flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", default="random,per-cluster,centroid,diverse", help="comma list of subsets to train")
    p.add_argument("--size", default="0.3")
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--seed", type=int, default=1, help="seed of k-means and of the random subset")
    p.add_argument("--max-update", type=int, default=600)
    p.add_argument("--warmup-updates", type=int, default=150)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--work", default=str(HERE / "work"))
    p.add_argument("--embed-checkpoint", default=None,
                   help="model whose encoder embeds the sentences (default: WORK/pruning/dense/checkpoints/"
                        "checkpoint_last.pt)")
    p.add_argument("--reuse", action="store_true", help="keep arms already trained")
    args = p.parse_args(argv)
    work = Path(args.work)
    out_dir = work / "sampling"
    data = out_dir / "bin"
    if not (work / "bin" / "train.en-es.en.bin").exists():
        raise SystemExit(f"{work / 'bin'} is missing: prepare the corpus first (PREPARE_ONLY=1 bash {HERE}/run.sh)")
    link_data(work / "bin", data)
    ckpt = Path(args.embed_checkpoint or work / "pruning" / "dense" / "checkpoints" / "checkpoint_last.pt")
    args.embed_checkpoint_label = str(ckpt.relative_to(ROOT)) if ckpt.is_relative_to(ROOT) else str(ckpt)
    embeddings = out_dir / "embeddings.npy"

    from evaluate import read_lines

    ref = read_lines(work / "raw" / "test.es")
    for arm in args.arms.split(","):
        arm_dir = out_dir / arm
        arm_dir.mkdir(parents=True, exist_ok=True)
        subset = "train" if arm == "full" else f"train30-{arm}"
        print(f"== {arm}", flush=True)
        if arm != "full" and not (args.reuse and (data / f"{subset}.en-es.en.bin").exists()):
            cmd = [sys.executable, "-m", "fluence_fairseq.cli.sample", data, "--split", "train", "--out-split", subset,
                   "--size", args.size, "--clusters", args.clusters, "--strategy", arm, "--seed", args.seed,
                   "--source-lang", "en", "--target-lang", "es", "--overwrite", "--no-progress-bar"]
            if arm != "random":
                if embeddings.exists():
                    cmd += ["--embeddings", embeddings]
                else:
                    if not ckpt.exists():
                        raise SystemExit(f"{ckpt} does not exist yet (the dense model is trained by pruning.py)")
                    cmd += ["--path", ckpt, "--save-embeddings", embeddings]
            start = time.time()
            run(cmd, arm_dir / "sampling.log")
            print(f"   subset written in {time.time() - start:.0f} s", flush=True)
        stats = subset_stats(data, subset)
        log_path = arm_dir / "train.log"
        if not (args.reuse and log_path.exists() and "done training" in log_path.read_text()):
            start = time.time()
            run(train_flags(args, data, subset, arm_dir / "checkpoints"), log_path)
            print(f"   trained in {time.time() - start:.0f} s", flush=True)
        log = log_path.read_text()
        valid = re.findall(r"valid on 'valid' subset \| loss ([\d.]+)", log)
        epochs = re.findall(r"epoch (\d+) \| loss", log)
        bleu, chrf, _ = translate_and_score(data, arm_dir / "checkpoints" / "checkpoint_last.pt",
                                            arm_dir / "generate-test.txt", ref)
        result = {"arm": arm, **stats, "epochs": int(epochs[-1]) if epochs else "-",
                  "valid_loss": valid[-1] if valid else "-", "bleu": bleu, "chrf": chrf,
                  "max_update": args.max_update, "warmup_updates": args.warmup_updates, "dim": args.dim}
        (arm_dir / "result.json").write_text(json.dumps(result))
        print(f"   BLEU {bleu:.2f} chrF {chrf:.2f} valid loss {result['valid_loss']}", flush=True)
        write_table(args, out_dir)


if __name__ == "__main__":
    main()
