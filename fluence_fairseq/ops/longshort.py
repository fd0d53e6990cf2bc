"""Transformer-LS math: one joint softmax over a band of local keys and a set of global (landmark / compressed
chunk) keys, computed in query blocks with a recomputing backward.

Query ``i`` may attend band key ``j`` iff ``-right <= i - j <= left`` and ``key_valid[b, j]``; it may attend global
column ``g`` iff ``glob_valid[b, g]`` and ``i >= glob_start[g]`` (noncausal landmarks: ``glob_start = 0``; causal
compressed chunks become visible once they lie entirely left of the query's window). Both kinds of scores share
one softmax, as in the paper ("[LN_G(P^T K); LN_L(K)]"), so the two branches compete for the same probability mass.

:func:`long_short_attention` (training and full-sequence inference) is one autograd node, :class:`_LongShort`:
queries go in blocks of ``bq``; block ``b`` scores the ``bq + left + right`` keys of its band, taken as one strided
view of the padded normalised keys (``unfold``, all blocks of a group at once), plus the global columns visible to
its group's last query. Forward keeps the normalised keys/values and q; backward recomputes the
probabilities group by group (flash-attention style), so memory is a few L x D tensors plus one bounded group of
scores, whatever the window. On the CPU without dropout or ALiBi, forward runs the blocks whose windows hold real
keys only through the CPU flash kernel instead (:meth:`_LongShort._flash_group`: 0.90x the causal training step at
L=8192, window 256, Intel Xeon); backward keeps the explicit scores. :func:`dense_joint_attention` is the same math
with a full score matrix (decoding).
"""
import bisect
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import (FLASH_CPU, LOG2_E, accumulation_dtype as _acc, covers_storage, cpu_flash_applies, dropout_keep_mask,
                     fold_windows, free_memory, thin_matmul)

__all__ = ["long_short_attention", "dense_joint_attention", "compress_chunks", "head_layer_norm"]

# elements of one (B, H, blocks, bq, keys) score tensor per group: bounds the transient memory
_GROUP_ELEMENTS = 1 << 18
# the same off the CPU (GPUs), where a group is a round of small kernel launches: on an H200 (causal, L=4096,
# batch 4, width 512, ``python -m benchmarks.group_sizes``) 2^22 took the training step to 0.34x that of 2^18 at
# 1.27x its peak memory (0.80x fairseq's attention's); 2^20 was slower (1.23x)
_DEVICE_GROUP_ELEMENTS = 1 << 22
#: whether the forward's groups of query blocks go through the CPU flash kernel (:meth:`_LongShort._flash_group`)
#: where it applies (a CPU tensor, no dropout, no ALiBi, kernels present); False: the explicit scores everywhere
FLASH_GROUPS = True
#: whether backward takes the probabilities of the groups whose windows hold real keys only from the forward's
#: log-sum-exps (False: a softmax of the joined scores everywhere, the reference for tests)
BACKWARD_FROM_LSE = True
#: elements of one group's key windows (blocks x B x H x window keys x D) on the flash path, which forms no scores:
#: bounds its transient windows and their gradients
_FLASH_GROUP_ELEMENTS = 1 << 21
#: the widest default query block of the flash path (causal, L=8192, window 256, Intel Xeon: a forward of 98 ms
#: in blocks of 64 against 101 in 32 and 111 in 128; the explicit scores take blocks of 128, see
#: :func:`long_short_attention`)
FLASH_BLOCK = 64


def head_layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """Layer norm of each head's vectors (B, H, L, D) with a per-head affine ``weight``/``bias`` (H, D)."""
    y = F.layer_norm(x, (x.size(-1),), eps=eps)
    return torch.addcmul(bias.unsqueeze(1), y, weight.unsqueeze(1))


