"""``python -m benchmarks.attention``: speed and memory of any registered attention against fairseq's MHA and plain SDPA.

    python -m benchmarks.attention adaptive_span --opt attn_span=4096 --setup span=64 --setup span=4096 \\
        --lengths 1024,4096 --out benchmarks/results/spans
    python -m benchmarks.attention --preset adaptive_span --out benchmarks/results/adaptive_span

Every case (one attention variant, fairseq ``MultiheadAttention``, SDPA with the same projections, and the four
projections alone) runs in fresh worker processes (``--worker``): one training step (forward + backward)
on a random ``(L, B, D)`` input, timed over ``--repeats`` steps after ``--warmup``, and the peak memory of the
first step in a second worker (see :mod:`benchmarks.common` for what exactly is measured). Decoding (causal self
attention; the variants marked for it, on the command line the first, and fairseq MHA, each in its worker
after training) times one incremental step with 256, 1024, ... tokens already cached, for batch 1 and for a
beam (the cache reordered every step). Threads: torch's default (``torch.set_num_threads`` is never called),
the number of physical cores; set ``OMP_NUM_THREADS`` to change it. On a machine busy with other work the
threads wait for each other and small operations slow down a lot: the header shows the load average.

Output: a Markdown report on stdout and, with ``--out PREFIX``, PREFIX.md, PREFIX.json and PREFIX.png.
"""
import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple

import torch

from .common import MEMORY_ENV, PATTERN_FLAGS, add_allocator_argument, allocator_of, run_in_fresh_process, run_job
from fluence_fairseq.modules.attention_base import PATTERNS
from fluence_fairseq.modules.registry import ATTENTIONS, get_attention

MHA, SDPA, PROJECTIONS, KEEP_QKV = "fairseq MHA", "SDPA", "projections only", "projections + q, k, v kept"
#: KEEP_QKV: the projections around an autograd step that keeps q, k and v and returns three new gradients; its
#: memory is the least that any attention computed as one such step over q, k and v can reach (self patterns)
BASELINES = {MHA: {"kind": "fairseq_mha"}, SDPA: {"kind": "sdpa"}, PROJECTIONS: {"kind": "projections"},
             KEEP_QKV: {"kind": "keep_qkv"}}


@dataclass
class Variant:
    """One registered attention with constructor ``options`` and a ``setup`` applied after building it."""

    attention: str
    options: Dict[str, Any] = field(default_factory=dict)
    setup: Dict[str, float] = field(default_factory=dict)
    decode: bool = False  # also measure decoding steps

    @property
    def label(self) -> str:
        return " ".join([self.attention] + [f"{k}={v:g}" for k, v in self.setup.items()])

    def module_spec(self) -> dict:
        return {"kind": "attention", "name": self.attention, "options": self.options, "setup": self.setup}


@dataclass
class TimeRatioTarget:
    """Training step time (or peak memory, ``metric="peak_mem_mb"``) of ``case`` <= ``limit`` x that of
    ``reference``, at ``length`` (default: the largest length measured)."""

    case: str
    reference: str
    limit: float
    length: Optional[int] = None
    metric: str = "time_ms_median"

    def check(self, report: dict) -> dict:
        length = self.length or max(row["length"] for row in report["train"])
        values = {row["case"]: row[self.metric] for row in report["train"] if row["length"] == length}
        what = "step time" if self.metric == "time_ms_median" else "peak memory"
        return _verdict(f"{self.case} {what} <= {self.limit:g} x {self.reference} (L={length})",
                        _ratio(values[self.case], values[self.reference]), self.limit)


def growth_exponent(report: dict, case: str, lengths: Optional[Tuple[int, int]] = None) -> float:
    """x in time ~ L^x for ``case`` between the smallest and largest length it was measured at (or ``lengths``);
    NaN without two such points."""
    points = dict((row["length"], row["time_ms_median"]) for row in report["train"] if row["case"] == case)
    l0, l1 = lengths or (min(points, default=0), max(points, default=0))
    if l0 == l1 or l0 not in points or l1 not in points:
        return math.nan
    return math.log(points[l1] / points[l0]) / math.log(l1 / l0)


