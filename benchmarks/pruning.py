"""Forward+backward time and peak memory of pruned attention (:func:`fluence_fairseq.ops.pruned_attention`), as
ratios to dense softmax attention measured in the same run.

    python -m benchmarks.pruning [--length 1024] [--heads 4] [--head-dim 64] [--batch 2] [--threads 1]
        [--repeats 3] [--block 32] [--json OUT] [--quick] [--heads-layout bhld|lbhd]
    python -m benchmarks.pruning --against REV [--pairs 12] [--q-factors 1,2,4]   # paired A/B of the block-sparse path
    python -m benchmarks.pruning --per-head [--patterns noncausal]   # each head alone on every path

Cases, for a noncausal and a causal (decoder self attention) pattern:

* ``dense``: ``F.scaled_dot_product_attention`` (``is_causal`` for the causal pattern), the path
  ``SoftmaxAttention`` takes through ``band_attention`` with no band: the baseline of every ratio;
* ``masked-dense 90%``: the data-informed 90% mask applied to the full (L, L) problem as an additive bias (the
  reference code's way, no savings), i.e. :func:`pruned_attention` forced onto its dense path;
* ``data-informed 10%`` ... ``90%``: :func:`~fluence_fairseq.pruning.policy.pruning_mask` at ``tau`` = 10, 30, 50,
  70, 90 (scope ``layer``: one threshold, heads compete) of a synthetic average pattern (:func:`synthetic_patterns`),
  through a :class:`~fluence_fairseq.ops.pruned_attention.PrunedPlan` with ``tune=True``, as the attention module
  builds it: its first call measures the dense path and the promising block layouts and keeps the fastest. The
  report says which path (and query x key block) each case took and the timings that chose it;
* ``random 90%``: :func:`~fluence_fairseq.pruning.policy.random_pruning_mask`, the same number of kept entries
  chosen at random: it keeps almost every block, so the plan takes the dense path.

"kept share" is the kept share of the *allowed* entries (all, or the causal triangle); "block density" the kept
share of the (head, query block, key block) triples at ``--block``. Time: median of ``--repeats`` forward+backward
passes after one warm-up, all cases of a pattern in one fresh process, round-robin (repeat r of every case, then
repeat r + 1: the machine's load changes hit every case alike); memory: the peak RSS increase of the second
forward+backward (after the same warm-up) in another fresh process with a fixed mmap threshold
(:func:`benchmarks.common.peak_rss_increase_mb`, :data:`~benchmarks.common.MEMORY_ENV`), on the path the timing
run chose. The plan of each mask is built (and its choice measured) outside the timed region, as a model caches it
per length. Targets: data-informed 90% at L=1024 takes <= 0.4x the dense time; no data-informed sparsity is slower
than dense; peak memory <= 1.5x dense.
"""
import argparse
import json
import math
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .common import (MEMORY_ENV, add_allocator_argument, allocator_of, peak_rss_increase_mb, round_robin,
                     run_in_fresh_process, use_allocator, warm_up)
from fluence_fairseq.pruning.policy import pruning_mask, random_pruning_mask
from fluence_fairseq.ops.pruned_attention import BlockLayout, PrunedPlan, pruned_attention

TARGET = 0.4  # data-informed 90% fwd+bwd time / dense time at L=1024
NEVER_SLOWER = 1.0  # every data-informed sparsity: fwd+bwd time / dense time
MEMORY_TARGET = 1.5  # every data-informed sparsity: peak memory / dense peak memory


