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
