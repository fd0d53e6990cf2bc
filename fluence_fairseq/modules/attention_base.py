"""The fairseq glue, written once: every fluence attention subclasses :class:`FluenceAttention` and supplies
only its math, :meth:`FluenceAttention.attend` (and, for recurrent attentions, :meth:`attend_incremental`).

The base owns: ``(L, B, D)`` or ``batch_first`` inputs, padding and attention masks of any dtype, weights
(``need_weights``/``need_head_weights``), ``static_kv`` cross attention, the incremental-decoding cache (batch on
dim 0 of every cached tensor, so ``reorder_incremental_state`` is one ``index_select`` per tensor) and the
pattern check (noncausal/causal x self/cross).

It derives from fairseq's ``MultiheadAttention`` so the projections keep the names ``q_proj``, ``k_proj``,
``v_proj`` and ``out_proj`` (state dicts load into stock transformers and back), and it overrides ``forward``
entirely: fairseq's own forward has a fused fast path that would skip any hook we override.
"""
import contextlib
import inspect
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Optional, Tuple

import torch
from fairseq.modules.multihead_attention import MultiheadAttention
from torch import Tensor

from ..ops.common import linear_grad_over_input, sdpa_for_decoding
from ..pruning.masks import PrunableAttentionMixin, leading_padding
from .masks import HARD_MASK, append_padding_masks, attn_mask_to_additive, padding_mask_to_bool

IncrementalState = Dict[str, Dict[str, Optional[Tensor]]]
#: the cache entry of a cross attention's decoding that counts the queries already attended
STEPS = "steps"
#: the cache entry numbering runs of consecutive rows whose cached source is the same (a sentence's beams)
SOURCE_GROUP = "source_group"
#: prefix of the cache entries holding one row of the cached source per run of ``SOURCE_GROUP`` (see
#: :attr:`FluenceAttention.shares_source`): the batch on their dim 0 is the sentences', not the beams'
SHARED_SOURCE = "shared_source."
#: the beams of a sentence share its cached source only where the whole cache holds this many elements: folding
#: the beams' queries and unfolding their outputs costs about 10-15 us a call, more than the reads it saves from a
#: small source (one sentence of 5 beams, a softmax cross step over 16 source tokens, 82k cached elements: 176
#: against 160 us; 64 tokens, 328k: 186 against 179; 256 tokens, 1.3M: 226 against 237; 8 sentences of 30 tokens,
#: 1.2M: within 1%, and a whole beam search 0.976x its time)
SHARE_FROM_ELEMENTS = 1 << 19
#: the cache entry holding a beam reorder not yet applied to a causal self attention's cached keys and values
#: (``prev_key``/``prev_value``): the next step copies them once, selected and with the new keys appended, where
#: the reorder's selection and the append's concatenation copied them twice (see
#: :meth:`FluenceAttention.reorder_incremental_state`). (B,), indices into the cached rows.
PENDING_ORDER = "pending_order"
#: the cached tensors whose reorder a causal self attention's default decoding step takes over
DEFERRED_REORDER = ("prev_key", "prev_value")

#: (cross, causal) -> name used in messages and docs
PATTERNS = {
    (False, False): "noncausal self",
    (False, True): "causal self",
    (True, False): "noncausal cross",
    (True, True): "causal cross",
}
ALL_PATTERNS: FrozenSet[Tuple[bool, bool]] = frozenset(PATTERNS)


@dataclass(frozen=True)
class Statistic:
    """One number an attention reports for the training log (see :meth:`FluenceAttention.stats`).

    Statistics of one name combine over the attentions of a model by ``reduce``: ``"mean"`` (weighted by
    ``weight``: a density of ``nonzero / allowed`` pairs has ``weight=allowed``), ``"max"`` or ``"sum"``. Over the
    workers of a data-parallel run the per-worker results are averaged, weighted by their total weight.
    ``per_layer``: also log it per attention as ``<name>_<role label>_<layer>`` (``alpha_enc_self_2``);
    ``model_wide``: log the combination over the model as ``<name>``; ``digits``: rounding in the log.
    """

    value: float
    weight: float = 1.0
    reduce: str = "mean"
    per_layer: bool = False
    model_wide: bool = True
    digits: Optional[int] = 3


class UnsupportedPatternError(AssertionError):
    """Raised when an attention is built for a pattern its math does not support."""


def registered_attentions(capability: str, value=True) -> str:
    """The registered attentions whose class has ``capability`` equal to ``value``, for error messages ("softmax,
    local, ...")."""
    from .registry import ATTENTIONS  # the registry imports this module

    return ", ".join(name for name, spec in ATTENTIONS.items() if getattr(spec.cls, capability) == value)


def describe_patterns(patterns) -> str:
    return ", ".join(PATTERNS[p] for p in sorted(patterns, key=lambda p: (p[0], p[1])))


