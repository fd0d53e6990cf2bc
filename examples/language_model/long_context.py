"""Long-context character LM on the bundled Shakespeare: every causal attention with and without memory.

    PATH="$PWD/.venv/bin:$PATH" python examples/language_model/long_context.py --resume   # about 10 hours on 2 cores
    PATH="$PWD/.venv/bin:$PATH" python examples/language_model/long_context.py --max-update 20 \\
        --rows softmax softmax_mem adaptive_span_mem --eval-subset valid                  # smoke run

Every row trains the same model (``--layers`` layers of width ``--dim``, 4 heads, no absolute positions, ALiBi
where the attention takes a relative bias) for the same ``--max-update`` updates of ``--batch-size`` streams x
``--segment`` characters with ``--task fluence_lm_stream`` (Adam, the learning rate falling linearly to 0 at the
last update), then scores the test stream with ``fairseq-eval-lm`` (cut into ``--eval-batch-size`` streams):

* ``<attention>`` rows train and score without memory (``--mem-len``-free softmax sees only its segment; the
  memory of every segment is dropped by resetting it, i.e. ``--segment``-character contexts);
* ``<attention>_mem`` rows carry memory: softmax ``--mem-len``, adaptive span with ``--attn-span``, local
  attention its window, ABC/Performer/S4D their recurrent state, LongShort its window and the compressed chunks
  of the last ``--mem-len`` characters.

Per row: test bits per character (memory rows also with the memory dropped at test: the same weights scoring each
segment alone, which shows what the model draws from its memory; ``--rescore`` fills that column in for rows
trained before it existed), training characters per second (fairseq's ``wps``), peak resident memory of training,
mean and max learned span (adaptive span), and the validation bpc against training time (a plot). The table,
followed by the issue's targets checked on its rows (met or missed, with the numbers), goes to
``WORK/long_context/results.md`` (or ``--out``), the curves to ``bpc_vs_time.png`` and the learned
span of every head of the adaptive-span rows (``fluence-plot spans``) to ``spans_<row>.png`` beside it.
``--resume`` skips the rows ``results.json`` already has with the same settings, so the same command continues a
comparison that does not fit one sitting. ``--by-position`` then scores the kept checkpoints by position in the
segment, with and without their memory (``fluence-stream-bpc``): ``by_position.md`` and ``bpc_by_position.png``.
"""
import argparse
import json
import re
import shutil
import subprocess
from datetime import datetime
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))

from measure import run_measured  # noqa: E402

ADAPTIVE_SPAN = ["--attn-span", "{attn_span}", "--adapt-span-init", "0.02", "--adapt-span-ramp", "32",
                 "--adapt-span-loss-coeff", "2e-6", "--criterion", "adaptive_span_cross_entropy"]
#: row -> (attention, memory?, extra training flags)
ROWS = {
    "softmax": ("softmax", False, []),
    "softmax_mem": ("softmax", True, ["--mem-len", "{mem_len}"]),
    "adaptive_span": ("adaptive_span", False, ADAPTIVE_SPAN),
    "adaptive_span_mem": ("adaptive_span", True, ADAPTIVE_SPAN),
    "local": ("local", False, ["--wsize", "{wsize}"]),
    "local_mem": ("local", True, ["--wsize", "{wsize}"]),
    "abc": ("abc", False, []),
    "abc_mem": ("abc", True, []),
    "performer": ("performer", False, []),
    "performer_mem": ("performer", True, []),
    "s4d": ("s4d", False, []),
    "s4d_mem": ("s4d", True, []),
    "longshort": ("longshort", False, []),
    "longshort_mem": ("longshort", True, ["--mem-len", "{mem_len}"]),
}



def prepare(args, work: Path) -> Path:
    binary = work / "bin"
    if (binary / "test.bin").exists():
        return binary
    subprocess.run([sys.executable, str(HERE / "prepare.py"), "--data", str(HERE / "data"), "--work", str(work)],
                   check=True)
    subprocess.run(["fairseq-preprocess", "--only-source", "--trainpref", work / "chars/train.txt", "--validpref",
                    work / "chars/valid.txt", "--testpref", work / "chars/test.txt", "--destdir", binary,
                    "--workers", "2"], check=True, capture_output=True)
    return binary


