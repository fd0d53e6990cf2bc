import math

import pytest
import torch

from attention_contract import AttentionContract, Case
from gradient_reuse import check_query_gradient_reused
from fluence_fairseq.modules import FSLongShort
from fluence_fairseq.ops.common import dropout_keep_mask
from fluence_fairseq.ops.longshort import long_short_attention


class TestLongShortContract(AttentionContract):
    case = Case("longshort", lambda **kw: FSLongShort(32, 4, num_landmarks=3, ls_window_size=3, chunk_size=2,
                                                      chunk_rank=2, **kw), tgt_len=13)


def _ln(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight.unsqueeze(1) + bias.unsqueeze(1)


def _heads(bsz, length, heads=4, dim=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bsz, heads, length, dim, generator=g, dtype=dtype) for _ in range(3)]


def _randomize(attn, seed=3):
    """Layer-norm affines and projection bias away from their identity/zero initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("ln_local_weight", "ln_global_weight"):
            p = getattr(attn, name)
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
        for name in ("ln_local_bias", "ln_global_bias", "proj_bias"):
            p = getattr(attn, name)
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return attn


def noncausal_reference(attn, q, k, v, kpm, keep=None):
    """Dense (L, r + L) score matrix: [landmarks || band keys], one softmax; ``keep`` (B, H, L, r + L) scales the
    probabilities (attention dropout) before they weight the values."""
    bsz, heads, length, dim = q.shape
    w, r = attn.window_size, attn.num_landmarks
    kn, vn = _ln(k, attn.ln_local_weight, attn.ln_local_bias), _ln(v, attn.ln_local_weight, attn.ln_local_bias)
    logits = torch.einsum("bhld,hdr->bhlr", kn, attn.proj_weight) + attn.proj_bias.view(1, heads, 1, r)
    logits = logits.masked_fill(kpm.view(bsz, 1, length, 1), float("-inf"))
    proj = torch.softmax(logits, dim=2)
    kbar = _ln(torch.einsum("bhlr,bhld->bhrd", proj, kn), attn.ln_global_weight, attn.ln_global_bias)
    vbar = _ln(torch.einsum("bhlr,bhld->bhrd", proj, vn), attn.ln_global_weight, attn.ln_global_bias)
    scores = torch.cat([q @ kbar.transpose(-1, -2), q @ kn.transpose(-1, -2)], -1) / math.sqrt(dim)
    i = torch.arange(length)
    allowed = torch.cat([torch.ones(length, r, dtype=torch.bool), (i[:, None] - i[None, :]).abs() <= w], 1)
    allowed = allowed.view(1, 1, length, r + length) & torch.cat(
        [torch.ones(bsz, r, dtype=torch.bool), ~kpm], 1).view(bsz, 1, 1, r + length)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
    if keep is not None:
        probs = probs * keep
    return probs @ torch.cat([vbar, vn], 2)


def causal_reference(attn, q, k, v, kpm, slopes=None):
    """Per query: compressed chunks ending at or before t - w (each compressed by an explicit softmax over its
    real positions) and the keys t-w+1..t; one softmax. Assumes no left padding. With ``slopes``, ALiBi:
    ``-slope_h (t - j)`` for key j, ``-slope_h (t - centre)`` for a chunk, centre the middle of the chunk."""
    bsz, heads, length, dim = q.shape
    w, c, rank = attn.window_size, attn.chunk_size, attn.chunk_rank
    kn, vn = _ln(k, attn.ln_local_weight, attn.ln_local_bias), _ln(v, attn.ln_local_weight, attn.ln_local_bias)
    out = torch.zeros_like(q)
    for b in range(bsz):
        for h in range(heads):
            comp_k, comp_v, comp_end, comp_pos = [], [], [], []
            for m in range(length // c):
                pos = [j for j in range(m * c, m * c + c) if not kpm[b, j]]
                if not pos:
                    continue
                logit = kn[b, h, pos] @ attn.proj_weight[h] + attn.proj_bias[h]  # (n, rank)
                mix = torch.softmax(logit, dim=0)
                gw, gb = attn.ln_global_weight[h:h + 1], attn.ln_global_bias[h:h + 1]
                for s in range(rank):
                    comp_k.append(_ln((mix[:, s:s + 1] * kn[b, h, pos]).sum(0)[None, None], gw, gb)[0, 0])
                    comp_v.append(_ln((mix[:, s:s + 1] * vn[b, h, pos]).sum(0)[None, None], gw, gb)[0, 0])
                    comp_end.append(m * c + c - 1)
                    comp_pos.append(m * c + (c - 1) / 2)
            for t in range(length):
                seen = [i for i in range(len(comp_k)) if comp_end[i] <= t - w]
                keys, vals = [comp_k[i] for i in seen], [comp_v[i] for i in seen]
                window = [j for j in range(max(0, t - w + 1), t + 1) if not kpm[b, j]]
                keys += [kn[b, h, j] for j in window]
                vals += [vn[b, h, j] for j in window]
                if not keys:
                    continue
                scores = torch.stack(keys) @ q[b, h, t] / math.sqrt(dim)
                if slopes is not None:
                    distance = torch.tensor([t - comp_pos[i] for i in seen] + [t - j for j in window])
                    scores = scores - slopes[h] * distance
                out[b, h, t] = torch.softmax(scores, 0) @ torch.stack(vals)
    return out


@pytest.mark.parametrize("block_size", [None, 4, 2])
def test_noncausal_equals_dense_reference(block_size):
    attn = _randomize(FSLongShort(32, 4, num_landmarks=3, ls_window_size=2, block_size=block_size)).eval()
    q, k, v = _heads(2, 19)
    kpm = torch.zeros(2, 19, dtype=torch.bool)
    kpm[1, :4] = True
    kpm[1, -2:] = True
    with torch.no_grad():
        got, _ = attn.attend(q, k, v, key_padding_mask=kpm, attn_mask=None, query_offset=0, need_weights=False)
        want = noncausal_reference(attn, q, k, v, kpm)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_dropout_weights_the_values_with_the_kept_probabilities():
    """With attention dropout the output is (P * keep) @ [landmark values || band values], as in the reference:
    the band values' bias counts once per kept probability, not once per row. The op draws one mask per group of
    query blocks from its seed (``ops.common.dropout_keep_mask``, the group's first block as its stream); at this
    size one group holds every block, so the mask is redrawn here."""
    bsz, heads, length, window, bq, r, p_drop = 2, 4, 19, 2, 4, 3, 0.4
    attn = _randomize(FSLongShort(32, heads, num_landmarks=r, ls_window_size=window, block_size=bq))
    q, k, v = _heads(bsz, length)
    kpm = torch.zeros(bsz, length, dtype=torch.bool)
    kpm[1, -3:] = True
    torch.manual_seed(7)
    with torch.no_grad():
        got = long_short_attention(q, k, v, ln_local=(attn.ln_local_weight, attn.ln_local_bias),
                                   ln_global=(attn.ln_global_weight, attn.ln_global_bias),
                                   proj_weight=attn.proj_weight, proj_bias=attn.proj_bias, key_padding_mask=kpm,
                                   causal=False, window=window, block_size=bq, dropout_p=p_drop)
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**62, ()))
    nblocks, kb = math.ceil(length / bq), bq + 2 * window
    # the group's mask: its stream is the group's first block
    drawn = dropout_keep_mask((bsz, heads, nblocks, bq, r + kb), p_drop, seed, torch.empty(0), stream=0)
    keep = torch.zeros(bsz, heads, length, r + length)
    for i in range(length):
        block, row = divmod(i, bq)
        keep[:, :, i, :r] = drawn[:, :, block, row, :r]
        for c in range(kb):
            j = block * bq + c - window
            if 0 <= j < length:
                keep[:, :, i, r + j] = drawn[:, :, block, row, r + c]
    assert 0.2 < float((drawn == 0).float().mean()) < 0.6
    with torch.no_grad():
        want = noncausal_reference(attn, q, k, v, kpm, keep=keep)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("alibi", [False, True])
# (2, 5, 3, 1): blocks much narrower than the window, whose unpadded blocks mask two corners of their keys
@pytest.mark.parametrize("block_size,window,chunk,rank", [(None, 3, 2, 2), (4, 3, 2, 2), (5, 4, 3, 1), (2, 5, 3, 1)])
def test_causal_equals_dense_reference(block_size, window, chunk, rank, alibi, grouped, padded, monkeypatch):
    """``grouped``: one query block per group, so that groups start past the first query and see compressed chunks
    completed inside their blocks' windows (masked for their earlier queries only; without padding the only
    global columns masked)."""
    import fluence_fairseq.ops.longshort as ops

    if grouped:
        monkeypatch.setattr(ops, "_GROUP_ELEMENTS", 1)
    attn = _randomize(FSLongShort(32, 4, causal=True, ls_window_size=window, chunk_size=chunk, chunk_rank=rank,
                                  block_size=block_size)).eval()
    attn.set_alibi(alibi)
    q, k, v = _heads(2, 21)
    kpm = torch.zeros(2, 21, dtype=torch.bool)
    if padded:
        kpm[1, 5:9] = True  # a fully padded chunk and a partly padded one
        kpm[1, -3:] = True
    with torch.no_grad():
        got, _ = attn.attend(q, k, v, key_padding_mask=kpm if padded else None, attn_mask=None, query_offset=0,
                             need_weights=False)
        want = causal_reference(attn, q, k, v, kpm, attn.alibi_slopes)
    real = ~kpm.view(2, 1, 21, 1).expand_as(got)
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("rank", [2, 1])
@pytest.mark.parametrize("causal,window,block,row_chunk,alibi,dropout", [
    (False, 1, 3, None, False, 0.0), (True, 2, 2, 4, False, 0.0), (True, 2, 2, 4, True, 0.0),
    (False, 1, 3, None, False, 0.4), (True, 2, 2, 4, True, 0.4), (True, 4, 1, 4, False, 0.0),
    (False, 2, 1, None, False, 0.0)])
def test_long_short_function_gradcheck_float64(causal, window, block, row_chunk, alibi, dropout, rank):
    """The hand-written backward (recomputation, in-place layer-norm backward) against finite differences, with
    attention dropout too (the same mask at every call: the global seed is reset before each); one compressed
    vector per chunk (the default ``chunk_rank``, whose chunk maps are single columns: ``ops.common.thin_matmul``)
    and two."""
    g = torch.Generator().manual_seed(4)
    heads, dim, length = 2, 3, 10

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q, k, v = rnd(2, heads, length, dim), rnd(2, heads, length, dim), rnd(2, heads, length, dim)
    params = [1 + 0.3 * rnd(heads, dim), 0.3 * rnd(heads, dim), 1 + 0.3 * rnd(heads, dim), 0.3 * rnd(heads, dim),
              rnd(heads, dim, rank), rnd(heads, rank)]
    kpm = torch.zeros(2, length, dtype=torch.bool)
    kpm[0, 2] = kpm[1, -3:] = True

    def fn(q, k, v, lw, lb, gw, gb, pw, pb):
        torch.manual_seed(0)
        return long_short_attention(q, k, v, ln_local=(lw, lb), ln_global=(gw, gb), proj_weight=pw, proj_bias=pb,
                                    key_padding_mask=kpm, causal=causal, window=window, chunk_size=2,
                                    block_size=block, row_chunk=row_chunk, dropout_p=dropout,
                                    alibi_slopes=torch.tensor([0.5, 0.125], dtype=torch.float64) if alibi else None)

    inputs = [t.clone().requires_grad_(True) for t in (q, k, v, *params)]
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_decoding_state_is_bounded():
    w, c, rank = 3, 4, 2
    attn = FSLongShort(32, 4, causal=True, ls_window_size=w, chunk_size=c, chunk_rank=rank).eval()
    state = {}
    x = torch.randn(30, 2, 32)
    for t in range(30):
        attn(x[t:t + 1], incremental_state=state, need_weights=False)
        buf = attn._get_input_buffer(state)
        entries = buf["ls_recent_key"].size(2) + (buf["ls_chunk_key"].size(2) if "ls_chunk_key" in buf else 0)
        assert entries <= w + (t + 1) // c * rank + c
        assert buf["ls_recent_key"].size(2) <= max(w, c) - 1


def test_left_padding_aligns_chunks_to_first_real_token():
    attn = _randomize(FSLongShort(32, 4, causal=True, ls_window_size=2, chunk_size=3, chunk_rank=1)).eval()
    x = torch.randn(14, 1, 32)
    want = attn(x, need_weights=False)[0]
    padded = torch.cat([torch.randn(2, 1, 32) * 10, x])
    kpm = torch.zeros(1, 16, dtype=torch.bool)
    kpm[0, :2] = True
    got = attn(padded, key_padding_mask=kpm, need_weights=False)[0]
    torch.testing.assert_close(got[2:], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_landmarks": 0}, "num_landmarks"), ({"ls_window_size": -1}, "ls_window_size"),
    ({"chunk_size": 0}, "chunk_size"), ({"chunk_rank": 1.5}, "chunk_rank"), ({"num_landmarks": True}, "num_landmarks"),
])
def test_option_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FSLongShort(32, 4, **kwargs)


def test_defaults_and_no_weights():
    assert FSLongShort(32, 4).window_size == 15
    assert FSLongShort(32, 4, causal=True).window_size == 256
    attn = FSLongShort(32, 4, num_landmarks=2, ls_window_size=1).eval()
    x = torch.randn(9, 2, 32)
    out, weights = attn(x, need_weights=True)
    assert weights is None and out.shape == x.shape
    causal = FSLongShort(32, 4, causal=True).eval()  # default window 256: plain causal softmax over LN'd keys
    state = {}
    steps = torch.cat([causal(x[t:t + 1], incremental_state=state, need_weights=False)[0] for t in range(9)])
    torch.testing.assert_close(steps, causal(x, need_weights=False)[0], atol=1e-5, rtol=0)


def test_multi_token_decoding_matches_full_pass():
    """Block decoding (aligned sequences) and the token loop (left padding) both equal the full pass."""
    attn = _randomize(FSLongShort(32, 4, causal=True, ls_window_size=3, chunk_size=4, chunk_rank=2)).eval()
    x = torch.randn(30, 2, 32)
    kpm = torch.zeros(2, 30, dtype=torch.bool)
    kpm[1, :5] = True
    for mask in (None, kpm):
        full = attn(x, key_padding_mask=mask, need_weights=False)[0]
        state, outs, t = {}, [], 0
        for n in (7, 1, 12, 10):
            piece_mask = None if mask is None else mask[:, t:t + n]
            outs.append(attn(x[t:t + n], key_padding_mask=piece_mask, incremental_state=state, need_weights=False)[0])
            t += n
        got = torch.cat(outs)
        real = torch.ones(30, 2, dtype=torch.bool) if mask is None else ~mask.t()
        torch.testing.assert_close(got[real], full[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_reuse_buffers_writes_the_query_gradient_over_q(causal):
    """reuse_buffers: the same output and gradients, the query gradient in q's own memory (the caller gave it up),
    and a second backward through the graph refused."""
    g = torch.Generator().manual_seed(4)
    bsz, heads, length, dim, rank = 2, 2, 40, 4, 2
    q, k, v = (torch.randn(bsz, heads, length, dim, dtype=torch.float64, generator=g) for _ in range(3))
    params = [torch.randn(heads, dim, dtype=torch.float64, generator=g) for _ in range(4)]
    proj_w = torch.randn(heads, dim, rank, dtype=torch.float64, generator=g)
    proj_b = torch.randn(heads, rank, dtype=torch.float64, generator=g)
    w = torch.randn(bsz, heads, length, dim, dtype=torch.float64, generator=g)
    kpm = torch.zeros(bsz, length, dtype=torch.bool)
    kpm[1, -6:] = True
    check_query_gradient_reused(
        lambda q, k, v, reuse: long_short_attention(
            q, k, v, ln_local=(params[0], params[1]), ln_global=(params[2], params[3]), proj_weight=proj_w,
            proj_bias=proj_b, key_padding_mask=kpm, causal=causal, window=5, chunk_size=4, block_size=8,
            reuse_buffers=reuse), (q, k, v), w)


def _op_inputs(bsz=2, heads=2, length=40, dim=4, rank=2, seed=6):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(bsz, heads, length, dim, dtype=torch.float64, generator=g) for _ in range(3))
    params = [1 + 0.3 * torch.randn(heads, dim, dtype=torch.float64, generator=g) if i % 2 == 0 else
              0.3 * torch.randn(heads, dim, dtype=torch.float64, generator=g) for i in range(4)]
    params += [torch.randn(heads, dim, rank, dtype=torch.float64, generator=g),
               torch.randn(heads, rank, dtype=torch.float64, generator=g)]
    kpm = torch.zeros(bsz, length, dtype=torch.bool)
    kpm[0, 3] = kpm[1, -5:] = True
    return q, k, v, params, kpm


def _op(q, k, v, params, kpm, causal, reuse=False, block=4):
    return long_short_attention(q, k, v, ln_local=(params[0], params[1]), ln_global=(params[2], params[3]),
                                proj_weight=params[4], proj_bias=params[5], key_padding_mask=kpm, causal=causal,
                                window=5, chunk_size=4, block_size=block, reuse_buffers=reuse)


@pytest.mark.parametrize("causal", [True, False])
def test_value_gradient_rows_written_out_group_by_group(causal, monkeypatch):
    """One query block per group and no slack: the value gradient's rolling rows are written out and moved at
    every group. Finite differences agree, and so do the gradients at the default grouping (to rounding: the
    groups also batch the scores differently)."""
    import fluence_fairseq.ops.longshort as ops

    q, k, v, params, kpm = _op_inputs()
    w = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def grads():
        leaves = [t.clone().requires_grad_() for t in (q, k, v, *params)]
        (_op(*leaves[:3], leaves[3:], kpm, causal) * w).sum().backward()
        return [t.grad for t in leaves]

    want = grads()
    monkeypatch.setattr(ops, "_GROUP_ELEMENTS", 1)
    monkeypatch.setattr(ops, "_ROLL_SLACK", 0)
    for g, h in zip(grads(), want):
        torch.testing.assert_close(g, h, rtol=1e-12, atol=1e-12)
    small = [t[:, :, :14].clone().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda q, k, v: _op(q, k, v, params, kpm[:, :14], causal, block=2), small,
                                    fast_mode=True)


@pytest.mark.parametrize("shifts", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_reuse_buffers_frees_k_and_v_and_writes_the_value_gradient_over_the_output_gradient(causal, shifts,
                                                                                            monkeypatch):
    """With ``shifts``, rows of the value gradient are written over the output's gradient at every group, while
    later groups still read it: bitwise the same gradients as into a buffer of their own."""
    import fluence_fairseq.ops.longshort as ops

    if shifts:
        monkeypatch.setattr(ops, "_GROUP_ELEMENTS", 1)
        monkeypatch.setattr(ops, "_ROLL_SLACK", 0)
    q, k, v, params, kpm = _op_inputs()
    grads = {}
    for reuse in (False, True):
        heads = [t.clone().requires_grad_() for t in (q, k, v)]
        given = [t * 1.0 for t in heads]  # memories nothing else reads, as the attention base's heads
        out = _op(*given, params, kpm, causal, reuse=reuse)
        # freed only when the caller gave them up; q becomes the query gradient's memory instead
        assert [t.untyped_storage().nbytes() == 0 for t in given[1:]] == [reuse, reuse]
        incoming = []
        out.register_hook(incoming.append)
        weight = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(2))
        gq, gk, gv = torch.autograd.grad((out * weight).sum(), given)
        shares = gv.untyped_storage().data_ptr() == incoming[0].untyped_storage().data_ptr()
        assert shares == reuse
        grads[reuse] = (gq, gk, gv)
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
