"""HEX vs baseline on the spurious-token data set (examples/classification/spurious_data.py), through fairseq-train.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python examples/classification/hex.py [--seeds 1 2] [--max-update 600]

For every seed it trains, with the same budget and seed, ``--arch hex_classifier_tiny`` as

* ``baseline``: ``--no-hex`` (the same main + naive network trained and evaluated on F_A = f([h_A, h_G])),
* ``main-only``: ``--no-hex --no-naive`` (the main encoder alone),
* ``hex-paper``: the projection as in the paper/authors' code (train F_P + lambda F_G, evaluate F_L = f([h_A, 0])),
* ``hex``: the same with ``--hex-center --hex-orth-penalty 1 --criterion hex_sentence_prediction`` (the projection
  against the batch-centred naive logits, plus a penalty on the part of F_L the naive logits explain),

then scores ``checkpoint_last.pt`` on the test split (cue independent of the label) with fairseq-validate, and
prints a Markdown table (also written to ``work/results.md``). Output: ``examples/classification/work/``.
"""
import argparse
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
import spurious_data  # noqa: E402

VARIANTS = {
    "baseline": ["--no-hex"],
    "main-only": ["--no-hex", "--no-naive"],
    "hex-paper": [],
    "hex": ["--hex-center", "--hex-orth-penalty", "1", "--criterion", "hex_sentence_prediction"],
}


def run(cmd, log: Path) -> str:
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log.write_text(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}), see {log}:\n{proc.stdout[-3000:]}")
    return proc.stdout


def accuracy(output: str, split: str) -> float:
    hits = re.findall(rf"\| {split} on .*?\| accuracy ([0-9.]+)", output) or re.findall(r"accuracy ([0-9.]+)", output)
    if not hits:
        raise RuntimeError(f"no accuracy in the fairseq-validate output:\n{output[-2000:]}")
    return float(hits[-1])


def train_and_test(data: Path, out: Path, variant: str, seed: int, a) -> float:
    save = out / f"{variant}_seed{seed}"
    save.mkdir(parents=True, exist_ok=True)
    common = ["--user-dir", a.user_dir, "--task", "sentence_prediction", "--num-classes", "2",
              "--cpu", "--num-workers", "0"]
    flags = VARIANTS[variant]
    criterion = [] if "--criterion" in flags else ["--criterion", "sentence_prediction"]
    train = [sys.executable, "-m", "fairseq_cli.train", str(data), *common, *criterion, "--arch", a.arch,
             *flags, *a.model_args, "--seed", str(seed),
             "--optimizer", "adam", "--lr", str(a.lr), "--lr-scheduler", "fixed", "--batch-size", str(a.batch_size),
             "--max-update", str(a.max_update), "--max-epoch", "1000", "--save-dir", str(save),
             "--no-epoch-checkpoints", "--disable-validation", "--log-format", "simple", "--log-interval", "100"]
    run(train, save / "train.log")
    # evaluation: the stock criterion (the penalty exists only in training; prediction is F_L in every HEX mode)
    valid = [sys.executable, "-m", "fairseq_cli.validate", str(data), *common, "--criterion", "sentence_prediction",
             "--path",
             str(save / "checkpoint_last.pt"), "--valid-subset", "test", "--batch-size", "256"]
    return accuracy(run(valid, save / "test.log"), "test")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE / "work")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--arch", default="hex_classifier_tiny")
    p.add_argument("--user-dir", default="fluence_fairseq")
    p.add_argument("--max-update", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--spurious", type=float, default=0.95)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--data-seed", type=int, default=1)
    p.add_argument("--model-args", nargs=argparse.REMAINDER, default=["--dropout", "0"],
                   help="extra model flags for every variant (last option; e.g. --model-args --hex-intercept)")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    raw = spurious_data.generate(a.out / "data", {"train": a.n_train}, a.spurious, a.data_seed)
    data = spurious_data.binarize(raw, a.out / "data" / "bin")
    results = {v: [] for v in a.variants}
    for seed in a.seeds:
        for v in a.variants:
            acc = train_and_test(data, a.out / "runs", v, seed, a)
            results[v].append(acc)
            print(f"{v} seed {seed}: test accuracy {acc:.1f}", flush=True)
    lines = [f"| model | test accuracy (%) per seed {a.seeds} | mean |", "|---|---|---|"]
    for v, accs in results.items():
        lines.append(f"| {v} | {', '.join(f'{x:.1f}' for x in accs)} | {sum(accs) / len(accs):.1f} |")
    table = "\n".join(lines)
    (a.out / "results.md").write_text(
        f"spurious={a.spurious}, n_train={a.n_train}, arch={a.arch}, max_update={a.max_update}, "
        f"batch={a.batch_size}, lr={a.lr}, model args {a.model_args}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
