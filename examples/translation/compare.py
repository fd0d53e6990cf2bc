"""Train the same small transformer on the Bible corpus with every attention and report BLEU side by side.

    PATH="$PWD/.venv/bin:$PATH" python examples/translation/compare.py            # all attentions, ~5 min each
    PATH="$PWD/.venv/bin:$PATH" python examples/translation/compare.py --attentions softmax,local --max-update 200

Every model is ``--arch transformer_<name>_small`` (``fluence_transformer_small`` for softmax): 3+3 layers, 4
heads, width ``--dim`` (ffn 4x), shared embeddings, the attention wherever its math allows and softmax elsewhere
(the table says where), each attention's default hyper-parameters. All get the same budget: the same data,
``--max-update`` Adam updates of at most 4,096 tokens, lr 2e-3 (inverse sqrt, ``--warmup-updates``), dropout 0.1, label
smoothing 0.1, seed 1 (``--seeds 1,2,3``: once per seed, the table gives mean and 95% interval); then beam-5 translation of the 311 test verses scored with sacrebleu (the same scoring
as ``run.sh``). Uses ``fairseq-*`` from PATH and the data prepared by ``run.sh`` in ``work/bin`` (prepared here
if missing). Writes ``work/compare/<name>/`` (logs, checkpoint, ``result.json``) and the table of every result
found there to ``--out``, so one attention can be rerun alone. A failing attention is reported, not fatal.
"""
import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

DEFAULT_ATTENTIONS = ("softmax,local,abc,nystrom,performer,lara,cosformer,probsparse,s4d,longshort,"
                      "sparsemax,entmax15,alpha_entmax")


def run(cmd, log_path):
    with open(log_path, "w") as log:
        proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = Path(log_path).read_text()[-3000:]
        raise SystemExit(f"{cmd[0]} failed (see {log_path}):\n{tail}")


def translate_and_score(binary, checkpoint, out_txt, ref, beam=5, max_len_b=200):
    """Beam-search the test set with ``checkpoint`` into ``out_txt``; return (BLEU, chrF, wall seconds) against the
    raw references ``ref`` (sacrebleu, the scoring of ``run.sh``)."""
    import time

    import sacrebleu
    from evaluate import read_hypotheses

    start = time.time()
    run(["fairseq-generate", binary, "--user-dir", "fluence_fairseq", "--path", checkpoint, "--source-lang", "en",
         "--target-lang", "es", "--gen-subset", "test", "--beam", beam, "--max-len-b", max_len_b,
         "--batch-size", "64", "--required-batch-size-multiple", "1", "--remove-bpe", "sentencepiece", "--cpu",
         "--seed", "1"], out_txt)
    seconds = time.time() - start
    hyp = read_hypotheses(out_txt, len(ref))
    return (sacrebleu.metrics.BLEU().corpus_score(hyp, [ref]).score,
            sacrebleu.metrics.CHRF().corpus_score(hyp, [ref]).score, seconds)


def training_seconds(log):
    """Wall time from fairseq's first training iteration to 'done training', from the log's timestamps."""
    from datetime import datetime

    def stamp(marker):
        line = next(ln for ln in log.splitlines() if marker in ln)
        return datetime.strptime(line[:19], "%Y-%m-%d %H:%M:%S")

    return (stamp("done training") - stamp("Start iterating over samples")).total_seconds()


def arch_of(name):
    return "fluence_transformer_small" if name == "softmax" else f"transformer_{name}_small"


def roles_of(arch):
    import fluence_fairseq  # noqa: F401
    from fluence_fairseq.models import ARCHITECTURES

    row = next(a for a in ARCHITECTURES if a.name == arch)
    short = {"encoder_self_attention": "enc self", "decoder_self_attention": "dec self", "cross_attention": "cross"}
    return ", ".join(f"{short[role]}={name}" for role, name in row.attention.items())


#: two-sided 95% Student t quantiles by degrees of freedom (seeds - 1)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(values):
    """(mean, half-width of the two-sided 95% t interval; nan for one value)."""
    import math
    import statistics

    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, math.nan
    return mean, _T95.get(n - 1, 1.96) * statistics.stdev(values) / math.sqrt(n)