def train_command(args, binary, save_dir, attention, memory, extra):
    fill = {"mem_len": args.mem_len, "attn_span": args.attn_span, "wsize": args.wsize}
    extra = [str(e).format(**fill) for e in extra]
    if "--criterion" not in extra:
        extra += ["--criterion", "cross_entropy"]
    cmd = ["fairseq-train", binary, "--user-dir", "fluence_fairseq", "--task", "fluence_lm_stream",
           "--arch", "fluence_transformer_lm", "--decoder-self-attention", attention,
           "--decoder-layers", args.layers, "--decoder-embed-dim", args.dim, "--decoder-ffn-embed-dim", 4 * args.dim,
           "--decoder-attention-heads", 4, "--share-decoder-input-output-embed",
           "--no-token-positional-embeddings", "--attn-position-bias", "alibi",
           "--tokens-per-sample", args.segment, "--batch-size", args.batch_size,
           "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", args.lr, "--lr-scheduler", args.lr_scheduler,
           "--warmup-updates", args.warmup, "--dropout", "0.0", "--max-update", args.max_update,
           "--cpu", "--num-workers", "0", "--seed", args.seed, "--save-dir", save_dir, "--no-epoch-checkpoints",
           "--validate-interval-updates", args.validate_every, "--log-format", "simple", "--log-interval", 50,
           *extra]
    if args.lr_scheduler == "polynomial_decay":
        cmd += ["--end-learning-rate", 0, "--total-num-update", args.max_update]
    if not memory:
        cmd += ["--stream-without-memory"]
    if attention in ("softmax", "longshort") and "--mem-len" not in extra:
        cmd += ["--mem-len", args.segment]  # bounded cache; without memory nothing is carried anyway
    return cmd


