"""How the chunked attentions' group sizes trade time for memory on a device: their training step with each
group constant scaled.

    python -m benchmarks.group_sizes --device cuda --length 4096 --scales 1 4 16 [--modules longshort abc]

Each has one constant for the CPU, tuned on a 2-core one where a group's temporaries should stay in cache and
Python's work per group is a few percent, and one for other devices, where every group is a round of kernel
launches (set from this benchmark on an H200); both are scaled. Rows: each module at each scale, the
median step time (CUDA events on CUDA), the peak memory on CUDA, and both as ratios to scale 1 in the same run.
"""
import argparse
import contextlib
import statistics
from typing import Callable, Dict, Iterator, List

import torch

import fluence_fairseq.ops.linear_attention as linear_ops
import fluence_fairseq.ops.longshort as longshort_ops
from benchmarks.common import add_allocator_argument, bench_spec, use_allocator
from benchmarks.gpu_check import pattern_of, peak_mib, timed, training_step_fn
from fluence_fairseq.modules.registry import ATTENTIONS


@contextlib.contextmanager
def _scaled_constants(owner, names, scale: int) -> Iterator[None]:
    old = {name: getattr(owner, name) for name in names}
    for name, value in old.items():
        setattr(owner, name, value * scale)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(owner, name, value)


def _scaling(owner, *names: str) -> Callable[[int], contextlib.AbstractContextManager]:
    return lambda scale: _scaled_constants(owner, names, scale)


#: module -> a context that scales its group constants (the CPU's and other devices') by an integer
GROUPS: Dict[str, Callable[[int], contextlib.AbstractContextManager]] = {
    "longshort": _scaling(longshort_ops, "_GROUP_ELEMENTS", "_DEVICE_GROUP_ELEMENTS"),
    "cosformer": _scaling(linear_ops, "GROUP", "DEVICE_GROUP"),
    "performer": _scaling(linear_ops, "GROUP", "DEVICE_GROUP"),
    "abc": _scaling(ATTENTIONS["abc"].cls, "block_chunks", "device_block_chunks"),
}


def run(args) -> List[dict]:
    device = torch.device(args.device)
    rows = []
    for name in args.modules:
        spec = bench_spec(name)
        for scale in args.scales:
            with GROUPS[name](scale):
                step = training_step_fn(spec, pattern_of(name), args, device, args.length)
                step()
                memory = peak_mib(step, device)
                ms = statistics.median(timed(step, device) for _ in range(args.repeats))
            rows.append({"module": name, "scale": scale, "ms": ms, "mib": memory})
            print(rows[-1], flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def report(rows: List[dict], args, allocator: str = "default (not recorded)") -> str:
    lines = [f"Group sizes on {args.device}: length {args.length}, batch {args.batch}, width {args.dim}, "
             f"{args.heads} heads, median of {args.repeats} training steps; CPU allocator "
             f"{allocator}.", "",
             "| module | group scale | ms | × scale 1 | peak MiB | × scale 1 |", "|---|---|---|---|---|---|"]
    first = {r["module"]: r for r in reversed(rows)}
    for r in rows:
        base = first[r["module"]]
        mem = "-" if r["mib"] is None else f"{r['mib']:.1f}"
        mem_ratio = "-" if r["mib"] is None or not base["mib"] else f"{r['mib'] / base['mib']:.2f}"
        lines.append(f"| {r['module']} | {r['scale']} | {r['ms']:.2f} | {r['ms'] / base['ms']:.2f} | {mem} | "
                     f"{mem_ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--modules", nargs="+", choices=sorted(GROUPS), default=list(GROUPS))
    p.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="also write the table here")
    add_allocator_argument(p)
    args = p.parse_args(argv)
    allocator = use_allocator(args.allocator)
    if any(scale < 1 for scale in args.scales):
        p.error(f"--scales: each scale multiplies a group size, so it must be a positive integer, got {args.scales}")
    text = report(run(args), args, allocator)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
