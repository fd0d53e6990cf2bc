"""benchmarks.span_groups: both variants run and the grouped one splits the heads (no timing asserted)."""
import torch

from benchmarks import span_groups
from fluence_fairseq.modules import FSAdaptiveSpanAttention


def test_span_groups_benchmark_runs_and_reports_the_groups(capsys):
    assert span_groups.main(["--spans", "0,200", "--attn-span", "256", "--ramp", "8", "--memory", "240",
                             "--segment", "32", "--batch", "1", "--dim", "16", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| over the widest head's band | 1 |" in out and "| in groups of similar span | [[0], [1]] |" in out


def test_one_band_and_head_groups_give_the_same_outputs():
    torch.manual_seed(0)
    attn = FSAdaptiveSpanAttention(16, 2, attn_span=256, adapt_span_ramp=8, causal=True)
    with torch.no_grad():
        attn.adaptive_span.current_val.copy_(torch.tensor([0.0, 0.8]).view(2, 1, 1))
    x = torch.randn(300, 2, 16)
    grouped = attn(x, need_weights=False)[0]
    attn.group_heads = False
    torch.testing.assert_close(attn(x, need_weights=False)[0], grouped, atol=1e-5, rtol=0)
