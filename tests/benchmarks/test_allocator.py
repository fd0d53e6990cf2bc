"""The timing benchmarks' steady allocator (benchmarks.common.use_allocator)."""
import subprocess
import sys
import textwrap

import pytest

from benchmarks.common import ALLOCATORS, STEADY_DESCRIPTION, add_allocator_argument, settle, use_allocator, warm_up

# a fresh process: allocate and free buffers of 4, 12, 24 and 48 MiB (the last above glibc's largest mmap
# threshold) in a varying order, as a training step's temporaries come and go, and count the page faults of the
# repeats after a warm-up
_FAULTS = textwrap.dedent("""
    import resource, sys
    import torch
    from benchmarks.common import use_allocator
    described = use_allocator(sys.argv[1])

    def step(order):
        held = []
        for mib in order:
            held.append(torch.ones(mib << 18))  # float32: 2^18 per MiB, written so that its pages are touched
            if len(held) > 1:
                del held[0]

    orders = [(24, 4, 48, 12), (12, 48, 24, 4), (4, 12, 24, 48)]
    for _ in range(3):  # the warm-up touches the heap's pages: its first rounds place buffers on fresh ones
        for order in orders:
            step(order)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        for order in orders:
            step(order)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, described)
""")


def _faults(allocator: str):
    out = subprocess.run([sys.executable, "-c", _FAULTS, allocator], capture_output=True, text=True, check=True)
    faults, described = out.stdout.strip().split(" ", 1)
    return int(faults), described


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and Linux page-fault counts")
def test_steady_allocator_reuses_freed_buffers_without_page_faults():
    faults, described = _faults("steady")
    assert described.startswith("steady"), described
    # 15 steps of 88 MiB each would fault ~340,000 pages if the buffers went back to the kernel
    assert faults < 500, f"{faults} page faults after the warm-up with the steady allocator"
    # glibc's adaptive defaults map every buffer above 32 MiB on its own (their largest threshold) and unmap it when
    # freed: the 48 MiB one alone faults 12,288 pages in each of the 15 steps
    default_faults, described = _faults("default")
    assert described.startswith("default") and default_faults > 15 * 12288 * 0.9, default_faults


def test_settle_runs_until_a_step_takes_no_page_fault():
    import mmap
    maps = []

    def faults_twice():  # touches fresh anonymous pages on its first two calls only
        if len(maps) < 2:
            maps.append(mmap.mmap(-1, 1 << 22))
            maps[-1].write(b"x" * (1 << 22))
        else:
            maps.append(None)

    # the third call touches nothing new (a fourth only if the interpreter itself faulted in that call)
    calls_made = settle(faults_twice)
    assert calls_made in (3, 4) and len(maps) == calls_made
    calls = []

    def always_faults():
        calls.append(mmap.mmap(-1, 1 << 20))
        calls[-1].write(b"x" * (1 << 20))

    assert settle(always_faults, limit=4) == 4 and len(calls) == 4


def test_warm_up_settles_only_under_the_steady_allocator():
    import mmap
    calls = []

    def always_faults():
        calls.append(mmap.mmap(-1, 1 << 20))
        calls[-1].write(b"x" * (1 << 20))

    warm_up(always_faults, "default (glibc's adaptive settings)")
    assert len(calls) == 1  # glibc's defaults fault at every step: one warm-up call, as before
    warm_up(always_faults, STEADY_DESCRIPTION)
    assert len(calls) == 1 + 8  # settle's limit


def test_unknown_allocator_is_refused_and_the_flag_offers_the_choices():
    with pytest.raises(ValueError, match="--allocator must be one of"):
        use_allocator("jemalloc")
    import argparse
    parser = argparse.ArgumentParser()
    add_allocator_argument(parser)
    assert parser.parse_args([]).allocator == "steady"
    assert parser.parse_args(["--allocator", "default"]).allocator == "default"
    with pytest.raises(SystemExit):
        parser.parse_args(["--allocator", "tcmalloc"])
    assert ALLOCATORS == ("steady", "default")


@pytest.mark.parametrize("module", ["attention", "models", "need_weights", "pruning", "ab", "paired", "span_groups",
                                    "group_sizes", "entmax_search", "entmax_support", "pruning_kernel"])
def test_every_timing_benchmark_takes_the_allocator_flag(module):
    """Each timing benchmark offers --allocator, defaulting to the steady one (its help says so)."""
    out = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--allocator {steady,default}" in out, module


def test_round_robin_times_every_call_in_turn_and_reduces_each():
    """Round r of every call, then round r + 1 (after one warm-up round without the steady allocator); each call's
    seconds reduced by ``reduce``."""
    import statistics
    import time as clock

    from benchmarks.common import round_robin

    order = []
    calls = {"a": lambda: order.append("a"), "b": lambda: (order.append("b"), clock.sleep(0.01))}
    fastest = round_robin(calls, 3, allocator="default")
    assert order == ["a", "b"] * 4
    assert set(fastest) == {"a", "b"} and fastest["b"] >= 0.01 > fastest["a"] >= 0
    medians = round_robin(calls, 2, allocator="default", reduce=statistics.median)
    assert medians["b"] >= 0.01
