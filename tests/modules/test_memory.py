"""Segment memory (``forward(memory=)``) for every causal self attention, read from the registry: two consecutive
segments with the carried memory equal one pass over their concatenation (restricted to what the memory keeps),
no gradient reaches the earlier segment, memories reorder with the batch, and attentions that cannot stream say so."""
import pytest
import torch

from fluence_fairseq.modules.registry import ATTENTIONS

E, H, B = 32, 4, 3
CAUSAL = sorted(n for n, s in ATTENTIONS.items() if (False, True) in s.cls.supported_patterns)
STREAMING = [n for n in CAUSAL if ATTENTIONS[n].cls.supports_memory]


def _build(name, **extra):
    spec = ATTENTIONS[name]
    torch.manual_seed(0)
    return spec.build(E, H, causal=True, **{**spec.tiny, **extra}).eval()


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _segments(attn, x, sizes, memory=None):
    memory = {} if memory is None else memory
    outs, t = [], 0
    for n in sizes:
        outs.append(attn(x[t:t + n], memory=memory, need_weights=False)[0])
        t += n
    return torch.cat(outs), memory


def test_every_causal_attention_declares_whether_it_streams():
    assert {"softmax", "adaptive_span", "local", "abc", "performer", "s4d", "longshort"} <= set(STREAMING)
    assert "cosformer" in CAUSAL and "cosformer" not in STREAMING


@pytest.mark.parametrize("name", STREAMING)
def test_segments_with_memory_equal_one_pass_over_the_stream(name):
    attn = _build(name)
    x = _randn(24, B, E, seed=1)
    full = attn(x, need_weights=False)[0]
    out, memory = _segments(attn, x, [10, 8, 6])
    torch.testing.assert_close(out, full, atol=1e-5, rtol=0)
    assert memory and all(t is None or (t.size(0) == B and not t.requires_grad) for t in memory.values())


def test_softmax_memory_keeps_the_last_mem_len_keys():
    attn = _build("softmax")
    attn.set_mem_len(5)
    x = _randn(20, B, E, seed=2)
    out, memory = _segments(attn, x, [8, 12])
    assert memory["prev_key"].size(2) == 5
    # the second segment's queries see the last 5 keys of the first segment and their own prefix
    visible = torch.ones(20, 20, dtype=torch.bool).tril()
    visible[8:, :3] = False
    want = attn(x, attn_mask=~visible, need_weights=False)[0]
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="mem_len must be a positive integer"):
        attn.set_mem_len(0)


def test_adaptive_span_memory_holds_at_most_span_plus_ramp_keys():
    attn = _build("adaptive_span", attn_span=64, adapt_span_ramp=4)
    with torch.no_grad():
        attn.adaptive_span.current_val.fill_(6 / 64)
    x = _randn(40, B, E, seed=3)
    full = attn(x, need_weights=False)[0]
    memory = {}
    for t in range(0, 40, 10):
        attn(x[t:t + 10], memory=memory, need_weights=False)
        assert memory["prev_key"].size(2) <= attn.window() <= 6 + 4 + 1
    torch.testing.assert_close(_segments(attn, x, [10] * 4)[0], full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", STREAMING)
def test_no_gradient_reaches_the_previous_segment(name):
    attn = _build(name).train()
    x = _randn(16, B, E, seed=4).requires_grad_()
    memory = {}
    attn(x[:8], memory=memory, need_weights=False)
    second = attn(x[8:], memory=memory, need_weights=False)[0]
    second.pow(2).sum().backward()
    assert torch.all(x.grad[:8] == 0), "the memory must be detached (truncated backpropagation through time)"
    assert x.grad[8:].abs().sum() > 0


@pytest.mark.parametrize("name", STREAMING)
def test_memory_reorders_with_the_batch(name):
    attn = _build(name)
    x = _randn(12, B, E, seed=5)
    _, memory = _segments(attn, x[:7], [7])
    order = torch.tensor([2, 0, 2])
    reordered = {k: None if t is None else t.index_select(0, order) for k, t in memory.items()}
    got = attn(x[7:, order], memory=reordered, need_weights=False)[0]
    want = attn(x[:, order], need_weights=False)[0][7:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_attentions_that_cannot_stream_or_take_no_memory_say_why():
    with pytest.raises(ValueError, match="cosformer_max_len.*Attentions that can: .*softmax"):
        _build("cosformer")(torch.randn(4, 1, E), memory={})
    noncausal = ATTENTIONS["softmax"].build(E, H)
    with pytest.raises(ValueError, match="segment memory is for causal self attention"):
        noncausal(torch.randn(4, 1, E), memory={})
    with pytest.raises(ValueError, match="either memory .* or incremental_state"):
        _build("softmax")(torch.randn(4, 1, E), memory={}, incremental_state={})


ALIBI = [n for n in STREAMING if ATTENTIONS[n].cls.position_scheme == "alibi"]


def test_alibi_is_offered_where_the_math_takes_a_relative_bias():
    assert {"softmax", "adaptive_span", "local", "sparsemax", "entmax15", "alpha_entmax"} <= set(ALIBI)
    assert ATTENTIONS["s4d"].cls.position_scheme == "state"  # its decaying convolution orders the prefix
    # prefix sums are order-free: without position embeddings these see the prefix as a bag of tokens
    assert ATTENTIONS["performer"].cls.position_scheme == ATTENTIONS["abc"].cls.position_scheme == "none"
    with pytest.raises(ValueError, match="takes no relative position bias.*ALiBi is for .*softmax"):
        _build("performer").set_alibi()


@pytest.mark.parametrize("name", ALIBI)
def test_alibi_survives_memory_and_penalises_distance(name):
    """With ALiBi the bias of a key depends on its distance to the query only, so segments with memory still equal
    one pass; and it is the documented bias: -slope_h * |i - j| added to the scores."""
    attn = _build(name)
    attn.set_alibi()
    x = _randn(24, B, E, seed=6)
    full = attn(x, need_weights=False)[0]
    torch.testing.assert_close(_segments(attn, x, [9, 15])[0], full, atol=1e-5, rtol=0)
    plain = _build(name)
    assert not torch.allclose(plain(x, need_weights=False)[0], full, atol=1e-3)
    if name == "softmax":  # against the explicit formula, through an additive attn_mask on the plain attention
        rel = torch.arange(24).view(-1, 1) - torch.arange(24)
        slopes = attn.alibi_slopes.view(-1, 1, 1)
        bias = (-slopes * rel.abs()).masked_fill(rel < 0, float("-inf"))  # (H, L, L)
        want = plain(x, attn_mask=bias.repeat(B, 1, 1), need_weights=False)[0]
        torch.testing.assert_close(full, want, atol=1e-5, rtol=0)
