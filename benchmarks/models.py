"""Training throughput of whole fluence models (``--arch`` names), as ratios to a baseline model in the same run.

    python -m benchmarks.models --preset sparse --out benchmarks/results/sparse_training

Each case builds a model with fairseq's ``build_model`` (dictionary of ``--vocab`` symbols), and times full
training steps on one fixed random batch: forward, cross entropy over the vocabulary, backward and an Adam step.
Throughput is target tokens per second (median over ``--repeats`` steps after ``--warmup`` steps); every model
runs in a fresh process, and its peak memory (the RSS increase of one step, see :mod:`benchmarks.common`)
in another. The ``sparse`` preset compares ``transformer_{sparsemax,entmax15,alpha_entmax}`` with the softmax model
of the same sizes in three settings: the ``_small`` translation sizes and the base sizes on sentence-length
batches (as in the paper's machine translation), and a base-size language model on 512-token blocks, where the
attention matrices are largest relative to the rest of the model. ``--model-args`` adds model flags to every
setting's (``--model-args "--attention-dropout 0.1"``: every model trains with that attention dropout).
"""
import argparse
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .common import (MEMORY_ENV, add_allocator_argument, allocator_of, peak_rss_increase_mb, run_in_fresh_process,
                     use_allocator, warm_up)


@dataclass(frozen=True)
class Setting:
    name: str
    baseline: str  # --arch of the reference model
    archs: Sequence[str]  # --arch of every compared model
    batch: int
    src_len: int  # 0 for a language model
    tgt_len: int
    doc: str = ""
    extra: Sequence[str] = ()  # model flags for every arch


#: attention -> minimum throughput ratio to the setting's (softmax) baseline: the issue's targets
SPARSE_TARGETS = {"alpha_entmax": 0.8, "entmax15": 0.9}


def _sparse_setting(name, model_prefix, suffix, baseline, batch, src_len, tgt_len, doc):
    archs = [f"{model_prefix}{n}{suffix}" for n in ("sparsemax", "entmax15", "alpha_entmax")]
    return Setting(name, baseline, archs, batch, src_len, tgt_len, doc)


PRESETS: Dict[str, List[Setting]] = {
    "sparse": [
        _sparse_setting("mt_small", "transformer_", "_small", "fluence_transformer_small", 128, 32, 32,
                        "translation, _small sizes (3+3 layers, 256, 4 heads), 128 pairs of 32+32 tokens"),
        _sparse_setting("mt_base", "transformer_", "", "fluence_transformer", 64, 32, 32,
                        "translation, base sizes (6+6 layers, 512, 8 heads), 64 pairs of 32+32 tokens"),
        _sparse_setting("lm_base", "transformer_lm_", "", "fluence_transformer_lm", 4, 0, 512,
                        "language model, base sizes (6 layers, 512, 8 heads), 4 blocks of 512 tokens"),
    ],
    # long blocks: the entmax family's passes keep no L x L tensor there (ops.entmax_attention); no targets
    "sparse_long": [
        _sparse_setting("lm_long", "transformer_lm_", "", "fluence_transformer_lm", 1, 0, 4096,
                        "language model, base sizes (6 layers, 512, 8 heads), 1 block of 4096 tokens"),
    ],
}
#: the throughput targets of each preset (attention -> minimum ratio to the baseline)
PRESET_TARGETS: Dict[str, Dict[str, float]] = {"sparse": SPARSE_TARGETS, "sparse_long": {}}


@dataclass
class BenchModelsConfig:
    settings: List[Setting]
    vocab: int = 8000
    warmup: int = 2
    repeats: int = 5
    threads: Optional[int] = None
    allocator: str = "steady"  # of the timing workers, see benchmarks.common.use_allocator
    targets: Dict[str, float] = field(default_factory=lambda: dict(SPARSE_TARGETS))