@dataclass
class LengthGrowthTarget:
    """Training step time of ``case`` grows no faster than L^``limit`` between the smallest and largest length,
    measured against ``reference`` (the projections alone) in the same run: the value is ``1 + x - x_ref``. The
    projections do work exactly linear in L, yet their step grows as L^1.09-1.22 between 2,048 and 16,384 on a
    2-core Intel Xeon (caches, memory bandwidth, page faults); that part of a case's growth is the machine's, not
    the attention's. Without the reference at both lengths the raw exponent is judged."""

    case: str
    limit: float
    reference: Optional[str] = PROJECTIONS

    def check(self, report: dict) -> dict:
        lengths = sorted(row["length"] for row in report["train"] if row["case"] == self.case)
        l0, l1 = lengths[0], lengths[-1]
        x = growth_exponent(report, self.case)
        x_ref = growth_exponent(report, self.reference, (l0, l1)) if self.reference else math.nan
        if math.isnan(x_ref):
            return _verdict(f"{self.case} step time grows as L^x from L={l0} to L={l1}, x <= {self.limit:g}", x,
                            self.limit)
        return _verdict(f"{self.case} step time grows as L^x from L={l0} to L={l1} (x = {x:.2f}), {self.reference} "
                        f"as L^{x_ref:.2f}: 1 + x - x_ref <= {self.limit:g}", 1 + x - x_ref, self.limit)


@dataclass
class DecodeGrowthTarget:
    """Decoding step time of ``case`` at the last position <= ``limit`` x that at the first."""

    case: str
    batch: int
    limit: float

    def check(self, report: dict) -> dict:
        series = decode_series(report)[(self.case, self.batch)]
        return _verdict(f"{self.case} decode step at position {series[-1][0]} <= {self.limit:g} x at position "
                        f"{series[0][0]} (batch {self.batch})", series[-1][1] / series[0][1], self.limit)


def _verdict(text: str, value: float, limit: float) -> dict:
    return {"target": text, "value": value, "limit": limit, "pass": bool(value <= limit)}


@dataclass
class BenchConfig:
    variants: List[Variant]
    pattern: str = "causal"  # a key of common.PATTERN_FLAGS
    dim: int = 512
    heads: int = 8
    batch: int = 1
    lengths: List[int] = field(default_factory=lambda: [1024])
    src_len: Optional[int] = None  # cross patterns: source length (default: the query length)
    repeats: int = 3
    warmup: int = 1  # >= 1: the first warm-up step is the memory measurement
    decode_positions: List[int] = field(default_factory=lambda: [256, 1024, 4096])
    decode_batches: List[int] = field(default_factory=lambda: [1, 5])
    decode_steps: int = 10
    targets: list = field(default_factory=list)
    #: fairseq MHA and SDPA are quadratic: run them only up to this length (None = every length)
    baseline_max_length: Optional[int] = None
    device: str = "cpu"  # "cuda": synchronised timing and peak CUDA memory (decoding is measured on the CPU only)
    allocator: str = "steady"  # of the timing workers, see benchmarks.common.use_allocator


def adaptive_span_preset() -> BenchConfig:
    """Causal self attention at L=4096 with every head's span at 64, 1024 and 4096 (= attn_span) tokens."""
    options = {"attn_span": 4096, "adapt_span_ramp": 32}
    variants = [Variant("adaptive_span", options, {"span": span}, decode=span == 64) for span in (64, 1024, 4096)]
    short, full = variants[0].label, variants[-1].label
    return BenchConfig(
        variants, pattern="causal", dim=512, heads=8, batch=1, lengths=[4096],
        targets=[TimeRatioTarget(short, full, 0.15), TimeRatioTarget(short, MHA, 0.3),
                 TimeRatioTarget(full, MHA, 1.5), DecodeGrowthTarget(short, 1, 1.1), DecodeGrowthTarget(short, 5, 1.1)],
    )


