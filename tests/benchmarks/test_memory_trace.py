"""benchmarks.memory_trace on a tiny step: every mark in order, and what the attention keeps for backward."""
import pytest

from benchmarks import memory_trace


@pytest.mark.skipif(not memory_trace.os.path.exists("/proc/self/clear_refs"), reason="reads /proc (Linux)")
def test_trace_marks_and_saved_tensors():
    job = {"attention": "softmax", "pattern": "causal", "length": 64, "dim": 32, "heads": 4}
    result = memory_trace.trace(job)
    assert [m["where"] for m in result["marks"]] == [
        "step starts", "attend called", "attend returned", "out_proj forward", "forward end",
        "out_proj backward starts", "out_proj backward ends", "q_proj backward starts", "k_proj backward starts",
        "v_proj backward starts", "step ends"]
    assert all(m["peak_mb"] >= m["rss_mb"] - 1e-9 for m in result["marks"])
    one = 64 * 32 * 4 / 2**20  # MiB of one (L, D) float32 tensor
    # softmax (SDPA) keeps q, k, v and its output (which the output projection keeps too, as a view)
    assert sum(t["mb"] for t in result["saved"]) >= 4 * one - 1e-9
    assert all(t["mb"] > 0 for t in result["saved"])
    text = memory_trace.markdown(job, result)
    assert "| attend called |" in text and "total" in text
