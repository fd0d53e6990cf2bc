"""``python -m benchmarks.memory_trace ATTENTION``: where the memory of one training step goes.

    python -m benchmarks.memory_trace local --pattern noncausal --length 8192

Runs the training step of :mod:`benchmarks.attention` (the registered attention with its benchmark options,
fairseq-shaped projections, ``out.sum()`` backward) once in a worker whose glibc mmap threshold is fixed, so that
the resident set follows the live tensors, and prints the resident memory (and its high-water mark) over the RSS
before the step at the points where an attention's memory changes hands: the call of its math (``attend``), the
output projection's forward and backward, the end of the forward and of the step. Then the tensors autograd keeps
for backward, by storage (the input and the parameters left out): what an attention saves, and its size.
Where the high-water mark jumps between two marks, the peak lies between them.
"""
import argparse
import json
import os
import sys
from typing import Dict, List

import torch

from .common import (MEMORY_ENV, PATTERN_FLAGS, bench_spec, build_module, reset_peak_rss, rss_mb,
                     run_in_fresh_process, training_step)
from fluence_fairseq.modules.registry import ATTENTIONS


def trace(job: dict) -> dict:
    """One step of ``job["attention"]``; returns the marks and the saved tensors."""
    torch.manual_seed(0)
    cross, causal = PATTERN_FLAGS[job["pattern"]]
    spec = bench_spec(job["attention"])
    module = build_module(spec, job["dim"], job["heads"], cross, causal)
    training_step(module, job["dim"], 1, 16, 16, cross, causal)()  # one-time costs out of the numbers
    step = training_step(module, job["dim"], 1, job["length"], job["length"], cross, causal)
    marks: List[dict] = []
    base: List[float] = []  # the RSS before the step, once it starts

    def mark(where: str) -> None:
        if base:
            rss, peak = rss_mb()
            marks.append({"where": where, "rss_mb": rss - base[0], "peak_mb": peak - base[0]})

    attend = module.attend

    def traced_attend(*args, **kwargs):
        mark("attend called")
        result = attend(*args, **kwargs)
        mark("attend returned")
        return result

    module.attend = traced_attend
    module.out_proj.register_forward_pre_hook(lambda *_: mark("out_proj forward"))
    module.register_forward_hook(lambda *_: mark("forward end"))
    module.out_proj.register_full_backward_pre_hook(lambda *_: mark("out_proj backward starts"))
    module.out_proj.register_full_backward_hook(lambda *_: mark("out_proj backward ends"))
    # the attention's own backward runs between the output projection's and the first input projection's
    for name in ("q_proj", "k_proj", "v_proj"):
        proj = getattr(module, name, None)
        if proj is not None:
            proj.register_full_backward_pre_hook(lambda *_, name=name: mark(f"{name} backward starts"))
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}

    def leave_out_input(_, args, kwargs):
        parameters.add((kwargs.get("query") if "query" in kwargs else args[0]).untyped_storage().data_ptr())

    module.register_forward_pre_hook(leave_out_input, with_kwargs=True)
    saved: Dict[int, dict] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters and storage.data_ptr() not in saved and storage.nbytes() > 0:
            saved[storage.data_ptr()] = {"shape": list(tensor.shape), "mb": storage.nbytes() / 2**20}
        return tensor

    reset_peak_rss()
    base.append(rss_mb()[0])
    mark("step starts")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    mark("step ends")
    return {"marks": marks, "saved": sorted(saved.values(), key=lambda t: -t["mb"])}


def markdown(job: dict, result: dict) -> str:
    lines = [f"{job['attention']}, {job['pattern']}, L={job['length']}, D={job['dim']}, {job['heads']} heads, batch 1 "
             "(MiB over the RSS before the step)", "", "| where | resident | high-water mark |", "|---|---|---|"]
    lines += [f"| {m['where']} | {m['rss_mb']:.1f} | {m['peak_mb']:.1f} |" for m in result["marks"]]
    lines += ["", "Kept for backward (by storage; the input and the parameters left out; the output projection "
                  "keeps its input, the attention's output):", ""]
    lines += [f"- {t['shape']}: {t['mb']:.2f} MiB" for t in result["saved"] if t["mb"] >= 0.01]
    lines.append(f"- total {sum(t['mb'] for t in result['saved']):.1f} MiB")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("attention", nargs="?", choices=sorted(ATTENTIONS))
    parser.add_argument("--pattern", default="causal", choices=sorted(PATTERN_FLAGS))
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one job: JSON stdin -> stdout
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(trace(json.loads(sys.stdin.read()))))
        return 0
    if not args.attention:
        parser.error("name an attention")
    if not os.path.exists("/proc/self/clear_refs"):
        raise SystemExit("memory_trace reads /proc/self/status and resets the high-water mark through "
                         "/proc/self/clear_refs: Linux only")
    job = {"attention": args.attention, "pattern": args.pattern, "length": args.length, "dim": args.dim,
           "heads": args.heads}
    print(markdown(job, run_in_fresh_process("benchmarks.memory_trace", job, args.attention, MEMORY_ENV)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
