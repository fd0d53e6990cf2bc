"""Measurements behind the benchmarks, run inside one worker process per module.

A *module spec* is a JSON-able dict naming what to build:

* ``{"kind": "attention", "name": ..., "options": {...}, "setup": {...}}``: an entry of the attention registry,
  built with ``options`` and then changed by ``setup`` (see :data:`SETUPS`);
* ``{"kind": "fairseq_mha"}``: fairseq's ``MultiheadAttention``, with the float ``-inf`` upper-triangular
  ``attn_mask`` the fairseq decoder passes when the pattern is causal;
* ``{"kind": "sdpa"}``: q/k/v/out projections around ``torch.nn.functional.scaled_dot_product_attention``
  (``is_causal`` for causal patterns);
* ``{"kind": "projections"}``: the four projections alone, the floor under every attention on CPU.

On CUDA (``--device cuda``) every timed step is synchronised before and after, and memory is the peak of
``torch.cuda.max_memory_allocated`` during the first full-size step over what was allocated before it. On the CPU,
memory is the increase of the process's resident set (RSS) at its peak during the first training step at full
size, over the RSS just before it (module, parameters and inputs already allocated): activations saved for
backward, gradients, temporaries and allocator overhead. The kernel's high-water mark (``VmHWM``) is reset
through ``/proc/self/clear_refs`` just before that step, so it is Linux-only; run each module in a fresh
process, or memory freed earlier and kept by the allocator hides part of the increase. ``benchmarks.attention`` measures
memory in a separate worker whose glibc ``MALLOC_MMAP_THRESHOLD_`` is fixed (:data:`MEMORY_ENV`): large buffers
are then always mapped and unmapped, so the RSS follows the live tensors instead of depending on glibc's
adaptive threshold (which otherwise made the same run read 94 or 160 MiB).

Times come from workers with a *steady* allocator unless ``--allocator default`` (:func:`use_allocator`): glibc
keeps freed memory for reuse instead of returning it to the kernel, as a caching allocator (jemalloc, tcmalloc,
PyTorch's CUDA allocator) does. With glibc's defaults a buffer of a few MiB freed in one step is often unmapped and
its pages faulted in again the next: on a 2-core AMD EPYC at L=8192 that was 0-28,000 page faults and 0-212 ms
of kernel time per projections-only step, whose median then moved between 288 and 385 ms from step to step (steady:
265-277 ms, no faults), so ratios to it measured the kernel's page handling as much as the attention.
"""
import contextlib
import ctypes
import ctypes.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fluence_fairseq.modules.attention_base import FluenceAttention
from fluence_fairseq.modules.registry import get_attention

#: environment of the memory-measuring worker (see the module docstring)
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}

#: ``--allocator`` choices of the timing benchmarks (see :func:`use_allocator`)
ALLOCATORS = ("steady", "default")
# glibc's mallopt parameters (malloc.h) and the steady settings: no buffer mapped on its own (with glibc's largest
# mmap threshold, 32 MiB, a step's score matrices and logits were still mapped and faulted in at every step: 42,000
# faults a step for buffers of 16-100 MiB in a test, none without mmap); no fast bins, so that small freed chunks
# (PyTorch's 64-byte aligned allocations leave slivers beside each buffer) merge with their neighbours at once and
# fewer holes are too small for the next buffer; no trimming (-1 is glibc's largest threshold: without fast bins a
# 2 GiB threshold trimmed fairseq MHA's heap at L=4096, RSS 2.8 GiB -> 1.3 GiB, and faulted it in again); and a
# heap grown 64 MiB beyond each request (without it, buffers freed in a changing order grew the heap, and faulted,
# for several steps). fairseq MHA at L=4096, 20 steps, three runs each: of steps 6-20, 7, 4 and 3 still faulted
# with fast bins and a 2 GiB threshold, 3, 1 and 1 with these settings. Whether one freed buffer takes the next
# request of its size still depends on where the heap lies (address randomisation): a warm-up is needed.
_M_MXFAST, _M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = 1, -1, -2, -4
_STEADY = ((_M_MMAP_MAX, 0), (_M_MXFAST, 0), (_M_TRIM_THRESHOLD, -1), (_M_TOP_PAD, 64 << 20))
#: at most this many warm-up steps are run until one takes no page fault (see :func:`settle`)
SETTLE_LIMIT = 8


