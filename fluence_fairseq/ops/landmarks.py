"""Landmark attentions on (batch, heads, length, head_dim) tensors: segment-mean landmarks over the real tokens,
Nyström attention (Xiong et al., 2021) and LARA (Zheng et al., 2022).

Landmarks are the means of ``m`` contiguous segments of the *real* (unpadded) tokens of each sequence. A token's
segment comes from its rank among the real tokens of its sequence, so left, right or no padding give the same
landmarks. With ``n`` real tokens and ``n > m`` the segmentation is Nyströmformer's: ``s = n // m``; the first
``(s + 1) * m - n`` segments hold ``s`` tokens, the others ``s + 1``. With ``n <= m`` every real token is its own
landmark (the remaining ``m - n`` landmarks are empty) and both attentions fall back to exact softmax attention,
which then costs no more than the approximation.

The means are one batched matmul with a ``(B, m, L)`` averaging matrix (``B = 1`` without padding); nothing of size
``(L, L)`` is formed unless the attention weights are asked for.
"""
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .abc import attend_slots_in_layout
from .common import accumulation_dtype as _acc, matmul_in_projection_layout


class Landmarks(NamedTuple):
    """Segment-mean landmarks of one batch, shared by queries and keys of a self attention."""

    #: (Bw, m, L) averaging matrix: row c holds 1/|segment c| on the tokens of segment c (Bw = B, or 1 without padding)
    weights: Tensor
    #: (Bw, m) bool, True where a landmark has no token (only in sequences with fewer than m real tokens)
    empty: Tensor
    #: (Bw,) bool, True for sequences with at most m real tokens: they get exact softmax attention
    short: Tensor

    def means(self, x: Tensor) -> Tensor:
        """(B, H, L, D) -> (B, H, m, D) segment means."""
        return segment_means(self.weights, x)


def segment_means(weights: Tensor, x: Tensor) -> Tensor:
    """(B, H, L, D) -> (B, H, m, D) means under the (Bw, m, L) averaging matrix of :class:`Landmarks`."""
    batch, heads, length, dim = x.shape
    # one (m, L) @ (L, H*D) product per sequence on the (B, L, H*D) layout (a view of fairseq's heads): no
    # per-head copy of the averaging matrix is made or saved for backward
    flat = x.transpose(1, 2).reshape(batch, length, heads * dim)
    weights = weights.to(x.dtype)
    if weights.size(0) == 1:
        out = torch.matmul(weights[0], flat) if batch == 1 else torch.einsum("ml,ble->bme", weights[0], flat)
    else:
        out = torch.bmm(weights, flat)
    return out.view(batch, -1, heads, dim).transpose(1, 2)