def efficient_attentions() -> Dict[str, Any]:
    """name -> spec of every registered attention of the "efficient" family, with its benchmark options and time
    bound (relative to the projections alone at L=8192) as its spec declares them."""
    return {name: spec for name, spec in ATTENTIONS.items() if spec.family == "efficient"}


def _efficient_preset(pattern: str, lengths: List[int]) -> BenchConfig:
    flags = PATTERN_FLAGS[pattern]
    specs = {n: spec for n, spec in efficient_attentions().items() if flags in spec.cls.supported_patterns}
    variants = [Variant(n, dict(spec.bench_options), decode=pattern == "causal") for n, spec in specs.items()]
    targets = []
    for v in variants:
        spec = specs[v.attention]
        targets += [TimeRatioTarget(v.label, PROJECTIONS, spec.bench_time_bound, length=8192),
                    TimeRatioTarget(v.label, PROJECTIONS, 1.5, length=8192, metric="peak_mem_mb")]
        if max(lengths) > 8192:
            targets.append(LengthGrowthTarget(v.label, 1.15))
        if v.decode and spec.cls.constant_state:
            targets += [DecodeGrowthTarget(v.label, 1, 1.1), DecodeGrowthTarget(v.label, 5, 1.1)]
    return BenchConfig(variants, pattern=pattern, dim=512, heads=8, batch=1, lengths=lengths, repeats=3,
                       decode_positions=[256, 1024, 4096], baseline_max_length=8192, targets=targets)


def efficient_noncausal_preset() -> BenchConfig:
    """Every efficient attention as noncausal self attention, L = 2048, 8192, 16384 (baselines up to 8192)."""
    return _efficient_preset("noncausal", [2048, 8192, 16384])


def efficient_causal_preset() -> BenchConfig:
    """Every efficient attention with a causal self pattern at L = 2048 and 8192, plus decoding steps."""
    return _efficient_preset("causal", [2048, 8192])


PRESETS = {"adaptive_span": adaptive_span_preset, "efficient_noncausal": efficient_noncausal_preset,
           "efficient_causal": efficient_causal_preset}


# ------------------------------------------------------------------------------------------------- running
def _run_in_fresh_process(job: dict, extra_env: Optional[Dict[str, str]] = None) -> dict:
    return run_in_fresh_process("benchmarks.attention", job, f"{job['module']} at L={job['length']}", extra_env)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def add_ratios(train_rows: List[dict]) -> None:
    """Time (median) and memory of every row as ratios to fairseq MHA, SDPA and the projections alone at the same
    length (NaN where the reference did not run)."""
    for row in train_rows:
        for reference, suffix in ((MHA, "mha"), (SDPA, "sdpa"), (PROJECTIONS, "proj")):
            ref = next((r for r in train_rows if r["case"] == reference and r["length"] == row["length"]), None)
            row[f"time_vs_{suffix}"] = _ratio(row["time_ms_median"], ref["time_ms_median"]) if ref else math.nan
            row[f"mem_vs_{suffix}"] = _ratio(row["peak_mem_mb"], ref["peak_mem_mb"]) if ref else math.nan
            if suffix == "proj":
                work = (row.get("gflop", math.nan), ref.get("gflop", math.nan)) if ref else (math.nan, 1.0)
                row["work_vs_proj"] = _ratio(*work)


def decode_series(report: dict) -> Dict[tuple, List[tuple]]:
    """(case, batch) -> [(position, ms per step)] sorted by position."""
    series: Dict[tuple, List[tuple]] = {}
    for row in report["decode"]:
        series.setdefault((row["case"], row["batch"]), []).append((row["position"], row["ms_per_step"]))
    return {key: sorted(points) for key, points in series.items()}


def machine_info() -> dict:
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    omp = os.environ.get("OMP_NUM_THREADS")
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "threads_from": f"OMP_NUM_THREADS={omp}" if omp else "torch default", "python": platform.python_version(),
            "load_avg_1min": os.getloadavg()[0]}  # other processes slow the measurements down