def use_allocator(name: str) -> str:
    """Set this process's allocator for timing; returns a description of what is in effect, for the report.

    ``steady``: glibc's ``mallopt`` keeps every freed buffer in the heap (none is mapped on its own), merges freed
    chunks at once (no fast bins), never trims the heap and grows it 64 MiB at a time, so once warm
    (:func:`settle`) a step reuses memory whose pages are already mapped (see the module docstring);
    ``default``: glibc's adaptive settings, page faults included. Without glibc (another libc) nothing is set and
    the description says so."""
    if name not in ALLOCATORS:
        raise ValueError(f"--allocator must be one of {ALLOCATORS}, got {name!r}")
    if name == "default":
        return "default (glibc's adaptive settings)"
    path = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(path), "mallopt", None) if path else None
    if mallopt is None or not all(mallopt(param, value) == 1 for param, value in _STEADY):
        return "default (steady asked for, but this C library has no glibc mallopt)"
    return STEADY_DESCRIPTION


#: what :func:`use_allocator` reports for the steady allocator
STEADY_DESCRIPTION = ("steady (glibc keeps freed memory: no mmap, no fast bins, no trim, top pad 64 MiB; warm-up "
                      "until no page fault)")


def minor_page_faults() -> int:
    """Minor page faults of this process so far (pages the kernel mapped in on first touch)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def settle(step: Callable[[], object], limit: int = SETTLE_LIMIT) -> int:
    """Call ``step`` until one call takes no page fault, at most ``limit`` times; returns the calls made.

    With the steady allocator the heap grows until it has a hole for every buffer of a step in the order the step
    asks for them, and each growth is faulted in: fairseq MHA at L=4096 (2 GiB of (L, L) matrices) took 2-5 steps
    to stop faulting (3.5, 5.6, 4.7, 3.2 s, then 1.5 s). Rarely the heap grows again later (a step in 15 or fewer
    at that size), which the fastest or the median of the timed steps leaves out. Under glibc's defaults faults
    never stop, so use this only with the steady allocator."""
    for calls in range(1, limit + 1):
        before = minor_page_faults()
        step()
        if minor_page_faults() == before:
            return calls
    return limit


def warm_up(step: Callable[[], object], allocator: str) -> None:
    """The last warm-up before timed steps: one call of ``step`` or, under the steady allocator (``allocator`` is
    :func:`use_allocator`'s description), calls until one takes no page fault (:func:`settle`)."""
    if allocator == STEADY_DESCRIPTION:
        settle(step)
    else:
        step()


def round_robin(calls: Dict[str, Callable[[], object]], repeats: int, allocator: str = "",
                reduce: Callable[[List[float]], float] = min) -> Dict[str, float]:
    """Seconds of each call, ``reduce`` (the fastest, or ``statistics.median``) of ``repeats`` rounds that time
    every call in turn (round r of each, then r + 1), so that a change of the machine's speed hits them alike;
    after a warm-up round (:func:`warm_up`: under the steady ``allocator``, rounds until one takes no page fault)."""
    def one_round():
        for call in calls.values():
            call()

    warm_up(one_round, allocator)
    spent: Dict[str, List[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            spent[name].append(time.perf_counter() - started)
    return {name: reduce(times) for name, times in spent.items()}


def allocator_of(machine: dict) -> str:
    """The allocator a report's ``machine`` entry records (reports from before the flag: glibc's defaults)."""
    return machine.get("allocator") or "default (not recorded)"


def add_allocator_argument(parser) -> None:
    parser.add_argument("--allocator", choices=ALLOCATORS, default="steady",
                        help="allocator of the timed process: steady (default; glibc keeps freed memory, no page "
                             "faults after the warm-up) or default (glibc's adaptive settings)")


def run_in_fresh_process(module: str, job: dict, what: str, extra_env: Optional[Dict[str, str]] = None) -> dict:
    """``python -m <module> --worker`` with ``job`` as JSON on stdin; returns the JSON of its last stdout line.
    A fresh process per measurement keeps allocator state and thread pools from leaking between cases."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
               **(extra_env or {}))
    proc = subprocess.run([sys.executable, "-m", module, "--worker"], input=json.dumps(job), capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker failed for {what}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


#: name -> (module, value): changes to a built attention before measuring, ``--setup name=value``
SETUPS: Dict[str, Callable[[nn.Module, float], None]] = {}


def _set_span_tokens(module: nn.Module, tokens: float) -> None:
    """Every head's adaptive span = ``tokens`` (the ramp comes on top)."""
    span = getattr(module, "adaptive_span", None)
    if span is None:
        raise ValueError(f"setup 'span' needs an adaptive-span attention; {type(module).__name__} has none")
    if not 0 <= tokens <= span.attn_span:
        raise ValueError(f"span={tokens} must be in [0, attn_span={span.attn_span}]")
    with torch.no_grad():
        span.current_val.fill_(tokens / span.attn_span)


SETUPS["span"] = _set_span_tokens


def _set_attention_dropout(module: nn.Module, rate: float) -> None:
    """The attention's dropout (fairseq's dropout module, applied in training) = ``rate``."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"attention_dropout={rate} must be in [0, 1)")
    dropout = getattr(module, "dropout_module", None)
    if dropout is None:
        raise ValueError(f"setup 'attention_dropout' needs an attention with a dropout module; "
                         f"{type(module).__name__} has none")
    dropout.p = rate


SETUPS["attention_dropout"] = _set_attention_dropout

# name on the command line -> (cross, causal)
PATTERN_FLAGS = {"noncausal": (False, False), "causal": (False, True), "cross": (True, False),
                 "causal-cross": (True, True)}


class _KeepQKV(torch.autograd.Function):
    """The least an attention computed as one autograd step over q, k and v can keep: those three for backward,
    an output written in their layout, and three new gradients (no other work): ``q * k + v``."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        return torch.addcmul(v, q, k)

    @staticmethod
    def backward(ctx, grad):
        q, k, _ = ctx.saved_tensors
        return grad * k, grad * q, grad.clone()


class ProjectedSDPA(nn.Module):
    """fairseq-shaped q/k/v/out projections around SDPA (``attend="sdpa"``); ``"none"`` keeps the projections
    alone; ``"keep_qkv"`` puts :class:`_KeepQKV` between them (the memory floor of an attention whose backward
    needs q, k and v together)."""

    def __init__(self, embed_dim: int, num_heads: int, causal: bool, attend: str = "sdpa"):
        super().__init__()
        if attend not in ("sdpa", "none", "keep_qkv"):
            raise ValueError(f"attend must be 'sdpa', 'none' or 'keep_qkv', got {attend!r}")
        self.num_heads, self.causal, self.attend = num_heads, causal, attend
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(embed_dim, embed_dim) for _ in range(4))

    def forward(self, x: Tensor, src: Tensor) -> Tuple[Tensor, ...]:
        q, k, v = self.q_proj(x), self.k_proj(src), self.v_proj(src)
        if self.attend == "none":
            return self.out_proj(q), k, v
        tgt_len, bsz, dim = x.shape
        if self.attend == "keep_qkv":
            return (self.out_proj(_KeepQKV.apply(q, k, v)),)

        def heads(t):  # (L, B, D) -> (B, H, L, Dh)
            return t.view(t.size(0), bsz, self.num_heads, -1).permute(1, 2, 0, 3)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=self.causal)
        return (self.out_proj(out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, dim)),)


