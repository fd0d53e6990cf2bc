"""Training memory guards: what a training forward keeps for backward, in units of one (L, B, D) float tensor.

The long-input memory of these attentions (``benchmarks.attention``, L=8192) was brought within 1.5x the
projections-only step by keeping fewer L-sized tensors for backward. Timing and RSS belong to the benchmarks; this
counts, at a small size, the distinct storages autograd keeps (q, k and v views, the output projection's input,
and whatever the attention adds), so that reintroducing a kept logits, probabilities or kernel tensor fails here.
Each bound sits between the count after that work and the count before it (noted per case)."""
import weakref

import pytest
import torch

from fluence_fairseq.modules.registry import get_attention

LENGTH, BATCH, DIM, HEADS = 512, 2, 256, 4

#: (attention, causal) -> bound; before / after the change that set it
BOUNDS = {
    ("performer", False): 4.9,  # 5.61 / 4.66: one feature function keeps only the features and the keys
    ("performer", True): 4.9,  # 5.56 / 4.61
    ("s4d", False): 4.6,  # 5.74 / 4.30: the kernel factors' exponentials are recomputed
    ("s4d", True): 3.7,  # 4.12 / 3.40
    ("abc", False): 5.4,  # 5.82 / 5.07: slots and slot attention recompute their probabilities
    ("probsparse", False): 5.4,  # 5.62 / 5.14: the selected queries go through the fused kernel
    ("nystrom", False): 5.7,  # 5.94 / 5.44: both L-sized kernels are recomputed
}


def _saved_units(name: str, causal: bool) -> float:
    torch.manual_seed(0)
    attn = get_attention(name).build(DIM, HEADS, dropout=0.0, causal=causal).train()
    x = torch.randn(LENGTH, BATCH, DIM, requires_grad=True)
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = attn(x, x, x, need_weights=False)[0]
    storages.pop(x.untyped_storage().data_ptr(), None)  # the input exists before the step
    out.sum().backward()  # the graph is usable
    return sum(storages.values()) / (LENGTH * BATCH * DIM * x.element_size())


@pytest.mark.parametrize("name,causal", sorted(BOUNDS))
def test_training_keeps_few_length_sized_tensors_for_backward(name, causal):
    units = _saved_units(name, causal)
    assert 3.0 <= units <= BOUNDS[(name, causal)], f"{name} keeps {units:.2f} (L, B, D) tensors for backward"


def test_projected_heads_are_released_before_the_output_projection():
    """The base drops its q, k, v once the attention has its output: an attention that keeps something else for
    backward (local attention keeps padded copies) must not have them alive beside the output projection's
    forward, where they would add three (L, B, D) tensors to the step's peak."""
    torch.manual_seed(0)
    attn = get_attention("local").build(DIM, HEADS, dropout=0.0, causal=True).train()
    refs, alive = [], []
    attend = attn.attend

    def recording_attend(q, k, v, **kwargs):
        refs.extend(weakref.ref(t) for t in (q, k, v))
        return attend(q, k, v, **kwargs)

    attn.attend = recording_attend
    attn.out_proj.register_forward_pre_hook(lambda module, args: alive.append([r() is not None for r in refs]))
    x = torch.randn(LENGTH, BATCH, DIM, requires_grad=True)
    attn(x, x, x, need_weights=False)[0].sum().backward()
    assert len(refs) == 3 and alive == [[False, False, False]]


def _pattern_cases():
    from fluence_fairseq.modules.registry import ATTENTIONS
    return [(name, cross, causal) for name, spec in sorted(ATTENTIONS.items())
            for cross, causal in sorted(spec.cls.supported_patterns)]


def _build(name, causal, dtype=torch.float32, cross=False):
    spec = get_attention(name)
    options = dict(spec.tiny)
    if name == "cosformer":
        options["cosformer_max_len"] = 2048
    return spec.build(64, 4, dropout=0.0, causal=causal, cross=cross, **options).to(dtype).train()


def _source(x: torch.Tensor, cross: bool) -> torch.Tensor:
    """The keys' input: the query's own for self attention, a longer sequence for cross attention."""
    return torch.randn(x.size(0) + 7, *x.shape[1:], dtype=x.dtype, requires_grad=True) if cross else x