def dense_joint_attention(
    q: Tensor, k: Tensor, v: Tensor, kg: Tensor, vg: Tensor, *, key_valid: Optional[Tensor],
    glob_valid: Optional[Tensor], glob_start: Tensor, left: int, right: int, query_offset: int = 0,
    dropout_p: float = 0.0, alibi_slopes: Optional[Tensor] = None, glob_distance: Optional[Tensor] = None,
) -> Tensor:
    """The same math with the full (Lq, G + Lk) score matrix (small inputs and decoding steps).

    Query ``i`` sits at key position ``i + query_offset``; ``glob_start`` compares with that position too.
    ``alibi_slopes`` (H,): ALiBi, ``-slope_h |i - j|`` on the band and ``-slope_h * glob_distance`` on the global
    columns (``glob_distance`` (B|1, Lq, G): from each query to each column's position).
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
    sg, sb = torch.matmul(qs, kg.transpose(-1, -2)).to(acc), torch.matmul(qs, k.transpose(-1, -2)).to(acc)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(acc).view(1, -1, 1, 1)
        sb = sb - slopes * rel.abs().to(acc)
        if n_glob:
            sg = sg - slopes * glob_distance.to(acc).unsqueeze(1)
    s = torch.cat([sg.masked_fill(glob_bad, torch.finfo(acc).min), sb.masked_fill(band_bad, torch.finfo(acc).min)], -1)
    p = torch.softmax(s, dim=-1).to(q.dtype)
    if dropout_p > 0:
        p = F.dropout(p, p=dropout_p)
    return torch.matmul(p[..., :n_glob], vg) + torch.matmul(p[..., n_glob:], v)


def _rows(x: Tensor, start: int, length: int) -> Tensor:
    """Rows ``start .. start+length-1`` of ``x`` (B, H, L, D) along dim 2, zeros outside ``[0, L)``."""
    lo, hi = max(0, start), min(x.size(2), start + length)
    if lo >= hi:
        return x.new_zeros(x.size(0), x.size(1), length, x.size(3))
    piece = x[:, :, lo:hi]
    if lo - start or start + length - hi:
        piece = F.pad(piece, (0, 0, lo - start, start + length - hi))
    return piece


def _whole_blocks(length: int, *blocks: int) -> int:
    """``length`` rounded up to whole blocks of every block size given (forward's and backward's)."""
    return max(math.ceil(length / b) * b for b in blocks)


def _softmax_backward(p: Tensor, grad_p: Tensor, dim: int) -> Tensor:
    return p * (grad_p - (p * grad_p).sum(dim, keepdim=True))


class _RollingRows:
    """Window gradients folded onto key rows through a short buffer of padded rows (row ``r`` is key
    ``r - left``), each key's row written to ``out`` (B, H, L, D) once complete.

    Padded row ``r`` gets contributions from the blocks ``t <= r // bq`` only, so once the groups before block
    ``g0`` are done every row below ``g0 * bq`` is complete. The buffer covers rows ``[base, base + cap)`` with
    ``cap`` the widest group's window rows plus :data:`_ROLL_SLACK` blocks; when a group would run past it, the
    complete rows are written out, the incomplete ones moved to the front and the rest zeroed. A key row ``j`` is
    written only after the groups up to the query block of ``j + left`` (>= ``j``) have run, so ``out`` may be
    the output's gradient, whose rows the groups read in order."""

    def __init__(self, out: Tensor, left: int, bq: int, kb: int, groups):
        bsz, heads, self.length, dim = out.shape
        widest = max(g[1] - g[0] for g in groups)
        # a window's rows rounded up to whole blocks: fold_windows adds a group of windows in padded pieces
        self.kb = -(-kb // bq) * bq
        self.out, self.left, self.bq = out, left, bq
        self.cap = (widest + _ROLL_SLACK) * bq + self.kb - bq
        self.buf = out.new_zeros(bsz, heads, self.cap, dim)
        self.base = 0  # padded row of buf[:, :, 0]; a multiple of bq

    def fold(self, grad_windows: Tensor, g0: int, g1: int) -> None:
        end = (g1 - 1) * self.bq + self.kb  # one past the group's last padded row
        if end - self.base > self.cap:
            self._write(self.base, g0 * self.bq)
            keep = self.cap - (g0 * self.bq - self.base)
            self.buf[:, :, :keep] = self.buf[:, :, self.cap - keep:].clone()
            self.buf[:, :, keep:].zero_()
            self.base = g0 * self.bq
        fold_windows(grad_windows, self.buf, (g0 * self.bq - self.base) // self.bq, self.bq)

    def finish(self) -> None:
        self._write(self.base, self.base + self.cap)

    def _write(self, lo: int, hi: int) -> None:
        """Padded rows ``[lo, hi)`` (complete) to their keys' rows of ``out``; rows outside the keys are dropped."""
        j0, j1 = max(0, lo - self.left), min(self.length, hi - self.left)
        if j1 > j0:
            start = j0 + self.left - self.base
            self.out[:, :, j0:j1] = self.buf[:, :, start:start + j1 - j0]


#: extra blocks of rows in a :class:`_RollingRows` buffer beyond the widest group's window: rows are written out
#: and moved once per this many blocks instead of after every group
_ROLL_SLACK = 4


class _GroupMasks:
    """The disallowed scores of a group of query blocks, masked when the group is scored (built for every block
    at once they were 5 MiB at L=8192, window 256, alive through forward and backward).

    Band: a block's disallowed pairs lie in its first and last ``bq`` columns (keys before the first query's
    window, after the last query's position), unless a key of its window is padding or outside the sequence; a
    group of blocks whose windows hold real keys only has those two corners masked, 2 bq of its ``kb`` columns
    (at L=8192, window 256: 43% of the block's entries; the whole block's boolean mask and its fill took 2-3% of
    the causal step). Global columns: a group's queries all see the columns visible to its first query; only the
    few after those (a chunk that completes inside the group's queries' windows) are masked, unless some columns
    are padding (``glob_valid``), where every one is."""

    def __init__(self, band: Tensor, valid_windows: Tensor, glob_start: Tensor, glob_valid: Optional[Tensor],
                 bq: int):
        self.band_shape, self.valid_windows = band, valid_windows  # (1, 1, bq, kb), (B, nblocks, kb)
        self.glob_start, self.glob_valid, self.bq = glob_start, glob_valid, bq
        self.real_windows = valid_windows.all(-1).all(0).tolist()  # per block: every window key real
        kb = band.size(-1)
        self.corners = [slice(0, kb)] if kb <= 2 * bq else [slice(0, bq), slice(kb - bq, kb)]
        self.biases = {}  # the corners' additive masks per (dtype, fill value), the whole band's per ("band", dtype)
        self.starts = glob_start.tolist()  # non-decreasing

    def visible(self, g1: int) -> int:
        """Global columns visible to some query of blocks < g1."""
        return bisect.bisect_right(self.starts, g1 * self.bq - 1)

    def fill_band(self, sw: Tensor, g0: int, g1: int, value: float) -> None:
        """Mask the disallowed band scores ``sw`` (B, H, G, bq, kb) of blocks g0..g1-1 with ``value``."""
        if all(self.real_windows[g0:g1]):
            # added rather than filled: a boolean mask broadcast over the heads and blocks took 4x as long, and
            # ``value`` (the dtype's lowest) absorbs any score (|s| below its ulp, ~1e31 in float32)
            key = (sw.dtype, value)
            if key not in self.biases:
                self.biases[key] = [torch.zeros(self.band_shape[..., cols].shape, dtype=sw.dtype,
                                                       device=sw.device).masked_fill_(self.band_shape[..., cols], value)
                                           for cols in self.corners]
            for cols, bias in zip(self.corners, self.biases[key]):
                sw[..., cols] += bias
        else:
            sw.masked_fill_((self.band_shape | ~self.valid_windows[:, g0:g1].unsqueeze(2)).unsqueeze(1), value)

    def has_keys(self, block: int) -> bool:
        """Whether block ``block``'s windows hold real keys only (for every sequence): every query of it then has
        a key, and its band mask is the same for every block."""
        return self.real_windows[block]

    def flash_applies(self, block: int) -> bool:
        """Whether block ``block`` can go through the flash kernel: :meth:`has_keys`, and no global column is
        padding, so one additive mask serves every block and sequence."""
        return self.real_windows[block] and self.glob_valid is None

    def band_bias(self, dtype, device) -> Tensor:
        """(1, 1, bq, kb) additive mask of a block's disallowed band pairs (the dtype's lowest value there)."""
        key = ("band", dtype)
        if key not in self.biases:
            self.biases[key] = torch.zeros(self.band_shape.shape, dtype=dtype, device=device).masked_fill_(
                self.band_shape, torch.finfo(dtype).min)
        return self.biases[key]

    def glob_bias(self, g0: int, g1: int, n_vis: int, dtype) -> Optional[Tensor]:
        """(1, 1, G * bq, n_vis) additive mask of the global columns the queries of blocks g0..g1-1 may not see
        (padding aside: the flash path has none), None when every query sees all ``n_vis``."""
        if bisect.bisect_right(self.starts, g0 * self.bq) >= n_vis:
            return None
        bias = torch.zeros(1, 1, (g1 - g0) * self.bq, n_vis, dtype=dtype, device=self.glob_start.device)
        self.fill_glob(bias, g0, g1, n_vis, torch.finfo(dtype).min)
        return bias

    def fill_glob(self, sg: Tensor, g0: int, g1: int, n_vis: int, value: float) -> None:
        """Mask the global columns ``sg`` (B, H, G * bq, n_vis) that queries of blocks g0..g1-1 may not see."""
        first = 0 if self.glob_valid is not None else bisect.bisect_right(self.starts, g0 * self.bq)
        if first >= n_vis:
            return
        pos = torch.arange(g0 * self.bq, g1 * self.bq, device=self.glob_start.device)
        bad = (pos.unsqueeze(1) < self.glob_start[first:n_vis].unsqueeze(0)).unsqueeze(0)
        if self.glob_valid is not None:
            bad = bad | ~self.glob_valid[:, :n_vis].unsqueeze(1)
        sg[..., first:n_vis].masked_fill_(bad.unsqueeze(1), value)


class _LongShort(torch.autograd.Function):
    """The whole long-short attention of one layer (after the q/k/v projections) as one autograd node.

    Keys and values are layer-normalised once (``y = (x - mean) * rstd``, before the per-head affine
    ``kn = y * w + b``) into padded buffers; forward saves only ``y``, ``rstd``, q and the small compressed keys and
    values (the mixing weights ``A`` are recomputed in backward), and writes the output into an (L, B, H, D)
    buffer (so the caller's permute + reshape is a view). It does not keep the output: backward takes the softmax
    backward's row sums ``rowsum(P * dP)`` from the probabilities it recomputes block by block anyway, so the
    output is freed with ``out_proj``'s backward. The key gradient is accumulated in place, the value gradient
    through :class:`_RollingRows`; with ``reuse_buffers`` the query gradient goes over q, the value gradient over
    the output's gradient, and k and v are freed once normalised: memory stays a few L x D tensors.

    The affine never touches an L x D tensor: band scores are ``(q * w) . y_j`` (the per-query constant ``q . b``
    is subtracted from the global scores instead, which leaves the softmax unchanged), band values are
    ``w * (P y) + b * sum(P)``, and the global columns use ``A^T kn = w * (A^T y) + b`` (``A`` sums to one).
    """

    @staticmethod
    def _small_graph(zk, zv, w, b, gw, gb, proj_w, proj_b):
        """The global keys/values and the effective logit map, from small tensors only."""
        kg = head_layer_norm(zk * w.unsqueeze(1) + b.unsqueeze(1), gw, gb)
        vg = head_layer_norm(zv * w.unsqueeze(1) + b.unsqueeze(1), gw, gb)
        w_eff = w.unsqueeze(-1) * proj_w  # logits = kn @ proj_w + proj_b = y @ w_eff + b_eff
        b_eff = torch.einsum("hd,hdr->hr", b, proj_w) + proj_b
        return kg, vg, w_eff, b_eff

    @staticmethod
    def forward(ctx, q, k, v, ln_l_w, ln_l_b, ln_g_w, ln_g_b, proj_w, proj_b, key_pad, slopes, cfg):
        causal, left, right, chunk, n_chunks, bq, dropout_p, seed, rows_per, reuse_buffers, flash_bq, keeps_lse = cfg
        bsz, heads, length, dim = q.shape
        acc = _acc(q.dtype)
        rank = proj_w.size(-1)
        # rows for the blocks of backward (``bq``) as well as of this pass
        rows_all = _whole_blocks(length, bq, flash_bq)
        span = rows_all + left + right
        flash = _LongShort._flash(q, dropout_p, slopes)
        if flash:
            bq = flash_bq
        nblocks = math.ceil(length / bq)
        kb = bq + left + right
        # normalised keys/values in zero-padded buffers: row r holds key r - left
        y_kp = q.new_zeros(bsz, heads, span, dim)
        y_vp = q.new_zeros(bsz, heads, span, dim)
        rstd = q.new_empty(2, bsz, heads, length)
        for i, (x, yp) in enumerate(((k, y_kp), (v, y_vp))):
            for a in range(0, length, rows_per):
                n = min(rows_per, length - a)
                y, _, r = torch.native_layer_norm(x[:, :, a:a + n], (dim,), None, None, 1e-5)
                yp[:, :, left + a:left + a + n] = y
                rstd[i, :, :, a:a + n] = r.squeeze(-1)
        if reuse_buffers:  # the caller gave up k and v: only their normalised copies are read from here on
            free_memory(k, v)
        y_k, y_v = y_kp[:, :, left:left + length], y_vp[:, :, left:left + length]
        # ---- global columns: landmarks (noncausal) / compressed chunks (causal)
        used = n_chunks * chunk if causal else length
        glob_valid = None
        if causal and key_pad is not None:
            glob_valid = (~key_pad[:, :used]).view(bsz, n_chunks, chunk).any(-1).repeat_interleave(rank, dim=1)
        weights = _LongShort._global_weights(y_k, ln_l_w, ln_l_b, proj_w, proj_b, key_pad, causal, used, chunk)
        zk = _LongShort._project(y_k, weights, causal, chunk)
        zv = _LongShort._project(y_v, weights, causal, chunk)
        del weights  # recomputed in backward (noncausal: (B, H, L, landmarks), 4 MiB at L=8192 with 16)
        kg, vg, _, _ = _LongShort._small_graph(zk, zv, ln_l_w, ln_l_b, ln_g_w, ln_g_b, proj_w, proj_b)
        kg_s, vg_s = kg - ln_l_b.unsqueeze(1), vg - ln_l_b.unsqueeze(1)  # shifted by the local bias (see above)
        glob_start = _LongShort._glob_start(causal, kg.size(2), rank, chunk, left, q.device)
        # ---- joint attention, query blocks
        masks = _LongShort._masks(key_pad, glob_valid, glob_start, bsz, length, nblocks, bq, kb, left, right,
                                  q.device)
        alibi = _LongShort._alibi(slopes, rank, chunk, kg.size(2), bq, kb, left, acc)
        buf = q.new_empty(length, bsz, heads, dim)
        out = buf.permute(1, 2, 0, 3)
        w5 = ln_l_w.view(1, heads, 1, 1, dim)
        b5 = ln_l_b.view(1, heads, 1, 1, dim)
        # every row's log-sum-exp of its scores, in base 2 (a few bytes a row): backward takes the probabilities
        # of its groups without padding from them, without a softmax; rows past the last block stay +inf (their
        # probabilities 0)
        lse2 = q.new_full((bsz, heads, rows_all), math.inf, dtype=acc)
        flash_step = max(1, _FLASH_GROUP_ELEMENTS // (bsz * heads * kb * dim)) if flash else 0
        flash_bias = ln_l_b.repeat(bsz, 1).view(1, bsz * heads, 1, dim) if flash else None  # b, as the kernel's heads
        groups = _LongShort._groups(bsz, heads, nblocks, bq, kb + kg.size(2), q.device,
                                    masks.flash_applies if flash else None, flash_step)
        for g0, g1, fast in groups:
            count = g1 - g0
            n_vis = masks.visible(g1)
            if fast:
                o, lse = _LongShort._flash_group(q, y_kp, y_vp, kg_s, vg_s, ln_l_w, g0, g1, bq, kb, masks, n_vis)
                torch.add(o, flash_bias, out=_LongShort._as_blocks(out, g0, g1, bq))
                torch.mul(lse, LOG2_E, out=lse2[:, :, g0 * bq:g1 * bq].view(bsz * heads, count, bq).transpose(0, 1))
                continue
            qs, s = _LongShort._block_scores(q, y_kp, kg_s, w5, g0, g1, bq, kb, masks, n_vis, acc, alibi)
            p = torch.softmax(s, dim=-1)
            if keeps_lse:
                # the log-sum-exp from the softmax itself: its largest probability is exp(max s - lse) (two reading
                # passes; ``logsumexp`` takes the slow exponential of the masked entries on some CPUs, 0.9 ms a
                # block of 128 queries at window 256 on an Intel Xeon)
                lse = torch.amax(s, dim=-1).sub_(torch.amax(p, dim=-1).log_())
                torch.mul(lse, LOG2_E, out=lse2[:, :, g0 * bq:g1 * bq].view(bsz, heads, count, bq))
            if dropout_p > 0:  # one mask per group, its stream the group's first block: backward draws it again
                p = p * dropout_keep_mask(p.shape, dropout_p, seed, p, stream=g0)
            p = p.to(q.dtype)
            vw = _LongShort._window(y_vp, g0, g1, bq, kb)
            o = torch.matmul(p[..., n_vis:], vw).mul_(w5).add_(b5)
            if n_vis:
                o += torch.matmul(p[..., :n_vis].reshape(bsz, heads, count * bq, n_vis),
                                  vg_s[:, :, :n_vis]).view(bsz, heads, count, bq, dim)
            if dropout_p > 0:
                # b + P_g (vg - b) stands for b * rowsum(P_band) + P_g vg only while rows sum to one; dropped
                # rows do not, and each kept band value carries b itself
                o += b5 * (p.sum(-1, keepdim=True) - 1)
            hi = min(length, g1 * bq)
            out[:, :, g0 * bq:hi] = o.view(bsz, heads, -1, dim)[:, :, :hi - g0 * bq]
        ctx.save_for_backward(q, y_kp, y_vp, rstd, ln_l_w, ln_l_b, ln_g_w, ln_g_b, proj_w, proj_b, key_pad,
                              zk, zv, slopes, lse2)
        ctx.cfg = cfg
        return out

    # ------------------------------------------------------------------------------------------ helpers
    @staticmethod
    def _flash(q: Tensor, dropout_p: float, slopes: Optional[Tensor]) -> bool:
        """Whether the call's groups may go through the CPU flash kernel (:data:`FLASH_GROUPS`)."""
        return FLASH_GROUPS and slopes is None and cpu_flash_applies(q, dropout_p)

    @staticmethod
    def _as_blocks(x: Tensor, g0: int, g1: int, bq: int) -> Tensor:
        """Rows of blocks g0..g1-1 of ``x`` (B, H, L, D) as the flash kernel's (blocks, B * H, bq, D): a view for
        fairseq's (L, B, H, D) layout and for contiguous heads."""
        bsz, heads, _, dim = x.shape
        return x[:, :, g0 * bq:g1 * bq].reshape(bsz * heads, g1 - g0, bq, dim).transpose(0, 1)

    @staticmethod
    def _flash_windows(yp: Tensor, w: Tensor, g0: int, g1: int, bq: int, kb: int) -> Tensor:
        """The local-weighted windows ``w * y`` of blocks g0..g1-1, (blocks, B * H, kb, D): overlapping strided views
        of one product over the rows they cover (consecutive windows share ``kb - bq`` rows)."""
        bsz, heads, _, dim = yp.shape
        rows = (g1 - g0 - 1) * bq + kb
        slab = yp[:, :, g0 * bq:g0 * bq + rows] * w.view(1, heads, 1, dim)
        return slab.as_strided((g1 - g0, bsz * heads, kb, dim), (bq * dim, rows * dim, dim, 1))

    @staticmethod
    def _flash_group(q, y_kp, y_vp, kg_s, vg_s, ln_l_w, g0, g1, bq, kb, masks, n_vis) -> Tuple[Tensor, Tensor]:
        """The output minus ``b`` of blocks g0..g1-1 through the CPU flash kernel, as (blocks, B * H, bq, D), and
        the joint log-sum-exp of the rows' scores, (blocks, B * H, bq): one call for the band (the blocks as the
        kernel's batch, each with its own window of keys) and one for the global columns (the group's queries as
        one sequence), joined by their log-sum-exps. Keys ``w * y`` and
        ``kg - b`` differ from the true ``w * y + b`` and ``kg`` by the same ``q . b`` per query, which leaves the
        joint softmax unchanged; values ``w * y`` and ``vg - b`` give the output minus ``b`` (the probabilities sum
        to one)."""
        bsz, heads, _, dim = q.shape
        bh, count, rows = bsz * heads, g1 - g0, (g1 - g0) * bq
        kw = _LongShort._flash_windows(y_kp, ln_l_w, g0, g1, bq, kb)
        vw = _LongShort._flash_windows(y_vp, ln_l_w, g0, g1, bq, kb)
        o_band, lse_band = FLASH_CPU(_LongShort._as_blocks(q, g0, g1, bq), kw, vw,
                                     attn_mask=masks.band_bias(q.dtype, q.device))
        if not n_vis:
            return o_band, lse_band
        o_glob, lse_glob = FLASH_CPU(q[:, :, g0 * bq:g1 * bq].reshape(1, bh, rows, dim),
                                     kg_s[:, :, :n_vis].reshape(1, bh, n_vis, dim),
                                     vg_s[:, :, :n_vis].reshape(1, bh, n_vis, dim),
                                     attn_mask=masks.glob_bias(g0, g1, n_vis, q.dtype))
        lse_glob = lse_glob.view(bh, count, bq).transpose(0, 1)
        lse = torch.logaddexp(lse_band, lse_glob)
        # each part's share of the joint softmax (a query with no visible column: its global share underflows to 0)
        share_glob = (lse_glob - lse).exp_().unsqueeze(-1)
        out = o_band.mul_((lse_band - lse).exp_().unsqueeze(-1))
        return out.addcmul_(o_glob.view(bh, count, bq, dim).transpose(0, 1), share_glob), lse

    @staticmethod
    def _global_weights(y_k, ln_l_w, ln_l_b, proj_w, proj_b, key_pad, causal, used, chunk):
        """The mixing weights ``A`` (B, H, used, rank) of the global columns: the logits ``kn @ proj_w + proj_b``
        of the normalised keys (through ``y``: ``kn = y * w + b``), padded keys out, a softmax over all positions
        (noncausal landmarks) or within each chunk (causal)."""
        bsz, heads = y_k.shape[:2]
        rank = proj_w.size(-1)
        acc = _acc(y_k.dtype)
        w_eff = ln_l_w.unsqueeze(-1) * proj_w
        b_eff = torch.einsum("hd,hdr->hr", ln_l_b, proj_w) + proj_b
        logits = (thin_matmul(y_k[:, :, :used], w_eff) + b_eff.unsqueeze(1)).to(acc)
        if key_pad is not None:
            logits.masked_fill_(key_pad[:, :used].view(bsz, 1, used, 1), torch.finfo(acc).min)
        if causal:
            weights = torch.softmax(logits.view(bsz, heads, used // chunk, chunk, rank), dim=3)
            return weights.view(bsz, heads, used, rank).to(y_k.dtype)
        return torch.softmax(logits, dim=2).to(y_k.dtype)

    @staticmethod
    def _project(y, weights, causal, chunk):
        """``A^T y`` per global column (B, H, G, D)."""
        bsz, heads, _, dim = y.shape
        used, rank = weights.size(2), weights.size(3)
        if causal:
            m = used // chunk
            res = torch.matmul(weights.reshape(bsz, heads, m, chunk, rank).transpose(-1, -2),
                               y[:, :, :used].reshape(bsz, heads, m, chunk, dim))
            return res.reshape(bsz, heads, m * rank, dim)
        return torch.matmul(weights.transpose(-1, -2), y)

    @staticmethod
    def _glob_start(causal, n_cols, rank, chunk, left, device):
        if not causal:
            return torch.zeros(n_cols, dtype=torch.long, device=device)
        # compressed chunk m is visible from the query whose window (left + 1 keys) starts after the chunk's end
        return (torch.arange(n_cols, device=device) // rank + 1) * chunk - 1 + left + 1

    @staticmethod
    def _alibi(slopes, rank, chunk, n_cols, bq, kb, left, acc):
        """ALiBi of the causal pattern (None without ``slopes``): the band bias ``-slope_h (i - j)`` of a block
        (the same for every block, (1, H, 1, bq, kb)), the slopes and each compressed column's position, the centre
        of its chunk (a query at ``i`` is ``i - centre`` from it)."""
        if slopes is None:
            return None
        device = slopes.device
        rel = (torch.arange(bq, device=device).unsqueeze(1) + left - torch.arange(kb, device=device)).clamp(min=0)
        band = (-slopes.to(acc).view(1, -1, 1, 1, 1) * rel.to(acc))
        centre = (torch.arange(n_cols, device=device) // rank).to(acc) * chunk + (chunk - 1) / 2
        return band, slopes.to(acc), centre

    @staticmethod
    def _valid_windows(key_pad, bsz, length, nblocks, bq, kb, left, device):
        span = (nblocks - 1) * bq + kb
        valid = torch.ones(bsz, length, dtype=torch.bool, device=device) if key_pad is None else ~key_pad
        return F.pad(valid, (left, span - left - length), value=False).unfold(1, kb, bq).contiguous()

    @staticmethod
    def _band_bad(bq, kb, left, right, device):
        rel = torch.arange(bq, device=device).unsqueeze(1) + left - torch.arange(kb, device=device)
        return (rel > left) | (rel < -right)

    @staticmethod
    def _groups(bsz, heads, nblocks, bq, width, device, kind=None, kind_step=0):
        """(first block, end block, ``kind`` of its blocks) of every group of query blocks, in order. With ``kind``
        (block -> bool) no group mixes blocks of both kinds, and runs of the first are cut by ``kind_step`` blocks
        when given (the flash path's bound: it forms no scores), every other run by the scores' bound."""
        elements = _GROUP_ELEMENTS if device.type == "cpu" else _DEVICE_GROUP_ELEMENTS
        step = max(1, elements // (bsz * heads * bq * width))
        groups, g = [], 0
        while g < nblocks:
            first = kind is not None and kind(g)
            end = min(nblocks, g + (kind_step if first and kind_step else step))
            if kind is not None:  # a group is all one kind
                end = next((t for t in range(g + 1, end) if kind(t) != first), end)
            groups.append((g, end, first))
            g = end
        return groups

    @staticmethod
    def _window(xp, g0, g1, bq, kb):
        """(B, H, G, kb, D) windows of a padded buffer for blocks g0..g1-1 (a view)."""
        return xp.narrow(2, g0 * bq, (g1 - g0 - 1) * bq + kb).unfold(2, kb, bq).transpose(-1, -2)

    @staticmethod
    def _masks(key_pad, glob_valid, glob_start, bsz, length, nblocks, bq, kb, left, right, device) -> "_GroupMasks":
        # the windows' validity (B, nblocks, kb) is small; it also marks the zero rows padded around the keys
        return _GroupMasks(_LongShort._band_bad(bq, kb, left, right, device).view(1, 1, bq, kb),
                           _LongShort._valid_windows(key_pad, bsz, length, nblocks, bq, kb, left, device),
                           glob_start, glob_valid, bq)

    @staticmethod
    def _block_scores(q, y_kp, kg_s, w5, g0, g1, bq, kb, masks, n_vis, acc, alibi=None, base2=False):
        """Scaled queries (B, H, G, bq, D) and the masked joint scores (B, H, G, bq, n_vis + kb) of query
        blocks g0..g1-1 (band scores against y with the local weight folded into the queries), ALiBi added.
        ``base2``: the scores times log2(e), as their two parts, global (B, H, G * bq, n_vis) (None without
        columns) and band (B, H, G, bq, kb), for probabilities ``exp2(s - lse2)`` (backward)."""
        bsz, heads, _, dim = q.shape
        count = g1 - g0
        unit = LOG2_E if base2 else 1.0
        qs = _rows(q, g0 * bq, count * bq).mul(dim**-0.5).reshape(bsz, heads, count, bq, dim)
        yw = _LongShort._window(y_kp, g0, g1, bq, kb)
        sw = torch.matmul(qs * (w5 * unit), yw.transpose(-1, -2)).to(acc)
        if alibi is not None:
            sw.add_(alibi[0], alpha=unit)
        masks.fill_band(sw, g0, g1, torch.finfo(acc).min)
        if n_vis == 0:
            return (qs, None, sw) if base2 else (qs, sw)
        qg = qs.view(bsz, heads, count * bq, dim)
        sg = torch.matmul(qg * unit if base2 else qg, kg_s[:, :, :n_vis].transpose(-1, -2)).to(acc)
        if alibi is not None:
            _, slopes, centre = alibi
            pos = torch.arange(g0 * bq, g1 * bq, device=q.device).to(acc)
            sg.sub_(slopes.view(1, -1, 1, 1) * (pos.unsqueeze(1) - centre[:n_vis]), alpha=unit)
        masks.fill_glob(sg, g0, g1, n_vis, torch.finfo(acc).min)
        if base2:
            return qs, sg, sw
        return qs, torch.cat([sg.view(bsz, heads, count, bq, n_vis), sw], dim=-1)

    @staticmethod
    def backward(ctx, grad_out):
        (q, y_kp, y_vp, rstd, ln_l_w, ln_l_b, ln_g_w, ln_g_b, proj_w, proj_b, key_pad, zk, zv,
         slopes, lse2) = ctx.saved_tensors
        causal, left, right, chunk, n_chunks, bq, dropout_p, seed, rows_per, reuse_buffers, _, _ = ctx.cfg
        bsz, heads, length, dim = q.shape
        acc = _acc(q.dtype)
        rank = proj_w.size(-1)
        scale = dim**-0.5
        leaves = [t.detach().requires_grad_() for t in (zk, zv, ln_l_w, ln_l_b, ln_g_w, ln_g_b, proj_w, proj_b)]
        with torch.enable_grad():
            kg_r, vg_r, w_eff_r, b_eff_r = _LongShort._small_graph(*leaves)
        kg, vg, w_eff = kg_r.detach(), vg_r.detach(), w_eff_r.detach()
        b_l = ln_l_b.unsqueeze(1)
        kg_s, vg_s = kg - b_l, vg - b_l
        glob_valid = None
        used = n_chunks * chunk if causal else length
        if causal and key_pad is not None:
            glob_valid = (~key_pad[:, :used]).view(bsz, n_chunks, chunk).any(-1).repeat_interleave(rank, dim=1)
        glob_start = _LongShort._glob_start(causal, kg.size(2), rank, chunk, left, q.device)
        nblocks = math.ceil(length / bq)
        kb = bq + left + right
        pieces = math.ceil(kb / bq)
        masks = _LongShort._masks(key_pad, glob_valid, glob_start, bsz, length, nblocks, bq, kb, left, right,
                                  q.device)
        alibi = _LongShort._alibi(slopes, rank, chunk, kg.size(2), bq, kb, left, acc)
        w5 = ln_l_w.view(1, heads, 1, 1, dim)
        # gradients w.r.t. the normalised keys/values kn, vn over padded rows, in (L, B, H, D) layouts so that
        # the projections' backward gets contiguous (L, B, D) gradients; row r is key r - left
        padded = (nblocks + pieces) * bq
        gk_buf = q.new_zeros(padded, bsz, heads, dim)
        grad_kp = gk_buf.permute(1, 2, 0, 3)
        # the value gradient is folded into a short window of rows and each key's row written out once complete,
        # with ``reuse_buffers`` over the output's gradient itself (read up to the rows written by then: see
        # _RollingRows)
        grad_vn = grad_out if reuse_buffers and covers_storage(grad_out) else q.new_empty(length, bsz, heads, dim).permute(
            1, 2, 0, 3)
        # the explicit scores (the flash kernel's backward needs the output: recomputed, it took 1.15x their time
        # here, causal, L=8192, window 256, Intel Xeon; kept, the output projection's backward held it beside its
        # gradient, over the memory bound). Groups: with dropout the forward's, each drawing its mask again; else
        # cut where a window starts or stops holding padding
        groups = _LongShort._groups(bsz, heads, nblocks, bq, kb + kg.size(2), q.device,
                                    None if dropout_p > 0 else masks.has_keys)
        value_rows = _RollingRows(grad_vn, left, bq, kb, groups)
        # with ``reuse_buffers`` over q itself: each block's rows are read (scaled into a copy) before theirs is written
        grad_q = q if reuse_buffers else q.new_empty(length, bsz, heads, dim).permute(1, 2, 0, 3)
        grad_kg, grad_vg = torch.zeros_like(kg), torch.zeros_like(vg)

        def group_backward(g0, g1):
            """One group of query blocks (a function: its temporaries are gone before the next group's and
            before what follows the loop)."""
            count = g1 - g0
            rows = count * bq
            n_vis = masks.visible(g1)
            if BACKWARD_FROM_LSE and all(masks.has_keys(t) for t in range(g0, g1)):
                # every row has a key: its probabilities from the forward's log-sum-exp, each part over its own
                # scores (no softmax, no joined copy; base 2, whose exponential of the masked entries' lowest
                # float is fast on CPUs where exp's is not)
                qs, sg, sw = _LongShort._block_scores(q, y_kp, kg_s, w5, g0, g1, bq, kb, masks, n_vis, acc, alibi,
                                                      base2=True)
                lse = lse2[:, :, g0 * bq:g1 * bq].view(bsz, heads, count, bq, 1)
                probs = [sw.sub_(lse).exp2_()]
                if n_vis:
                    probs.append(sg.view(bsz, heads, count, bq, n_vis).sub_(lse).exp2_())
                del sg, sw
            else:
                qs, s = _LongShort._block_scores(q, y_kp, kg_s, w5, g0, g1, bq, kb, masks, n_vis, acc, alibi)
                p = torch.softmax(s, dim=-1)
                del s  # before the probabilities' gradient: two score-sized tensors at a time, not three
                probs = [p[..., n_vis:]] + ([p[..., :n_vis]] if n_vis else [])
                del p
            # probs: the band's (B, H, G, bq, kb) and the global columns' (B, H, G, bq, n_vis)
            g_out = _rows(grad_out, g0 * bq, rows).reshape(bsz, heads, count, bq, dim)
            kw = _LongShort._window(y_kp, g0, g1, bq, kb)
            vw = _LongShort._window(y_vp, g0, g1, bq, kb)
            keeps = None
            if dropout_p > 0:  # the forward's mask, drawn over the joined columns as there
                keep = dropout_keep_mask((bsz, heads, count, bq, n_vis + kb), dropout_p, seed, probs[0], stream=g0)
                keeps = [keep[..., n_vis:], keep[..., :n_vis]]
                used = [(pr * kp).to(q.dtype) for pr, kp in zip(probs, keeps)]
            else:
                used = [pr.to(q.dtype) for pr in probs]
            # the values' gradients first, from the probabilities alone: the band's is folded away before the
            # probabilities' gradient exists (one window gradient fewer at backward's peak)
            value_rows.fold(torch.matmul(used[0].transpose(-1, -2), g_out), g0, g1)  # d vn
            if n_vis:
                grad_vg[:, :, :n_vis] += torch.matmul(used[1].reshape(bsz, heads, rows, n_vis).transpose(-1, -2),
                                                      g_out.reshape(bsz, heads, rows, dim))
            del used
            # the probabilities' gradient in its two parts, band (B, H, G, bq, kb) and global columns (B, H, G, bq,
            # n_vis), each a product of its own: joined, as the scores are, they cost a copy of both (1.5% of the
            # causal step at L=8192), and the score gradient's parts below are then contiguous
            parts = [torch.matmul(g_out * w5, vw.transpose(-1, -2)).to(acc)]
            if n_vis:
                gp_g = torch.matmul(g_out.reshape(bsz, heads, rows, dim), vg_s[:, :, :n_vis].transpose(-1, -2))
                parts.append(gp_g.view(bsz, heads, count, bq, n_vis).to(acc))
            # the parts lack the per-row constant dO . b (band values are w * y, global ones vg - b). Without
            # dropout it cancels in the softmax backward (rows of p sum to one); with dropout the kept entries
            # carry it scaled, so it is added back first
            if keeps is not None:
                row_bias = (g_out * b_l.view(1, heads, 1, 1, dim)).sum(-1, keepdim=True).to(acc)
                for grad_p, kp in zip(parts, keeps):
                    grad_p.add_(row_bias).mul_(kp)
                del keep, keeps
            # rowsum(P * dP) from the recomputed probabilities: the output need not be kept for backward (``vecdot``:
            # a fifth of the time of the batched (1 x width) by (width x 1) products; AMD EPYC, torch 2.13)
            delta = sum(torch.linalg.vecdot(pr, grad_p) for pr, grad_p in zip(probs, parts)).unsqueeze(-1)
            grad_s = [grad_p.sub_(delta).mul_(pr).to(q.dtype) for pr, grad_p in zip(probs, parts)]
            del probs, parts
            gs_w = grad_s[0]
            gq = torch.matmul(gs_w, kw).mul_(w5)  # d(q . kn) / dq with kn = y * w + b, minus the b part ...
            gq += gs_w.sum(-1, keepdim=True) * ln_l_b.view(1, heads, 1, 1, dim)  # ... added back here
            if n_vis:
                gs_g = grad_s[1].view(bsz, heads, rows, n_vis)
                gq += torch.matmul(gs_g, kg[:, :, :n_vis]).view(bsz, heads, count, bq, dim)
                grad_kg[:, :, :n_vis] += torch.matmul(gs_g.transpose(-1, -2), qs.reshape(bsz, heads, rows, dim))
            # each block's window gradient back onto the padded key rows it was taken from
            fold_windows(torch.matmul(gs_w.transpose(-1, -2), qs), grad_kp, g0, bq)  # d kn; qs is pre-scaled
            hi = min(length, g1 * bq)
            grad_q[:, :, g0 * bq:hi] = (gq * scale).view(bsz, heads, rows, dim)[:, :, :hi - g0 * bq]
        for g0, g1, _ in groups:
            group_backward(g0, g1)
        value_rows.finish()
        value_rows = None  # its buffer freed before the passes below
        grad_kn = grad_kp[:, :, left:left + length]
        y_k, y_v = y_kp[:, :, left:left + length], y_vp[:, :, left:left + length]
        # ---- local affine: d kn -> d y (in place), gradients of the local weight and bias
        grad_l_w, grad_l_b = torch.zeros_like(ln_l_w), torch.zeros_like(ln_l_b)
        for y, g in ((y_k, grad_kn), (y_v, grad_vn)):
            for a in range(0, length, rows_per):
                gr = g[:, :, a:a + rows_per]
                grad_l_w += (gr * y[:, :, a:a + rows_per]).sum(dim=(0, 2))
                grad_l_b += gr.sum(dim=(0, 2))
                gr.mul_(ln_l_w.unsqueeze(1))
        # ---- global columns backward
        weights = _LongShort._global_weights(y_k, ln_l_w, ln_l_b, proj_w, proj_b, key_pad, causal, used, chunk)
        grad_zk, grad_zv = torch.autograd.grad((kg_r, vg_r), leaves[:2], (grad_kg, grad_vg), retain_graph=True)
        if causal:
            # in row pieces of whole chunks (rows_per is a multiple of chunk): the products and the batched
            # matmul's copies of the strided y rows stay ~4 MiB instead of L x D each
            gzk5 = grad_zk.view(bsz, heads, n_chunks, rank, dim)
            gzv5 = grad_zv.view(bsz, heads, n_chunks, rank, dim)
            grad_weights = weights.new_empty(bsz, heads, used, rank)
            for a in range(0, used, rows_per):
                n = min(rows_per, used - a)
                c0, c1 = a // chunk, (a + n) // chunk
                gzk, gzv = gzk5[:, :, c0:c1], gzv5[:, :, c0:c1]
                yk5, yv5 = (y[:, :, a:a + n].unflatten(2, (c1 - c0, chunk)) for y in (y_k, y_v))
                gw = thin_matmul(yk5, gzk.transpose(-1, -2))
                gw += thin_matmul(yv5, gzv.transpose(-1, -2))
                grad_weights[:, :, a:a + n] = gw.view(bsz, heads, n, rank)
                w5c = weights[:, :, a:a + n].unflatten(2, (c1 - c0, chunk))
                grad_kn[:, :, a:a + n] += thin_matmul(w5c, gzk).view(bsz, heads, n, dim)
                grad_vn[:, :, a:a + n] += thin_matmul(w5c, gzv).view(bsz, heads, n, dim)
        else:
            grad_weights = torch.matmul(y_k, grad_zk.transpose(-1, -2)) + torch.matmul(y_v, grad_zv.transpose(-1, -2))
            for a in range(0, length, rows_per):
                grad_kn[:, :, a:a + rows_per] += torch.matmul(weights[:, :, a:a + rows_per], grad_zk)
                grad_vn[:, :, a:a + rows_per] += torch.matmul(weights[:, :, a:a + rows_per], grad_zv)
        weights = weights.to(acc)
        grad_weights = grad_weights.to(acc)
        if causal:
            shape5 = (bsz, heads, n_chunks, chunk, rank)
            grad_logits = _softmax_backward(weights.view(shape5), grad_weights.view(shape5), 3).view_as(weights)
        else:
            grad_logits = _softmax_backward(weights, grad_weights, 2)
        grad_logits = grad_logits.to(q.dtype)
        grad_w_eff = thin_matmul(y_k[:, :, :used].transpose(-1, -2), grad_logits).sum(0)
        grad_b_eff = grad_logits.sum(dim=(0, 2))
        for a in range(0, used, rows_per):
            n = min(rows_per, used - a)
            grad_kn[:, :, a:a + n] += thin_matmul(grad_logits[:, :, a:a + n], w_eff.transpose(-1, -2).unsqueeze(0))
        small = torch.autograd.grad((kg_r, vg_r, w_eff_r, b_eff_r), leaves[2:],
                                    (grad_kg, grad_vg, grad_w_eff, grad_b_eff), allow_unused=True)
        small = [torch.zeros_like(t) if g is None else g for g, t in zip(small, leaves[2:])]
        grad_l_w += small[0]
        grad_l_b += small[1]
        # ---- layer norm backward (d y -> d x = rstd * (dy - mean(dy) - y * mean(dy * y))), in place
        for i, (y, g) in enumerate(((y_k, grad_kn), (y_v, grad_vn))):
            for a in range(0, length, rows_per):
                gr, yr = g[:, :, a:a + rows_per], y[:, :, a:a + rows_per]
                m_gy = (gr * yr).mean(-1, keepdim=True)
                gr.sub_(gr.mean(-1, keepdim=True)).addcmul_(yr, m_gy, value=-1)
                gr.mul_(rstd[i, :, :, a:a + rows_per].unsqueeze(-1))
        return (grad_q, grad_kn, grad_vn, grad_l_w, grad_l_b, small[2], small[3], small[4], small[5], None, None,
                None)


def long_short_attention(
    q: Tensor, k: Tensor, v: Tensor, *, ln_local: Tuple[Tensor, Tensor], ln_global: Tuple[Tensor, Tensor],
    proj_weight: Tensor, proj_bias: Tensor, key_padding_mask: Optional[Tensor], causal: bool, window: int,
    chunk_size: int = 1, dropout_p: float = 0.0, block_size: Optional[int] = None, row_chunk: Optional[int] = None,
    alibi_slopes: Optional[Tensor] = None, reuse_buffers: bool = False,
) -> Tensor:
    """Long-short self attention on raw projected heads q, k, v (B, H, L, D).

    Keys/values are normalised with ``ln_local`` (per-head weight, bias (H, D)); global columns are made with
    the per-head map ``proj_weight`` (H, D, rank), ``proj_bias`` (H, rank) of the normalised keys: a softmax over
    all positions (noncausal: ``rank`` landmarks) or within each chunk of ``chunk_size`` positions (causal:
    ``rank`` vectors per chunk), then ``ln_global``. Noncausal: band ``|i - j| <= window``; causal: keys
    ``i - window + 1 .. i`` and the chunks ending at or before ``i - window``. One softmax over both.
    ``block_size``: queries per block (default by window: 16, 32, or 128 beyond 96 window keys, where the CPU
    flash forward takes :data:`FLASH_BLOCK`); ``row_chunk``: rows per full-length elementwise pass.
    ``alibi_slopes`` (H,), causal only: ALiBi, ``-slope_h (i - j)`` on band scores and ``-slope_h (i - centre)``
    on a compressed chunk's, ``centre`` the middle of its chunk. ``reuse_buffers``: nothing reads q, k, v after the
    call nor the output's gradient after backward receives it (the attention base's whole passes): forward frees
    k and v once normalised, backward writes q's gradient over q and v's over the output's gradient (each where
    it covers its own storage) instead of allocating more L x D tensors; a second backward through the graph is
    refused by autograd's in-place check, and reading a freed tensor is undefined (see
    :func:`..common.free_memory`).
    Returns (B, H, L, D), a permuted view of an (L, B, H, D) buffer.
    """
    bsz, heads, length, dim = q.shape
    left, right = (window - 1, 0) if causal else (window, window)
    n_chunks = max(0, (length - window) // chunk_size) if causal else 0
    flash_bq = block_size
    if block_size is None:
        span = left + right + 1
        block_size = 16 if span <= 24 else (32 if span <= 96 else 128)
        flash_bq = min(block_size, FLASH_BLOCK)
    bq = max(1, min(block_size, length))
    flash_bq = max(1, min(flash_bq, length))
    # row chunks of the full-length elementwise passes: ~4 MiB transients (few operations, small transients)
    rows_per = row_chunk or max(1, (1 << 20) // (bsz * heads * dim))
    if causal:
        rows_per = max(chunk_size, rows_per // chunk_size * chunk_size)
    seed = int(torch.randint(0, 2**62, ())) if dropout_p > 0 else 0
    if alibi_slopes is not None and not causal:
        raise ValueError("long_short_attention: ALiBi is for the causal pattern (noncausal landmarks have no position)")
    # backward takes its probabilities from the forward's log-sum-exps: kept only when there will be a backward
    keeps_lse = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, *ln_local, *ln_global, proj_weight, proj_bias))
    cfg = (causal, left, right, chunk_size, n_chunks, bq, dropout_p, seed, rows_per, bool(reuse_buffers), flash_bq,
           keeps_lse)
    return _LongShort.apply(q, k, v, ln_local[0], ln_local[1], ln_global[0], ln_global[1], proj_weight, proj_bias,
                            key_padding_mask, alibi_slopes, cfg)


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