@contextlib.contextmanager
def eager_reorder(on: bool = True):
    """Within the block (``on``), every beam reorder selects the causal self attentions' cached keys and values
    at once, as fairseq's attention does (a copy by the reorder, another by the next step's concatenation),
    instead of leaving them to the next step (``PENDING_ORDER`` in :mod:`fluence_fairseq.modules.attention_base`)."""
    if not on:
        yield
        return
    own = FluenceAttention._defers_reorder
    FluenceAttention._defers_reorder = lambda self, buffer: False
    try:
        yield
    finally:
        FluenceAttention._defers_reorder = own


def bench_spec(name: str) -> dict:
    """The module spec of registered attention ``name`` with its benchmark options (``bench_options``)."""
    return {"kind": "attention", "name": name, "options": dict(get_attention(name).bench_options)}


def causal_float_mask(tgt_len: int, src_len: int) -> Tensor:
    """fairseq's future mask: 0 on and below the diagonal, -inf above."""
    return torch.triu(torch.full((tgt_len, src_len), float("-inf")), 1)


def build_module(spec: dict, dim: int, heads: int, cross: bool, causal: bool) -> nn.Module:
    kind = spec["kind"]
    if kind == "attention":
        module = get_attention(spec["name"]).build(dim, heads, dropout=0.0, causal=causal, cross=cross,
                                                   **spec.get("options", {}))
        for name, value in spec.get("setup", {}).items():
            if name not in SETUPS:
                raise ValueError(f"unknown setup {name!r}; choose from {sorted(SETUPS)}")
            SETUPS[name](module, value)
        for name, value in spec.get("attributes", {}).items():  # class constants (group sizes, thresholds)
            if not hasattr(type(module), name):
                raise ValueError(f"{type(module).__name__} has no class attribute {name!r} to set")
            setattr(module, name, value)
        return module
    if kind == "fairseq_mha":
        from fairseq.modules.multihead_attention import MultiheadAttention
        return MultiheadAttention(dim, heads, dropout=0.0, self_attention=not cross, encoder_decoder_attention=cross)
    if kind in ("sdpa", "projections", "keep_qkv"):
        if kind == "keep_qkv" and cross:
            raise ValueError("the keep_qkv floor is for self attention (q, k and v of the same length)")
        return ProjectedSDPA(dim, heads, causal, attend={"sdpa": "sdpa", "projections": "none"}.get(kind, kind))
    raise ValueError(f"unknown module kind {kind!r}")