def synthetic_patterns(heads: int, length: int, causal: bool, seed: int = 0) -> torch.Tensor:
    """A (1, heads, L, L) "average attention pattern" shaped like trained attention, rows summing to 1 over the
    allowed keys (the causal triangle for ``causal``).

    Head ``h`` mixes, with head-specific weights:
    * a diagonal band: a Gaussian bump of width ``w_h`` centred on ``i + o_h`` (offsets cycle -1, 0, +1, 0:
      previous-token, self, next-token heads; widths grow geometrically from 2 to about L/16);
    * global columns: extra mass on the first 2 tokens (BOS / first-token heads);
    * a smooth decay ``1 / (1 + |i - j| / 32)`` over the whole row (diffuse long-range attention);
    * multiplicative noise ``1 + 0.2 * U(-1, 1)`` (a seeded generator), which jitters the band edges.
    """
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(length, dtype=torch.float64)
    dist = pos.view(-1, 1) - pos.view(1, -1)  # i - j
    offsets = [-1, 0, 1, 0]
    widths = [2.0 * (max(2.0, length / 16) / 2.0) ** (h / max(1, heads - 1)) for h in range(heads)]
    out = []
    for h in range(heads):
        o, w = offsets[h % 4], widths[h]
        band = torch.exp(-0.5 * ((dist + o) / w) ** 2) / w
        glob = torch.zeros(length, length, dtype=torch.float64)
        glob[:, :2] = 1.0
        decay = 1.0 / (1.0 + dist.abs() / 32.0)
        a_band, a_glob, a_decay = 1.0, 0.05 * (1 + h % 3), 0.02 / (1 + h)
        p = a_band * band + a_glob * glob / length * 8 + a_decay * decay / length * 8
        p = p * (1 + 0.2 * (2 * torch.rand(length, length, generator=gen, dtype=torch.float64) - 1))
        if causal:
            p = torch.tril(p)
        out.append(p / p.sum(-1, keepdim=True))
    return torch.stack(out).unsqueeze(0)


def make_mask(kind: str, tau: float, heads: int, length: int, causal: bool) -> Optional[torch.Tensor]:
    """keep (H, L, L) for ``kind`` in ("informed", "random"); None for dense."""
    allowed = torch.tril(torch.ones(length, length, dtype=torch.bool)) if causal else None
    if kind == "informed":
        return pruning_mask(synthetic_patterns(heads, length, causal), tau, "layer", allowed)[0]
    if kind == "random":
        return random_pruning_mask((1, heads, length, length), tau, "layer", allowed, seed=0)[0]
    raise ValueError(kind)


# (label, kind, tau, forced path)
CASES = [("dense (SDPA)", "sdpa", 0.0, None), ("masked-dense 90%", "informed", 90.0, "dense")]
CASES += [(f"data-informed {tau}%", "informed", float(tau), None) for tau in (10, 30, 50, 70, 90)]
CASES += [("random 90%", "random", 90.0, None)]