def parse_log(text):
    wps = [float(m) for m in re.findall(r"\| wps ([0-9.]+) \|", text)]
    stamps = re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) .*?valid on 'valid' subset \| loss ([0-9.]+).*?"
                        r"num_updates (\d+)", text, re.M)
    first = re.search(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", text, re.M)
    start = datetime.strptime(first.group(1), "%Y-%m-%d %H:%M:%S") if first else None
    valid = [((datetime.strptime(t, "%Y-%m-%d %H:%M:%S") - start).total_seconds(), float(loss), int(updates))
             for t, loss, updates in stamps]  # (seconds since the log began, validation bpc, updates)
    span_avg = re.findall(r"\| train \|.*?span_avg ([0-9.]+)", text)
    span_max = re.findall(r"\| train \|.*?span_max ([0-9.]+)", text)
    return {"wps": wps[-1] if wps else None, "valid_curve": valid,
            "span_avg": float(span_avg[-1]) if span_avg else None,
            "span_max": float(span_max[-1]) if span_max else None}


#: the arguments that make rows comparable: a table only shows rows trained and scored with the same ones
SETTINGS = ("dim", "layers", "segment", "batch_size", "max_update", "lr", "lr_scheduler", "warmup", "mem_len",
            "attn_span", "wsize", "seed", "eval_subset", "eval_batch_size")


def settings(args) -> dict:
    return {name: getattr(args, name) for name in SETTINGS}


def earlier_rows(args, out_dir: Path) -> dict:
    """The rows a previous sitting left in ``out_dir/results.json`` (a comparison too long for one sitting is run
    a few rows at a time with the same command); rows trained again now are replaced."""
    saved = out_dir / "results.json"
    if not saved.exists():
        return {}
    rows = json.loads(saved.read_text())
    for row, r in rows.items():
        if row not in args.rows and r.get("settings") != settings(args):
            print(f"{row}: kept in results.json but not in the table (trained with other settings: "
                  f"{r.get('settings')})", flush=True)
    return {row: r for row, r in rows.items()
            if row not in args.rows or (args.resume and r.get("settings") == settings(args))}


def write_results(args, results, out_dir: Path) -> str:
    """results.json (every row) and the Markdown table of the rows with this run's settings (rewritten after every
    row, so a long run shows what it has)."""
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    results = {row: results[row] for row in ROWS
               if row in results and results[row].get("settings", settings(args)) == settings(args)}
    schedule = "linear decay to 0" if args.lr_scheduler == "polynomial_decay" else "inverse square root"
    lines = [f"Character LM, {args.layers} layers x {args.dim}, segments of {args.segment} characters x "
             f"{args.batch_size} streams, {args.max_update} updates (Adam, lr {args.lr:g} after {args.warmup} "
             f"warm-up updates, {schedule}), seed {args.seed}; the {args.eval_subset} stream "
             f"scored with `fairseq-eval-lm --task fluence_lm_stream --batch-size {args.eval_batch_size}`. Train "
             "chars/s: fairseq's wps over the last epoch; span avg / max: the spans with the ramp, as the last epoch's "
             "training log averages them.", "",
             f"| row | memory | {args.eval_subset} bpc | memory dropped at {args.eval_subset} | train chars/s | "
             "train s | peak RSS MB | span avg / max |",
             "|---|---|---|---|---|---|---|---|"]
    for row, r in results.items():
        spans = f"{r['span_avg']} / {r['span_max']}" if r["span_avg"] is not None else "-"
        dropped = r.get("test_bpc_memory_dropped")
        lines.append(f"| {row} | {'yes' if r['memory'] else 'no'} | {r['test_bpc']:.3f} | "
                     f"{'-' if dropped is None else f'{dropped:.3f}'} | {r['wps']} | "
                     f"{r['train_seconds']:.0f} | {r['peak_rss_mb']:.0f} | {spans} |")
    lines += target_lines(args, results)
    target = Path(args.out) if args.out else out_dir / "results.md"
    target.write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def target_lines(args, results) -> list:
    """The issue's bars checked on the rows of the table (a bar whose rows are not in yet says so). Step time is
    1 / training characters per second, so a time ratio is the inverse ratio of ``wps``."""
    from fluence_fairseq.modules.registry import get_attention

    lines = ["", "Targets, checked on the rows above (step time ratios from the training characters per second):", ""]
    missing = []

    def rows(*names):
        absent = [n for n in names if n not in results]
        missing.extend(n for n in absent if n not in missing)
        return None if absent else [results[n] for n in names]

    if rows("softmax"):
        bpc = results["softmax"]["test_bpc"]
        lines.append(f"- softmax without memory at most 2.1 {args.eval_subset} bpc: {bpc:.3f}, {_verdict(bpc <= 2.1)}")
    if rows("adaptive_span_mem", "softmax_mem"):
        span, soft = results["adaptive_span_mem"], results["softmax_mem"]
        gap = span["test_bpc"] - soft["test_bpc"]
        lines.append(f"- adaptive span with memory at most softmax with memory + 0.02 bpc: {span['test_bpc']:.3f} "
                     f"vs {soft['test_bpc']:.3f} ({gap:+.3f}), {_verdict(gap <= 0.02)}")
        ratio = soft["wps"] / span["wps"] if soft["wps"] and span["wps"] else float("nan")
        lines.append(f"- adaptive span with memory, training step at most 0.6x softmax with memory's: {ratio:.2f}x, "
                     f"{_verdict(ratio <= 0.6)}")
    if rows("adaptive_span_mem") and results["adaptive_span_mem"]["span_avg"] is not None:
        mean = results["adaptive_span_mem"]["span_avg"]
        lines.append(f"- adaptive span with memory, mean span at most a quarter of --attn-span "
                     f"({args.attn_span / 4:g}): {mean:g}, {_verdict(mean <= args.attn_span / 4)}")
    for row, (attention, memory, _) in ROWS.items():
        if not memory or not rows(attention, row):
            continue
        with_mem, without = results[row]["test_bpc"], results[attention]["test_bpc"]
        lines.append(f"- {attention}: memory beats no memory on {args.eval_subset} bpc: {with_mem:.3f} vs "
                     f"{without:.3f} ({with_mem - without:+.3f}), {_verdict(with_mem < without)}")
        if get_attention(attention).cls.constant_state and results[attention]["wps"] and results[row]["wps"]:
            ratio = results[attention]["wps"] / results[row]["wps"]
            lines.append(f"- {attention} (constant state): training step with carried state at most 1.1x without: "
                         f"{ratio:.2f}x over the last pass, {_verdict(ratio <= 1.1)} (per step however far the "
                         "stream has gone: `make bench-memory`)")
    if missing:
        lines.append(f"- not measured yet (rows not in the table): {', '.join(missing)}")
    return lines


def plot(results, path: Path) -> None:
    """Validation bpc against training updates and against training wall time, one line per row."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for row, r in results.items():
        curve = [point for point in r.get("valid_curve", []) if len(point) == 3]
        if curve:
            seconds, bpc, updates = zip(*curve)
            style = "-" if r["memory"] else "--"
            axes[0].plot(updates, bpc, style, marker="o", label=row)
            axes[1].plot(seconds, bpc, style, marker="o", label=row)
    axes[0].set_xlabel("training updates")
    axes[1].set_xlabel("training wall time (s, validation included)")
    axes[0].set_ylabel("validation bits per character")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def merge(args) -> int:
    """Combine the rows of several runs into one table and plot (the later run of a row wins): rows of one
    comparison that did not fit one sitting. Each source is a run's ``long_context`` directory (its logs are
    re-read) or a saved ``results.json`` (rows kept as they are; a row without a validation curve is not plotted)."""
    results = {}
    for source in map(Path, args.merge):
        directory = source if source.is_dir() else None
        previous = json.loads(((directory / "results.json") if directory else source).read_text())
        for row, r in previous.items():
            if directory is not None:
                r.update(parse_log((directory / row / "train.log").read_text()))
            r["run"] = str(source)
            results[row] = r
    ordered = {row: results[row] for row in ROWS if row in results}
    out_dir = Path(args.work) / "long_context"
    out_dir.mkdir(parents=True, exist_ok=True)
    print(write_results(args, ordered, out_dir))
    plot(ordered, Path(args.out).with_suffix(".png") if args.out else out_dir / "bpc_vs_time.png")
    return 0


DROPPED_LOG = "eval_memory_dropped.log"


def score(args, binary, run_dir: Path, memory: bool, log_name: str = "eval.log"):
    """(bits per character of the ``--eval-subset`` stream, seconds) of the row's last checkpoint, with or without
    carrying memory from one segment to the next; fairseq-eval-lm's output goes to ``run_dir / log_name``."""
    log = run_dir / log_name
    evaluation = ["fairseq-eval-lm", binary, "--user-dir", "fluence_fairseq", "--task", "fluence_lm_stream",
                  "--path", run_dir / "checkpoint_last.pt", "--gen-subset", args.eval_subset,
                  "--batch-size", args.eval_batch_size,
                  "--tokens-per-sample", args.segment, "--cpu", "--num-workers", 0]
    if not memory:
        evaluation += ["--stream-without-memory"]
    seconds, _ = run_measured(evaluation, log)
    return float(re.search(r"Loss \(base 2\): ([0-9.]+)", log.read_text()).group(1)), seconds