def synchronize(device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously: a timer must not stop before it ends)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def training_step(module: nn.Module, dim: int, batch: int, length: int, src_len: int, cross: bool,
                  causal: bool, device="cpu", need_weights: bool = False) -> Callable[[], float]:
    """A function running one forward+backward of ``module`` on a fixed random input; returns its seconds.
    ``need_weights``: called with fairseq's default ``need_weights=True`` (the weights returned and not used)."""
    x = torch.randn(length, batch, dim, device=device, requires_grad=True)
    src = torch.randn(src_len, batch, dim, device=device, requires_grad=True) if cross else x
    # fluence attentions are causal by construction; fairseq's MHA needs the decoder's mask
    needs_mask = causal and not isinstance(module, (FluenceAttention, ProjectedSDPA))
    mask = causal_float_mask(length, src_len).to(device) if needs_mask else None

    def forward() -> Tuple[Tensor, ...]:
        if isinstance(module, ProjectedSDPA):
            return module(x, src)
        return (module(query=x, key=src, value=src, attn_mask=mask, need_weights=need_weights)[0],)

    def step() -> float:
        module.zero_grad(set_to_none=True)
        x.grad = src.grad = None
        synchronize(device)
        start = time.perf_counter()
        sum(out.sum() for out in forward()).backward()
        synchronize(device)
        return time.perf_counter() - start

    return step


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def rss_mb() -> Tuple[float, float]:
    """(resident set, its high-water mark) of this process in MiB (Linux /proc)."""
    return _proc_status_kb("VmRSS") / 1024, _proc_status_kb("VmHWM") / 1024