def _case(case: dict, job: dict, make_heads, grad):
    """(step, info) of one case: ``step()`` runs one forward+backward of the heads ``make_heads()`` gives (see
    :func:`heads_inputs`); ``info()`` (after the first step, which makes the plan's measured choice) describes
    it."""
    heads, length, causal = job["heads"], job["length"], job["causal"]
    if case["kind"] == "sdpa":
        def forward(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        def info():
            return dict(kept_share=1.0, block_density=1.0, path="sdpa", why="baseline")
    else:
        keep = make_mask(case["kind"], case["tau"], heads, length, causal)
        plan = PrunedPlan(keep, job["block"], tune=case["force"] is None)  # what the attention module builds
        path = case["force"] or "auto"
        chosen = case.get("chosen")  # the memory run repeats the timing run's choice instead of measuring again
        if chosen and chosen != "dense":
            q_block = int(chosen.split()[-1].split("x")[0])
            plan = PrunedPlan(keep, job["block"], layouts=[BlockLayout.build(keep, job["block"], q_block)])
        path = "dense" if chosen == "dense" else ("block-sparse" if chosen else path)
        allowed = (heads * length * (length + 1) // 2) if causal else keep.numel()

        def forward(q, k, v):
            return pruned_attention(q, k, v, keep, plan=plan, path=path)[0]

        def info():
            square = plan.layouts[0]
            if case["force"]:
                taken, why = "dense", "forced (the reference's masked computation)"
            elif chosen:
                taken, why = chosen, "the timing run's choice"
            else:
                (kind, layout, why), = plan.decisions.values()
                taken = kind if layout is None else f"{kind} {layout.q_block}x{layout.k_block}"
            return dict(kept_share=int(keep.sum()) / allowed, block_density=square.density, path=taken, why=why)

    def step():
        # no reference to the heads outside the attention (a module's are dropped once its forward returns)
        forward(*make_heads()).backward(grad)

    return step, info


def heads_inputs(batch: int, heads: int, length: int, head_dim: int, layout: str):
    """``(make_heads, grad)``: ``make_heads()`` gives q, k, v (B, H, L, D) for one step, ``grad`` is the output's
    gradient.
    ``bhld``: the same contiguous leaf tensors every step (their gradients reset). ``lbhd``: as an attention
    module makes its heads, views of (L, B, H, D) memory computed afresh at each step from leaf tensors (a product
    by 1, standing in for the projections), so that nothing outside the attention keeps them between its forward
    and backward."""
    if layout not in ("bhld", "lbhd"):
        raise ValueError(f"heads layout must be bhld or lbhd, got {layout!r}")
    if layout == "bhld":
        shape = (batch, heads, length, head_dim)
        leaves = [torch.randn(shape, requires_grad=True) for _ in range(3)]

        def same():
            for x in leaves:
                x.grad = None
            return leaves

        return same, torch.randn(shape)
    shape = (length, batch, heads, head_dim)
    leaves = [torch.randn(shape, requires_grad=True) for _ in range(3)]

    def fresh():
        for x in leaves:
            x.grad = None
        return [(x * 1.0).permute(1, 2, 0, 3) for x in leaves]

    return fresh, torch.randn(shape).permute(1, 2, 0, 3)


def _worker(job: dict) -> dict:
    """``job["case"]`` with ``memory_only``: its peak memory; else ``job["cases"]`` timed round-robin in this
    process (repeat r of every case, then repeat r + 1), so that a change of machine load during the run hits
    every case alike and the ratios stay fair."""
    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    make_heads, grad = heads_inputs(job["batch"], job["heads"], job["length"], job["head_dim"],
                                    job.get("heads_layout", "bhld"))
    if job.get("memory_only"):
        step, info = _case(job["case"], job, make_heads, grad)
        step()  # warm-up: pages in library code, makes the plan's choice, fills the cached masks
        return {"peak_mem_mb": peak_rss_increase_mb(step), **info()}
    allocator = use_allocator(job.get("allocator", "steady"))
    cases = [_case(case, job, make_heads, grad) for case in job["cases"]]

    def one_round():  # warm-up (and the plan's measured choice)
        for step, _ in cases:
            step()

    warm_up(one_round, allocator)
    times = [[] for _ in cases]
    for _ in range(job["repeats"]):
        for (step, _), series in zip(cases, times):
            started = time.perf_counter()
            step()
            series.append((time.perf_counter() - started) * 1e3)
    return {"cases": [{"time_ms": series, "time_ms_median": statistics.median(series), **info()}
                      for (_, info), series in zip(cases, times)], "allocator": allocator}


def run_benchmark(length=1024, heads=4, head_dim=64, batch=2, threads=1, repeats=3, block=32,
                  patterns=("noncausal", "causal"), allocator="steady", heads_layout="bhld",
                  log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict:
    from .attention import machine_info

    started = time.perf_counter()
    rows, allocator_used = [], None
    for pattern in patterns:
        job = {"causal": pattern == "causal", "length": length, "heads": heads, "head_dim": head_dim,
               "batch": batch, "threads": threads, "repeats": repeats, "block": block, "allocator": allocator,
               "heads_layout": heads_layout}
        cases = [{"kind": kind, "tau": tau, "force": force} for _, kind, tau, force in CASES]
        timed = run_in_fresh_process("benchmarks.pruning", {**job, "cases": cases}, f"{pattern} timing")
        allocator_used = timed["allocator"]
        for (label, *_), case, result in zip(CASES, cases, timed["cases"]):
            result["peak_mem_mb"] = run_in_fresh_process(
                "benchmarks.pruning", {**job, "case": {**case, "chosen": result["path"]}, "memory_only": True},
                f"{pattern} {label} (memory)", MEMORY_ENV)["peak_mem_mb"]
            rows.append({"pattern": pattern, "case": label, **result})
            log(f"{pattern} {label}: {result['time_ms_median']:.1f} ms, {result['peak_mem_mb']:.1f} MiB, "
                f"{result['path']}")
    for row in rows:
        base = next(r for r in rows if r["pattern"] == row["pattern"] and r["path"] == "sdpa")
        row["time_ratio"] = row["time_ms_median"] / base["time_ms_median"]
        row["mem_ratio"] = row["peak_mem_mb"] / base["peak_mem_mb"] if base["peak_mem_mb"] > 0 else math.nan
    machine = machine_info()
    machine.update(threads=threads, threads_from="--threads", allocator=allocator_used)
    config = dict(length=length, heads=heads, head_dim=head_dim, batch=batch, threads=threads, repeats=repeats,
                  block=block, heads_layout=heads_layout)
    targets = []
    for row in rows:
        if not row["case"].startswith("data-informed"):
            continue
        checks = [("time", row["time_ratio"], NEVER_SLOWER), ("memory", row["mem_ratio"], MEMORY_TARGET)]
        if row["case"] == "data-informed 90%":
            checks.append(("time", row["time_ratio"], TARGET))
        for measure, ratio, limit in checks:
            targets.append({"pattern": row["pattern"], "case": row["case"], "measure": measure, "ratio": ratio,
                            "limit": limit, "met": bool(ratio <= limit)})
    return {"machine": machine, "config": config, "rows": rows, "targets": targets,
            "wall_s": time.perf_counter() - started}


def _paired_inputs(allocator: str, threads: int, shape) -> Tuple[torch.Tensor, ...]:
    """The paired comparisons' setting: the allocator and threads set, q, k, v (leaves) and an output gradient of
    ``shape``, seeded."""
    use_allocator(allocator)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    return q, k, v, torch.randn(shape)


def paired(against: str, *, length=1024, heads=4, head_dim=64, batch=2, threads=1, block=32, pairs=12,
           taus=(70.0, 90.0), q_factors=(2, 4), patterns=("noncausal", "causal"), allocator="steady",
           new_block: Optional[int] = None) -> List[str]:
    """Paired A/B of the block-sparse path: the working tree's :mod:`~fluence_fairseq.ops.pruned_attention`
    against its copy at git revision ``against``, on the same layouts (``q_factors`` x ``block`` query blocks) of
    the data-informed masks, forward+backward alternating old and new (and dense SDPA) in one process, so that
    both sides of every pair see the same machine state (which side runs first alternates). ``new_block``: the
    new side's layouts take key blocks of this size (at the same query blocks). Lines of: the median of the
    per-pair ratios new / old with their range, each side's median ms, new / SDPA, and the largest difference of
    their gradients."""
    from .ab import load_revision
    import fluence_fairseq.ops.pruned_attention as new

    old = load_revision("pruned_attention", against)
    q, k, v, grad = _paired_inputs(allocator, threads, (batch, heads, length, head_dim))
    lines = []
    for pattern in patterns:
        causal = pattern == "causal"
        for tau in taus:
            keep = make_mask("informed", tau, heads, length, causal)
            for factor in q_factors:
                def step(module, layout):
                    q.grad = k.grad = v.grad = None
                    module._sparse_path(q, k, v, layout, None, 0.0).backward(grad)
                    return q.grad, k.grad, v.grad

                def sdpa():
                    q.grad = k.grad = v.grad = None
                    F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(grad)

                old_layout = old.BlockLayout.build(keep, block, block * factor)
                new_layout = new.BlockLayout.build(keep, new_block or block, block * factor)
                got = [g.clone() for g in step(old, old_layout)]
                diff = max(float((a - b).abs().max()) for a, b in zip(got, step(new, new_layout)))
                series = {"old": [], "new": [], "sdpa": []}
                sides = [("old", lambda: step(old, old_layout)), ("new", lambda: step(new, new_layout))]
                for i in range(pairs):
                    # the order alternates: a step right after dense SDPA ran 5-8% slower than the next one (the
                    # same code against itself read 0.92-0.94 with old always first)
                    for name, run in (sides if i % 2 == 0 else sides[::-1]) + [("sdpa", sdpa)]:
                        started = time.perf_counter()
                        run()
                        series[name].append(time.perf_counter() - started)
                ratios = [n / o for n, o in zip(series["new"], series["old"])]
                med = {name: statistics.median(t) * 1e3 for name, t in series.items()}
                shown = f"{block * factor}x{block}" + (f" (new: {block * factor}x{new_block})" if new_block else "")
                lines.append(f"{pattern} data-informed {tau:g}% {shown}: new / old "
                             f"{statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f}), old "
                             f"{med['old']:.1f} ms, new {med['new']:.1f} ms, new / SDPA "
                             f"{med['new'] / med['sdpa']:.2f}; gradients differ by at most {diff:.1e}")
    return lines


def per_head(*, length=1024, heads=4, head_dim=64, batch=2, threads=1, block=32, repeats=7,
             taus=(10.0, 30.0), patterns=("noncausal",), allocator="steady") -> List[str]:
    """Would a plan per head beat the plan per layer? Each head of the data-informed masks alone (B, 1, L, D):
    forward+backward of dense SDPA (a path only for a head that keeps every allowed entry), the masked dense path
    and every block layout, medians of ``repeats`` round-robin rounds in one process; lines of each head's times
    and its fastest path, and per mask the sum of the heads' fastest against dense SDPA over all heads."""
    from fluence_fairseq.ops.pruned_attention import _dense_path, _sparse_path

    allocator_name = use_allocator(allocator)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, head_dim) for _ in range(3))

    def timed(runs):  # milliseconds
        return {name: 1e3 * t for name, t in round_robin(runs, repeats, allocator_name, statistics.median).items()}

    def step(inputs, attend):
        def run():
            leaves = [x.detach().requires_grad_() for x in inputs]
            out = attend(*leaves)
            out.backward(torch.ones_like(out))
        return run

    lines = []
    for pattern in patterns:
        causal = pattern == "causal"
        whole = timed({"sdpa": step((q, k, v), lambda a, b, c: F.scaled_dot_product_attention(
            a, b, c, is_causal=causal))})["sdpa"]
        for tau in taus:
            keep = make_mask("informed", tau, heads, length, causal)
            allowed = torch.tril(torch.ones(length, length, dtype=torch.bool)) if causal else None
            total = 0.0
            for h in range(heads):
                keep_h = keep[h:h + 1]
                inputs = tuple(x[:, h:h + 1].contiguous() for x in (q, k, v))
                plan = PrunedPlan(keep_h, block)
                runs = {"masked dense": step(inputs, lambda a, b, c: _dense_path(a, b, c, keep_h, None, 0.0, False,
                                                                                  plan)[0])}
                full = bool(keep_h.all()) if allowed is None else bool((keep_h[0] == allowed).all())
                if full:
                    runs["sdpa"] = step(inputs, lambda a, b, c: F.scaled_dot_product_attention(a, b, c,
                                                                                              is_causal=causal))
                for lay in plan.layouts:
                    if lay.buckets:
                        runs[f"block-sparse {lay.q_block}x{lay.k_block}"] = step(
                            inputs, lambda a, b, c, lay=lay: _sparse_path(a, b, c, lay, None, 0.0))
                ms = timed(runs)
                best = min(ms, key=ms.get)
                total += ms[best]
                lines.append(f"{pattern} data-informed {tau:g}% head {h} (kept {float(keep_h.float().mean()):.3f}): "
                             + ", ".join(f"{name} {t:.1f} ms" for name, t in ms.items()) + f"; fastest: {best}")
            lines.append(f"{pattern} data-informed {tau:g}%: the heads' fastest paths sum to {total:.1f} ms, "
                         f"{total / whole:.3f}x dense SDPA over all {heads} heads ({whole:.1f} ms)")
    return lines


def _rotating_medians(calls: dict, rounds: int) -> dict:
    """Median milliseconds of each call over ``rounds`` rounds that take every call in turn, the first call of a
    round rotating, after one warm-up round."""
    series = {key: [] for key in calls}
    order = list(calls)
    for i in range(rounds + 1):
        shift = i % len(order)
        for key in order[shift:] + order[:shift]:
            started = time.perf_counter()
            calls[key]()
            if i:  # the first round warms up
                series[key].append(time.perf_counter() - started)
    return {key: statistics.median(t) * 1e3 for key, t in series.items()}


def mask_cost(*, length=1024, heads=4, head_dim=64, batch=2, threads=1, pairs=15, allocator="steady",
              **_) -> List[str]:
    """What an additive mask costs the CPU flash kernel: its forward and its backward (called directly) without a
    mask, with a zero (1, H, L, L) mask, and with a zero mask whose every query row is the same memory (a (1, H, 1,
    L) row expanded), the three taken in turn (which one first rotating); lines of each variant's median ms and
    its ratio to the unmasked kernel's. The masks are all zeros: the numbers are the same, only what is read
    differs."""
    from fluence_fairseq.ops.common import FLASH_CPU, FLASH_CPU_BACKWARD

    q, k, v, grad = _paired_inputs(allocator, threads, (batch, heads, length, head_dim))
    q, k, v = q.detach(), k.detach(), v.detach()
    masks = {"no mask": None, "zero mask (1, H, L, L)": torch.zeros(1, heads, length, length),
             "one row per head (stride 0)": torch.zeros(1, heads, 1, length).expand(1, heads, length, length)}
    saved = {name: FLASH_CPU(q, k, v, 0.0, False, attn_mask=mask) for name, mask in masks.items()}
    calls = {}
    for name, mask in masks.items():
        out, lse = saved[name]
        calls[name, "forward"] = lambda mask=mask: FLASH_CPU(q, k, v, 0.0, False, attn_mask=mask)
        calls[name, "backward"] = lambda mask=mask, out=out, lse=lse: FLASH_CPU_BACKWARD(
            grad, q, k, v, out, lse, 0.0, False, attn_mask=mask)
    med = _rotating_medians(calls, pairs)
    return [f"{part} {name}: {med[name, part]:.1f} ms, {med[name, part] / med['no mask', part]:.3f}x no mask"
            for part in ("forward", "backward") for name in masks]


def padding(*, length=1024, heads=4, head_dim=64, batch=2, threads=1, pairs=15, taus=(10.0, 30.0, 50.0),
            patterns=("noncausal", "causal"), allocator="steady", padded=128, **_) -> List[str]:
    """The masked dense path of a padded batch (the last item's last ``padded`` keys padding, fairseq's right
    padding of targets; the first item unpadded): item by item on the unpadded keys (what it does from
    :data:`~fluence_fairseq.ops.pruned_attention.PER_ITEM_FROM` entries per item) against one call with the
    padding in a (B, H, L, L) bias (what it does below), and the same batch unpadded, forward+backward taken in
    turn; lines of each side's median ms and the ratios to the unpadded batch."""
    from fluence_fairseq.ops import pruned_attention as pa

    q, k, v, grad = _paired_inputs(allocator, threads, (batch, heads, length, head_dim))
    pad = torch.zeros(batch, length, dtype=torch.bool)
    pad[-1, length - padded:] = True
    lines = []
    for pattern in patterns:
        causal = pattern == "causal"
        for tau in taus:
            keep = make_mask("informed", tau, heads, length, causal)
            plan = pa.PrunedPlan(keep, 32)

            def run(mask, per_item_from):
                q.grad = k.grad = v.grad = None
                before, pa.PER_ITEM_FROM = pa.PER_ITEM_FROM, per_item_from
                try:
                    pa._dense_path(q, k, v, keep, mask, 0.0, False, plan)[0].backward(grad)
                finally:
                    pa.PER_ITEM_FROM = before

            sides = {"unpadded": lambda: run(None, 0), "item by item": lambda: run(pad, 0),
                     "one call": lambda: run(pad, float("inf"))}
            med = _rotating_medians(sides, pairs)
            lines.append(f"{pattern} data-informed {tau:g}%, {padded} keys of one item padded: "
                         + ", ".join(f"{name} {ms:.1f} ms ({ms / med['unpadded']:.3f}x unpadded)"
                                     for name, ms in med.items()))
    return lines


def bias_order(*, length=1024, heads=4, head_dim=64, batch=2, threads=1, pairs=15, taus=(10.0, 30.0, 50.0),
               patterns=("noncausal", "causal"), allocator="steady", **_) -> List[str]:
    """The masked dense path's kernel call with the mask shared by the batch's items, so that the kernel takes
    heads as its batch (:func:`fluence_fairseq.ops.common.cpu_flash_attention`), against the same mask expanded
    over the items (the kernel's usual order, as before), forward+backward alternating in one process; lines of
    the median of the per-pair ratios heads-first / usual with their range and each side's median ms."""
    from fluence_fairseq.ops.common import cpu_flash_attention
    from fluence_fairseq.ops.pruned_attention import _additive, _rows_with_a_key

    q, k, v, grad = _paired_inputs(allocator, threads, (batch, heads, length, head_dim))
    lines = []
    for pattern in patterns:
        causal = pattern == "causal"
        for tau in taus:
            keep = make_mask("informed", tau, heads, length, causal).unsqueeze(0)
            bias, has_key = _additive(keep, q.dtype), _rows_with_a_key(keep)

            def run(b, zero_rows=None if has_key is None else ~has_key):
                q.grad = k.grad = v.grad = None
                cpu_flash_attention(q, k, v, causal=causal, bias=b, zero_rows=zero_rows).backward(grad)

            sides = [("usual", lambda: run(bias.expand(batch, -1, -1, -1))), ("heads first", lambda: run(bias))]
            series = {name: [] for name, _ in sides}
            for i in range(pairs + 1):
                for name, side in sides if i % 2 == 0 else sides[::-1]:
                    started = time.perf_counter()
                    side()
                    if i:  # the first round warms up
                        series[name].append(time.perf_counter() - started)
            ratios = [h / u for h, u in zip(series["heads first"], series["usual"])]
            med = {name: statistics.median(t) * 1e3 for name, t in series.items()}
            lines.append(f"{pattern} data-informed {tau:g}% masked dense: heads first / usual "
                         f"{statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f}), usual "
                         f"{med['usual']:.1f} ms, heads first {med['heads first']:.1f} ms")
    return lines


def markdown(report: dict) -> str:
    c, m = report["config"], report["machine"]
    lines = [f"Pruned attention, forward+backward, B={c['batch']}, H={c['heads']}, L={c['length']}, D={c['head_dim']}, "
             f"block {c['block']}, on {m['cpu']}, {c['threads']} thread(s), torch {m['torch']}; 1-min load "
             f"{m['load_avg_1min']:.2f} at the end; allocator {allocator_of(m)}; heads "
             + ("(B, H, L, D) views of (L, B, H, D) memory" if c.get("heads_layout") == "lbhd"
                else "contiguous (B, H, L, D)")
             + ". Ratios are to dense SDPA of the same pattern in the same run.", ""]
    lines += ["| pattern | case | kept share | block density | path | fwd+bwd ms | vs dense | peak MiB | vs dense |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['pattern']} | {r['case']} | {r['kept_share']:.3f} | {r['block_density']:.3f} | "
                     f"{r['path']} | {r['time_ms_median']:.1f} | {r['time_ratio']:.2f} | {r['peak_mem_mb']:.1f} | "
                     f"{r['mem_ratio']:.2f} |")
    lines += ["", "Why each path (the plan's measured choice at the warm-up call, forward+backward):", ""]
    for r in report["rows"]:
        lines.append(f"- {r['pattern']} {r['case']}: {r['path']}: {r['why']}")
    lines += ["", "Targets:", ""]
    for t in report["targets"]:
        lines.append(f"- {t['pattern']} {t['case']}: {t['measure']} ratio {t['ratio']:.2f} (target <= {t['limit']}): "
                     f"{'met' if t['met'] else 'MISSED'}")
    return "\n".join(lines) + "\n"


#: the problem of ``--quick`` (a smoke test)
QUICK_SIZES = dict(length=64, heads=2, head_dim=8, batch=1, block=8)


def add_problem_arguments(parser: argparse.ArgumentParser) -> None:
    """The pruning benchmarks' problem (this one's and ``benchmarks.pruning_kernel``'s): its sizes, block, threads,
    patterns and ``--quick``; read back by :func:`problem_of`."""
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--patterns", default="noncausal,causal", help="comma-separated: noncausal, causal")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test): L=64, H=2, D=8, B=1, block 8")