def _neg(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min


def segment_index(real: Tensor, num_landmarks: int) -> Tensor:
    """Segment of every token from its rank among the real tokens of its row; -1 at padding.

    Args:
        real: bool (Bw, L), True = real token.
    Returns:
        long (Bw, L) in [-1, num_landmarks).
    """
    m = num_landmarks
    rank = real.long().cumsum(-1) - 1
    n = real.sum(-1, keepdim=True)
    size = (n // m).clamp(min=1)  # short segment length s (rows with n < m are handled below)
    num_small = (size + 1) * m - n  # segments of length s; the rest have s + 1 (all of them when m divides n)
    boundary = num_small * size
    seg = torch.where(rank < boundary, rank // size, num_small + (rank - boundary) // (size + 1))
    seg = torch.where(n <= m, rank, seg)  # one token per landmark
    return torch.where(real, seg, torch.full_like(seg, -1))


def segment_landmarks(
    key_padding_mask: Optional[Tensor], length: int, num_landmarks: int, dtype: torch.dtype, device: torch.device
) -> Landmarks:
    """The averaging matrix of ``num_landmarks`` segment means over the real tokens.

    Args:
        key_padding_mask: bool (B, L), True = padding, or None (no padding: one shared matrix).
    """
    if key_padding_mask is None:
        real = torch.ones(1, length, dtype=torch.bool, device=device)
    else:
        real = ~key_padding_mask
    seg = segment_index(real, num_landmarks)
    onehot = seg.unsqueeze(1) == torch.arange(num_landmarks, device=device).view(1, -1, 1)  # (Bw, m, L)
    counts = onehot.sum(-1)
    weights = onehot.to(dtype) / counts.clamp(min=1).unsqueeze(-1).to(dtype)
    return Landmarks(weights, counts == 0, real.sum(-1) <= num_landmarks)


def _masked_softmax(scores: Tensor, masked: Optional[Tensor]) -> Tensor:
    """Softmax over the last dim with ``masked`` (broadcastable bool) entries excluded; finite for all-masked rows."""
    if masked is not None:
        scores = scores.masked_fill(masked, _neg(scores.dtype))
    return torch.softmax(scores, dim=-1, dtype=_acc(scores.dtype)).to(scores.dtype)


def landmark_softmax_attention(
    q: Tensor, landmarks: Landmarks, k_lm: Tensor, v_lm: Tensor, need_weights: bool
) -> Tuple[Tensor, Optional[Tensor]]:
    """Exact softmax attention for the short sequences, whose landmarks are their real keys and values.

    Args:
        q: (B, H, L, D); k_lm, v_lm: (B, H, m, D) one-token landmarks (means of one token).
    Returns:
        (out (B, H, L, D), weights (B, H, L, L) or None)
    """
    scale = q.size(-1) ** -0.5
    probs = _masked_softmax(torch.matmul(q, (k_lm * scale).transpose(-1, -2)), landmarks.empty[:, None, None, :])
    out = torch.matmul(probs, v_lm)
    # a one-token landmark's averaging row is the indicator of its token: it maps landmarks back to positions
    weights = torch.matmul(probs, landmarks.weights.unsqueeze(1).to(probs.dtype)) if need_weights else None
    return out, weights


def _where_short(short: Tensor, exact: Tensor, approx: Tensor) -> Tensor:
    return torch.where(short.view(-1, *([1] * (approx.dim() - 1))), exact, approx)


def _with_fallback(q, landmarks, k_lm, v, key_padding_mask, approx_fn, need_weights):
    """Exact attention for the short sequences, ``approx_fn(key_padding_mask)`` for the others (each only if
    needed)."""
    short = landmarks.short
    any_short = bool(short.any())
    if any_short:
        exact, exact_w = landmark_softmax_attention(q, landmarks, k_lm, landmarks.means(v), need_weights)
        if bool(short.all()):
            return exact, exact_w
        if key_padding_mask is not None:
            # the approximation of a short row is discarded below, but its gradient (zero) still flows through it:
            # leaving its keys unmasked keeps it finite even for a fully padded row (empty landmarks are zero
            # vectors, harmless too)
            key_padding_mask = key_padding_mask & ~short.unsqueeze(-1)
    out, weights = approx_fn(key_padding_mask)
    if any_short:
        # the approximation of a short row is finite but unused: torch.where passes it zero gradient
        out = _where_short(short, exact, out)
        weights = _where_short(short, exact_w, weights) if need_weights else None
    return out, weights


def iterative_pinv(a: Tensor, iterations: int) -> Tensor:
    """Moore-Penrose pseudo-inverse of each (m, m) matrix in ``a`` (..., m, m) by the iteration of Razavi et al.
    (2014) used in Nyströmformer: ``Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4``.

    ``Z_0 = A^T / (||A||_1 ||A||_inf)`` (max column sum times max row sum) for EACH matrix, which keeps the
    singular values of ``A Z_0`` in (0, 1] so the iteration converges. The reference takes the maximum column
    sum over the whole batch, which makes one sequence's output depend on the others in its batch.
    """
    absolute = a.abs()
    norm = absolute.sum(-2).amax(-1) * absolute.sum(-1).amax(-1)  # (...,)
    z = a.transpose(-1, -2) / norm.clamp(min=torch.finfo(a.dtype).tiny)[..., None, None]
    eye = torch.eye(a.size(-1), dtype=a.dtype, device=a.device)
    for _ in range(iterations):
        az = torch.matmul(a, z)
        z = 0.25 * torch.matmul(z, 13 * eye - torch.matmul(az, 15 * eye - torch.matmul(az, 7 * eye - az)))
    return z


class _LandmarkSummary(torch.autograd.Function):
    """``softmax(Q~ K^T s) V`` (B, H, m, D) for m landmark queries over the keys (padded keys left out), keeping
    only Q~, K, V (views of the projections' outputs, kept anyway) and the mask: the (m, L) kernel is recomputed
    in backward, and the key and value gradients are written in the projections' layout (L, B, H, D)."""

    @staticmethod
    def _kernel(q_lm, k, kpm):
        scores = torch.matmul(q_lm * k.size(-1) ** -0.5, k.transpose(-1, -2))
        return _masked_softmax(scores, kpm)

    @staticmethod
    def forward(ctx, q_lm, k, v, kpm):
        ctx.save_for_backward(q_lm, k, v, kpm)
        return torch.matmul(_LandmarkSummary._kernel(q_lm, k, kpm), v)

    @staticmethod
    def backward(ctx, g_out):
        q_lm, k, v, kpm = ctx.saved_tensors
        kernel = _LandmarkSummary._kernel(q_lm, k, kpm)  # (B, H, m, L)
        dim = k.size(-1)
        g_v = matmul_in_projection_layout(kernel.transpose(-1, -2), g_out)
        g_kernel = torch.matmul(g_out, v.transpose(-1, -2))
        g_scores = g_kernel.sub_((g_kernel * kernel).sum(-1, keepdim=True)).mul_(kernel).mul_(dim ** -0.5)
        if kpm is not None:
            g_scores.masked_fill_(kpm, 0.0)
        g_q_lm = torch.matmul(g_scores, k)
        g_k = matmul_in_projection_layout(g_scores.transpose(-1, -2), q_lm)
        return g_q_lm, g_k, g_v, None


def nystrom_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    num_landmarks: int,
    pinv_iterations: int,
    key_padding_mask: Optional[Tensor] = None,
    need_weights: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Nyström self attention ``softmax(Q K~^T s) pinv(softmax(Q~ K~^T s)) (softmax(Q~ K^T s) V)``, s = D^-1/2.

    Args:
        q, k, v: (B, H, L, D), one sequence for queries and keys (self attention).
        key_padding_mask: bool (B, L), True = padding; padded tokens are left out of the landmarks and of the
            third kernel's keys.
    Returns:
        (out (B, H, L, D), implied weights (B, H, L, L) or None)
    """
    landmarks = segment_landmarks(key_padding_mask, k.size(2), num_landmarks, q.dtype, q.device)
    k_lm = landmarks.means(k)
    scale = q.size(-1) ** -0.5

    def approx(key_padding_mask):
        q_lm = landmarks.means(q)
        k_lm_s = (k_lm * scale).transpose(-1, -2)  # scale the small factor, not the (L, D) one
        kernel_2 = _masked_softmax(torch.matmul(q_lm, k_lm_s), None)  # (B, H, m, m)
        kpm = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        pinv = iterative_pinv(kernel_2.to(_acc(q.dtype)), pinv_iterations).to(q.dtype)
        if not need_weights and q.dtype == _acc(q.dtype):
            # both L-sized kernels are recomputed in backward and the gradients written in the projections' layout;
            # softmax(Q K~^T s) rhs is softmax attention of the queries over m slots
            rhs = torch.matmul(pinv, _LandmarkSummary.apply(q_lm, k, v, kpm))  # (B, H, m, D)
            return attend_slots_in_layout(q, k_lm, rhs), None
        kernel_3 = _masked_softmax(torch.matmul(q_lm * scale, k.transpose(-1, -2)), kpm)  # (B, H, m, L)
        rhs = torch.matmul(pinv, torch.matmul(kernel_3, v))  # (B, H, m, D)
        kernel_1 = _masked_softmax(torch.matmul(q, k_lm_s), None)  # (B, H, L, m)
        out = torch.matmul(kernel_1, rhs)
        weights = torch.matmul(torch.matmul(kernel_1, pinv), kernel_3) if need_weights else None
        return out, weights

    return _with_fallback(q, landmarks, k_lm, v, key_padding_mask, approx, need_weights)


#: rows per block of LARA's backward writes: ~2 MiB temporaries at width 512
_ROWS = 1024


class _Lara(torch.autograd.Function):
    """LARA's approximation (see :func:`lara_attention`) as one autograd node for float32/float64 inputs without
    weights. It keeps q, k, v, the noise and the (m, D) / (m,) statistics; the (m, L) key probabilities and the
    (L, m) proposal weights are recomputed in backward. With ``reuse`` (the caller gives up q, k and v, three
    separate memories) their gradients are written over them, each once it is no longer read: plain autograd
    kept the (m, L) probabilities, the query and key copies of its products and three new L x D gradients."""

    @staticmethod
    def _key_probs(omega, k, kpm, log_norm=None):
        """log phi(k_j, w_c) normalised over the keys: (probs (B, H, m, L), log_norm (B, H, m))."""
        scale = k.size(-1) ** -0.5
        log_phi = torch.matmul(omega * scale, k.transpose(-1, -2))
        log_phi -= (0.5 * scale) * k.square().sum(-1).unsqueeze(-2)
        if kpm is not None:
            log_phi.masked_fill_(kpm[:, None, None, :], _neg(log_phi.dtype))
        if log_norm is None:
            log_norm = torch.logsumexp(log_phi, dim=-1)
        return log_phi.sub_(log_norm.unsqueeze(-1)).exp_(), log_norm

    @staticmethod
    def _proposal_weights(q, mu, omega, log_norm):
        """r (B, H, L, m), the softmax over proposals, and the query map a = s (mu + w) (B, H, m, D)."""
        scale = q.size(-1) ** -0.5
        a = (mu + omega) * scale
        bias = log_norm - scale * (omega * mu).sum(-1) + (0.5 * scale) * mu.square().sum(-1)
        return torch.softmax(torch.matmul(q, a.transpose(-1, -2)).add_(bias.unsqueeze(-2)), dim=-1), a

    @staticmethod
    def forward(ctx, q, k, v, noise, weights, kpm, reuse: bool):
        mu = segment_means(weights, q) + segment_means(weights, k)
        omega = mu if noise is None else mu + noise
        probs, log_norm = _Lara._key_probs(omega, k, kpm)
        kv = torch.matmul(probs, v)
        del probs
        r, _ = _Lara._proposal_weights(q, mu, omega, log_norm)
        out = matmul_in_projection_layout(r, kv)
        ctx.save_for_backward(q, k, v, weights, kpm, mu, omega, log_norm, kv)
        ctx.reuse = reuse
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, weights, kpm, mu, omega, log_norm, kv = ctx.saved_tensors
        scale = q.size(-1) ** -0.5
        # out = r kv, r = softmax_c(q . a_c + bias_c)
        r, a = _Lara._proposal_weights(q, mu, omega, log_norm)
        g_kv = torch.matmul(r.transpose(-1, -2), g)
        g_r = torch.matmul(g, kv.transpose(-1, -2))
        g_log_r = g_r.sub_((g_r * r).sum(-1, keepdim=True)).mul_(r)  # (B, H, L, m)
        del r
        g_bias = g_log_r.sum(-2)  # (B, H, m)
        g_a = torch.matmul(g_log_r.transpose(-1, -2), q)
        # bias = log_norm - s w.mu + s |mu|^2 / 2 and a = s (mu + w)
        g_omega = scale * (g_a - g_bias.unsqueeze(-1) * mu)
        g_mu = scale * (g_a + g_bias.unsqueeze(-1) * (mu - omega))
        # kv = probs v, probs = exp(log phi - log_norm), log_norm = logsumexp(log phi) (its gradient is g_bias)
        probs, _ = _Lara._key_probs(omega, k, kpm, log_norm)
        g_probs = torch.matmul(g_kv, v.transpose(-1, -2))
        g_log_phi = g_probs.sub_((g_probs * probs).sum(-1, keepdim=True)).add_(g_bias.unsqueeze(-1)).mul_(probs)
        # the L x D gradients a block of rows at a time, over the inputs themselves with ``reuse`` (v is no longer
        # read; k only by its own block below; q not at all)
        g_q, g_k, g_v = (q, k, v) if ctx.reuse else (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
        for lo in range(0, v.size(2), _ROWS):
            rows = slice(lo, lo + _ROWS)
            g_v[:, :, rows] = torch.matmul(probs[..., rows].transpose(-1, -2), g_kv)
        del probs, g_probs
        # log phi = s w . k - s |k|^2 / 2
        g_omega += scale * torch.matmul(g_log_phi, k)
        g_mu += g_omega  # w = mu + noise
        g_key_sq = g_log_phi.sum(-2).unsqueeze(-1).mul_(-scale)  # (B, H, L, 1)
        w_t = weights.to(g_mu.dtype).transpose(-1, -2).unsqueeze(1)  # (Bw, 1, L, m): mu = means(q) + means(k)
        for lo in range(0, k.size(2), _ROWS):
            rows = slice(lo, lo + _ROWS)
            spread = torch.matmul(w_t[:, :, rows], g_mu)
            g_k[:, :, rows] = torch.matmul(g_log_phi[..., rows].transpose(-1, -2), omega).mul_(scale).addcmul_(
                k[:, :, rows], g_key_sq[:, :, rows]).add_(spread)
            g_q[:, :, rows] = torch.matmul(g_log_r[:, :, rows], a).add_(spread)
        return g_q, g_k, g_v, None, None, None, None


def lara_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    num_landmarks: int,
    noise: bool,
    key_padding_mask: Optional[Tensor] = None,
    need_weights: bool = False,
    reuse_inputs: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Linear randomized attention with segment-mean proposals.

    Proposal c has mean ``mu_c = q~_c + k~_c`` and sample ``w_c = mu_c + eps`` (eps ~ N(0, I) when ``noise``,
    else 0). With ``log phi(x, w) = s w.x - s |x|^2 / 2``, s = D^-1/2:

    * ``kv_c = sum_j softmax_j(log phi(k_j, w_c)) v_j`` (padded keys excluded);
    * ``log r_{c,n} = s mu_c.q_n + log phi(q_n, w_c) + logsumexp_j log phi(k_j, w_c) - log phi(mu_c, w_c)``,
      normalised over c;
    * ``out_n = sum_c r_{c,n} kv_c``.

    The ``-s |q_n|^2 / 2`` inside ``log phi(q_n, w_c)`` is the same for every c and cancels in the softmax over c,
    so it is never computed.

    ``reuse_inputs``: the caller gives up q, k and v (see :class:`_Lara`); honoured where no sequence takes the
    exact fallback and neither weights nor half precision are involved.

    Returns:
        (out (B, H, L, D), implied weights ``sum_c r_{c,n} softmax_j(...)`` (B, H, L, L) or None)
    """
    landmarks = segment_landmarks(key_padding_mask, k.size(2), num_landmarks, q.dtype, q.device)
    if not need_weights and q.dtype == _acc(q.dtype) and not bool(landmarks.short.any()):
        noise = torch.randn(*q.shape[:2], num_landmarks, q.size(-1), dtype=q.dtype, device=q.device) if noise else None
        return _Lara.apply(q, k, v, noise, landmarks.weights, key_padding_mask, bool(reuse_inputs)), None
    k_lm = landmarks.means(k)
    scale = q.size(-1) ** -0.5

    def approx(key_padding_mask):
        mu = landmarks.means(q) + k_lm  # (B, H, m, D)
        omega = mu + torch.randn(mu.shape, dtype=mu.dtype, device=mu.device) if noise else mu
        key_sq = torch.linalg.vector_norm(k, dim=-1).square()  # (B, H, L)
        log_phi_k = torch.matmul(omega * scale, k.transpose(-1, -2)) - (0.5 * scale) * key_sq.unsqueeze(-2)
        if key_padding_mask is not None:
            log_phi_k = log_phi_k.masked_fill(key_padding_mask[:, None, None, :], _neg(log_phi_k.dtype))
        log_phi_k = log_phi_k.to(_acc(q.dtype))
        log_norm = torch.logsumexp(log_phi_k, dim=-1)  # (B, H, m)
        probs = torch.exp(log_phi_k - log_norm.unsqueeze(-1)).to(q.dtype)  # (B, H, m, L)
        kv = torch.matmul(probs, v)  # (B, H, m, D)
        # log r = s q.(mu + w) + logsumexp_j log phi(k_j, w) - s w.mu + s |mu|^2 / 2  (the |q|^2 term cancels)
        bias = log_norm.to(q.dtype) - scale * (omega * mu).sum(-1) + (0.5 * scale) * mu.square().sum(-1)
        log_r = torch.matmul(q, ((mu + omega) * scale).transpose(-1, -2)) + bias.unsqueeze(-2)  # (B, H, L, m)
        r = _masked_softmax(log_r, None)
        out = torch.matmul(r, kv)
        weights = torch.matmul(r, probs) if need_weights else None
        return out, weights

    return _with_fallback(q, landmarks, k_lm, v, key_padding_mask, approx, need_weights)
