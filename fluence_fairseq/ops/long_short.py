"""Transformer-LS math: one joint softmax over a band of local keys and a set of global (landmark / compressed
chunk) keys, computed in query blocks with a recomputing backward.

Query ``i`` may attend band key ``j`` iff ``-right <= i - j <= left`` and ``key_valid[b, j]``; it may attend global
column ``g`` iff ``glob_valid[b, g]`` and ``i >= glob_start[g]`` (noncausal landmarks: ``glob_start = 0``; causal
compressed chunks become visible once they lie entirely left of the query's window). Both kinds of scores share
one softmax, as in the paper ("[LN_G(P^T K); LN_L(K)]"), so the two branches compete for the same probability mass.

Queries go in blocks of ``bq``; block ``b`` scores the ``bq + left + right`` keys of its band, taken as one strided
view of the padded keys (``unfold``), plus the global columns visible to its last query. Forward keeps only the
inputs and the output; backward recomputes the probabilities group by group (flash-attention style), so memory is
O(L * head_dim) plus one bounded group of scores, whatever the window.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["joint_window_global_attention", "dense_joint_attention", "head_layer_norm"]

# elements of one (B, H, blocks, bq, keys) score tensor per group: bounds the transient memory
_GROUP_ELEMENTS = 1 << 18


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def head_layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """Layer norm of each head's vectors (B, H, L, D) with a per-head affine ``weight``/``bias`` (H, D)."""
    y = F.layer_norm(x, (x.size(-1),), eps=eps)
    return torch.addcmul(bias.unsqueeze(1), y, weight.unsqueeze(1))


def dense_joint_attention(
    q: Tensor, k: Tensor, v: Tensor, kg: Tensor, vg: Tensor, *, key_valid: Optional[Tensor],
    glob_valid: Optional[Tensor], glob_start: Tensor, left: int, right: int, query_offset: int = 0,
    dropout_p: float = 0.0,
) -> Tensor:
    """The same math with the full (Lq, G + Lk) score matrix (small inputs and decoding steps).

    Query ``i`` sits at key position ``i + query_offset``; ``glob_start`` compares with that position too.
    """
    tgt_len, src_len, n_glob = q.size(2), k.size(2), kg.size(2)
    acc = _acc(q.dtype)
    scale = q.size(-1) ** -0.5
    pos = torch.arange(tgt_len, device=q.device) + query_offset
    rel = pos.unsqueeze(1) - torch.arange(src_len, device=q.device).unsqueeze(0)
    band_bad = ((rel > left) | (rel < -right)).view(1, 1, tgt_len, src_len)
    if key_valid is not None:
        band_bad = band_bad | ~key_valid.view(key_valid.size(0), 1, 1, src_len)
    glob_bad = (pos.unsqueeze(1) < glob_start.unsqueeze(0)).view(1, 1, tgt_len, n_glob)
    if glob_valid is not None:
        glob_bad = glob_bad | ~glob_valid.view(glob_valid.size(0), 1, 1, n_glob)
    qs = q * scale
    s = torch.cat([torch.matmul(qs, kg.transpose(-1, -2)).to(acc).masked_fill(glob_bad, torch.finfo(acc).min),
                   torch.matmul(qs, k.transpose(-1, -2)).to(acc).masked_fill(band_bad, torch.finfo(acc).min)], -1)
    p = torch.softmax(s, dim=-1).to(q.dtype)
    if dropout_p > 0:
        p = F.dropout(p, p=dropout_p)
    return torch.matmul(p[..., :n_glob], vg) + torch.matmul(p[..., n_glob:], v)