def problem_of(args: argparse.Namespace) -> Tuple[Dict[str, int], Tuple[str, ...]]:
    """(sizes with the block, patterns) of arguments parsed with :func:`add_problem_arguments`, ``--quick``'s
    sizes where given; exits naming ``--patterns`` when it holds an unknown pattern or none."""
    sizes = dict(QUICK_SIZES) if args.quick else dict(length=args.length, heads=args.heads, head_dim=args.head_dim,
                                                        batch=args.batch, block=args.block)
    patterns = tuple(p for p in args.patterns.split(",") if p)
    if not patterns or not set(patterns) <= {"noncausal", "causal"}:
        raise SystemExit(f"--patterns: unknown patterns or none in {args.patterns!r}; choose noncausal and/or causal")
    return sizes, patterns


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_problem_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", metavar="OUT", help="write the report as JSON")
    parser.add_argument("--heads-layout", choices=("bhld", "lbhd"), default="bhld",
                        help="q, k, v contiguous (B, H, L, D) tensors, or (B, H, L, D) views of (L, B, H, D) memory as "
                        "an attention module's heads are (every case alike, dense SDPA included)")
    parser.add_argument("--against", metavar="REV", help="instead: paired A/B of the block-sparse path against the "
                        "ops module at git revision REV (70%% and 90%%, query blocks of --q-factors key blocks)")
    parser.add_argument("--q-factors", default="1,2,4", help="with --against: query blocks as multiples of the key "
                        "block, comma-separated")
    parser.add_argument("--pairs", type=int, default=12, help="with --against: alternations of old and new")
    parser.add_argument("--new-block", type=int, default=None, metavar="N", help="with --against: the working "
                        "tree's side takes key blocks of N at the same query blocks (--block's multiples)")
    parser.add_argument("--bias-order", action="store_true", help="instead: the masked dense path's kernel with "
                        "heads as its batch against its usual order, paired (10%%, 30%% and 50%% masks)")
    parser.add_argument("--mask-cost", action="store_true", help="instead: what an additive mask costs the CPU "
                        "flash kernel's forward and backward (no mask, a full zero mask, one row per head)")
    parser.add_argument("--padding", action="store_true", help="instead: a padded batch's masked dense path item "
                        "by item against one call with the padding in its bias, and the batch unpadded")
    parser.add_argument("--per-head", action="store_true", help="instead: each head of the 10%% and 30%% masks "
                        "alone on every path, and the sum of the heads' fastest against dense SDPA (would a plan "
                        "per head beat one per layer?)")
    add_allocator_argument(parser)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(sys.stdin.read()))))
        return
    sizes, patterns = problem_of(args)
    if args.against:
        try:
            q_factors = tuple(int(f) for f in args.q_factors.split(",") if f)
        except ValueError:
            raise SystemExit(f"--q-factors must be comma-separated integers, got {args.q_factors!r}")
        if not q_factors or min(q_factors) < 1:
            raise SystemExit(f"--q-factors must be positive integers, got {args.q_factors!r}")
        if args.new_block is not None and args.new_block < 1:
            raise SystemExit(f"--new-block must be a positive integer, got {args.new_block}")
        for line in paired(args.against, threads=args.threads, pairs=args.pairs, patterns=patterns,
                           allocator=args.allocator, q_factors=q_factors, new_block=args.new_block, **sizes):
            print(line, flush=True)
        return
    if args.mask_cost:
        for line in mask_cost(threads=args.threads, pairs=args.pairs, allocator=args.allocator, **sizes):
            print(line, flush=True)
        return
    if args.padding:
        sizes["padded"] = max(1, sizes["length"] // 8)
        for line in padding(threads=args.threads, pairs=args.pairs, patterns=patterns, allocator=args.allocator,
                            **sizes):
            print(line, flush=True)
        return
    if args.bias_order:
        for line in bias_order(threads=args.threads, pairs=args.pairs, patterns=patterns, allocator=args.allocator,
                               **sizes):
            print(line, flush=True)
        return
    if args.per_head:
        for line in per_head(threads=args.threads, patterns=patterns, allocator=args.allocator, **sizes):
            print(line, flush=True)
        return
    report = run_benchmark(threads=args.threads, repeats=1 if args.quick else args.repeats, patterns=patterns,
                           allocator=args.allocator, heads_layout=args.heads_layout, **sizes)
    print(markdown(report))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=1)


if __name__ == "__main__":
    main()