def run_benchmark(cfg: BenchConfig, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict:
    """Measure every case of ``cfg``; returns the report (also what PREFIX.json holds)."""
    if cfg.warmup < 1 or cfg.repeats < 1:
        raise ValueError("--warmup and --repeats must be >= 1 (the first warm-up step measures memory)")
    started, machine = time.perf_counter(), machine_info()
    decoding = cfg.pattern == "causal" and any(v.decode for v in cfg.variants)
    if any(v.decode for v in cfg.variants) and not decoding:
        log(f"no decoding measurements: {cfg.pattern} attention is not decoded step by step")
    cases = [(v.label, v.module_spec(), v.decode) for v in cfg.variants]
    cases += [(label, spec, label == MHA) for label, spec in BASELINES.items()]
    decode_job = {"positions": cfg.decode_positions, "batches": cfg.decode_batches, "steps": cfg.decode_steps}
    train_rows, decode_rows = [], []
    for i, length in enumerate(cfg.lengths):
        for label, spec, decodes in cases:
            if label in (MHA, SDPA) and cfg.baseline_max_length and length > cfg.baseline_max_length:
                continue
            if label == KEEP_QKV and PATTERN_FLAGS[cfg.pattern][0]:  # cross: q and k/v differ in length
                continue
            job = {"module": spec, "pattern": cfg.pattern, "dim": cfg.dim, "heads": cfg.heads, "batch": cfg.batch,
                   "length": length, "src_len": cfg.src_len or length, "repeats": cfg.repeats,
                   "warmup": cfg.warmup, "device": cfg.device, "allocator": cfg.allocator,
                   "decode": decode_job if decoding and decodes and i == 0 and cfg.device == "cpu" else None}
            result = _run_in_fresh_process(job)
            machine["allocator"] = result.get("allocator", machine.get("allocator"))
            # memory from a second worker with a fixed mmap threshold (see benchmarks/common.py): reproducible RSS peaks
            result["peak_mem_mb"] = _run_in_fresh_process({**job, "memory_only": True, "decode": None},
                                                          MEMORY_ENV)["peak_mem_mb"]
            train_rows.append({"case": label, "length": length,
                               **{k: result[k] for k in ("time_ms_median", "time_ms_min", "time_ms", "peak_mem_mb")},
                               "gflop": result.get("gflop", math.nan)})
            decode_rows += [{"case": label, **row} for row in result.get("decode", [])]
            log(f"L={length} {label}: {result['time_ms_median']:.1f} ms, {result['peak_mem_mb']:.1f} MiB"
                + (" (+ decoding)" if "decode" in result else ""))
    add_ratios(train_rows)
    report = {"machine": machine, "config": asdict(cfg), "train": train_rows, "decode": decode_rows}
    report["targets"] = [target.check(report) for target in cfg.targets]
    report["wall_s"] = time.perf_counter() - started
    return report


# ------------------------------------------------------------------------------------------------- output
def _table(header: List[str], rows: List[list]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def markdown(report: dict) -> str:
    cfg, machine = report["config"], report["machine"]
    attentions = sorted({v["attention"] for v in cfg["variants"]})
    lines = [
        f"# benchmarks.attention: {', '.join(attentions)}, {PATTERNS[PATTERN_FLAGS[cfg['pattern']]]} attention", "",
        f"Machine: {machine['cpu']}, {machine['cpu_count']} CPUs, torch {machine['torch']}, "
        f"{machine['threads']} threads ({machine['threads_from']}), Python {machine['python']}; load average "
        f"{machine['load_avg_1min']:.2f} at the start.", "",
        f"D={cfg['dim']}, H={cfg['heads']}, batch {cfg['batch']}"
        + (f", source length {cfg['src_len']}" if cfg["src_len"] else "")
        + "; options: " + "; ".join(dict.fromkeys(f"{v['attention']} {v['options']}" for v in cfg["variants"])) + ". "
        f"Each case runs in a fresh process. Time: one training step (forward + backward), median and min of "
        f"{cfg['repeats']} steps after {cfg['warmup']} warm-up, allocator "
        f"{allocator_of(machine)}. Memory: peak RSS increase during the first "
        "full-size step over the RSS before it (activations, gradients, temporaries; not parameters or inputs), "
        "in a separate worker with glibc's mmap threshold fixed so that RSS follows the live tensors.",
        "",
        "## Training step", "",
    ]
    lines += _table(
        ["L", "case", "median ms", "min ms", "peak MiB", "time / proj", "mem / proj", "work / proj", "time / MHA",
         "mem / MHA", "time / SDPA", "mem / SDPA"],
        [[r["length"], r["case"], f"{r['time_ms_median']:.1f}", f"{r['time_ms_min']:.1f}", f"{r['peak_mem_mb']:.1f}"]
         + [f"{r.get(k, math.nan):.3f}" for k in ("time_vs_proj", "mem_vs_proj", "work_vs_proj", "time_vs_mha",
                                                 "mem_vs_mha", "time_vs_sdpa", "mem_vs_sdpa")]
         for r in report["train"]])
    lines += ["", "work / proj: the step's floating-point work (matrix products and fused attention kernels, as "
                  "torch.utils.flop_counter counts them; not FFTs, elementwise passes or transcendental functions) "
                  "over the projections-only step's. An attention whose "
                  "extra matrix products ran as fast per FLOP as the projections' large ones would take about that "
                  "ratio of their time, plus its elementwise passes."]
    lines += [""] + [f"Floor: the four projections alone (q, k, v, out linear layers, forward + backward) take "
                     f"{r['time_ms_median']:.1f} ms at L={r['length']}"
                     + (f", {r['time_vs_mha']:.2f} x fairseq MHA." if not math.isnan(r["time_vs_mha"]) else ".")
                     for r in report["train"] if r["case"] == PROJECTIONS]
    lines += [f"Memory floor of one autograd step over q, k and v ({KEEP_QKV}: they are kept for backward, which "
              f"returns three new gradients): {r['peak_mem_mb']:.1f} MiB at L={r['length']}, {r['mem_vs_proj']:.2f} x "
              "the projections alone." for r in report["train"] if r["case"] == KEEP_QKV]
    series = decode_series(report)
    if series:
        positions = sorted({p for points in series.values() for p, _ in points})
        lines += ["", f"## Decoding: ms per step with N tokens cached (median of {cfg['decode_steps']} steps; "
                      "batch > 1 is a beam: the cache is reordered every step)", ""]
        lines += _table(["case", "batch"] + [str(p) for p in positions] + ["last / first"],
                        [[case, batch] + [f"{ms:.3f}" for _, ms in points] + [f"{points[-1][1] / points[0][1]:.2f}"]
                         for (case, batch), points in series.items()])
    if report["targets"]:
        lines += ["", "## Targets", ""]
        lines += [f"- {'PASS' if t['pass'] else 'FAIL'}: {t['target']}: measured {t['value']:.3f}"
                  for t in report["targets"]]
    lines += ["", f"Total wall time {report['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def summary(reports: List[dict], length: int = 8192) -> str:
    """One row per case over several reports (one per pattern): time and memory / proj at ``length``, the growth
    exponent over the lengths measured, and decoding step time last/first position per batch; targets missed are
    marked with a star."""
    def kind(text: str) -> str:
        for key, word in (("growth", " grows "), ("mem", " peak memory "), ("decode", " decode "), ("time", " step time ")):
            if word in text:
                return key
        return "other"

    missed = [(r["config"]["pattern"], t["target"]) for r in reports for t in r["targets"] if not t["pass"]]

    def star(pattern: str, case: str, what: str) -> str:
        return "*" if any(p == pattern and text.startswith(case + " ") and kind(text[len(case):]) == what
                          for p, text in missed) else ""

    patterns = [r["config"]["pattern"] for r in reports]
    cases = list(dict.fromkeys(row["case"] for r in reports for row in r["train"] if row["case"] != PROJECTIONS))
    header = ["case"]
    for pattern in patterns:
        header += [f"{pattern}: time / proj", "work / proj", "mem / proj", "growth L^x (vs proj)"]
    header += ["decode last / first (batch 1, beam 5)"]
    rows = []
    for case in cases:
        row = [case]
        decode = ""
        for r in reports:
            points = sorted((x["length"], x) for x in r["train"] if x["case"] == case)
            at = next((x for n, x in points if n == length), None)
            pattern = r["config"]["pattern"]
            if at is None:
                row += ["–", "–", "–", "–"]
                continue
            growth = growth_exponent(r, case)
            own = 1 + growth - growth_exponent(r, PROJECTIONS, (points[0][0], points[-1][0]))
            work = at.get("work_vs_proj", math.nan)
            row += [f"{at['time_vs_proj']:.2f}" + star(pattern, case, "time"),
                    "–" if math.isnan(work) else f"{work:.2f}",
                    f"{at['mem_vs_proj']:.2f}" + star(pattern, case, "mem"),
                    f"{growth:.2f} ({own:.2f})" + star(pattern, case, "growth")]
            series = decode_series(r)
            ratios = [f"{p[-1][1] / p[0][1]:.2f}" + star(pattern, case, "decode")
                      for (c, _), p in sorted(series.items()) if c == case]
            decode = decode or " / ".join(ratios)
        rows.append(row + [decode or "–"])
    lengths = sorted({x["length"] for r in reports for x in r["train"]})
    note = (f"Ratios at L={length}; growth from L={lengths[0]} to the largest length measured for that pattern, in "
            "brackets 1 + x - x_proj: against the projections' own growth in the same run (the growth target); "
            "work: the step's floating-point work over the projections' (reports from before the column: –); "
            "* = the issue's target for that number missed (see the report's Targets).")
    return "\n".join(_table(header, rows) + ["", note]) + "\n"


def plot(report: dict, path: str) -> None:
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's import sets the root logger to DEBUG
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = decode_series(report)
    fig, axes = plt.subplots(1, 3 if series else 2, figsize=(17 if series else 11.5, 5))
    cases = list(dict.fromkeys(row["case"] for row in report["train"]))
    for ax, key, title, unit in zip(axes, ("time_ms_median", "peak_mem_mb"),
                                    ("training step (forward + backward)", "peak memory of a training step"),
                                    ("ms", "MiB")):
        for case in cases:
            points = sorted((r["length"], r[key]) for r in report["train"] if r["case"] == case)
            style = dict(linestyle="--", color="black") if case == PROJECTIONS else {}
            ax.plot([p for p, _ in points], [max(v, 1e-3) for _, v in points], marker="o", label=case, **style)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend(fontsize=7)
    if series:
        ax = axes[2]
        for (case, batch), points in series.items():
            ax.plot([p for p, _ in points], [ms for _, ms in points], marker="o", label=f"{case}, batch {batch}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens cached")
        ax.set_ylabel("ms per decoding step")
        ax.set_title("decoding step time vs position")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict, prefix: str) -> List[str]:
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with open(prefix + ".md", "w") as f:
        f.write(markdown(report))
    with open(prefix + ".json", "w") as f:
        json.dump(report, f, indent=1)
    plot(report, prefix + ".png")
    return [prefix + ext for ext in (".md", ".json", ".png")]


# ------------------------------------------------------------------------------------------------- CLI
def _ints(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x]


def _key_values(pairs: List[str], flag: str) -> Dict[str, str]:
    try:
        return dict(pair.split("=", 1) for pair in pairs)
    except ValueError:
        raise SystemExit(f"{flag} takes key=value, got {pairs}") from None


def _typed_options(attention: str, raw: Dict[str, str]) -> Dict[str, Any]:
    try:
        types = {o.name: o.type for o in get_attention(attention).options}
    except ValueError as error:  # unknown attention
        raise SystemExit(str(error)) from None
    unknown = sorted(set(raw) - set(types))
    if unknown:
        raise SystemExit(f"{attention} has no option {unknown}; its options: {sorted(types) or 'none'}")
    return {key: types[key](value) for key, value in raw.items()}


def config_from_args(args) -> BenchConfig:
    overrides = {name: getattr(args, name) for name in (
        "pattern", "dim", "heads", "batch", "lengths", "src_len", "repeats", "warmup", "decode_positions",
        "decode_batches", "decode_steps", "device", "allocator") if getattr(args, name) is not None}
    raw_options = _key_values(args.opt, "--opt")
    if args.preset:
        if args.setup or args.attention:
            raise SystemExit("--preset fixes the attention and its setups; pass --opt or sizes to change it")
        cfg = PRESETS[args.preset]()
        cfg.variants = [replace(v, options={**v.options, **_typed_options(v.attention, raw_options)})
                        for v in cfg.variants]
    else:
        if not args.attention:
            raise SystemExit(f"name an attention ({', '.join(sorted(ATTENTIONS))}) or a --preset")
        options = _typed_options(args.attention, raw_options)
        setups = [{k: float(v) for k, v in _key_values(s.split(","), "--setup").items()} for s in args.setup] or [{}]
        cfg = BenchConfig([Variant(args.attention, options, setup, decode=i == 0) for i, setup in enumerate(setups)])
    cfg = replace(cfg, **overrides)
    if args.no_decode:
        cfg.variants = [replace(v, decode=False) for v in cfg.variants]
    # a preset's targets on what this run does not measure (decoding, growth over one length) are left out
    cfg.targets = [t for t in cfg.targets if not (isinstance(t, DecodeGrowthTarget) and args.no_decode)
                   and not (isinstance(t, LengthGrowthTarget) and len(set(cfg.lengths)) < 2)]
    return cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("attention", nargs="?", help="registered attention name")
    parser.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="attention option")
    parser.add_argument("--setup", action="append", default=[], metavar="NAME=VALUE[,...]",
                        help="one variant per --setup, e.g. span=64 (every head's adaptive span in tokens); "
                             "decoding is measured for the first")
    parser.add_argument("--pattern", choices=sorted(PATTERN_FLAGS))
    parser.add_argument("--dim", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--lengths", type=_ints, help="comma-separated query lengths, e.g. 1024,4096")
    parser.add_argument("--src-len", type=int, help="source length of cross patterns (default: the query length)")
    parser.add_argument("--repeats", type=int, help="timed training steps per case (default 3)")
    parser.add_argument("--warmup", type=int, help="warm-up steps per case (default 1)")
    parser.add_argument("--decode-positions", type=_ints, help="tokens cached when a decoding step is timed")
    parser.add_argument("--decode-batches", type=_ints, help="decoding batch sizes; > 1 reorders like a beam")
    parser.add_argument("--decode-steps", type=int, help="timed decoding steps per position")
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument("--device", help="cpu (default) or cuda: synchronised times and peak CUDA memory")
    add_allocator_argument(parser)
    parser.add_argument("--out", metavar="PREFIX", help="write PREFIX.md, PREFIX.json and PREFIX.png")
    parser.add_argument("--summarize", nargs="+", metavar="REPORT.json",
                        help="print one table of the given reports (e.g. the efficient presets) and exit")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one job: JSON stdin -> stdout
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(run_job(json.load(sys.stdin))))
        return
    if args.summarize:
        reports = []
        for path in args.summarize:
            with open(path) as f:
                reports.append(json.load(f))
        print(summary(reports))
        return
    report = run_benchmark(config_from_args(args))
    print(markdown(report))
    if args.out:
        print("wrote " + ", ".join(write_outputs(report, args.out)), file=sys.stderr)


if __name__ == "__main__":
    main()
