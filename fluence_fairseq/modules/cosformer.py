"""cosFormer (Qin et al., 2022): linear attention with ReLU features and a cos-based re-weighting."""
import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.linear_attention import (
    LinearState,
    attend_linear_summary,
    causal_linear_attention,
    linear_attention,
    linear_summary,
)
from .attention_base import ALL_PATTERNS, FluenceAttention, fold_rows, fsmha, unfold_rows
from ..flag_types import Choice, IntRange
from .spec import AttentionOption, AttentionSpec, check_int

__all__ = ["CosformerAttention", "FSCosformerAttention"]

#: the reference's denominator floor: rows whose query (or all keys) the activation zeroed give 0, not 0/0
DEN_EPS = 1e-6
ACTIVATIONS = ("relu", "elu")


class CosformerAttention(FluenceAttention):
    """cosFormer attention (Qin et al., 2022): ``softmax(q k^T)`` replaced by a decomposable re-weighting.

    With ``q' = act(q)``, ``k' = act(k)`` (``act`` = ReLU, or ``1 + elu``) and positions ``i`` (query) and
    ``j`` (key), the weight is ``q'_i . k'_j * cos(pi (i - j) / 2M)``. Since ``cos(a - b) = sin a sin b +
    cos a cos b``, it equals ``phi(q_i) . phi(k_j)`` with ``phi(x_i) = [x'_i sin(pi i / 2M), x'_i cos(pi i / 2M)]``
    (2d features), so the attention is linear in the length (shared op: :mod:`fluence_fairseq.ops.linear_attention`).

    ``M`` and the positions:

    * noncausal self attention: ``M`` = the real (unpadded) length of each sequence, positions counted over its
      real tokens, as in the paper (the outputs of real tokens do not depend on padding);
    * causal self, noncausal cross and causal cross attention: ``M = cosformer_max_len``, fixed, so that a
      prefix (or a decoding step) gets the same weights as the full sequence. Queries sit at their position in
      the target (continuing across decoding calls), keys at their index in the source, counted over real tokens
      for noncausal cross attention (so left-padded sources work). A position ``>= cosformer_max_len`` raises an
      error naming the flag to raise (``|i - j| < M`` keeps every weight positive).

    Patterns: all four; ``key_padding_mask`` is honoured in all of them. ``attn_mask`` is refused (the standard
    future mask of a causal self attention is accepted). Attention weights are not formed (``need_weights``
    returns ``None``) and ``dropout`` is not applied.

    Decoding state: causal self attention keeps ``cos_kv`` (B, H, 2d, d) = sum phi(k) v^T, ``cos_k`` (B, H, 2d)
    = sum phi(k) and ``cos_steps`` (B,), the number of positions seen: constant size and time per step.
    Noncausal cross attention caches ``cos_kv`` and ``cos_k`` of the source once per sentence; causal cross
    attention caches the source keys and values (each step sees a longer prefix).

    Differences from the reference implementation (bugs fixed): ``key_padding_mask`` is applied (the reference
    ignored it); ``act_fun="elu"`` works (the reference raised a TypeError); ``vdim`` is honoured (the reference
    tested ``kdim``); causal self and causal cross attention exist, with a fixed ``M``; cross-attention query
    positions continue across decoding calls (the reference restarted them at 1, so decoding differed from the
    full forward) and ``M`` no longer changes with the call's lengths.

    Example::

        >>> import torch
        >>> from fluence_fairseq import FSCosformerAttention
        >>> attn = FSCosformerAttention(512, 8, causal=True, cosformer_max_len=2048)
        >>> x = torch.randn(100, 2, 512)                      # (length, batch, dim)
        >>> out, _ = attn(x, x, x, need_weights=False)
        >>> state = {}                                        # decoding: one token at a time, constant state
        >>> step, _ = attn(x[:1], x[:1], x[:1], incremental_state=state)
    """

    decoding_state = "sum phi(k) v^T (2d x d), sum phi(k) (2d) and the position"
    keeps_output = False  # its backward does not read its output (see FluenceAttention.keeps_output)
    position_scheme = "cos re-weighting"  # its own position re-weighting

    supported_patterns = ALL_PATTERNS
    constant_state = True  # causal decoding keeps sum phi(k) v^T, sum phi(k) and the step count
    supports_memory = False
    memory_refusal = ("its causal re-weighting uses a fixed M = cosformer_max_len and positions from the start of "
                      "the stream, so a stream longer than M cannot be scored (silently wrapping the positions would "
                      "change the method).")
    forms_weights = False
    # noncausal cross: a sentence's beams read its source summary together, each query's features made at its
    # own position first (attend_shared_summary)
    shares_source = True
    supports_attn_mask = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        *,
        cosformer_max_len: int = 1024,
        act_fun: str = "relu",
        chunk_size: int = 64,
        **kwargs,
    ):
        check_int("cosformer_max_len", cosformer_max_len, 1,
                  "the longest sequence a causal or cross cosFormer attention accepts")
        if act_fun not in ACTIVATIONS:
            raise ValueError(f"act_fun must be one of {ACTIVATIONS} ('elu' means 1 + elu), got {act_fun!r}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        super().__init__(embed_dim, num_heads, dropout=dropout, **kwargs)
        if dropout > 0:
            warnings.warn(f"CosformerAttention does not apply attention dropout ({dropout}): it never forms "
                          "attention probabilities", stacklevel=2)
        self.cosformer_max_len = cosformer_max_len
        self.act_fun = act_fun
        self.chunk_size = chunk_size

    # ------------------------------------------------------------------------------------------- features
    def activation(self, x: Tensor) -> Tensor:
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        return F.relu(x) if self.act_fun == "relu" else 1 + F.elu(x)

    def features(self, x: Tensor, angle: Tensor) -> Tensor:
        """(B, H, L, d) and angles pi * position / 2M broadcastable to (B, 1, L, 1) -> (B, H, L, 2d)."""
        a = self.activation(x)
        angle = angle.to(a.dtype)  # angles are made in float64 (exact positions), used in the feature dtype
        return torch.cat([a * torch.sin(angle), a * torch.cos(angle)], dim=-1)

    @staticmethod
    def trig(angle: Tensor, dtype: torch.dtype) -> Tensor:
        """Angles (B or 1, 1, L, 1) -> the multipliers [sin, cos] (B or 1, 1, L, 2): ``features(x, angle)`` is
        ``activation(x)`` re-weighted by them (the causal op applies them chunk by chunk)."""
        angle = angle.to(dtype)
        return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)

    def _check_position(self, last: int, what: str) -> None:
        if last >= self.cosformer_max_len:
            raise ValueError(
                f"cosFormer {what} position {last} is beyond cosformer_max_len={self.cosformer_max_len} (causal and "
                f"cross cosFormer attention re-weights with a fixed M = cosformer_max_len). M must exceed every "
                f"position the model will see (here at least {last + 1}; when generating, the longest output: "
                f"max-len-a x source length + max-len-b + 1). Train with --cosformer-max-len M; for a trained "
                f"checkpoint, fairseq-generate, fairseq-interactive and fairseq-eval-lm take --model-overrides "
                f"\"{{'cosformer_max_len': M}}\" (the re-weighting then differs from training's); in Python pass "
                f"cosformer_max_len=M"
            )

    def _angles(self, positions: Tensor) -> Tensor:
        """Positions -> angles for the fixed-M patterns, shaped to broadcast against (B, H, L, d)."""
        angle = positions.to(torch.float64) * (math.pi / (2 * self.cosformer_max_len))
        return angle.view(-1, 1, positions.size(-1), 1) if positions.dim() == 2 else angle.view(1, 1, -1, 1)

    def _query_angles(self, length: int, offset: int, device) -> Tensor:
        self._check_position(offset + length - 1, "query")
        return self._angles(torch.arange(offset, offset + length, device=device))

    def _source_key_angles(self, length: int, key_padding_mask: Optional[Tensor], device) -> Tensor:
        """Noncausal cross attention: source keys at their index among the real source tokens."""
        if key_padding_mask is None:
            self._check_position(length - 1, "key")
            return self._angles(torch.arange(length, device=device))
        positions = (~key_padding_mask).cumsum(-1) - 1
        self._check_position(int(positions.max()), "key")
        return self._angles(positions)

    # ----------------------------------------------------------------------------------------------- math
    def attend(self, q, k, v, *, key_padding_mask, attn_mask, query_offset, need_weights):
        length_q, length_k = q.size(2), k.size(2)
        if not (self.cross or self.causal):
            # M = each sequence's real length; positions over its real tokens
            if key_padding_mask is None:
                angle = torch.arange(length_k, device=q.device, dtype=torch.float64) * (math.pi / (2 * length_k))
                angle = angle.view(1, 1, -1, 1)
            else:
                real = ~key_padding_mask
                lengths = real.sum(-1, keepdim=True).clamp_min(1)
                angle = ((real.cumsum(-1) - 1).to(torch.float64) * (math.pi / 2) / lengths).view(
                    real.size(0), 1, length_k, 1)
            query_angle = key_angle = angle
        else:
            query_angle = self._query_angles(length_q, query_offset, q.device)
            if self.cross and not self.causal:
                key_angle = self._source_key_angles(length_k, key_padding_mask, k.device)
            else:
                self._check_position(length_k - 1, "key")
                key_angle = self._angles(torch.arange(length_k, device=k.device))
        # the op applies the sin/cos re-weighting a block at a time, and relu too (so only q, k and v are kept,
        # and with heads nothing else reads it writes their gradients over them); elu's features are made here
        relu = self.act_fun == "relu"
        a_q, a_k = (q, k) if relu else (self.activation(q), self.activation(k))
        work = torch.promote_types(q.dtype, torch.float32)
        out = linear_attention(a_q, a_k, v, causal=self.causal, query_offset=query_offset,
                               key_padding_mask=key_padding_mask, eps=DEN_EPS, chunk_size=self.chunk_size,
                               query_mix=self.trig(query_angle, work), key_mix=self.trig(key_angle, work),
                               relu=relu, reuse_inputs=relu and self.heads_exclusive)
        return out.to(v.dtype), None

    def attend_incremental(self, q, k, v, *, key_padding_mask, attn_mask, buffer, need_weights):
        steps = buffer.get("cos_steps")
        start = 0 if steps is None else int(steps[0])
        angle = self._query_angles(q.size(2), start, q.device)  # new keys share the new queries' positions
        state = None
        if buffer.get("cos_kv") is not None:
            kv = buffer["cos_kv"]
            state = LinearState(kv, buffer["cos_k"], kv.new_zeros(kv.shape[:2]))
        a_q, a_k = self.activation(q), self.activation(k)
        mix = self.trig(angle, a_q.dtype)
        out, state = causal_linear_attention(
            a_q, a_k, v, key_padding_mask=key_padding_mask, state=state, eps=DEN_EPS, chunk_size=self.chunk_size,
            query_mix=mix, key_mix=mix,
        )
        buffer["cos_kv"], buffer["cos_k"] = state.kv, state.k
        buffer["cos_steps"] = torch.full((q.size(0),), start + q.size(2), dtype=torch.long, device=q.device)
        return out.to(v.dtype), None

    def summarize_keys(self, k, v, key_padding_mask):
        if self.causal:  # each query step sees a longer source prefix: keep the keys
            return super().summarize_keys(k, v, key_padding_mask)
        phi_k = self.features(k, self._source_key_angles(k.size(2), key_padding_mask, k.device))
        kv, ksum = linear_summary(phi_k, v, key_padding_mask=key_padding_mask)
        return {"cos_kv": kv, "cos_k": ksum}

    def attend_summary(self, q, summary, *, attn_mask, query_offset, need_weights):
        if "cos_kv" not in summary:
            return super().attend_summary(q, summary, attn_mask=attn_mask, query_offset=query_offset,
                                          need_weights=need_weights)
        phi_q = self.features(q, self._query_angles(q.size(2), query_offset, q.device))
        out = attend_linear_summary(phi_q, summary["cos_kv"], summary["cos_k"], eps=DEN_EPS)
        return out.to(q.dtype), None

    def attend_shared_summary(self, q, summary, rows, *, query_offset, need_weights):
        """The beams' features at their positions, then one product per sentence with its source summary (the
        summary is 2d x d per head: read once per sentence instead of once per beam)."""
        phi_q = self.features(q, self._query_angles(q.size(2), query_offset, q.device))
        out = attend_linear_summary(fold_rows(phi_q, rows), summary["cos_kv"], summary["cos_k"], eps=DEN_EPS)
        return unfold_rows(out, rows).to(q.dtype), None



@fsmha
class FSCosformerAttention(CosformerAttention):
    """cosFormer attention with fairseq's MultiheadAttention constructor keywords."""


ATTENTION_SPEC = AttentionSpec(
    "cosformer", FSCosformerAttention,
    (
        AttentionOption("cosformer_max_len", IntRange(1), help="fixed M of the cos re-weighting for causal and cross cosFormer attention: the longest "
                        "sequence (query or key positions) accepted"),
        AttentionOption("act_fun", Choice("relu", "elu"), help="cosFormer feature activation: relu or elu (= 1 + elu)"),
    ),
    "cosFormer linear attention with cos re-weighting (Qin et al. 2022); all four patterns",
    tiny={"cosformer_max_len": 64},
    bench_options={"cosformer_max_len": 16384},
)
