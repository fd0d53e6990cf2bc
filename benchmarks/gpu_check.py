"""The short device benchmark of ``make gpu-check``: every attention's training step and decode step against
fairseq ``MultiheadAttention`` and SDPA, at a few lengths, with device time and peak device memory.

    python -m benchmarks.gpu_check --out gpu-check-report.md [--tests-log gpu-tests.log] [--lengths 1024 4096]

On CUDA, times come from CUDA events around each step after a synchronisation (median of ``--repeats``), and
memory is the peak of ``torch.cuda.max_memory_allocated`` during the first full-size step over what was allocated
before it (module, parameters, inputs). On a CPU (to try the script) times are wall clock and memory is not
measured. Each attention runs in its causal self pattern where it has one (decode steps too), else noncausal.
"""
import argparse
import contextlib
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from benchmarks.common import bench_spec, build_module, causal_float_mask, cuda_peak_increase_mb, synchronize
from fluence_fairseq.modules.attention_base import FluenceAttention
from fluence_fairseq.modules.registry import ATTENTIONS

BASELINES = {"fairseq_mha": {"kind": "fairseq_mha"}, "sdpa": {"kind": "sdpa"}}


def timed(fn: Callable[[], None], device: torch.device) -> float:
    """Milliseconds of ``fn`` on ``device``."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        synchronize(device)
        start.record()
        fn()
        end.record()
        synchronize(device)
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def peak_mib(fn: Callable[[], None], device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        fn()
        return None
    return cuda_peak_increase_mb(fn, device)


def pattern_of(spec_name: str) -> tuple:
    patterns = ATTENTIONS[spec_name].cls.supported_patterns
    return (False, True) if (False, True) in patterns else (False, False)


def training_row(spec: dict, pattern: tuple, args, device: torch.device, length: int) -> dict:
    step = training_step_fn(spec, pattern, args, device, length)
    step()  # warm-up: kernels chosen, workspaces allocated
    memory = peak_mib(step, device)
    times = [timed(step, device) for _ in range(args.repeats)]
    return {"train_ms": statistics.median(times), "train_mib": memory}


def training_step_fn(spec: dict, pattern: tuple, args, device: torch.device, length: int) -> Callable[[], None]:
    """One training step (forward, backward) of the module ``spec`` at ``length``, as a closure."""
    cross, causal = pattern
    module = build_module(spec, args.dim, args.heads, cross, causal).to(device).train()
    x = torch.randn(length, args.batch, args.dim, device=device, requires_grad=True)
    mask = None
    if causal and not isinstance(module, FluenceAttention) and spec["kind"] == "fairseq_mha":
        mask = causal_float_mask(length, length).to(device)

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        if spec["kind"] in ("sdpa", "projections"):
            out = module(x, x)[0]
        else:
            out = module(query=x, key=x, value=x, attn_mask=mask, need_weights=False)[0]
        out.float().sum().backward()

    return step


def profile_row(spec: dict, pattern: tuple, args, device: torch.device, length: int, top: int = 5) -> dict:
    """Where one training step's time goes: on CUDA the kernels launched, their device time and the ops whose
    kernels took the most of it (a step of many small launches is bound by them, not by the arithmetic); on the
    CPU the op calls, their time and the ops with the most of it."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step = training_step_fn(spec, pattern, args, device, length)
    step()
    on_cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])) as prof:
        step()
        synchronize(device)
    averages = list(prof.key_averages())
    if on_cuda:
        def own_us(e) -> float:  # the device time of the kernels the event (an op or a kernel) launched itself
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

        counted = [e for e in averages if e.device_type == DeviceType.CUDA]
        # the ops (aten::mul) name the work better than their kernels' template names; kernels where they carry none
        ranked = [e for e in averages if e.device_type == DeviceType.CPU and own_us(e) > 0] or counted
    else:
        def own_us(e) -> float:
            return e.self_cpu_time_total

        counted = ranked = [e for e in averages if e.device_type == DeviceType.CPU]
    ranked = sorted(ranked, key=own_us, reverse=True)
    return {"calls": sum(e.count for e in counted), "ms": sum(map(own_us, counted)) / 1e3,
            "top": [(e.key[:60], own_us(e) / 1e3, e.count) for e in ranked[:top]]}


@torch.no_grad()
def decode_ms(spec: dict, args, device: torch.device, length: int) -> Optional[float]:
    """Median ms of one decoding step with ``length`` tokens cached (causal self attention only)."""
    module = build_module(spec, args.dim, args.heads, False, True).to(device).eval()
    state: Dict = {}
    try:
        prefix = torch.randn(length, args.batch, args.dim, device=device)
        module(query=prefix, key=prefix, value=prefix, incremental_state=state, need_weights=False)
    except (ValueError, RuntimeError, AssertionError, TypeError):
        return None  # takes one token per call: prefilling token by token would not be a short check
    token = torch.randn(1, args.batch, args.dim, device=device)

    def step():
        module(query=token, key=token, value=token, incremental_state=state, need_weights=False)

    step()
    return statistics.median(timed(step, device) for _ in range(args.repeats))