class _JointBlocked(torch.autograd.Function):
    @staticmethod
    def _groups(bsz, heads, nblocks, bq, width):
        step = max(1, _GROUP_ELEMENTS // (bsz * heads * bq * width))
        return [(g, min(nblocks, g + step)) for g in range(0, nblocks, step)]

    @staticmethod
    def _visible(glob_start, g1, bq):
        """Global columns visible to some query of blocks < g1 (glob_start is non-decreasing)."""
        if glob_start.numel() == 0:
            return 0
        return int(torch.searchsorted(glob_start, torch.tensor([g1 * bq - 1], device=glob_start.device),
                                      right=True)[0])

    @staticmethod
    def _scores(qs, kp, kg, g0, g1, bq, kb, band_bad, valid_w, glob_valid, glob_start, n_vis, acc):
        """Masked joint scores (B, H, G, bq, n_vis + kb) of blocks g0..g1-1."""
        bsz, heads, _, _, dim = qs.shape
        count = g1 - g0
        qb = qs[:, :, g0:g1]
        kw = kp.narrow(2, g0 * bq, (count - 1) * bq + kb).unfold(2, kb, bq)  # (B, H, G, D, kb)
        sw = torch.matmul(qb, kw).to(acc)
        bad = band_bad.view(1, 1, bq, kb) | ~valid_w[:, g0:g1].unsqueeze(2)  # (B, G, bq, kb)
        sw.masked_fill_(bad.unsqueeze(1), torch.finfo(acc).min)
        if n_vis == 0:
            return sw, kw
        sg = torch.matmul(qb.reshape(bsz, heads, count * bq, dim), kg[:, :, :n_vis].transpose(-1, -2)).to(acc)
        pos = torch.arange(g0 * bq, g1 * bq, device=qs.device)
        gbad = (pos.unsqueeze(1) < glob_start[:n_vis].unsqueeze(0)).view(1, count * bq, n_vis)
        if glob_valid is not None:
            gbad = gbad | ~glob_valid[:, :n_vis].unsqueeze(1)
        sg.masked_fill_(gbad.unsqueeze(1), torch.finfo(acc).min)
        return torch.cat([sg.view(bsz, heads, count, bq, n_vis), sw], dim=-1), kw

    @staticmethod
    def forward(ctx, q, k, v, kg, vg, valid_w, glob_valid, glob_start, left, right, bq, dropout_p, seed):
        bsz, heads, length, dim = q.shape
        nblocks = valid_w.size(1)
        kb = bq + left + right
        acc = _acc(q.dtype)
        span = (nblocks - 1) * bq + kb
        qs = F.pad(q * dim**-0.5, (0, 0, 0, nblocks * bq - length)).view(bsz, heads, nblocks, bq, dim)
        kp = F.pad(k, (0, 0, left, span - left - length))
        vp = F.pad(v, (0, 0, left, span - left - length))
        rel = torch.arange(bq, device=q.device).unsqueeze(1) + left - torch.arange(kb, device=q.device)
        band_bad = (rel > left) | (rel < -right)
        out = q.new_empty(bsz, heads, nblocks, bq, dim)
        gen = torch.Generator(q.device).manual_seed(seed) if dropout_p > 0 else None
        width = kb + kg.size(2)
        for g0, g1 in _JointBlocked._groups(bsz, heads, nblocks, bq, width):
            n_vis = _JointBlocked._visible(glob_start, g1, bq)
            s, _ = _JointBlocked._scores(qs, kp, kg, g0, g1, bq, kb, band_bad, valid_w, glob_valid, glob_start,
                                         n_vis, acc)
            p = torch.softmax(s, dim=-1)
            if gen is not None:
                p = p * torch.empty_like(p).bernoulli_(1 - dropout_p, generator=gen) / (1 - dropout_p)
            p = p.to(v.dtype)
            vw = vp.narrow(2, g0 * bq, (g1 - g0 - 1) * bq + kb).unfold(2, kb, bq)  # (B, H, G, D, kb)
            o = torch.matmul(p[..., n_vis:], vw.transpose(-1, -2))
            if n_vis:
                count = g1 - g0
                o += torch.matmul(p[..., :n_vis].reshape(bsz, heads, count * bq, n_vis),
                                  vg[:, :, :n_vis]).view(bsz, heads, count, bq, dim)
            out[:, :, g0:g1] = o
        ctx.save_for_backward(q, k, v, kg, vg, valid_w, glob_valid, glob_start, out)
        ctx.config = (left, right, bq, dropout_p, seed)
        return out.view(bsz, heads, nblocks * bq, dim)[:, :, :length].contiguous()

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, kg, vg, valid_w, glob_valid, glob_start, out = ctx.saved_tensors
        left, right, bq, dropout_p, seed = ctx.config
        bsz, heads, length, dim = q.shape
        nblocks = valid_w.size(1)
        kb = bq + left + right
        acc = _acc(q.dtype)
        span = (nblocks - 1) * bq + kb
        pieces = math.ceil(kb / bq)
        scale = dim**-0.5
        qs = F.pad(q * scale, (0, 0, 0, nblocks * bq - length)).view(bsz, heads, nblocks, bq, dim)
        kp = F.pad(k, (0, 0, left, span - left - length))
        vp = F.pad(v, (0, 0, left, span - left - length))
        rel = torch.arange(bq, device=q.device).unsqueeze(1) + left - torch.arange(kb, device=q.device)
        band_bad = (rel > left) | (rel < -right)
        go = F.pad(grad_out, (0, 0, 0, nblocks * bq - length)).view_as(out)
        delta = (go.to(acc) * out.to(acc)).sum(-1)  # rowsum(dO * O) = rowsum(P * dP)
        grad_q = torch.zeros_like(qs)
        grad_kp = q.new_zeros(bsz, heads, (nblocks + pieces) * bq, dim)
        grad_vp = torch.zeros_like(grad_kp)
        grad_kg = torch.zeros_like(kg)
        grad_vg = torch.zeros_like(vg)
        gen = torch.Generator(q.device).manual_seed(seed) if dropout_p > 0 else None
        width = kb + kg.size(2)
        for g0, g1 in _JointBlocked._groups(bsz, heads, nblocks, bq, width):
            count = g1 - g0
            n_vis = _JointBlocked._visible(glob_start, g1, bq)
            s, kw = _JointBlocked._scores(qs, kp, kg, g0, g1, bq, kb, band_bad, valid_w, glob_valid, glob_start,
                                          n_vis, acc)
            p = torch.softmax(s, dim=-1)
            vw = vp.narrow(2, g0 * bq, (count - 1) * bq + kb).unfold(2, kb, bq)  # (B, H, G, D, kb)
            g_out = go[:, :, g0:g1]
            grad_p_w = torch.matmul(g_out, vw)  # (B, H, G, bq, kb)
            if n_vis:
                grad_p_g = torch.matmul(g_out.reshape(bsz, heads, count * bq, dim), vg[:, :, :n_vis].transpose(-1, -2))
                grad_p = torch.cat([grad_p_g.view(bsz, heads, count, bq, n_vis), grad_p_w], -1).to(acc)
            else:
                grad_p = grad_p_w.to(acc)
            if gen is not None:
                keep = torch.empty_like(p).bernoulli_(1 - dropout_p, generator=gen) / (1 - dropout_p)
                p_used, grad_p = p * keep, grad_p * keep
            else:
                p_used = p
            p_used = p_used.to(v.dtype)
            grad_s = grad_p.sub_(delta[:, :, g0:g1].unsqueeze(-1)).mul_(p).to(q.dtype)
            grad_s_w = grad_s[..., n_vis:]
            gq = torch.matmul(grad_s_w, kw.transpose(-1, -2))
            grad_vw = torch.matmul(p_used[..., n_vis:].transpose(-1, -2), g_out)  # (B, H, G, kb, D)
            grad_kw = torch.matmul(grad_s_w.transpose(-1, -2), qs[:, :, g0:g1])  # qs is pre-scaled
            if n_vis:
                rows = count * bq
                grad_s_g = grad_s[..., :n_vis].reshape(bsz, heads, rows, n_vis)
                gq += torch.matmul(grad_s_g, kg[:, :, :n_vis]).view(bsz, heads, count, bq, dim)
                grad_kg[:, :, :n_vis] += torch.matmul(grad_s_g.transpose(-1, -2), qs[:, :, g0:g1].reshape(bsz, heads, rows, dim))
                grad_vg[:, :, :n_vis] += torch.matmul(p_used[..., :n_vis].reshape(bsz, heads, rows, n_vis).transpose(-1, -2),
                                                      g_out.reshape(bsz, heads, rows, dim))
            grad_q[:, :, g0:g1] = gq * scale
            # fold each block's window gradient back onto key rows, bq rows (one "piece") at a time: piece t of
            # block b covers padded rows (b + t) * bq ..; consecutive blocks' pieces are consecutive rows
            for grad_w, grad_buf in ((grad_kw, grad_kp), (grad_vw, grad_vp)):
                grad_w = F.pad(grad_w, (0, 0, 0, pieces * bq - kb)).view(bsz, heads, count, pieces, bq, dim)
                for t in range(pieces):
                    grad_buf[:, :, (g0 + t) * bq:(g1 + t) * bq] += grad_w[:, :, :, t].reshape(bsz, heads, count * bq, dim)
        grad_k = grad_kp[:, :, left:left + length]
        grad_v = grad_vp[:, :, left:left + length]
        grad_q = grad_q.view(bsz, heads, nblocks * bq, dim)[:, :, :length]
        return grad_q, grad_k, grad_v, grad_kg, grad_vg, None, None, None, None, None, None, None, None


def joint_window_global_attention(
    q: Tensor, k: Tensor, v: Tensor, kg: Tensor, vg: Tensor, *, key_padding_mask: Optional[Tensor],
    glob_valid: Optional[Tensor], glob_start: Tensor, left: int, right: int, dropout_p: float = 0.0,
    block_size: Optional[int] = None,
) -> Tensor:
    """Self attention (query ``i`` at key position ``i``) over [global columns || band ``-right <= i-j <= left``].

    Args:
        q, k, v: (B, H, L, D), unscaled queries.
        kg, vg: (B, H, G, D) global keys/values; ``glob_valid`` (B, G) bool or None; ``glob_start`` (G,) long,
            non-decreasing: column ``g`` is visible to queries ``i >= glob_start[g]``.
        key_padding_mask: (B, L) bool, True = padding, or None.
    Returns: (B, H, L, D)
    """
    bsz, heads, length, dim = q.shape
    if block_size is None:
        # small windows waste less with small blocks; 64 was the sweet spot for long windows
        span = left + right + 1
        block_size = 16 if span <= 24 else (32 if span <= 96 else 64)
    bq = max(1, min(block_size, length))
    nblocks = math.ceil(length / bq)
    kb = bq + left + right
    span_len = (nblocks - 1) * bq + kb
    valid = torch.ones(bsz, length, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        valid = ~key_padding_mask
    valid = F.pad(valid, (left, span_len - left - length), value=False)
    valid_w = valid.unfold(1, kb, bq).contiguous()  # (B, nblocks, kb)
    seed = int(torch.randint(0, 2**62, ())) if dropout_p > 0 else 0
    glob_start = glob_start.to(device=q.device, dtype=torch.long).contiguous()
    return _JointBlocked.apply(q, k, v, kg, vg, valid_w, glob_valid, glob_start, left, right, bq, dropout_p, seed)


def compress_chunks(
    k: Tensor, v: Tensor, logits: Tensor, pad: Optional[Tensor], chunk: int
) -> Tuple[Tensor, Tensor, Tensor]:
    """Compress every chunk of ``chunk`` positions of k, v (B, H, L, D) into ``rank`` vectors each.

    ``logits`` (B, H, L, rank): a softmax over each chunk's non-padded positions gives the mixing weights.
    Returns (ck, cv) of shape (B, H, M * rank, D), chunk-major, and ``chunk_valid`` (B, M * rank): False for
    chunks with no real position (their uniform mix of padding must never be attended).
    A trailing incomplete chunk is compressed too (callers show it to no query).
    """
    bsz, heads, length, dim = k.shape
    rank = logits.size(-1)
    n_chunks = math.ceil(length / chunk)
    extra = n_chunks * chunk - length
    neg = torch.finfo(logits.dtype).min
    if pad is None:
        pad = torch.zeros(bsz, length, dtype=torch.bool, device=k.device)
    pad = F.pad(pad, (0, extra), value=True)
    logits = F.pad(logits, (0, 0, 0, extra)).masked_fill(pad.view(bsz, 1, -1, 1), neg)
    weights = torch.softmax(logits.view(bsz, heads, n_chunks, chunk, rank), dim=3)
    kc = F.pad(k, (0, 0, 0, extra)).view(bsz, heads, n_chunks, chunk, dim)
    vc = F.pad(v, (0, 0, 0, extra)).view(bsz, heads, n_chunks, chunk, dim)
    wt = weights.transpose(-1, -2).to(k.dtype)  # (B, H, M, rank, chunk)
    ck = torch.matmul(wt, kc).reshape(bsz, heads, n_chunks * rank, dim)
    cv = torch.matmul(wt, vc).reshape(bsz, heads, n_chunks * rank, dim)
    valid = (~pad).view(bsz, n_chunks, chunk).any(-1).repeat_interleave(rank, dim=1)
    return ck, cv, valid