# ------------------------------------------------------------------------------------------------- worker
def _build(arch: str, extra: Sequence[str], vocab: int):
    from fairseq.data import Dictionary
    from fairseq.models import ARCH_MODEL_REGISTRY, build_model
    from fairseq.tasks import FairseqTask

    import fluence_fairseq  # noqa: F401  (registers the archs)

    dictionary = Dictionary()
    for i in range(vocab - dictionary.nspecial):
        dictionary.add_symbol(f"w{i}")
    dictionary.finalize(padding_factor=1)

    class _Task(FairseqTask):
        source_dictionary = target_dictionary = property(lambda self: dictionary)

    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    ARCH_MODEL_REGISTRY[arch].add_args(parser)
    args = parser.parse_args(list(extra))
    args.arch = arch
    args.tokens_per_sample = 4096  # LM positions
    args.max_source_positions = args.max_target_positions = 4096
    task = _Task(args)
    return build_model(args, task), dictionary  # runs the --arch function, as fairseq-train does


def _check_model_args(settings: Sequence[Setting]) -> None:
    """Refuses model flags that an ``--arch`` of the settings does not take, before any model is built (a worker
    would fail with the parser's message only)."""
    from fairseq.models import ARCH_MODEL_REGISTRY

    import fluence_fairseq  # noqa: F401  (registers the archs)

    for setting in settings:
        for arch in [setting.baseline, *setting.archs]:
            parser = argparse.ArgumentParser(prog=arch, argument_default=argparse.SUPPRESS, add_help=False)
            ARCH_MODEL_REGISTRY[arch].add_args(parser)
            _, unknown = parser.parse_known_args(list(setting.extra))
            if unknown:
                raise SystemExit(f"--model-args: {arch} does not take {unknown}")


def _worker(job: dict) -> dict:
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    model, dictionary = _build(job["arch"], job["extra"], job["vocab"])
    model.train()
    gen = torch.Generator().manual_seed(1)
    low = dictionary.nspecial
    bsz, src_len, tgt_len = job["batch"], job["src_len"], job["tgt_len"]
    prev = torch.randint(low, job["vocab"], (bsz, tgt_len), generator=gen)
    target = torch.randint(low, job["vocab"], (bsz, tgt_len), generator=gen)
    if src_len:
        src = torch.randint(low, job["vocab"], (bsz, src_len), generator=gen)
        net_input = {"src_tokens": src, "src_lengths": torch.full((bsz,), src_len), "prev_output_tokens": prev}
    else:
        net_input = {"src_tokens": prev}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = model(**net_input)[0]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1))
        loss.backward()
        optimizer.step()

    if job.get("memory_only"):
        return {"peak_mem_mb": peak_rss_increase_mb(step)}
    allocator = use_allocator(job.get("allocator", "steady"))
    for _ in range(job["warmup"] - 1):
        step()
    warm_up(step, allocator)
    times = []
    for _ in range(job["repeats"]):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    return {"step_s_median": seconds, "step_s_min": min(times), "tokens_per_s": bsz * tgt_len / seconds,
            "params": sum(p.numel() for p in model.parameters()), "allocator": allocator}


def _run(job: dict, extra_env: Optional[Dict[str, str]] = None) -> dict:
    return run_in_fresh_process("benchmarks.models", job, job["arch"], extra_env)


# ------------------------------------------------------------------------------------------------- driver
def attention_of(arch: str) -> str:
    """The attention an ``--arch`` of the table names (``fluence_transformer*``: softmax)."""
    if arch.startswith("fluence_transformer"):
        return "softmax"
    for prefix in ("transformer_lm_", "transformer_"):
        if arch.startswith(prefix):
            name = arch[len(prefix):]
            for suffix in ("_small", "_tiny"):
                if name.endswith(suffix):
                    name = name[: -len(suffix)]
            return name
    return arch


