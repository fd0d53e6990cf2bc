"""Performer / FAVOR+ (Choromanski et al., 2020): softmax attention approximated with positive random features."""
import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from ..ops.linear_attention import (
    LinearState,
    attend_linear_summary,
    causal_linear_attention,
    linear_attention,
    linear_summary,
)
from .attention_base import ALL_PATTERNS, FluenceAttention, fsmha
from ..flag_types import IntRange
from .spec import AttentionOption, AttentionSpec, check_int

__all__ = ["PerformerAttention", "FSPerformerAttention", "Performer", "FSPerformer"]

#: added to every (stabilised) feature, as in the reference: keeps each key's and query's features bounded
#: away from zero relative to its own largest feature, so a denominator with a real key is never ~0
FEATURE_EPS = 1e-4
#: the denominator clamp only turns rows without any visible key (0 / 0) into zeros; real rows are >= ~1e-8
DEN_EPS = 1e-30


def orthogonal_gaussian_projection(heads: int, features: int, head_dim: int,
                                   generator: Optional[torch.Generator] = None) -> Tensor:
    """(heads, features, head_dim) random projection: rows orthogonal within blocks of ``head_dim`` rows, each
    row's norm drawn like the norm of a standard Gaussian vector (orthogonal random features, FAVOR+)."""
    blocks = math.ceil(features / head_dim)
    gauss = torch.randn(heads * blocks, head_dim, head_dim, generator=generator)
    q, r = torch.linalg.qr(gauss)
    # sign correction makes Q Haar-distributed; rows of Q^T are then uniformly oriented orthonormal vectors
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    rows = q.transpose(-1, -2).reshape(heads, blocks * head_dim, head_dim)[:, :features]
    norms = torch.randn(heads, features, head_dim, generator=generator).norm(dim=-1, keepdim=True)
    return rows * norms


def _positive_features(x: Tensor, w: Tensor, norm_coef: float, eps: float):
    """(features, log scale (B, H, L, 1), argmax (B, H, L, 1)); see :class:`_PositiveFeatures`."""
    logits = torch.matmul(x, w.transpose(-1, -2).unsqueeze(0))
    if norm_coef:
        logits.sub_(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().mul_(norm_coef))
    scale, argmax = logits.max(-1, keepdim=True)
    return logits.sub_(scale).exp_().add_(eps), scale, argmax


