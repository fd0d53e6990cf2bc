"""The chunked attentions group their work by one constant on the CPU (cache-sized groups) and another elsewhere
(GPUs, where every group is a round of kernel launches; docs/gpu.md). Checked with tensors on the meta device,
which is not the CPU and holds no memory."""
import torch

import fluence_fairseq.modules.abc as abc_module
import fluence_fairseq.ops.linear_attention as linear_ops
from fluence_fairseq.modules import FSABCAttention
from fluence_fairseq.ops.longshort import _LongShort

META, CPU = torch.device("meta"), torch.device("cpu")


def test_linear_attention_groups_by_device():
    assert linear_ops.group_size(CPU) == linear_ops.GROUP == 512
    assert linear_ops.group_size(META) == linear_ops.DEVICE_GROUP == 2048


def test_causal_linear_groups_grow_as_the_states_narrow(monkeypatch):
    """A causal group's temporaries are ``group x C`` intra-chunk weights and ``group / C`` states of M x d: cosFormer's
    2 x 64 mixed features fill them at GROUP positions, Performer's 16 features at twice as many; capped, never below
    GROUP, and DEVICE_GROUP off the CPU whatever the widths."""
    assert linear_ops.group_size(CPU, 64, 128, 64) == 512
    assert linear_ops.group_size(CPU, 64, 16, 64) == 1024
    assert linear_ops.group_size(CPU, 32, 16, 64) == 2048 == linear_ops.MAX_GROUP
    assert linear_ops.group_size(CPU, 8, 1, 1) == linear_ops.MAX_GROUP
    assert linear_ops.group_size(CPU, 4, 128, 64) == 512  # wide states per position: never below GROUP
    assert linear_ops.group_size(META, 64, 16, 64) == linear_ops.DEVICE_GROUP
    seen = []
    real = linear_ops._CausalLinearAttention.apply
    monkeypatch.setattr(linear_ops._CausalLinearAttention, "apply",
                        lambda *args: seen.append(args[12]) or real(*args))
    v = torch.randn(1, 2, 100, 8)
    for m, mix in ((16, None), (8, torch.rand(1, 1, 100, 2))):
        phi = torch.rand(1, 2, 100, m)
        linear_ops.causal_linear_attention(phi, phi, v, eps=1e-6, chunk_size=64, query_mix=mix, key_mix=mix)
    # 16 features x 8 values over chunks of 64: 64 per position; 2 x 8 mixed features: still 64
    assert seen == [1024, 1024]
    linear_ops.causal_linear_attention(torch.rand(1, 2, 100, 16), torch.rand(1, 2, 100, 16), v, eps=1e-6,
                                       chunk_size=256)  # chunks of the 100 keys: 100 per position
    assert seen[-1] == 512


def test_longshort_groups_by_device():
    # (B, H, blocks, bq, keys) = (4, 8, 64, 64, 192): 393,216 score elements a block
    on_cpu = _LongShort._groups(4, 8, 64, 64, 192, CPU)
    off_cpu = _LongShort._groups(4, 8, 64, 64, 192, META)
    assert len(on_cpu) == 64 and len(off_cpu) == 64 // 10 + 1  # 2^18: one block a group; 2^22: ten
    assert off_cpu[0] == (0, 10, False) and off_cpu[-1] == (60, 64, False)


def test_abc_walks_more_chunks_per_group_off_the_cpu(monkeypatch):
    seen = []
    monkeypatch.setattr(abc_module, "causal_abc", lambda *args, **kwargs: seen.append(kwargs["block_chunks"]))
    attn = FSABCAttention(32, 4, causal=True)
    for device in (CPU, META):
        q = k = v = torch.empty(2, 4, 16, 8, device=device)
        alpha = torch.empty(2, 4, 16, attn.num_landmarks, device=device)
        attn._run_causal(q, k, v, alpha, alpha)
    assert seen == [attn.block_chunks, attn.device_block_chunks] == [8, 32]