def run_benchmark(cfg: BenchModelsConfig, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict:
    from .attention import machine_info

    started = time.perf_counter()
    rows = []
    for setting in cfg.settings:
        for arch in [setting.baseline, *setting.archs]:
            job = {"arch": arch, "extra": list(setting.extra), "vocab": cfg.vocab, "batch": setting.batch,
                   "src_len": setting.src_len, "tgt_len": setting.tgt_len, "warmup": cfg.warmup,
                   "repeats": cfg.repeats, "threads": cfg.threads, "allocator": cfg.allocator}
            result = _run(job)
            result["peak_mem_mb"] = _run({**job, "memory_only": True}, MEMORY_ENV)["peak_mem_mb"]
            row = {"setting": setting.name, "arch": arch, "attention": attention_of(arch),
                   "baseline": arch == setting.baseline, **result}
            rows.append(row)
            log(f"{setting.name} {arch}: {result['tokens_per_s']:.0f} tokens/s, {result['peak_mem_mb']:.0f} MiB")
    for row in rows:
        setting = next(s for s in cfg.settings if s.name == row["setting"])
        base = next(r for r in rows if r["setting"] == row["setting"] and r["arch"] == setting.baseline)
        row["throughput_vs_baseline"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["mem_vs_baseline"] = row["peak_mem_mb"] / base["peak_mem_mb"] if base["peak_mem_mb"] > 0 else float("nan")
        limit = None if row["baseline"] else cfg.targets.get(row["attention"])
        row["target"] = limit
        row["met"] = None if limit is None else bool(row["throughput_vs_baseline"] >= limit)
    machine = machine_info()
    if cfg.threads:  # the workers' setting, not the driver's
        machine.update(threads=cfg.threads, threads_from="--threads")
    machine["allocator"] = rows[0].get("allocator") if rows else None
    return {"machine": machine, "config": asdict(cfg), "rows": rows, "wall_s": time.perf_counter() - started}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Training throughput (target tokens/s; forward, loss, backward, Adam step) on {m['cpu']}, "
             f"{m['threads']} threads ({m['threads_from']}), torch {m['torch']}; 1-min load "
             f"{m['load_avg_1min']:.2f} at the end; allocator {allocator_of(m)}. "
             "Ratios are to the setting's baseline model (first row) in the same run.", ""]
    for setting in report["config"]["settings"]:
        flags = f" Model flags: `{' '.join(setting['extra'])}`." if setting["extra"] else ""
        lines += [f"**{setting['name']}**: {setting['doc']}.{flags}" if flags else
                  f"**{setting['name']}**: {setting['doc']}", "",
                  "| attention | --arch | params | tokens/s | vs baseline | peak MiB | vs baseline | target |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in (r for r in report["rows"] if r["setting"] == setting["name"]):
            target = "-" if r["target"] is None else f">= {r['target']:.2f}: {'met' if r['met'] else 'MISSED'}"
            lines.append(f"| {r['attention']} | `{r['arch']}` | {r['params']:,} | {r['tokens_per_s']:.0f} | "
                         f"{r['throughput_vs_baseline']:.2f} | {r['peak_mem_mb']:.0f} | {r['mem_vs_baseline']:.2f} | "
                         f"{target} |")
        lines.append("")
    lines.append(f"Wall time {report['wall_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.models", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="sparse")
    p.add_argument("--settings", default=None, help="comma-separated subset of the preset's settings")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads in the workers (default: torch's)")
    add_allocator_argument(p)
    p.add_argument("--model-args", default="", metavar="FLAGS",
                   help="model flags added to every setting's, one string (e.g. '--attention-dropout 0.1')")
    p.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(sys.stdin.read()))))
        return
    settings = PRESETS[args.preset]
    if args.settings:
        wanted = args.settings.split(",")
        unknown = sorted(set(wanted) - {s.name for s in settings})
        if unknown:
            raise SystemExit(f"unknown settings {unknown}; the preset has {[s.name for s in settings]}")
        settings = [s for s in settings if s.name in wanted]
    if args.warmup < 1 or args.repeats < 1:
        raise SystemExit("--warmup and --repeats must be >= 1")
    if args.model_args:
        settings = [replace(s, extra=tuple(s.extra) + tuple(shlex.split(args.model_args))) for s in settings]
        _check_model_args(settings)
    cfg = BenchModelsConfig(settings, vocab=args.vocab, warmup=args.warmup, repeats=args.repeats, threads=args.threads,
                            allocator=args.allocator, targets=dict(PRESET_TARGETS[args.preset]))
    report = run_benchmark(cfg)
    text = markdown(report)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".md", "w") as f:
            f.write(text)
        with open(args.out + ".json", "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