def run(args, on_row: Callable[[List[dict]], None] = lambda rows: None) -> List[dict]:
    """Every row of the report; ``on_row`` sees the rows so far after each one (the report is rewritten then, so
    that a check stopped at its time limit still leaves what it measured)."""
    device = torch.device(args.device)
    rows = []
    subjects = {name: bench_spec(name) for name in ATTENTIONS}
    for length in args.lengths:
        for name, spec in {**BASELINES, **subjects}.items():
            pattern = pattern_of(name) if spec["kind"] == "attention" else (False, True)
            row = {"module": name, "length": length, "pattern": "causal" if pattern[1] else "noncausal"}
            context = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
            try:
                with context:
                    row.update(training_row(spec, pattern, args, device, length))
                    if pattern[1] and spec["kind"] != "sdpa":
                        row["decode_ms"] = decode_ms(spec, args, device, length)
            except torch.cuda.OutOfMemoryError:
                row["error"] = "out of memory"
            except Exception as error:  # a failure is a finding for the report, not the end of the check
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            print(row, flush=True)
            on_row(rows)
    return rows


def _fmt(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(rows: List[dict], args, tests_log: Optional[str], profiles: Optional[Dict[str, dict]] = None) -> str:
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    lines = [f"# GPU check: {name}", "",
             f"torch {torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}; "
             f"batch {args.batch}, width {args.dim}, {args.heads} heads, {'bf16 autocast' if args.bf16 else 'fp32'}; "
             f"median of {args.repeats} steps. Ratios are to fairseq `MultiheadAttention` at the same length.", ""]
    if tests_log:
        with open(tests_log) as f:
            tail = [line for line in f.read().splitlines() if line.strip()][-1:]
        lines += [f"Device tests (`pytest -k cuda`): {tail[0] if tail else 'no output'}", ""]
    lines += ["| length | module | pattern | train ms | × MHA | peak MiB | × MHA | decode ms/step |",
              "|---|---|---|---|---|---|---|---|"]
    base = {(r["length"]): r for r in rows if r["module"] == "fairseq_mha" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['length']} | {r['module']} | {r['pattern']} | {r['error']} | | | | |")
            continue
        ref = base.get(r["length"], {})
        t_ratio = r["train_ms"] / ref["train_ms"] if ref.get("train_ms") else None
        m_ratio = (r["train_mib"] / ref["train_mib"]) if ref.get("train_mib") and r["train_mib"] is not None else None
        lines.append(f"| {r['length']} | {r['module']} | {r['pattern']} | {_fmt(r['train_ms'])} | {_fmt(t_ratio)} | "
                     f"{_fmt(r['train_mib'], 1)} | {_fmt(m_ratio)} | {_fmt(r.get('decode_ms'), 3)} |")
    if profiles:
        device_kind = "kernels" if device.type == "cuda" else "op calls"
        lines += ["", f"## Where the slow training steps go (one step profiled at length {max(args.lengths)})", "",
                  f"| module | {device_kind} | their ms | largest (ms, calls) |", "|---|---|---|---|"]
        for name, prof in profiles.items():
            if "error" in prof:
                lines.append(f"| {name} | {prof['error']} | | |")
                continue
            largest = "; ".join(f"`{key}` {ms:.2f}, {count}" for key, ms, count in prof["top"])
            lines.append(f"| {name} | {prof['calls']} | {prof['ms']:.2f} | {largest} |")
    return "\n".join(lines) + "\n"


def slow_modules(rows: List[dict], threshold: float) -> List[str]:
    """Attentions whose training step at the longest length took at least ``threshold`` times fairseq's."""
    length = max(r["length"] for r in rows)
    at = {r["module"]: r for r in rows if r["length"] == length and "error" not in r}
    base = at.get("fairseq_mha", {}).get("train_ms")
    return [name for name, r in at.items()
            if base and name not in BASELINES and r["train_ms"] >= threshold * base]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu-check-report.md")
    p.add_argument("--tests-log", default=None, help="pytest output whose summary line goes into the report")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bf16", action="store_true", help="run every step under bf16 autocast")
    p.add_argument("--profile-above", type=float, default=2.0, metavar="RATIO",
                   help="profile one training step, at the longest length, of every attention at least RATIO times "
                        "slower than fairseq's (0: every attention; a negative value: none)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    profiles: Dict[str, dict] = {}

    def write(rows: List[dict]) -> str:
        text = report(rows, args, args.tests_log, profiles)
        with open(args.out, "w") as f:
            f.write(text)
        return text

    rows = run(args, on_row=write)
    device = torch.device(args.device)
    for name in (slow_modules(rows, args.profile_above) if args.profile_above >= 0 else []):
        spec = bench_spec(name)
        context = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
        try:
            with context:
                profiles[name] = profile_row(spec, pattern_of(name), args, device, max(args.lengths))
        except Exception as error:  # a finding for the report, as in run()
            profiles[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
        print(name, profiles[name], flush=True)
        write(rows)
    print(write(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