def run_dir(work, name, seed, tag=""):
    """Seed 1 keeps the single-seed layout (``compare/<name>``); other seeds get ``compare/<name>-seed<N>``; a
    ``--tag`` (a variant trained with ``--train-args``) is appended to the name: ``compare/<name>+<tag>``."""
    label = f"{name}+{tag}" if tag else name
    return work / "compare" / (label if seed == 1 else f"{label}-seed{seed}")


def write_table(args, work):
    """The table of every result in WORK/compare with this run's budget; attentions with several seeds get one row
    with the mean and the 95% interval over seeds, and the seeds' own values."""
    order = DEFAULT_ATTENTIONS.split(",")
    results = [json.loads(f.read_text()) for f in (work / "compare").glob("*/result.json")]
    results.sort(key=lambda r: (order.index(r["name"]) if r["name"] in order else len(order), r.get("seed", 1)))
    budget = (args.max_update, args.dim, args.warmup_updates)
    lines = [f"Bible en->es test set (311 verses), beam 5, sacrebleu; every model {args.max_update} updates at width "
             f"{args.dim}, 3+3 layers, 4 heads, {args.warmup_updates} warm-up updates "
             f"(`python examples/translation/compare.py --max-update {args.max_update} --dim {args.dim}`); "
             "several seeds: mean ± half-width of the 95% t interval, then each seed.", "",
             "| attention | where | seeds | params | train wall s | valid loss | BLEU | chrF |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        r["label"] = f"{r['name']}+{r['tag']}" if r.get("tag") else r["name"]
    names = list(dict.fromkeys(r["label"] for r in results))
    for name in names:
        runs = [r for r in results if r["label"] == name]
        failed = [r for r in runs if r.get("failed")]
        done = [r for r in runs if not r.get("failed")
                and (r["max_update"], r["dim"], r.get("warmup_updates")) == budget]  # other budgets: not comparable
        if failed:
            lines.append(f"| {name} | {failed[0]['where']} | {', '.join(str(r.get('seed', 1)) for r in failed)} | - | - "
                         f"| - | training failed | - |")
        if not done:
            continue
        seeds = ", ".join(str(r.get("seed", 1)) for r in done)
        if done[0].get("train_args"):
            name = f"{name} (`{done[0]['train_args']}`)"
        train_s = sum(r["train_s"] for r in done) / len(done)
        if len(done) == 1:
            r = done[0]
            lines.append(f"| {name} | {r['where']} | {seeds} | {r['params']} | {train_s:.0f} | {r['valid_loss']} | "
                         f"{r['bleu']:.2f} | {r['chrf']:.2f} |")
            continue
        cells = []
        for key, fmt in (("valid_loss", "{:.3f}"), ("bleu", "{:.2f}"), ("chrf", "{:.2f}")):
            values = [float(r[key]) for r in done]
            mean, half = mean_ci(values)
            cells.append(f"{fmt.format(mean)} ± {fmt.format(half)} ({' / '.join(fmt.format(x) for x in values)})")
        lines.append(f"| {name} | {done[0]['where']} | {seeds} | {done[0]['params']} | {train_s:.0f} | "
                     + " | ".join(cells) + " |")
    write_markdown(lines, Path(args.out) if args.out else work / "compare" / "results.md")


def write_markdown(lines, target):
    """Write the table (a list of lines) to ``target`` and print it."""
    text = "\n".join(lines) + "\n"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    print(text, flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attentions", default=DEFAULT_ATTENTIONS)
    p.add_argument("--max-update", type=int, default=400)
    p.add_argument("--warmup-updates", type=int, default=100)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--work", default=str(HERE / "work"))
    p.add_argument("--seeds", default="1", help="comma-separated training seeds; every attention is trained once per "
                   "seed and the table gives the mean and 95%% interval over seeds [default: 1]")
    p.add_argument("--reuse", action="store_true", help="keep models already trained in WORK/compare/<name>/")
    p.add_argument("--table-only", action="store_true", help="only rewrite the table from the results found")
    p.add_argument("--train-args", default="", help="extra fairseq-train arguments (one string), for a variant of "
                   "the default setup; needs --tag")
    p.add_argument("--tag", default="", help="name of the variant: runs go to compare/<name>+<tag>, and the table "
                   "shows <name>+<tag> with its --train-args")
    p.add_argument("--out", default=None, help="markdown table (default: WORK/compare/results.md)")
    args = p.parse_args(argv)
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        p.error(f"--seeds: expected distinct integers, got {args.seeds!r}")
    if bool(args.train_args) != bool(args.tag) or not re.fullmatch(r"[A-Za-z0-9_.-]*", args.tag):
        p.error("--train-args and --tag go together; --tag is letters, digits, '.', '_' or '-'")
    work = Path(args.work)
    if args.table_only:
        write_table(args, work)
        return
    binary = work / "bin"
    if not (binary / "test.en-es.es.bin").exists():
        subprocess.run(["bash", str(HERE / "run.sh")], cwd=ROOT, check=True,
                       env={**__import__("os").environ, "PREPARE_ONLY": "1"})
    from evaluate import read_lines

    ref = read_lines(work / "raw" / "test.es")
    for name, seed in [(name, seed) for name in args.attentions.split(",") for seed in seeds]:
        out = run_dir(work, name, seed, args.tag)
        out.mkdir(parents=True, exist_ok=True)
        arch = arch_of(name)
        train = ["fairseq-train", binary, "--user-dir", "fluence_fairseq", "--arch", arch,
                 "--encoder-embed-dim", args.dim, "--decoder-embed-dim", args.dim,
                 "--encoder-ffn-embed-dim", 4 * args.dim, "--decoder-ffn-embed-dim", 4 * args.dim,
                 "--share-all-embeddings", "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
                 "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", "2e-3", "--lr-scheduler",
                 "inverse_sqrt", "--warmup-updates", args.warmup_updates, "--dropout", "0.1", "--max-tokens", "4096",
                 "--required-batch-size-multiple", "1", "--max-update", args.max_update, "--cpu", "--num-workers",
                 "0", "--seed", seed, "--save-dir", out / "checkpoints", "--no-epoch-checkpoints",
                 "--log-format", "simple", "--log-interval", "100", *shlex.split(args.train_args)]
        print(f"== {name} (seed {seed}): {arch}", flush=True)
        done = out / "train.log"
        if args.reuse and done.exists() and "done training" in done.read_text():
            print("   reusing the trained checkpoint", flush=True)
        else:
            try:
                run(train, out / "train.log")
            except SystemExit as failure:
                print(failure, flush=True)
                (out / "result.json").write_text(json.dumps({"name": name, "where": roles_of(arch), "failed": True,
                                                             "seed": seed, "tag": args.tag}))
                continue
        train_s = training_seconds(done.read_text())
        log = (out / "train.log").read_text()
        params = re.search(r"num\. (?:shared )?model params: ([\d,]+)", log).group(1)
        valid = re.findall(r"valid on 'valid' subset \| loss ([\d.]+)", log)
        bleu, chrf, _ = translate_and_score(binary, out / "checkpoints" / "checkpoint_last.pt",
                                            out / "generate-test.txt", ref)
        result = {"name": name, "where": roles_of(arch), "params": params, "train_s": train_s,
                  "valid_loss": valid[-1] if valid else "-", "bleu": bleu, "chrf": chrf,
                  "max_update": args.max_update, "dim": args.dim, "warmup_updates": args.warmup_updates, "seed": seed,
                  "tag": args.tag, "train_args": args.train_args}
        (out / "result.json").write_text(json.dumps(result))
        print(f"   BLEU {bleu:.2f} chrF {chrf:.2f} valid loss {result['valid_loss']} ({train_s:.0f} s)", flush=True)
        write_table(args, work)


if __name__ == "__main__":
    main()
