"""ABC, Attention with Bounded-memory Control (Peng et al., 2021), on the fluence base.

The math lives in :mod:`fluence_fairseq.ops.abc`; this module holds the parameters and the fairseq glue.
"""
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from ..ops.abc import (ABCState, attend_slots, attend_slots_in_layout, causal_abc, causal_abc_dense,
                       compressed_slots, noncausal_abc, slot_memory)
from .attention_base import FluenceAttention, fsmha
from ..flag_types import IntRange
from .spec import AttentionOption, AttentionSpec, check_int

__all__ = ["ABCAttention", "FSABCAttention", "ABC", "FSABC"]

_STATE_NAMES = ("abc_k_num", "abc_k_den", "abc_k_max", "abc_v_num", "abc_v_den", "abc_v_max")


class ABCAttention(FluenceAttention):
    """ABC: attention over ``num_landmarks`` learned memory slots (Peng et al., 2021, arXiv 2110.02488).

    Each slot ``r`` is a softmax-weighted average of the keys (and, with its own scores, of the values):
    ``K~[r] = sum_j softmax_j(k_j W_k)[r] k_j``, ``V~[r] = sum_j softmax_j(v_j W_v)[r] v_j``, with
    ``compress_k``/``compress_v`` (head_dim x r, shared by the heads) scoring the projected keys and values.
    Each query then attends over the r slots: ``o = softmax(q K~^T / sqrt(d)) V~``. O(L r d) time, O(r d) memory
    per head for the summary.

    Patterns: all four.

    * noncausal self/cross: the slots summarise the whole (unpadded) source. Cross decoding caches K~ and V~
      (``abc_k_slots``/``abc_v_slots``, (B, H, r, d)) once per source sentence: constant cost per step.
    * causal self: the true recurrence, query ``t`` reads slots over keys ``j <= t`` only,
      ``K~_t[r] = sum_{j<=t} exp(a_{j,r}) k_j / sum_{j<=t} exp(a_{j,r})``. Training is chunked (masked chunk
      matrices plus carried states, never per-position states); decoding keeps a constant-size state per head:
      ``abc_k_num``/``abc_v_num`` (B, H, r, d), ``abc_k_den``/``abc_v_den`` and running maxima
      ``abc_k_max``/``abc_v_max`` (B, H, r). Several tokens per call and padded new tokens are handled.
    * causal cross: query ``i`` reads slots over source keys ``j <= i + query_offset``; decoding keeps the
      source keys and values (fairseq's cache) and recomputes the prefix slots.

    Positions: none of its own (a causal slot is a weighted average over the prefix, order-free). With
    :meth:`set_alibi` (``--attn-position-bias alibi``, causal self attention) the slots written for query ``t``
    weigh key ``j`` by an extra ``exp(-slope_h (t - j))`` (ALiBi's bias on the slot-writing softmax), so recent keys
    dominate each head's slots at that head's rate; the state stays constant-size, decoding and memory exact.

    ``attn_mask`` is refused (the slots are not an attention matrix); padding comes from ``key_padding_mask``.
    Weights (on request: ``need_head_weights=True``) are the equivalent attention over keys, ``sum_r p[i, r] softmax_j(b)[j, r]``; they
    are None where only a summary or a state exists (cross decoding from slots, causal decoding).

    Differences from the CAB reference implementation: its causal path normalises each key by a cumulative
    logsumexp but never sums over earlier keys, so its output is a scalar multiple of ``v_t`` (not ABC); here
    the prefix sums are real. Its decoding cache kept the whole key/value history and recomputed the slots every
    step; here the causal state is bounded and cross slots are computed once. A fully padded row gives finite
    outputs (the mean of its padded values) instead of NaN.

    Args:
        num_landmarks: number of memory slots r (default 16).

    Example::

        >>> import torch
        >>> from fluence_fairseq import FSABCAttention
        >>> attn = FSABCAttention(512, 8, num_landmarks=16, causal=True)
        >>> x = torch.randn(100, 2, 512)                      # (length, batch, dim)
        >>> out, _ = attn(x, x, x, need_weights=False)
        >>> out.shape
        torch.Size([100, 2, 512])
    """

    decoding_state = "r x d numerators, r denominators and a running max"
    keeps_output = False  # its backward does not read its output (see FluenceAttention.keeps_output)
    float32_math = True  # its own autograd kernels keep float32 accumulators
    position_scheme = "alibi"  # as a decay of the causal slot sums (slope_h * j on every key's slot scores)
    alibi_causal_self_only = "it enters as a decay of the causal slot sums"
    alibi_running_maxima = ("abc_k_max", "abc_v_max")

    supports_attn_mask = False
    constant_state = True  # causal decoding keeps r memory slots
    shares_source = True  # noncausal cross: each query attends the slots on its own (see FluenceAttention)
    #: positions per chunk of the causal computation (the masked chunk matrices are chunk x chunk)
    chunk_size: int = 64
    #: chunks per group of the fused training pass (its temporaries are one group's), and per checkpointed block
    #: of the exact fallback
    block_chunks: int = 8
    #: the same off the CPU (GPUs), where a group is a round of small kernel launches: on an H200 (causal, L=4096,
    #: batch 4, width 512, ``python -m benchmarks.group_sizes``) 32 took the training step to 0.33x that of 8 at
    #: 1.85x its peak memory (1.11x fairseq's attention's)
    device_block_chunks: int = 32

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        *,
        num_landmarks: int = 16,
        **kwargs,
    ):
        check_int("num_landmarks", num_landmarks, 1, "the number of ABC memory slots")
        super().__init__(embed_dim, num_heads, dropout=dropout, **kwargs)
        self.num_landmarks = num_landmarks
        self.compress_k = nn.Parameter(torch.empty(self.head_dim, num_landmarks))
        self.compress_v = nn.Parameter(torch.empty(self.head_dim, num_landmarks))
        self._reset_compression()

    def _reset_compression(self):
        nn.init.xavier_uniform_(self.compress_k, gain=2 ** -0.5)
        nn.init.xavier_uniform_(self.compress_v, gain=2 ** -0.5)

    def reset_parameters(self):
        super().reset_parameters()
        if hasattr(self, "compress_k"):  # fairseq's constructor resets before the slots exist
            self._reset_compression()


    # ----------------------------------------------------------------------------------------------- math
    def _slot_scores(self, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor]):
        """(B, H, L, r) scores of every key/value for every slot; padded keys get finfo.min (never NaN). With
        ALiBi (causal self attention) key ``j`` of the call gets ``slope_h * j`` on every slot: a prefix slot
        then weighs key ``j`` by ``exp(-slope_h (t - j))`` relative to the newest key ``t``."""
        # in (L, B, H, d) order, where the projected heads are contiguous: no copy of k or v is made (or saved)
        alpha_k = torch.matmul(k.permute(2, 0, 1, 3), self.compress_k.to(k.dtype)).permute(1, 2, 0, 3)
        alpha_v = torch.matmul(v.permute(2, 0, 1, 3), self.compress_v.to(v.dtype)).permute(1, 2, 0, 3)
        offsets = self.alibi_key_offsets(k.size(2), alpha_k)
        if offsets is not None:
            alpha_k, alpha_v = alpha_k + offsets.unsqueeze(-1), alpha_v + offsets.unsqueeze(-1)
        if key_padding_mask is not None:
            pad = key_padding_mask.view(key_padding_mask.size(0), 1, -1, 1)
            low = torch.finfo(alpha_k.dtype).min
            alpha_k, alpha_v = alpha_k.masked_fill(pad, low), alpha_v.masked_fill(pad, low)
        return alpha_k, alpha_v

    def _dropout_p(self) -> float:
        return self.dropout_module.p if self.training else 0.0

    def attend(self, q, k, v, *, key_padding_mask, attn_mask, query_offset, need_weights):
        if not self.causal and not need_weights:
            k_slots = compressed_slots(k, self.compress_k, key_padding_mask)
            v_slots = compressed_slots(v, self.compress_v, key_padding_mask)
            dropout_p = self._dropout_p()
            if dropout_p == 0.0:
                return attend_slots_in_layout(q, k_slots, v_slots), None
            return attend_slots(q, k_slots, v_slots, dropout_p=dropout_p)[0], None
        if self.causal and not need_weights and self.heads_exclusive and query_offset == 0 and q.size(2) == k.size(2):
            # a whole pass over heads nothing else reads: the op takes the slot scores' gradient through the maps
            # itself, so no autograd node keeps k and v for the product and all three gradients can be written
            # over the heads
            out, _ = self._run_causal(q, k, v, None, None, slot_maps=(self.compress_k, self.compress_v),
                                      slot_shift=self.alibi_key_offsets(k.size(2), k), slot_pad=key_padding_mask,
                                      reuse_inputs=True)
            return out, None
        alpha_k, alpha_v = self._slot_scores(k, v, key_padding_mask)
        if not self.causal:
            return noncausal_abc(q, k, v, alpha_k, alpha_v, dropout_p=self._dropout_p(), need_weights=need_weights)
        if need_weights:
            return causal_abc_dense(q, k, v, alpha_k, alpha_v, query_offset=query_offset,
                                    dropout_p=self._dropout_p())
        return self._causal(q, k, v, alpha_k, alpha_v, query_offset), None

    def _run_causal(self, q, k, v, alpha_k, alpha_v, state=None, **slot_map_args):
        # q is read by nothing else (the slot scores come from k and v): with exclusive heads its gradient may
        # be written over it
        return causal_abc(q, k, v, alpha_k, alpha_v, state, chunk_size=self.chunk_size,
                          block_chunks=self.block_chunks if q.device.type == "cpu" else self.device_block_chunks,
                          dropout_p=self._dropout_p(),
                          reuse_query=self.heads_exclusive, **slot_map_args)

    def _causal(self, q, k, v, alpha_k, alpha_v, query_offset: int) -> Tensor:
        """Query i sees keys j <= i + query_offset. Queries are placed on their key positions; those before the
        first key get zeros, those past the last key read the slots of the whole source."""
        tgt_len, src_len = q.size(2), k.size(2)
        if query_offset == 0 and tgt_len == src_len:
            return self._run_causal(q, k, v, alpha_k, alpha_v)[0]
        first = min(max(-query_offset, 0), tgt_len)  # queries [0, first) see no key
        last = min(max(src_len - query_offset, first), tgt_len)  # [first, last) sit on keys; [last, Lq) see all
        parts = []
        if first > 0:
            parts.append(q.new_zeros(q.size(0), q.size(1), first, v.size(-1)))
        if last > first:
            keys = last + query_offset
            placed = nn.functional.pad(q[:, :, first:last], (0, 0, first + query_offset, 0))
            out, _ = self._run_causal(placed, k[:, :, :keys], v[:, :, :keys], alpha_k[:, :, :keys],
                                      alpha_v[:, :, :keys])
            parts.append(out[:, :, first + query_offset:])
        if last < tgt_len:  # the prefix is the whole source: the noncausal slots
            k_slots, v_slots = slot_memory(k, v, alpha_k, alpha_v)
            parts.append(attend_slots(q[:, :, last:], k_slots, v_slots, dropout_p=self._dropout_p())[0])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    # ------------------------------------------------------------------------------------------- decoding
    def attend_incremental(self, q, k, v, *, key_padding_mask, attn_mask, buffer, need_weights):
        """Causal self decoding from the constant-size state (see the class docstring); weights are None."""
        alpha_k, alpha_v = self._slot_scores(k, v, key_padding_mask)
        state = None
        if buffer.get(_STATE_NAMES[0]) is not None:
            state = ABCState(*(buffer[name] for name in _STATE_NAMES))
        out, state = self._run_causal(q, k, v, alpha_k, alpha_v, state)
        buffer.update(zip(_STATE_NAMES, state))
        return out, None

    def summarize_keys(self, k, v, key_padding_mask) -> Dict[str, Optional[Tensor]]:
        if self.causal:  # each query step needs a different prefix of the source: keep the keys
            return super().summarize_keys(k, v, key_padding_mask)
        alpha_k, alpha_v = self._slot_scores(k, v, key_padding_mask)
        k_slots, v_slots = slot_memory(k, v, alpha_k, alpha_v)
        return {"abc_k_slots": k_slots, "abc_v_slots": v_slots}

    def attend_summary(self, q, summary, *, attn_mask, query_offset, need_weights):
        if self.causal:
            return super().attend_summary(q, summary, attn_mask=attn_mask, query_offset=query_offset,
                                          need_weights=need_weights)
        out, _ = attend_slots(q, summary["abc_k_slots"], summary["abc_v_slots"], dropout_p=self._dropout_p())
        return out, None


@fsmha
class FSABCAttention(ABCAttention):
    """:class:`ABCAttention` accepting fairseq's ``MultiheadAttention`` keywords."""


ATTENTION_SPEC = AttentionSpec(
    "abc", FSABCAttention,
    (AttentionOption("num_landmarks", IntRange(1), help="number of memory slots r of ABC / landmarks of Nystrom, LARA, "
                     "LongShort (each attention with its own default)"),),
    "ABC, attention with bounded-memory control (Peng et al. 2021); all four patterns, true causal recurrence",
    tiny={"num_landmarks": 4},
)


# the names before 0.2, kept for code that imports them
ABC = ABCAttention
FSABC = FSABCAttention
