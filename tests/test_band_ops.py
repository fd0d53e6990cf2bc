"""The band-attention kernels in fluence_fairseq.ops, checked against the dense reference and by gradcheck."""
import pytest
import torch

import fluence_fairseq.ops.band as band
from fluence_fairseq.ops import band_attention, dense_attention


def qkv(B=2, H=3, L=37, D=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g, dtype=dtype, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("left,right", [(5, 0), (7, 7), (3, 9)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_blocked_path_equals_dense_path_with_gradients(left, right, with_mask, monkeypatch):
    monkeypatch.setattr(band, "_GROUP_ELEMENTS", 200)  # several block groups
    q, k, v = qkv()
    B, H, L, _ = q.shape
    bias_table = torch.randn(H, 2 * L, dtype=torch.float64, requires_grad=True)
    rel_bias = lambda rel: bias_table[:, (rel + L).clamp(0, 2 * L - 1)]  # noqa: E731
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1, :4] = True
    attn_mask = None
    if with_mask:
        attn_mask = torch.zeros(1, 1, L, L, dtype=torch.float64)
        attn_mask[..., 10:20, 12:15] = -3.0
    kwargs = dict(query_offset=0, left=left, right=right, rel_bias=rel_bias, key_padding_mask=kpm, attn_mask=attn_mask)
    blocked = band.blocked_band_attention(q, k, v, block_size=8, **kwargs)
    dense, _ = dense_attention(q, k, v, **kwargs)
    real = ~kpm.view(B, 1, L, 1).expand_as(blocked) if right == 0 else torch.ones_like(blocked, dtype=torch.bool)
    torch.testing.assert_close(blocked[real], dense[real])
    weights = torch.randn_like(dense)
    grads_b = torch.autograd.grad((blocked * weights)[real].sum(), [q, k, v, bias_table])
    grads_d = torch.autograd.grad((dense * weights)[real].sum(), [q, k, v, bias_table])
    for gb, gd in zip(grads_b, grads_d):
        torch.testing.assert_close(gb, gd)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_blocked_kernel_gradcheck(dropout_p, monkeypatch):
    monkeypatch.setattr(band, "_GROUP_ELEMENTS", 100)
    q, k, v = qkv(B=1, H=2, L=13, D=3)
    left, right, bq = 4, 2, 4
    nblocks, kb = 4, bq + left + right
    rel = torch.arange(bq).unsqueeze(1) + left - torch.arange(kb).unsqueeze(0)
    bandmask = (rel <= left) & (rel >= -right)
    bias = torch.randn(2, bq, kb, dtype=torch.float64, requires_grad=True)
    valid = torch.ones(1, nblocks, kb, dtype=torch.bool)
    valid[0, 0, :left] = False  # keys before the sequence start
    fn = lambda q, k, v, bias: band._BlockedBand.apply(  # noqa: E731
        q, k, v, bias, None, valid, bandmask, -left, bq, dropout_p, 1234)
    assert torch.autograd.gradcheck(fn, (q, k, v, bias))


def test_dropout_is_applied_and_reproducible_from_the_global_seed():
    q, k, v = qkv(dtype=torch.float32, L=64)
    kwargs = dict(query_offset=0, left=9, right=0, rel_bias=lambda rel: torch.zeros(3, *rel.shape),
                  dropout_p=0.5, block_size=8)
    torch.manual_seed(7)
    a = band.blocked_band_attention(q, k, v, **kwargs)
    torch.manual_seed(7)
    b = band.blocked_band_attention(q, k, v, **kwargs)
    no_dropout = band.blocked_band_attention(q, k, v, **{**kwargs, "dropout_p": 0.0})
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, no_dropout)


def test_blocked_path_keeps_only_linear_memory_for_backward():
    q, k, v = qkv(B=1, H=2, L=512, D=8, dtype=torch.float32)
    bias = torch.zeros(2, 1, 1, requires_grad=True)
    out, _ = band_attention(q, k, v, query_offset=0, left=31, right=0, rel_bias=lambda rel: bias.expand(2, *rel.shape),
                            block_size=32)
    saved = out.grad_fn.saved_tensors
    biggest = max(t.numel() for t in saved if t is not None)
    assert biggest <= 2 * 512 * 8 * 2, f"backward keeps a tensor of {biggest} elements"