class FluenceAttention(PrunableAttentionMixin, MultiheadAttention):
    """Base of all fluence attentions. Subclasses set :attr:`supported_patterns` and implement :meth:`attend`.

    Args:
        embed_dim, num_heads, kdim, vdim, dropout, bias, q_noise, qn_block_size: as in fairseq's
            ``MultiheadAttention`` (``dropout`` is attention-probability dropout).
        causal: query ``i`` may only see keys up to its own position. Causality comes from this flag, not from
            ``attn_mask`` (an ``attn_mask`` is still honoured on top of it).
        cross: keys and values come from another sequence (encoder-decoder attention).
    """

    supported_patterns: FrozenSet[Tuple[bool, bool]] = ALL_PATTERNS
    #: False for attentions whose math cannot take an arbitrary ``attn_mask`` (kernel and recurrent methods).
    #: They still accept the standard future mask on a causal self attention (it says nothing new) and refuse
    #: any other mask with an error, instead of silently ignoring it.
    supports_attn_mask: bool = True
    #: False for attentions that read only the values (S4D): ``q_proj``/``k_proj`` are not built and
    #: :meth:`attend` receives the projected values as ``q``, ``k`` and ``v``.
    uses_query_key: bool = True
    #: when set (an instance attribute), every forward computes head weights and calls
    #: ``weight_recorder(module, weights (B, H, Lq, Lk))``; ``compute_attn_score`` uses it to collect patterns
    weight_recorder: Optional[Callable[["FluenceAttention", Tensor], None]] = None
    #: capabilities the rest of the package reads (the benchmark, pattern collection, the docs' support matrix)
    #: what causal (or cross) decoding keeps, for the docs (every cached tensor has the batch on dim 0)
    decoding_state: str = "K/V cache"
    #: causal decoding keeps a state whose size does not grow with the number of decoded tokens
    constant_state: bool = False
    #: the math forms attention probabilities, so ``need_weights`` and pattern collection can have them
    forms_weights: bool = True
    #: ``need_weights=True`` alone (fairseq's default) returns the weights. True where they come with the math
    #: (the entmax family forms them anyway) or where fairseq's MultiheadAttention contract is the point
    #: (softmax, the baseline). Elsewhere weights would cost an extra O(Lq x Lk) pass (5x the step at L=8192), so
    #: they are returned only on explicit request: ``need_head_weights=True`` or a pattern recorder; a plain
    #: ``need_weights=True`` gives None, as fairseq's interface allows
    weights_by_default: bool = False
    #: the weights can be exactly zero (sparse normalisers); the attention counts them while
    #: :meth:`track_statistics` is on and reports their density in :meth:`stats`
    sparse_weights: bool = False
    #: cross decoding attends each call's queries on their own (a method that selects among the queries):
    #: step-by-step decoding then equals the full pass applied call by call, not the whole target at once
    cross_decoding_per_call: bool = False
    #: noncausal cross decoding: the beams of a sentence (consecutive rows with one cached source, in runs of
    #: equal size) attend one copy of it together (:meth:`attend_shared_summary`), which reads the source once per
    #: sentence instead of once per beam (a base-size softmax model's beam search over sources of 256 tokens:
    #: 0.89x its time). The default folds a run's queries into one longer query sequence: right where
    #: :meth:`attend_summary` treats every query on its own and without its position
    shares_source: bool = False
    #: causal self attention can carry memory from one segment of a stream to the next (``forward(memory=)``):
    #: the state its decoding keeps, fed a whole segment at a time
    supports_memory: bool = True
    #: why not, for the error message, where ``supports_memory`` is False
    memory_refusal: str = ""
    #: keys and values kept from earlier segments by an otherwise unbounded cache (:meth:`set_mem_len`)
    mem_len: Optional[int] = None
    #: its own decoding state grows with the sequence unless :meth:`set_mem_len` bounds it (LongShort's
    #: compressed chunks); a plain key/value cache without :meth:`max_cached_keys` is recognised by itself
    grows_without_mem_len: bool = False
    #: the memory a forward without ``memory=`` and ``incremental_state`` uses (see
    #: :class:`fluence_fairseq.models.stream_memory.StreamMemory`, which sets it around a model's forward)
    active_memory: Optional[Dict[str, Optional[Tensor]]] = None
    #: how the attention knows token order without absolute positions (for memory over a stream): "alibi" where
    #: its math takes a relative bias (:meth:`set_alibi`), "state" where a recurrent state carries the order,
    #: "cos re-weighting" (cosFormer), "none" where it takes no relative bias
    position_scheme: str = "alibi"
    #: why ALiBi applies to this attention as causal self attention only ("" where every pattern takes it): e.g. it
    #: enters as a decay of a causal prefix sum (:meth:`alibi_key_offsets`; Performer, ABC), since ``|i - j|``
    #: does not factor into a key term once keys can follow the query
    alibi_causal_self_only: str = ""
    #: decoding-state entries that hold running maxima of key log weights taken with :meth:`alibi_key_offsets`:
    #: after each causal self-attention call the base moves them into the next call's frame (see
    #: :meth:`_shift_alibi_state`)
    alibi_running_maxima: Tuple[str, ...] = ()
    #: runs under ``torch.autocast`` (fp16/bf16 mixed precision) with finite outputs and gradients near float32's
    supports_autocast: bool = True
    #: largest relative deviation of a 16-bit autocast output from float32 (the contract checks it): methods that
    #: select discretely (top-k queries) can flip a selection on rounding and deviate more
    autocast_tolerance: float = 0.05
    #: under autocast the base runs :meth:`attend`/:meth:`attend_incremental` in float32 with autocast off (the
    #: projections stay in low precision): for methods whose own autograd kernels keep float32 accumulators or
    #: whose selections (top-k) are too brittle in 16 bits
    float32_math: bool = False
    #: set by the base while :meth:`attend` runs on heads that nothing reads after the call (a whole pass without
    #: decoding cache or segment memory, q, k and v from three projections): the math may then write gradients
    #: over them (cosFormer, LARA, causal ABC; LongShort the query's, and the value's over the output's
    #: gradient) or over its own saved copies (local attention) in backward instead of allocating more. An
    #: autograd function that does so must save what it overwrites for backward, so that autograd refuses a second
    #: backward through the graph. Local attention also frees the heads' memory once it has copied them, and its
    #: output's gradient once copied in backward; LongShort frees k and v once normalised: a subclass that
    #: overrides ``attend`` must not read q, k or v after calling the parent's
    heads_exclusive: bool = False
    #: whether the backward of :meth:`attend` may read its output (or a view of it): the fused SDPA kernel keeps
    #: it (softmax; local attention and adaptive span on some paths), and an attention says False only when none
    #: of its paths does (tests/modules/test_saved_for_backward.py checks every pattern at three lengths). With False, a whole pass hands the output
    #: projection the attention's output as its input, and that projection's backward writes its input gradient
    #: over it (the output projection's backward is where several attentions' training peak lies: their saved
    #: heads, this input and its gradient side by side). An output that the heads' merge copies is written over
    #: whatever this says (the copy is the projection's alone).
    keeps_output: bool = True
    #: set by the base while :meth:`attend` runs when the caller asked only for the head-averaged weights (plain
    #: ``need_weights``, no weight recorder, no global pruning mask): the math may then return them already
    #: averaged, as (B, 1, Lq, Lk), instead of the (B, H, Lq, Lk) weights of every head (the entmax family
    #: averages its query blocks, softmax its banded weights pass: an H times smaller matrix to write and
    #: differentiate)
    head_average_weights: bool = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        dropout: float = 0.0,
        bias: bool = True,
        *,
        causal: bool = False,
        cross: bool = False,
        q_noise: float = 0.0,
        qn_block_size: int = 8,
    ):
        causal, cross = bool(causal), bool(cross)
        if type(self).attend is FluenceAttention.attend:
            raise TypeError(f"{type(self).__name__} must implement attend(): the base supplies only the fairseq glue")
        if (cross, causal) not in self.supported_patterns:
            raise UnsupportedPatternError(
                f"{type(self).__name__} cannot do {PATTERNS[(cross, causal)]} attention; it supports "
                f"{describe_patterns(self.supported_patterns)} (set cross=/causal= accordingly)"
            )
        if num_heads <= 0 or embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        super().__init__(
            embed_dim, num_heads, kdim=kdim, vdim=vdim, dropout=dropout, bias=bias,
            self_attention=not cross, encoder_decoder_attention=cross,
            q_noise=q_noise, qn_block_size=qn_block_size,
        )
        self.causal = causal
        self.cross = cross
        self.global_mask = None  # data-informed pruning: set_global_mask()
        if not self.uses_query_key:
            if cross:
                raise UnsupportedPatternError(f"{type(self).__name__} reads only its input; it cannot do cross attention")
            self.q_proj = None
            self.k_proj = None

    # ----------------------------------------------------------------------------------------------- math
    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Optional[Tensor],
        attn_mask: Optional[Tensor],
        query_offset: int,
        need_weights: bool,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """The attention's math on projected, unscaled heads.

        Args:
            q: (B, H, Lq, Dh); k, v: (B, H, Lk, Dh).
            key_padding_mask: bool (B, Lk), True = padding, or None.
            attn_mask: additive float broadcastable to (B, H, Lq, Lk), or None.
            query_offset: query ``i`` sits at key position ``i + query_offset`` (causal: sees keys ``<=`` that).
            need_weights: also return attention probabilities (B, H, Lq, Lk).
        Returns:
            (out (B, H, Lq, Dh), weights or None)
        """
        raise TypeError(f"{type(self).__name__} must implement attend()")  # unreachable: checked in __init__

    # ------------------------------------------------------------------------- what the criterion reads
    def aux_losses(self) -> Dict[str, Tensor]:
        """Regularisers this attention adds to the training loss, by name (e.g. ``{"span_loss": ...}``).

        Each is a per-token quantity, like the mean NLL. The ``fluence_*`` criterions sum every name over the
        model's attentions, add the total in training (scaled so that fairseq's division by ``sample_size`` leaves
        exactly this value) and log each name."""
        return {}

    def stats(self) -> Dict[str, Statistic]:
        """Statistics to log, by name (e.g. ``{"span_avg": Statistic(12.0)}``); see :class:`Statistic`."""
        return {}

    def track_statistics(self, enabled: bool) -> None:
        """Start (and reset) or stop the statistics that cost a pass over the weights; the criterions turn this
        on for validation steps only."""

    def summarize_keys(
        self, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor]
    ) -> Dict[str, Optional[Tensor]]:
        """Cross attention: what the decoding cache keeps of the source sentence, computed once per sentence
        (``static_kv``). Every tensor must have the batch on dim 0. The default keeps the keys and values;
        kernel/landmark attentions override this (with :meth:`attend_summary`) to keep a fixed-size summary.
        The keys and values are kept in memory of their own: as views of the projections' (L, B, H, Dh) output
        every decoding step's products copied them again (a sixth of a cross step's time)."""
        return {"prev_key": k.contiguous(), "prev_value": v.contiguous(), "prev_key_padding_mask": key_padding_mask}

    def attend_summary(
        self,
        q: Tensor,
        summary: Dict[str, Optional[Tensor]],
        *,
        attn_mask: Optional[Tensor],
        query_offset: int,
        need_weights: bool,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Cross attention of ``q`` (B, H, Lq, Dh) to a source summarised by :meth:`summarize_keys`.
        Must equal :meth:`attend` on the original keys."""
        return self._core_attend(
            q, summary["prev_key"], summary["prev_value"], key_padding_mask=summary.get("prev_key_padding_mask"),
            attn_mask=attn_mask, query_offset=query_offset, need_weights=need_weights,
        )

    def attend_shared_summary(
        self,
        q: Tensor,
        summary: Dict[str, Optional[Tensor]],
        rows: int,
        *,
        query_offset: int,
        need_weights: bool,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """:meth:`attend_summary` for queries (B, H, Lq, Dh) whose consecutive runs of ``rows`` rows share one
        source: ``summary`` holds one row per run (B / rows). The default attends each run's queries as one
        sequence of ``rows * Lq`` queries (see :attr:`shares_source`)."""
        out, weights = self.attend_summary(fold_rows(q, rows), summary, attn_mask=None, query_offset=query_offset,
                                           need_weights=need_weights)
        return unfold_rows(out, rows), None if weights is None else unfold_rows(weights, rows)

    def set_mem_len(self, mem_len: Optional[int]) -> None:
        """Keep at most the last ``mem_len`` keys and values of the previous segments (or decoding steps) in an
        attention whose cache is otherwise unbounded (softmax, entmax): Transformer-XL's memory length. Attentions
        with their own bound (a window, a span, a recurrent state) keep that. None: keep every key."""
        if mem_len is not None and (isinstance(mem_len, bool) or not isinstance(mem_len, int) or mem_len < 1):
            raise ValueError(f"mem_len must be a positive integer (keys kept from earlier segments) or None, "
                             f"got {mem_len!r}")
        self.mem_len = mem_len

    def set_alibi(self, enabled: bool = True) -> None:
        """Add ALiBi (Press et al. 2022) to the scores: ``-slope_h * distance``, slopes ``2^(-8 (h+1) / H)``. A
        relative position bias that survives memory (a key's bias depends on its distance from the query, not on
        where the segment starts), for models without absolute position embeddings."""
        if enabled and self.position_scheme != "alibi":
            raise ValueError(f"{type(self).__name__} takes no relative position bias (its position scheme: "
                             f"{self.position_scheme}); ALiBi is for {registered_attentions('position_scheme', 'alibi')}")
        if enabled and self.alibi_causal_self_only and (self.cross or not self.causal):
            raise ValueError(f"{type(self).__name__} takes ALiBi only as causal self attention "
                             f"({self.alibi_causal_self_only}); this one is {PATTERNS[(self.cross, self.causal)]}")
        slopes = None
        if enabled:
            slopes = torch.pow(2.0, -8.0 * torch.arange(1, self.num_heads + 1, dtype=torch.float32) / self.num_heads)
        self.register_buffer("alibi_slopes", slopes, persistent=False)

    def relative_bias(self, other=None):
        """The relative bias ``rel -> (H, *rel.shape)`` of query-minus-key offsets this attention adds to its
        scores: ALiBi if set, plus ``other`` (e.g. adaptive span's log-mask); None when there is none."""
        slopes = getattr(self, "alibi_slopes", None)
        if slopes is None:
            return other

        def bias(rel: Tensor) -> Tensor:
            alibi = -slopes.view(-1, *([1] * rel.dim())) * rel.abs().to(slopes.dtype)
            return alibi if other is None else alibi + other(rel)

        return bias

    def alibi_key_offsets(self, length: int, like: Tensor) -> Optional[Tensor]:
        """ALiBi for a normalised causal prefix sum (Performer, ABC): ``slope_h * j`` (H, length) to add
        to the log weight of key ``j`` of this call. Query ``i``'s weight on key ``j`` then carries
        ``exp(slope_h * j) = exp(slope_h * i) * exp(-slope_h * (i - j))``; the first factor is the query's own and
        cancels in the normalisation, which leaves ALiBi's ``-slope_h * (i - j)``. None without ALiBi. The base
        moves a carried state into the next call's frame (:attr:`alibi_running_maxima`)."""
        slopes = getattr(self, "alibi_slopes", None)
        if slopes is None:
            return None
        positions = torch.arange(length, device=like.device, dtype=like.dtype)
        return slopes.to(like).unsqueeze(-1) * positions

    def _shift_alibi_state(self, buffer: Dict[str, Optional[Tensor]], length: int) -> None:
        """Move the :attr:`alibi_running_maxima` of a state built from a call of ``length`` keys (positions
        0 .. length-1) into the frame of the next call (whose first key is position 0): subtract
        ``slope_h * length`` from them (each is (B, H, ...)). Keeps the log weights small however long the stream."""
        slopes = getattr(self, "alibi_slopes", None)
        if slopes is None:
            return
        for name in self.alibi_running_maxima:
            running = buffer.get(name)
            if running is not None:
                shift = slopes.to(running) * length
                buffer[name] = running - shift.view(1, -1, *([1] * (running.dim() - 2)))

    def _check_memory(self, incremental_state, attn_mask) -> None:
        name = type(self).__name__
        if self.cross or not self.causal:
            raise ValueError(f"{name}: segment memory is for causal self attention; this one is "
                             f"{PATTERNS[(self.cross, self.causal)]}")
        if not self.supports_memory:
            raise ValueError(f"{name} cannot carry memory from one segment to the next: {self.memory_refusal} "
                             f"Attentions that can: {registered_attentions('supports_memory')}")
        if incremental_state is not None:
            raise ValueError(f"{name}: pass either memory (a stream, segment by segment) or incremental_state "
                             "(decoding), not both")
        if attn_mask is not None:
            raise ValueError(f"{name}: an attn_mask cannot be applied with memory (its keys include the earlier "
                             "segments); causality comes from causal=True, padding from key_padding_mask")

    def max_cached_keys(self) -> Optional[int]:
        """Upper bound on the keys a causal self-attention cache must keep (None = all)."""
        return None

    @classmethod
    def memory_grows(cls) -> bool:
        """Whether the attention's memory grows with the stream unless :meth:`set_mem_len` bounds it: its own
        state says so (:attr:`grows_without_mem_len`), or it is the base's key/value cache without a
        :meth:`max_cached_keys` bound."""
        kv_cache = cls.attend_incremental is FluenceAttention.attend_incremental
        return cls.grows_without_mem_len or (kv_cache and cls.max_cached_keys is FluenceAttention.max_cached_keys)

    def unbounded_memory(self) -> bool:
        """The memory grows with the stream as things stand (no ``mem_len``): such a model cannot read a long
        stream with memory."""
        return self.memory_grows() and self.mem_len is None

    def attend_incremental(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Optional[Tensor],
        attn_mask: Optional[Tensor],
        buffer: Dict[str, Optional[Tensor]],
        need_weights: bool,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """One causal self-attention decoding step (``q`` holds the newest query or queries).

        The default keeps a key/value cache (``prev_key``/``prev_value`` (B, H, t, Dh) and
        ``prev_key_padding_mask`` (B, t)) trimmed to :meth:`max_cached_keys` and calls :meth:`attend`.
        Recurrent attentions override this to keep their own state in ``buffer`` (batch on dim 0).
        """
        prev_k = buffer.get("prev_key")
        prev_len = 0 if prev_k is None else prev_k.size(2)
        order = buffer.pop(PENDING_ORDER, None)
        if prev_k is not None:
            k = _append_keys(prev_k, k, order)
            v = _append_keys(buffer["prev_value"], v, order)
        key_padding_mask = append_padding_masks(
            buffer.get("prev_key_padding_mask"), prev_len, key_padding_mask, q.size(2), q.size(0)
        )
        attn_mask = self._normalize_attn_mask(attn_mask, q.size(0), q.size(2), k.size(2), q.dtype)
        keep = self.max_cached_keys()
        if keep is not None and k.size(2) > keep + q.size(2) - 1:
            need = keep + q.size(2) - 1  # the first new query still sees keep - 1 keys before it
            k, v = k[:, :, -need:], v[:, :, -need:]
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask[:, -need:]
            if attn_mask is not None:
                attn_mask = attn_mask[..., -need:]
        store = keep if keep is not None else self.mem_len
        stored = slice(None) if store is None else slice(-store, None)
        buffer["prev_key"], buffer["prev_value"] = k[:, :, stored], v[:, :, stored]
        if key_padding_mask is not None:
            buffer["prev_key_padding_mask"] = key_padding_mask[:, stored]
        positions = None
        if self.global_mask is not None:
            # a trimmed cache forgets how many tokens came before it, so the step count is cached too
            steps = buffer.get("mask_steps")
            seen = q.size(2) + (0 if steps is None else steps)
            if not torch.is_tensor(seen):
                seen = torch.full((q.size(0),), seen, dtype=torch.long, device=q.device)
            buffer["mask_steps"] = seen
            shift = leading_padding(key_padding_mask, q.size(0), q.device)
            positions = (seen - q.size(2) - shift, seen - k.size(2) - shift)
        return self._core_attend(
            q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
            query_offset=k.size(2) - q.size(2), need_weights=need_weights, positions=positions,
        )

    # -------------------------------------------------------------------------------------------- glue
    def _normalize_attn_mask(self, attn_mask, bsz, tgt_len, src_len, dtype):
        return attn_mask_to_additive(attn_mask, bsz, self.num_heads, tgt_len, src_len, dtype)

    def _drop_future_mask(self, attn_mask: Tensor, tgt_len: int) -> None:
        """For attentions without ``attn_mask`` support: accept (and drop) the standard future mask of a causal
        self attention, which ``causal=True`` already enforces; refuse anything else."""
        if self.causal and not self.cross and attn_mask.dim() == 2 and attn_mask.size(0) == tgt_len:
            cols = attn_mask.size(1)
            future = torch.ones(tgt_len, cols, dtype=torch.bool, device=attn_mask.device).triu(1 + cols - tgt_len)
            if attn_mask.dtype.is_floating_point:
                is_future_mask = bool((attn_mask[~future] == 0).all() and (attn_mask[future] <= HARD_MASK).all())
            else:
                is_future_mask = bool(((attn_mask != 0) == future).all())
            if is_future_mask:
                return None
        raise ValueError(
            f"{type(self).__name__} cannot apply an arbitrary attn_mask (its math never forms the attention "
            "matrix); causality comes from causal=True and padding from key_padding_mask. Drop attn_mask, or use "
            f"an attention that supports it: {registered_attentions('supports_attn_mask')}"
        )

    def _heads(self, x: Tensor, bsz: int) -> Tensor:
        """(L, B, H*Dh) -> (B, H, L, Dh)"""
        return x.view(x.size(0), bsz, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

    def _set_call_flags(self, heads_exclusive: bool, head_average_weights: bool) -> None:
        """:attr:`heads_exclusive` and :attr:`head_average_weights` for the call under way, as plain instance
        attributes: ``nn.Module.__setattr__`` (which looks for parameters, buffers and submodules of the name)
        took 1.3 us a write against 0.14, four writes a call, in decoding steps of 250-350 us."""
        object.__setattr__(self, "heads_exclusive", heads_exclusive)
        object.__setattr__(self, "head_average_weights", head_average_weights)

    def forward(
        self,
        query: Tensor,
        key: Optional[Tensor] = None,
        value: Optional[Tensor] = None,
        query_padding_mask: Optional[Tensor] = None,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        need_head_weights: bool = False,
        attn_mask: Optional[Tensor] = None,
        static_kv: bool = False,
        incremental_state: Optional[IncrementalState] = None,
        memory: Optional[Dict[str, Optional[Tensor]]] = None,
        batch_first: bool = False,
        before_softmax: bool = False,
        **unused,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Attention with fairseq's keyword interface.

        Args:
            query: (Lq, B, D), or (B, Lq, D) with ``batch_first``.
            key, value: (Lk, B, kdim/vdim); default to ``query`` (self attention) and ``key``. With ``static_kv``
                and a filled cache they may be None.
            query_padding_mask: (B, Lq) bool/byte/float, True/nonzero = padding; outputs there are zeroed.
            key_padding_mask: (B, Lk) bool/byte/float, True/nonzero = padding. During decoding: the new keys only.
            need_weights: return head-averaged weights (B, Lq, Lk) where :attr:`weights_by_default` (softmax,
                entmax), else None; ``need_head_weights``: (H, B, Lq, Lk) from every attention that forms them.
            attn_mask: (Lq, Lk) or (B*H, Lq, Lk), bool (True = masked) or additive float.
            static_kv: cross attention whose keys are computed once and cached (fairseq decoding).
            incremental_state: fairseq's decoding cache; causal self or cross attention only.
            memory: segment memory of a causal self attention (training or scoring a stream segment by segment):
                a dict, empty at the start of a stream, that the call reads (the previous segments as this
                attention keeps them: keys and values, a window, or a recurrent state; batch on dim 0) and
                updates, detached, with this segment (truncated backpropagation through time). See
                :attr:`supports_memory` and :meth:`set_mem_len`.
        Returns:
            (output shaped like ``query``, weights or None)
        """
        if unused:
            raise TypeError(f"{type(self).__name__}.forward() got unexpected arguments: {sorted(unused)}")
        if before_softmax:
            raise ValueError(f"{type(self).__name__} does not return raw scores (before_softmax=True)")
        recorder = self.weight_recorder
        if need_weights and not (need_head_weights or self.weights_by_default):
            need_weights = False  # only on explicit request (see weights_by_default)
        need_weights = need_weights or need_head_weights
        return_weights = need_weights
        need_weights = need_weights or recorder is not None
        query, key, value = self._inputs(query, key, value, batch_first)
        tgt_len, bsz, _ = query.shape

        buffer = None
        if memory is None and incremental_state is None:
            memory = self.active_memory  # set by StreamMemory.attached() around a model's forward
        if memory is not None:
            self._check_memory(incremental_state, attn_mask)
            buffer = memory
        elif incremental_state is not None:
            if not (self.cross or self.causal):
                raise ValueError(
                    f"{type(self).__name__}: incremental decoding needs causal=True or cross=True; a noncausal "
                    "self attention would have to see tokens that have not been generated yet"
                )
            buffer = self._get_input_buffer(incremental_state)

        summary = self._cached_source(buffer, bsz) if self.cross and static_kv else None
        if summary is None and buffer is not None and self.cross and static_kv and attn_mask is None:
            summary = self._cache_shared_source(key, value, key_padding_mask, buffer, bsz)
        q, k, v, src_len = self._project(query, key, value, bsz, summary)
        query_padding_mask = padding_mask_to_bool(query_padding_mask, bsz, tgt_len, "query_padding_mask")
        if attn_mask is not None and not self.supports_attn_mask:
            attn_mask = self._drop_future_mask(attn_mask, tgt_len)

        math_context = contextlib.ExitStack()
        if self.float32_math and torch.is_autocast_enabled(q.device.type):
            q, k, v = (None if t is None else t.float() for t in (q, k, v))
            math_context.enter_context(torch.autocast(q.device.type, enabled=False))
        if incremental_state is not None and q.device.type == "cuda":  # (the context costs 13 us a call on a CPU)
            math_context.enter_context(sdpa_for_decoding())
        with math_context:
            if buffer is not None and not self.cross:
                key_padding_mask = padding_mask_to_bool(key_padding_mask, bsz, tgt_len, "key_padding_mask")
                out, weights = self.attend_incremental(
                    q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask, buffer=buffer,
                    need_weights=need_weights,
                )
                self._shift_alibi_state(buffer, k.size(2))
            else:
                # not under a global pruning mask: its generic path zeroes per head the rows a head cannot see
                self._set_call_flags(buffer is None and self.uses_query_key,
                                     return_weights and not need_head_weights and recorder is None
                                     and self.global_mask is None)
                try:
                    out, weights = self._attend_whole(q, k, v, summary, buffer, static_kv, key_padding_mask,
                                                      attn_mask, src_len, need_weights)
                finally:
                    self._set_call_flags(False, False)
        if memory is not None:
            for name, tensor in list(memory.items()):
                memory[name] = None if tensor is None else tensor.detach()
        elif buffer is not None:
            self._set_input_buffer(incremental_state, buffer)
        if recorder is not None:
            self._record(recorder, weights)
        # the projected heads are not needed past this point: attentions that keep something else for backward
        # (copies, features, states) then no longer hold q, k and v alive beside the output projection's forward
        del q, k, v

        merged = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, self.embed_dim)
        # the projection's own input: a copy the merge made, or the output of an attention that does not keep it
        # (a whole pass through attend itself, not decoding, segment memory or a global pruning mask)
        exclusive = merged.untyped_storage().data_ptr() != out.untyped_storage().data_ptr() or (
            not self.keeps_output and buffer is None and self.global_mask is None)
        # after a copying merge the attention's output is not needed here: freed before the projection's forward
        # unless its backward keeps it (else it stayed alive beside the copy and the projection's output)
        del out
        out = self._project_output(merged, exclusive)
        if query_padding_mask is not None:
            out = out.masked_fill(query_padding_mask.t().unsqueeze(-1), 0.0)
        if batch_first:
            out = out.transpose(0, 1)
        if not return_weights or weights is None:
            return out, None
        weights = weights.transpose(0, 1)  # (H, B, Lq, Lk), or (1, B, Lq, Lk) already averaged
        if need_head_weights:
            return out, weights
        # a mean over a dim of size 1 would still read and write the whole (B, Lq, Lk) matrix (77 ms at L=4096)
        return out, (weights[0] if weights.size(0) == 1 else weights.mean(dim=0))

    def _project_output(self, merged: Tensor, exclusive: bool) -> Tensor:
        """``out_proj(merged)``. When nothing but this product reads ``merged`` (``exclusive``: see
        :attr:`keeps_output`), its gradient is written over it in backward. Only for a plain ``nn.Linear`` with no
        hook of its own or global (quant noise and weight pruning are forward hooks of ``out_proj``, tracing and
        profiling tools add global ones: all run only in the module's call) and outside autocast (whose casts
        the module's call makes)."""
        proj = self.out_proj
        if (exclusive and type(proj) is torch.nn.Linear and torch.is_grad_enabled() and merged.requires_grad
                and not _has_hooks(proj) and not torch.is_autocast_enabled(merged.device.type)
                and merged.dtype == proj.weight.dtype):
            return linear_grad_over_input(merged, proj.weight, proj.bias)
        return proj(merged)

    def _inputs(self, query, key, value, batch_first: bool):
        """(L, B, D) query, key and value; key and value default to the query (self) and the key."""
        if batch_first:
            query = query.transpose(0, 1)
            key = None if key is None else key.transpose(0, 1)
            value = None if value is None else value.transpose(0, 1)
        if query.dim() != 3 or query.size(-1) != self.embed_dim:
            raise ValueError(
                f"query must be (length, batch, {self.embed_dim}) (or batch first), got {tuple(query.shape)}"
            )
        if not self.cross:
            key = query if key is None else key
        return query, key, key if value is None else value

    def _cached_source(self, buffer, bsz: int) -> Optional[Dict[str, Optional[Tensor]]]:
        """Cross attention with ``static_kv``: the source summary cached by an earlier call, if any."""
        summary = {name: t for name, t in buffer.items() if _is_source(name)} if buffer is not None else {}
        if not summary:
            return None
        cached_bsz = next(t.size(0) for t in summary.values() if t is not None)
        if cached_bsz != bsz:
            raise ValueError(f"the cached source has batch {cached_bsz} but the query has batch {bsz}; "
                             "reorder the cache with reorder_incremental_state")
        return summary

    def _project(self, query, key, value, bsz: int, summary):
        """(q, k, v, src_len) as heads (B, H, L, Dh); k, v None (and src_len None unless the summary keeps the
        keys) when a cached source summary replaces them."""
        if summary is not None:
            src_len = summary["prev_key"].size(2) if summary.get("prev_key") is not None else None
            k = v = None
        else:
            self._check_source(key, value, bsz)
            v = self._heads(self.v_proj(value), bsz)
            k = self._heads(self.k_proj(key), bsz) if self.uses_query_key else v
            src_len = k.size(2)
        q = self._heads(self.q_proj(query), bsz) if self.uses_query_key else v
        return q, k, v, src_len

    def _check_source(self, key, value, bsz: int) -> None:
        if key is None:
            raise ValueError(f"{type(self).__name__}: cross attention needs key/value (or a filled static_kv cache)")
        if key.dim() != 3 or key.size(1) != bsz:
            raise ValueError(f"key must be (length, batch={bsz}, kdim), got {tuple(key.shape)}")
        if value.shape[:2] != key.shape[:2]:
            raise ValueError(f"value {tuple(value.shape)} must match key {tuple(key.shape)} in length and batch")

    def _cache_shared_source(self, key, value, key_padding_mask, buffer, bsz: int):
        """The first cross decoding call with ``static_kv`` where consecutive rows bring the same source, bit for
        bit (beam search repeats each sentence's encoder output for its beams): each run of them is projected and
        summarised once and the summary copied to its rows, and the runs numbered (:data:`SOURCE_GROUP`; their
        shared copy, where the attention keeps one, is made from the rows by :meth:`_shared_source`). fairseq's
        attention projects every beam's copy: projecting each sentence's once took a base-size model's beam search
        (8 sentences of 256 tokens, beam 5) to 0.82x its time. None, and nothing cached, when no two consecutive
        rows are equal."""
        self._check_source(key, value, bsz)
        if bsz < 2:
            return None
        key_padding_mask = padding_mask_to_bool(key_padding_mask, bsz, key.size(0), "key_padding_mask")
        same = (key[:, 1:] == key[:, :-1]).all(-1).all(0)
        if value is not key:
            same &= (value[:, 1:] == value[:, :-1]).all(-1).all(0)
        if key_padding_mask is not None:
            same &= (key_padding_mask[1:] == key_padding_mask[:-1]).all(-1)
        if not bool(same.any()):
            return None
        runs = torch.cat([same.new_zeros(1, dtype=torch.long), (~same).long().cumsum(0)])
        firsts = torch.cat([runs.new_zeros(1), (~same).nonzero().squeeze(1) + 1])
        count = firsts.numel()
        v = self._heads(self.v_proj(value.index_select(1, firsts)), count)
        k = self._heads(self.k_proj(key.index_select(1, firsts)), count) if self.uses_query_key else v
        run_padding = None if key_padding_mask is None else key_padding_mask.index_select(0, firsts)
        per_run = self.summarize_keys(k, v, run_padding)
        summary = {name: t.index_select(0, runs) for name, t in per_run.items() if t is not None}
        buffer.update(summary)
        buffer[SOURCE_GROUP] = runs
        return summary

    def _attend_whole(self, q, k, v, summary, buffer, static_kv, key_padding_mask, attn_mask, src_len,
                      need_weights):
        """Every call but a causal self-attention decoding step: a full pass, or cross attention (decoding or
        not) against the keys or their cached summary."""
        bsz, _, tgt_len, _ = q.shape
        if src_len is None and attn_mask is not None:
            raise ValueError(f"{type(self).__name__}: attn_mask cannot be applied to a cached source summary")
        if src_len is not None:
            attn_mask = self._normalize_attn_mask(attn_mask, bsz, tgt_len, src_len, q.dtype)
        # self attention: the last query is the last key; cross: both sequences start together
        query_offset = src_len - tgt_len if not self.cross else 0
        if buffer is not None:  # cross attention while decoding: queries continue where the last call ended
            steps = buffer.get(STEPS)
            if steps is not None:
                query_offset = int(steps[0])
            buffer[STEPS] = torch.full((bsz,), query_offset + tgt_len, dtype=torch.long, device=q.device)
        if summary is None:
            key_padding_mask = padding_mask_to_bool(key_padding_mask, bsz, src_len, "key_padding_mask")
            if buffer is not None and static_kv:
                summary = self.summarize_keys(k, v, key_padding_mask)
                buffer.update({name: t for name, t in summary.items() if t is not None})
        if summary is not None:
            shared = self._shared_source(buffer, summary, bsz) if attn_mask is None else None
            if shared is not None:
                return self.attend_shared_summary(q, shared[0], shared[1], query_offset=query_offset,
                                                  need_weights=need_weights)
            return self.attend_summary(q, summary, attn_mask=attn_mask, query_offset=query_offset,
                                       need_weights=need_weights)
        return self._core_attend(q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                 query_offset=query_offset, need_weights=need_weights)

    def _may_share_source(self) -> bool:
        """:attr:`shares_source` applies: noncausal cross attention, no global pruning mask, no ALiBi."""
        return (self.shares_source and self.cross and not self.causal and self.global_mask is None
                and getattr(self, "alibi_slopes", None) is None)

    def _shared_source(self, buffer, summary, bsz: int) -> Optional[Tuple[Dict[str, Optional[Tensor]], int]]:
        """Noncausal cross decoding where :attr:`shares_source`: one row of the cached source per run of rows that
        share it and the run length, when the runs (:data:`SOURCE_GROUP`) all have the same length and start at its
        multiples (a beam search's sentences and their beams); made once, kept in the cache until a reorder moves
        rows across the runs. None otherwise, for a cache of fewer than :data:`SHARE_FROM_ELEMENTS` elements, and
        under a global pruning mask or with ALiBi (their entries depend on the query positions, which a folded run
        does not keep)."""
        if buffer is None or not self._may_share_source():
            return None
        shared = {name[len(SHARED_SOURCE):]: t for name, t in buffer.items() if name.startswith(SHARED_SOURCE)}
        if shared:
            return shared, bsz // next(t.size(0) for t in shared.values())
        if sum(t.numel() for t in summary.values() if t is not None) < SHARE_FROM_ELEMENTS:
            return None
        group = buffer.get(SOURCE_GROUP)
        if group is None or group.numel() != bsz:
            return None
        starts = (group[1:] != group[:-1]).nonzero()
        rows = int(starts[0]) + 1 if starts.numel() else bsz
        if rows < 2 or bsz % rows or not torch.equal(group.view(-1, rows),
                                                     group[::rows].unsqueeze(1).expand(-1, rows)):
            return None
        shared = {name: t[::rows].contiguous() for name, t in summary.items() if t is not None}
        buffer.update({SHARED_SOURCE + name: t for name, t in shared.items()})
        return shared, rows

    def _record(self, recorder, weights) -> None:
        if weights is None:
            raise ValueError(
                f"{type(self).__name__} does not form attention probabilities, so its attention patterns cannot "
                "be recorded; collect patterns from a model whose attention exposes weights: "
                f"{registered_attentions('forms_weights')}"
            )
        recorder(self, weights)

    @torch.jit.unused
    def reorder_incremental_state(self, incremental_state: IncrementalState, new_order: Tensor):
        """Beam search: select the new batch order in every cached tensor (batch is dim 0 of all of them). A cross
        attention's cached source is left as it is when every row moves within its group of rows holding the same
        source (:meth:`_cache_shared_source`: a sentence's beams, in fairseq's beam search every step until a
        sentence finishes): the selection would copy the whole source cache of every layer for nothing. The
        query count of cross decoding is the same in every row."""
        buffer = self._get_input_buffer(incremental_state)
        if buffer:
            group = buffer.get(SOURCE_GROUP)
            if (group is not None and group.numel() == new_order.numel()
                    and torch.equal(group.index_select(0, new_order), group)):
                return incremental_state
            for name in [name for name in buffer if name.startswith(SHARED_SOURCE)]:
                del buffer[name]  # one row per run of the old order: made again from the reordered source
            # the keys and values are selected by the next step as it appends to them (one copy, not two); a
            # pending order is itself reordered below, which composes the two
            deferred = DEFERRED_REORDER if self._defers_reorder(buffer) else ()
            for name, tensor in buffer.items():
                if tensor is not None and name not in deferred:
                    buffer[name] = tensor.index_select(0, new_order)
            if deferred and PENDING_ORDER not in buffer:
                buffer[PENDING_ORDER] = new_order.clone()  # (the caller may change its tensor later)
            incremental_state = self._set_input_buffer(incremental_state, buffer)
        return incremental_state

    def _defers_reorder(self, buffer: Dict[str, Optional[Tensor]]) -> bool:
        """Whether a reorder of ``buffer`` leaves :data:`DEFERRED_REORDER` to the next step: a causal self
        attention's key/value cache that the base's own :meth:`attend_incremental` keeps (it applies the
        :data:`PENDING_ORDER`; an attention with a decoding step of its own keeps other state)."""
        return (not self.cross and buffer.get("prev_key") is not None
                and type(self).attend_incremental is FluenceAttention.attend_incremental)

    def hyper_parameters(self) -> Tuple[str, ...]:
        """The constructor keywords beyond the base's that the instance keeps as attributes of the same name
        (derived from the signature, so a hyper-parameter is declared once)."""
        base = inspect.signature(FluenceAttention.__init__).parameters
        own = inspect.signature(type(self).__init__).parameters
        return tuple(name for name in own if name not in base and name != "self" and name in self.__dict__)

    def _pattern_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"pattern={PATTERNS[(self.cross, self.causal)]!r}, dropout={self.dropout_module.p}")

    def extra_repr(self) -> str:
        return self._pattern_repr() + "".join(f", {name}={getattr(self, name)!r}" for name in self.hyper_parameters())


def _append_keys(cached: Tensor, new: Tensor, order: Optional[Tensor]) -> Tensor:
    """``cat([cached[order], new], dim=2)`` for (B, H, t, Dh) caches, the selection written straight into its
    place in the result (``order`` None: no selection)."""
    if order is None:
        return torch.cat([cached, new], dim=2)
    if (torch.is_grad_enabled() and (cached.requires_grad or new.requires_grad)) or cached.dtype != new.dtype:
        # ``out=`` records no graph (and takes one dtype); ``cat`` promotes mixed ones
        return torch.cat([cached.index_select(0, order), new], dim=2)
    out = new.new_empty(order.numel(), new.size(1), cached.size(2) + new.size(2), new.size(3))
    torch.index_select(cached, 0, order, out=out[:, :, : cached.size(2)])
    out[:, :, cached.size(2):] = new
    return out


def _is_source(name: str) -> bool:
    """Whether a cross attention's cache entry is part of its cached source (not the step count, the runs of rows
    or their shared copy)."""
    return name not in (STEPS, SOURCE_GROUP) and not name.startswith(SHARED_SOURCE)


def fold_rows(x: Tensor, rows: int) -> Tensor:
    """(B, H, L, ...) -> (B / rows, H, rows * L, ...): each run of ``rows`` consecutive rows as one longer
    sequence (row-major: the first row's L entries, then the second's)."""
    bsz, heads, length = x.shape[:3]
    return x.reshape(bsz // rows, rows, heads, length, *x.shape[3:]).transpose(1, 2).reshape(
        bsz // rows, heads, rows * length, *x.shape[3:])


def unfold_rows(x: Tensor, rows: int) -> Tensor:
    """The inverse of :func:`fold_rows`: (B / rows, H, rows * L, ...) -> (B, H, L, ...)."""
    groups, heads, folded = x.shape[:3]
    return x.reshape(groups, heads, rows, folded // rows, *x.shape[3:]).transpose(1, 2).reshape(
        groups * rows, heads, folded // rows, *x.shape[3:])


_FAIRSEQ_ONLY = ("dictionary",)


def _has_hooks(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` would run a hook: its own forward or backward hooks, or global module hooks."""
    own = (module._forward_pre_hooks, module._forward_hooks, module._backward_pre_hooks, module._backward_hooks)
    registry = torch.nn.modules.module
    global_hooks = (getattr(registry, name, None) for name in (
        "_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks", "_global_backward_hooks"))
    return any(own) or any(bool(hooks) for hooks in global_hooks)


def fsmha(cls):
    """Make an attention class accept the constructor keywords fairseq's transformer layers pass.

    ``@fsmha class FSX(X): pass`` keeps ``X``'s math and Python API and adds: ``encoder_decoder_attention=True``
    meaning ``cross=True``, ``self_attention`` checked against ``cross``, and clear errors for the fairseq
    options fluence attentions do not implement (``add_bias_kv``, ``add_zero_attn``, ``xformers_att_config``).
    ``X`` must derive from :class:`FluenceAttention`, which supplies the fairseq glue.
    """
    if not (isinstance(cls, type) and issubclass(cls, FluenceAttention)):
        raise TypeError(f"@fsmha expects a subclass of FluenceAttention, got {cls!r}")
    inner_init = cls.__init__

    def __init__(
        self,
        *args,
        self_attention: Optional[bool] = None,
        encoder_decoder_attention: Optional[bool] = None,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        xformers_att_config=None,
        **kwargs,
    ):
        name = cls.__name__
        if add_bias_kv or add_zero_attn:
            raise ValueError(f"{name} does not implement add_bias_kv/add_zero_attn; build it without them")
        if xformers_att_config is not None:
            raise ValueError(f"{name} is its own attention; drop xformers_att_config")
        for key in _FAIRSEQ_ONLY:
            kwargs.pop(key, None)
        if encoder_decoder_attention is not None:
            if "cross" in kwargs and bool(kwargs["cross"]) != bool(encoder_decoder_attention):
                raise ValueError(f"{name}: cross={kwargs['cross']} contradicts "
                                 f"encoder_decoder_attention={encoder_decoder_attention}")
            kwargs["cross"] = bool(encoder_decoder_attention)
        if self_attention and kwargs.get("cross", False):
            raise ValueError(f"{name}: self_attention=True contradicts cross=True")
        inner_init(self, *args, **kwargs)

    __init__.__doc__ = inner_init.__doc__
    __init__.__wrapped__ = inner_init  # inspect.signature shows (and the registry checks) the real keywords
    cls.__init__ = __init__
    cls.is_fsmha = True
    return cls