def reset_peak_rss() -> None:
    """Reset the high-water mark VmHWM to the current RSS."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss_increase_mb(fn: Callable[[], None]) -> float:
    """Run ``fn``; return (peak RSS during it) - (RSS before it), in MiB (Linux /proc)."""
    before = _proc_status_kb("VmRSS")
    reset_peak_rss()
    fn()
    return (_proc_status_kb("VmHWM") - before) / 1024


def cuda_peak_increase_mb(fn: Callable[[], None], device) -> float:
    """Run ``fn``; return the peak CUDA memory allocated during it over what was allocated before, in MiB."""
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


def measure_training(spec: dict, dim: int, heads: int, batch: int, length: int, src_len: int, cross: bool,
                     causal: bool, repeats: int, warmup: int, memory_only: bool = False, device="cpu",
                     allocator: str = "") -> dict:
    """Forward+backward of one module: peak memory of the first full-size step, then ``repeats`` timed steps
    (none with ``memory_only``) after ``warmup`` steps in all and, under the steady ``allocator`` (its
    description) on the CPU, after one that took no page fault (:func:`settle`).

    One step on a 16-token input comes first so that one-time costs (thread pools, library code paged in)
    stay out of the memory number.
    """
    module = build_module(spec, dim, heads, cross, causal).to(device).train()
    training_step(module, dim, batch, min(length, 16), min(src_len, 16), cross, causal, device)()
    step = training_step(module, dim, batch, length, src_len, cross, causal, device)
    on_cuda = torch.device(device).type == "cuda"
    peak_mb = cuda_peak_increase_mb(step, device) if on_cuda else peak_rss_increase_mb(step)
    if memory_only:
        return {"peak_mem_mb": peak_mb}
    for _ in range(warmup - 1):  # the memory step was the first
        step()
    if allocator == STEADY_DESCRIPTION and not on_cuda:
        settle(step)
    times_ms = [step() * 1e3 for _ in range(repeats)]
    return {"time_ms": times_ms, "time_ms_median": statistics.median(times_ms), "time_ms_min": min(times_ms),
            "peak_mem_mb": peak_mb, "gflop": step_gflop(step)}


def step_gflop(step: Callable[[], object]) -> float:
    """The floating-point work of one call of ``step`` in GFLOP, as :class:`torch.utils.flop_counter.FlopCounterMode`
    counts it: matrix products, convolutions and fused attention kernels (here also the CPU flash kernel, whose
    causal calls count half); not FFTs, elementwise passes, reductions or transcendental functions."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_CPU_FLASH_FLOPS) as counter:
        step()
    return counter.get_total_flops() / 1e9


def _cpu_flash_flops(backward: bool):
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    def count(*args, out_shape=None, **kwargs) -> int:
        if backward:  # grad_out, query, key, value, out, logsumexp, dropout_p, is_causal
            grad_out, query, key, value = args[:4]
            flops = sdpa_backward_flop_count(grad_out, query, key, value)
            causal = args[7] if len(args) > 7 else kwargs.get("is_causal", False)
        else:  # query, key, value, dropout_p, is_causal
            query, key, value = args[:3]
            flops = sdpa_flop_count(query, key, value)
            causal = args[4] if len(args) > 4 else kwargs.get("is_causal", False)
        return flops // 2 if causal else flops

    return count


_CPU_FLASH_FLOPS = {op: _cpu_flash_flops(backward) for op, backward in (
    (getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None), False),
    (getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None), True)) if op is not None}


def _copy_state(state: dict) -> dict:
    return {key: dict(buffer) for key, buffer in state.items()}