class _PositiveFeatures(torch.autograd.Function):
    """FAVOR+ features of ``x`` (B, H, L, Dh) for a projection ``W`` (H, m, Dh): the logits ``l = x Wᵀ`` (minus
    ``norm_coef |x|²`` for keys), the features ``exp(l - max l) + eps`` (B, H, L, m) and their log scale
    ``max l`` (B, H, L), with the exact gradient of both (the max included).

    Autograd on the plain expression keeps, per side, the logits (for the max), the exponential (the features
    before the epsilon) and a contiguous copy of the strided heads view of ``x`` (for the product). This keeps only
    the features (linear attention saves the very same tensor), the argmax (one index per row) and ``x`` where a
    gradient needs it (keys: ``|x|²``; the projection is a buffer and gets none), and writes the gradient of ``x``
    in its layout, a block at a time."""

    BLOCK = 1024

    @staticmethod
    def forward(ctx, x, w, norm_coef: float, eps: float):
        features, scale, argmax = _positive_features(x, w, norm_coef, eps)
        keep_x = bool(norm_coef) or w.requires_grad
        ctx.save_for_backward(features, argmax, w, x if keep_x else None)
        # the layout empty_like would give x (its own strides if dense), remembered without keeping x alive
        meta = torch.empty_like(torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta"))
        ctx.x_layout = (meta.shape, meta.stride(), x.dtype, x.device)
        ctx.norm_coef, ctx.eps = norm_coef, eps
        return features, scale.squeeze(-1)

    @staticmethod
    def backward(ctx, g_features, g_scale):
        features, argmax, w, x = ctx.saved_tensors
        g_logits = (features - ctx.eps).mul_(g_features)  # d features / d logits = exp(l - max l)
        # the max enters every feature (minus) and the scale (plus); its gradient goes to the argmax
        g_max = g_logits.sum(-1, keepdim=True).neg_()
        if g_scale is not None:
            g_max.add_(g_scale.unsqueeze(-1))
        g_logits.scatter_add_(-1, argmax, g_max)
        gx = gw = None
        if ctx.needs_input_grad[0]:
            shape, stride, dtype, device = ctx.x_layout
            gx = torch.empty_strided(shape, stride, dtype=dtype, device=device)
            row_sums = g_logits.sum(-1, keepdim=True) if ctx.norm_coef else None
            for lo in range(0, g_logits.size(2), _PositiveFeatures.BLOCK):
                rows = slice(lo, lo + _PositiveFeatures.BLOCK)
                block = torch.matmul(g_logits[:, :, rows], w.unsqueeze(0))
                if row_sums is None:
                    gx[:, :, rows] = block
                else:  # d(-c |x|²)/dx = -2c x, once per feature: added as the block is written out (one pass)
                    torch.addcmul(block, x[:, :, rows], row_sums[:, :, rows], value=-2 * ctx.norm_coef,
                                  out=gx[:, :, rows])
        if ctx.needs_input_grad[1]:
            gw = torch.matmul(g_logits.transpose(-1, -2), x).sum(0)
        return gx, gw, None, None


class PerformerAttention(FluenceAttention):
    """Performer attention with FAVOR+ positive orthogonal random features (Choromanski et al., 2020).

    ``exp(q . k / sqrt(d))`` is estimated by ``phi(q) . phi(k)`` with ``phi(x) = exp(W x' - |x'|^2 / 2)``,
    ``x' = x d^-1/4`` and ``W`` (m x d) a random orthogonal Gaussian projection per head; attention becomes
    ``phi(Q) (phi(K)^T V) / (phi(Q) . sum phi(K))``, linear in the sequence length (shared op:
    :mod:`fluence_fairseq.ops.linear_attention`).

    Patterns: all four. Noncausal self and cross attention use the whole-sequence sums; causal self attention
    uses chunked prefix sums (query ``i`` sees keys ``j <= i``); causal cross attention lets query ``i`` see source
    keys ``j <= i``. ``attn_mask`` is refused (the standard future mask of a causal self attention is accepted).
    Attention weights are not formed: ``need_weights`` returns ``None``; ``dropout`` is not applied.

    Positions: none of its own (its causal state is a plain sum over the prefix). With :meth:`set_alibi`
    (``--attn-position-bias alibi``, causal self attention) key ``j`` of query ``i`` is weighted by
    ``exp(-slope_h (i - j))``, which is ALiBi applied to the kernel Performer estimates, ``exp(q . k / sqrt(d))``;
    it enters as ``slope_h * j`` added to the key's log scale (the query's factor cancels), so the state stays
    constant-size and decoding and memory stay exact.

    Stabilisation (exact, never looks ahead): each query's features are divided by their own maximum (a
    per-query factor that cancels); each key's features are divided by their own maximum, which is carried as a
    log scale, and the scales enter relative to the running maximum over the keys a query can see. So causal
    outputs never depend on future tokens, and decoding equals the full forward.

    Decoding state: causal self attention keeps ``favor_kv`` (B, H, m, d) = sum phi(k) v^T, ``favor_k``
    (B, H, m) = sum phi(k) and ``favor_max`` (B, H), the running key scale they are relative to: constant size
    and constant time per step. Noncausal cross attention caches ``favor_kv`` and ``favor_k`` of the source once
    per sentence; causal cross attention caches the source keys and values (each step sees a longer prefix).

    Differences from the reference implementation (bugs fixed):

    * the projection is a persistent buffer ``projection`` (H, m, d) drawn at construction (from ``seed``, or
      from torch's global generator): a saved model has the same features after loading (the reference kept its
      eval projection out of the state dict and redrew a fresh projection on every training call);
    * ``feature_redraw_interval=N`` redraws it every N training forward calls (0 = never); never in eval;
    * causal self attention really is causal (the reference silently turned it noncausal because its key
      stabiliser, a maximum over the whole sequence, leaked the future);
    * the feature epsilon is relative to each key's own largest feature, not to the largest feature of the whole
      sequence, so it does not depend on the other keys (and the denominator is not clamped at 0.1);
    * padding masks are applied per batch row for every head.

    Example::

        >>> import torch
        >>> from fluence_fairseq import FSPerformerAttention
        >>> attn = FSPerformerAttention(512, 8, approx_attn_dim=64, causal=True)
        >>> x = torch.randn(100, 2, 512)                      # (length, batch, dim)
        >>> out, _ = attn(x, x, x, need_weights=False)
        >>> state = {}                                        # decoding: one token at a time, constant state
        >>> step, _ = attn(x[:1], x[:1], x[:1], incremental_state=state)
    """

    decoding_state = "sum phi(k) v^T (m x d), sum phi(k) (m) and a running max"
    keeps_output = False  # its backward does not read its output (see FluenceAttention.keeps_output)
    float32_math = True  # its own autograd kernels keep float32 accumulators
    position_scheme = "alibi"  # as a decay of the causal prefix sums: exactly ALiBi on the estimated exp(q . k)
    alibi_causal_self_only = "it enters as a decay of the causal prefix sums"
    alibi_running_maxima = ("favor_max",)

    constant_state = True  # causal decoding keeps sum phi(k) v^T and sum phi(k)
    forms_weights = False
    shares_source = True  # the source summary is read by each query's features alone (see FluenceAttention)
    supported_patterns = ALL_PATTERNS
    supports_attn_mask = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        *,
        approx_attn_dim: int = 16,
        feature_redraw_interval: int = 0,
        seed: Optional[int] = None,
        chunk_size: int = 64,
        **kwargs,
    ):
        check_int("approx_attn_dim", approx_attn_dim, 1, "the number of random features m")
        check_int("feature_redraw_interval", feature_redraw_interval, 0,
                  "0 = never redraw, N = every N training calls")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        super().__init__(embed_dim, num_heads, dropout=dropout, **kwargs)
        if dropout > 0:
            warnings.warn(f"Performer does not apply attention dropout ({dropout}): it never forms attention "
                          "probabilities", stacklevel=2)
        self.approx_attn_dim = approx_attn_dim
        self.feature_redraw_interval = feature_redraw_interval
        self.chunk_size = chunk_size
        self._generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.register_buffer("projection", self._draw(), persistent=True)
        self.training_calls_since_redraw = 0

    # ------------------------------------------------------------------------------------------- features
    def _draw(self) -> Tensor:
        return orthogonal_gaussian_projection(self.num_heads, self.approx_attn_dim, self.head_dim, self._generator)

    @torch.no_grad()
    def redraw_projection(self) -> None:
        """Draw a new random projection (a new tensor: graphs built with the old one stay valid)."""
        old = self.projection
        self.projection = self._draw().to(device=old.device, dtype=old.dtype)

    def _features(self, x: Tensor, keys: bool):
        """(B, H, L, Dh) -> (features (B, H, L, m) relative to each row's largest one, log of that largest one
        (B, H, L)) in float32 or wider, for ``x' = x d^-1/4``: ``exp(W x' - |x'|^2 / 2)`` for keys,
        ``exp(W x')`` for queries (``exp(-|q'|^2 / 2)`` is a per-query factor and cancels in num / den).

        The scale d^-1/4 goes into the (small) projection, so no scaled copy of ``x`` is made and kept."""
        work = torch.promote_types(x.dtype, torch.float32)
        projection = self.projection.to(work) * self.head_dim ** -0.25
        # |x'|^2 / 2 = |x|^2 / (2 sqrt(d))
        norm_coef = 0.5 * self.head_dim ** -0.5 if keys else 0.0
        if torch.is_grad_enabled() and (x.requires_grad or projection.requires_grad):
            return _PositiveFeatures.apply(x.to(work), projection, norm_coef, FEATURE_EPS)
        with torch.no_grad():  # decoding and evaluation: the same arithmetic without the autograd function
            features, scale, _ = _positive_features(x.to(work), projection, norm_coef, FEATURE_EPS)
        return features, scale.squeeze(-1)

    def query_features(self, q: Tensor) -> Tensor:
        # dividing by the maximum is a per-query factor as well (it cancels up to the epsilon)
        return self._features(q, keys=False)[0]

    def key_features(self, k: Tensor):
        """(features relative to each key's largest one, log of that largest one (B, H, S))."""
        return self._features(k, keys=True)

    # ----------------------------------------------------------------------------------------------- math
    def forward(self, *args, **kwargs):
        if self.training and self.feature_redraw_interval > 0:
            if self.training_calls_since_redraw >= self.feature_redraw_interval:
                self.redraw_projection()
                self.training_calls_since_redraw = 0
            self.training_calls_since_redraw += 1
        return super().forward(*args, **kwargs)

    def _decayed(self, scale: Tensor) -> Tensor:
        """Key log scales with ALiBi's decay (causal self attention with :meth:`set_alibi`; else unchanged)."""
        offsets = self.alibi_key_offsets(scale.size(-1), scale)
        return scale if offsets is None else scale + offsets

    def attend(self, q, k, v, *, key_padding_mask, attn_mask, query_offset, need_weights):
        phi_k, scale = self.key_features(k)
        scale = self._decayed(scale)
        out = linear_attention(
            self.query_features(q), phi_k, v, causal=self.causal, query_offset=query_offset, key_log_scale=scale,
            key_padding_mask=key_padding_mask, eps=DEN_EPS, chunk_size=self.chunk_size,
        )
        return out.to(v.dtype), None

    def attend_incremental(self, q, k, v, *, key_padding_mask, attn_mask, buffer, need_weights):
        state = None
        if buffer.get("favor_kv") is not None:
            state = LinearState(buffer["favor_kv"], buffer["favor_k"], buffer["favor_max"])
        phi_k, scale = self.key_features(k)
        out, state = causal_linear_attention(
            self.query_features(q), phi_k, v, key_log_scale=self._decayed(scale), key_padding_mask=key_padding_mask,
            state=state, eps=DEN_EPS, chunk_size=self.chunk_size,
        )
        buffer["favor_kv"], buffer["favor_k"], buffer["favor_max"] = state
        return out.to(v.dtype), None

    def summarize_keys(self, k, v, key_padding_mask):
        if self.causal:  # each query step sees a longer source prefix: keep the keys
            return super().summarize_keys(k, v, key_padding_mask)
        phi_k, scale = self.key_features(k)
        kv, ksum = linear_summary(phi_k, v, key_log_scale=scale, key_padding_mask=key_padding_mask)
        return {"favor_kv": kv, "favor_k": ksum}

    def attend_summary(self, q, summary, *, attn_mask, query_offset, need_weights):
        if "favor_kv" not in summary:
            return super().attend_summary(q, summary, attn_mask=attn_mask, query_offset=query_offset,
                                          need_weights=need_weights)
        out = attend_linear_summary(self.query_features(q), summary["favor_kv"], summary["favor_k"], eps=DEN_EPS)
        return out.to(q.dtype), None



@fsmha
class FSPerformerAttention(PerformerAttention):
    """Performer with fairseq's MultiheadAttention constructor keywords."""


ATTENTION_SPEC = AttentionSpec(
    "performer", FSPerformerAttention,
    (
        AttentionOption("approx_attn_dim", IntRange(1), help="number of random features m per head (FAVOR+)"),
        AttentionOption("feature_redraw_interval", IntRange(0, meaning="0 = never"), help="redraw the random projection every N training forward calls (0 = never)"),
    ),
    "Performer / FAVOR+ positive orthogonal random features (Choromanski et al. 2020); all four patterns",
    tiny={"approx_attn_dim": 8},
)


# the names before 0.2, kept for code that imports them
Performer = PerformerAttention
FSPerformer = FSPerformerAttention