def rescore(args) -> int:
    """Score the memory rows of ``results.json`` that have no bpc with the memory dropped yet, from their kept
    checkpoints (rows trained before that column existed)."""
    out_dir = Path(args.work) / "long_context"
    results = json.loads((out_dir / "results.json").read_text())
    binary = prepare(args, Path(args.work))
    for row, r in results.items():
        if r["memory"] and "test_bpc_memory_dropped" not in r and (out_dir / row / "checkpoint_last.pt").exists():
            r["test_bpc_memory_dropped"] = score(args, binary, out_dir / row, False, DROPPED_LOG)[0]
            print(f"{row}: {r['test_bpc_memory_dropped']:.3f} bpc with the memory dropped", flush=True)
    print(write_results(args, results, out_dir))
    return 0


def by_position_command(args, binary, out_dir: Path, rows) -> list:
    """``fluence-stream-bpc`` over the kept checkpoints of ``rows``, scored as the table scores them."""
    cmd = [sys.executable, "-m", "fluence_fairseq.cli.stream_bpc", str(binary), "--subset", args.eval_subset,
           "--batch-size", str(args.eval_batch_size), "--cpu", "--out", str(out_dir / "by_position.md"),
           "--plot", str(out_dir / "bpc_by_position.png"), "--json", str(out_dir / "by_position.json")]
    for row in rows:
        cmd += ["--path", str(out_dir / row / "checkpoint_last.pt"), "--label", row]
    return cmd