def _decode_call(module: nn.Module, tokens: Tensor, state: dict) -> Tensor:
    return module(query=tokens, key=tokens, value=tokens, incremental_state=state, need_weights=False)[0]


def _accepts_multi_token_steps(module: nn.Module, dim: int) -> bool:
    try:
        _decode_call(module, torch.randn(2, 1, dim), {})
        return True
    except (ValueError, RuntimeError, AssertionError):
        return False


#: decoding steps of every (position, batch) case are timed in this many interleaved rounds
DECODE_ROUNDS = 5


@torch.no_grad()
def measure_decoding(spec: dict, dim: int, heads: int, positions: List[int], batches: List[int], steps: int,
                     warmup: int, prefill_chunk: int = 512) -> List[dict]:
    """ms per decoding step of a causal self attention with ``positions[i]`` tokens already cached.

    The cache is filled once at batch 1 (in chunks of ``prefill_chunk`` tokens when the module takes
    multi-token queries, else token by token) and copied out to each batch size ``b`` with
    ``reorder_incremental_state(state, zeros(b))``, as fairseq's beam search expands a batch into beams. With
    ``b > 1`` every timed step also reorders the cache by a random beam order, as beam search does.

    The ``steps`` timed steps of each case are spread over :data:`DECODE_ROUNDS` rounds that visit every case in
    turn (each case's cache continues from round to round), so the ratio of a late position to an early one is
    not the drift of a shared machine between two moments: timed one case after another, ABC's and cosFormer's
    steps read 1.13x and 1.49x longer at position 4,096 than at 256, and 0.93x and 1.04x timed alternately.
    """
    module = build_module(spec, dim, heads, cross=False, causal=True).eval()
    chunk = prefill_chunk if _accepts_multi_token_steps(module, dim) else 1
    prefix_state: Dict[str, Dict[str, Optional[Tensor]]] = {}
    filled, cases = 0, []
    for position in sorted(positions):
        while filled < position:
            n = min(chunk, position - filled)
            _decode_call(module, torch.randn(n, 1, dim), prefix_state)
            filled += n
        for beam in batches:
            state = _copy_state(prefix_state)
            module.reorder_incremental_state(state, torch.zeros(beam, dtype=torch.long))
            cases.append({"position": position, "batch": beam, "state": state, "ms": []})

    def step(case) -> float:
        token = torch.randn(1, case["batch"], dim)
        start = time.perf_counter()
        if case["batch"] > 1:
            module.reorder_incremental_state(case["state"], torch.randint(case["batch"], (case["batch"],)))
        _decode_call(module, token, case["state"])
        return (time.perf_counter() - start) * 1e3

    for case in cases:
        for _ in range(warmup):
            step(case)
    rounds = max(1, min(steps, DECODE_ROUNDS))
    for r in range(rounds):
        for case in cases:
            for _ in range(steps // rounds + (1 if r < steps % rounds else 0)):
                case["ms"].append(step(case))
    return [{"position": c["position"], "batch": c["batch"], "ms_per_step": statistics.median(c["ms"])} for c in cases]


def run_job(job: dict) -> dict:
    """One worker's work: training measurement of ``job["module"]``, and decoding if ``job["decode"]``."""
    allocator = None if job.get("memory_only") else use_allocator(job.get("allocator", "steady"))
    torch.manual_seed(0)
    cross, causal = PATTERN_FLAGS[job["pattern"]]
    shape = {k: job[k] for k in ("dim", "heads")}
    result = measure_training(job["module"], batch=job["batch"], length=job["length"], src_len=job["src_len"],
                              cross=cross, causal=causal, repeats=job["repeats"], warmup=job["warmup"],
                              memory_only=job.get("memory_only", False), device=job.get("device", "cpu"),
                              allocator=allocator or "", **shape)
    if job.get("decode"):
        result["decode"] = measure_decoding(job["module"], warmup=job["warmup"], **job["decode"], **shape)
    if allocator is not None:
        result["allocator"] = allocator
    return result