@pytest.mark.parametrize("name,cross,causal", _pattern_cases())
def test_an_attention_that_declares_it_does_not_keep_its_output_keeps_none_of_it(name, cross, causal):
    """``keeps_output = False`` lets the output projection write its input gradient over the attention's output;
    none of the attention's paths (short inputs, blocked and narrow kernels) may then save that output."""
    torch.manual_seed(0)
    attn = _build(name, causal, cross=cross)
    if attn.keeps_output:
        pytest.skip(f"{name} keeps its output (the base writes only over a copy)")
    attend, kept = attn.attend, []

    def probing_attend(q, k, v, **kwargs):
        storages = []

        def pack(t):
            storages.append(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out, weights = attend(q, k, v, **kwargs)
        kept.append(out.untyped_storage().data_ptr() in storages)
        return out, weights

    attn.attend = probing_attend
    for length in (16, 300, 1100):
        x = torch.randn(length, 2, 64, requires_grad=True)
        src = _source(x, cross)
        attn(x, src, src, need_weights=False)[0].sum().backward()
    assert kept == [False] * 3


@pytest.mark.parametrize("name,cross,causal", _pattern_cases())
def test_the_output_projection_writing_over_its_input_gives_the_plain_gradients(name, cross, causal, monkeypatch):
    """Every attention and pattern, with padding: the same output and gradients (float64) as a plain ``out_proj``
    call, and the reuse did happen (where the attention does not keep its output)."""
    from fluence_fairseq.modules import attention_base
    torch.manual_seed(0)
    attn = _build(name, causal, torch.float64, cross=cross)
    x = torch.randn(40, 2, 64, dtype=torch.float64, requires_grad=True)
    src = _source(x, cross)
    padding = torch.zeros(2, src.size(0), dtype=torch.bool)
    padding[1, -5:] = True

    def grads():
        attn.zero_grad(set_to_none=True)
        x.grad = src.grad = None
        torch.manual_seed(1)  # LARA's noise and ProbSparse's key sample: the same in both calls
        out = attn(x, src, src, key_padding_mask=padding, need_weights=False)[0]
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return [out.detach(), x.grad, src.grad] + [p.grad for p in attn.parameters() if p.grad is not None]

    used = []
    real = attention_base.linear_grad_over_input
    monkeypatch.setattr(attention_base, "linear_grad_over_input", lambda *a: used.append(1) or real(*a))
    reused = grads()
    monkeypatch.setattr(attention_base.FluenceAttention, "_project_output",
                        lambda self, merged, exclusive: self.out_proj(merged))
    plain = grads()
    # an attention that keeps its output is written over only where the heads' merge copied it
    assert used == [1] or (attn.keeps_output and used == [])
    assert len(reused) == len(plain)
    for a, b in zip(reused, plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_the_output_projection_stays_a_plain_call_under_hooks_autocast_or_a_kept_output(monkeypatch):
    """Quant noise and weight pruning run as ``out_proj`` hooks, tools add backward or global hooks, autocast casts
    in its call: those take the plain call; so does an attention that keeps its output in the projections' layout
    (nothing copied it)."""
    from fluence_fairseq.modules import attention_base
    used = []
    real = attention_base.linear_grad_over_input
    monkeypatch.setattr(attention_base, "linear_grad_over_input", lambda *a: used.append(1) or real(*a))
    x = torch.randn(40, 2, 64, requires_grad=True)
    attn = _build("entmax15", False)
    hooked = []
    handle = attn.out_proj.register_forward_pre_hook(lambda module, args: hooked.append(1))
    attn(x, x, x, need_weights=False)[0].sum().backward()
    assert hooked == [1] and used == []
    handle.remove()
    handle = attn.out_proj.register_full_backward_hook(lambda module, grad_in, grad_out: hooked.append(2))
    attn(x, x, x, need_weights=False)[0].sum().backward()
    assert hooked == [1, 2] and used == []
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    attn(x, x, x, need_weights=False)[0].sum().backward()
    assert used == []
    handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn(x, x, x, need_weights=False)[0].float().sum().backward()
    assert used == []
    attn(x, x, x, need_weights=False)[0].sum().backward()
    assert used == [1]
    # an output that its own backward keeps and that is already in the projections' layout: left alone
    keeper = _build("entmax15", False)
    keeper.keeps_output = True

    def attend_in_projection_layout(q, k, v, **kwargs):
        out, weights = type(keeper).attend(keeper, q, k, v, **kwargs)
        return out.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3), weights

    keeper.attend = attend_in_projection_layout
    used.clear()
    keeper(x, x, x, need_weights=False)[0].sum().backward()
    assert used == []


def test_a_second_backward_through_a_whole_pass_is_refused():
    """The output projection's input holds its gradient after the first backward: autograd refuses a second one
    instead of reading the gradient as the input (double backward, where nothing is overwritten, is checked on
    the op in tests/ops/test_common.py)."""
    torch.manual_seed(0)
    attn = _build("entmax15", True)
    x = torch.randn(40, 2, 64, requires_grad=True)
    out = attn(x, x, x, need_weights=False)[0].sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_the_attentions_output_is_freed_before_the_output_projection_when_the_merge_copies_it():
    """A copying merge leaves the attention's output to autograd: entmax's ``p @ v`` does not keep it, so it is
    gone when the output projection runs (it was alive beside the copy and the projection's output)."""
    torch.manual_seed(0)
    attn = _build("entmax15", False)
    refs, alive = [], []
    attend = attn.attend

    def recording_attend(q, k, v, **kwargs):
        out, weights = attend(q, k, v, **kwargs)
        refs.append(weakref.ref(out))
        return out, weights

    attn.attend = recording_attend
    attn.out_proj.register_forward_pre_hook(lambda module, args: alive.append(refs[0]() is not None))
    x = torch.randn(40, 2, 64, requires_grad=True)
    attn(x, x, x, need_weights=False)[0].sum().backward()
    assert alive == [False]


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing_gives_the_plain_gradients(use_reentrant):
    """fairseq's --checkpoint-activations recomputes a layer's forward in backward (torch's checkpoint, reentrant or
    not): the output projection then writes over the recomputed input, once, and the gradients are unchanged."""
    import torch.utils.checkpoint as checkpoint
    torch.manual_seed(0)
    for name in ("entmax15", "lara"):
        attn = _build(name, False, torch.float64)
        x = torch.randn(40, 2, 64, dtype=torch.float64, requires_grad=True)

        def grads(run):
            attn.zero_grad(set_to_none=True)
            x.grad = None
            torch.manual_seed(1)  # LARA's noise, the same in the recomputed forward
            run().sum().backward()
            return [x.grad] + [p.grad for p in attn.parameters()]

        plain = grads(lambda: attn(x, x, x, need_weights=False)[0])
        checkpointed = grads(lambda: checkpoint.checkpoint(lambda t: attn(t, t, t, need_weights=False)[0], x,
                                                           use_reentrant=use_reentrant))
        for a, b in zip(checkpointed, plain):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