def by_position(args) -> int:
    """Bits per character by position in the segment, with and without the memory, of every row of
    ``results.json`` (in ``--rows``) whose checkpoint is kept: where in a segment each model's memory pays."""
    out_dir = Path(args.work) / "long_context"
    results = json.loads((out_dir / "results.json").read_text())
    rows = [row for row in args.rows if row in results and (out_dir / row / "checkpoint_last.pt").exists()]
    if not rows:
        raise SystemExit(f"--by-position: no row of {out_dir / 'results.json'} in --rows has its checkpoint kept "
                         f"under {out_dir}/ROW/checkpoint_last.pt (train the rows first)")
    subprocess.run(by_position_command(args, prepare(args, Path(args.work)), out_dir, rows), check=True)
    print((out_dir / "by_position.md").read_text())
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--work", default=str(HERE / "work"))
    p.add_argument("--out", default=None)
    p.add_argument("--dim", type=int, default=160)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--segment", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-update", type=int, default=8000)
    p.add_argument("--validate-every", type=int, default=1000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--lr-scheduler", default="polynomial_decay", choices=["inverse_sqrt", "polynomial_decay"],
                   help="polynomial_decay: linear from --lr after the warm-up to 0 at --max-update")
    p.add_argument("--mem-len", type=int, default=2048)
    p.add_argument("--attn-span", type=int, default=4096)
    p.add_argument("--wsize", type=int, default=64)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--eval-subset", default="test")
    p.add_argument("--eval-batch-size", type=int, default=8,
                   help="streams scored in parallel (1: every character but the first; B: faster, leaves out the "
                        "first character of each row and the last < B)")
    p.add_argument("--resume", action="store_true",
                   help="skip the rows that results.json already has with these settings (a comparison too long "
                        "for one sitting: run the same command again)")
    p.add_argument("--rescore", action="store_true",
                   help="instead of training: score the memory rows of results.json with the memory dropped at "
                        "test, where that column is missing (from their checkpoints)")
    p.add_argument("--by-position", action="store_true",
                   help="instead of training: bits per character by position in the segment, with and without the "
                        "memory, of the rows (of --rows) whose checkpoints are kept (fluence-stream-bpc): "
                        "by_position.md, bpc_by_position.png and by_position.json beside results.md")
    p.add_argument("--merge", nargs="+", default=None, metavar="DIR_OR_JSON",
                   help="instead of training: combine the rows of earlier runs (their long_context directories, or "
                        "saved results.json files)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    if args.rescore:
        return rescore(args)
    if args.by_position:
        return by_position(args)
    work = Path(args.work)
    out_dir = work / "long_context"
    out_dir.mkdir(parents=True, exist_ok=True)
    binary = prepare(args, work)
    results = earlier_rows(args, out_dir)
    done = [row for row in args.rows if row in results]  # with --resume: finished with these settings
    if done:
        print(f"--resume: already in {out_dir / 'results.json'} with these settings: {', '.join(done)}", flush=True)
    for row in args.rows:
        if row in done:
            continue
        attention, memory, extra = ROWS[row]
        run_dir = out_dir / row
        if run_dir.exists():  # a row interrupted in an earlier sitting starts again (fairseq would resume it)
            shutil.rmtree(run_dir)
        run_dir.mkdir()
        seconds, rss = run_measured(train_command(args, binary, run_dir, attention, memory, extra),
                                    run_dir / "train.log")
        log = (run_dir / "train.log").read_text()
        bpc, eval_seconds = score(args, binary, run_dir, memory)
        results[row] = {"attention": attention, "memory": memory, "test_bpc": bpc, "train_seconds": seconds,
                        "peak_rss_mb": rss, "eval_seconds": eval_seconds, "settings": settings(args),
                        "finished": datetime.now().isoformat(timespec="seconds"), **parse_log(log)}
        if memory:  # the same weights with the memory dropped at test: what the model draws from it
            results[row]["test_bpc_memory_dropped"] = score(args, binary, run_dir, False, DROPPED_LOG)[0]
        if attention == "adaptive_span":  # the learned span of every head (the paper's figure)
            subprocess.run(["fluence-plot", "spans", run_dir / "checkpoint_last.pt", "-o", out_dir / f"spans_{row}.png",
                            "--include-ramp", "--title", f"{row}: learned spans (with the ramp) after "
                            f"{args.max_update} updates"], check=True, capture_output=True)
        print(f"{row}: {bpc:.3f} bpc, {seconds:.0f} s, {results[row]['wps']} chars/s", flush=True)
        # the file as it is now, with this row: what another process (--rescore, another sitting) wrote meanwhile stays
        saved = out_dir / "results.json"
        results = {**(json.loads(saved.read_text()) if saved.exists() else {}), row: results[row]}
        write_results(args, results, out_dir)
    print(write_results(args, results, out_dir))
    plot({row: r for row, r in results.items() if r.get("settings") == settings(args)}, out_dir / "bpc_vs_time.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
