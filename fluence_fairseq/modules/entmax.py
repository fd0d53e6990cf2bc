"""Adaptively sparse attention (Correia, Niculae & Martins, 2019): the softmax of scaled dot-product attention
replaced by sparsemax, 1.5-entmax or α-entmax with one learned α per head.

The normalisers live in :mod:`fluence_fairseq.ops.entmax` (float32 arithmetic whatever the input dtype, zeros for
rows with nothing to attend to, exact zeros elsewhere). Each attention can also count how many of its weights are
non-zero (:meth:`EntmaxAttentionBase.track_density`), which the ``fluence_*`` criterions log in validation and
``fluence-plot density`` draws per head.
"""
import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..ops.common import element_blocks, lower_blocks, prefixes
from ..ops.entmax import entmax
from ..ops.entmax_attention import blocked_entmax_attention, lists_support
from .attention_base import FluenceAttention, Statistic, fsmha
from .masks import HARD_MASK, relative_positions
from ..flag_types import FloatRange, NumberOrWord
from .spec import AttentionOption, AttentionSpec

__all__ = [
    "EntmaxAttentionBase", "SparsemaxAttention", "Entmax15Attention", "AlphaEntmaxAttention",
    "FSSparsemaxAttention", "FSEntmax15Attention", "FSAlphaEntmaxAttention", "parse_alpha_init",
    "FSSparsemax", "FSEntmax15", "FSAlphaEntmax",
]

#: the range α is clamped to (Correia et al. 2019): below 1.01 the α-gradient divides by almost zero
ALPHA_MIN, ALPHA_MAX = 1.01, 2.0
#: --alpha-init: 'random' or a starting alpha (alpha = 1 + sigmoid(a) never reaches 2)
ALPHA_INIT = NumberOrWord(FloatRange(ALPHA_MIN, ALPHA_MAX, hi_open=True), "random")
#: --alpha-lr-scale: how much faster than the other weights α's pre-activation moves under Adam
ALPHA_LR_SCALE = FloatRange(0.0, lo_open=True, meaning="1 = the paper; 20 moves alpha's pre-activation 20x faster "
                            "under Adam")


class EntmaxAttentionBase(FluenceAttention):
    """Dense scaled dot-product attention normalised by α-entmax (subclasses choose α).

    All four patterns (noncausal/causal, self/cross); decoding keeps the usual key/value cache. Masked positions
    (causal future, key padding, ``attn_mask`` entries at or below ``-1e4``) get probability exactly 0; a query
    with no key left gets a zero output instead of NaN. Other ``attn_mask`` values are added to the scores.
    """

    #: α of every head for the fixed-α attentions; learned-α attentions override :meth:`alpha` instead
    fixed_alpha: Optional[float] = None

    def __init__(self, *args, **kwargs):
        if self.fixed_alpha is None and type(self).alpha is EntmaxAttentionBase.alpha:
            raise TypeError(f"{type(self).__name__} must set fixed_alpha or override alpha()")
        super().__init__(*args, **kwargs)

    def alpha(self) -> Union[float, Tensor]:
        """α of every head: a float, or a tensor of shape (num_heads,)."""
        return self.fixed_alpha

    def _alpha_for_scores(self) -> Union[float, Tensor]:
        alpha = self.alpha()
        return alpha.view(1, -1, 1, 1) if isinstance(alpha, Tensor) else alpha

    sparse_weights = True
    keeps_output = False  # p @ v keeps p and v, not its output (see FluenceAttention.keeps_output)
    weights_by_default = True  # the normaliser forms the full probabilities anyway
    shares_source = True  # each query row on its own, no query position without ALiBi (see FluenceAttention)

    # ------------------------------------------------------------------------------ what the criterion logs
    def track_statistics(self, enabled: bool) -> None:
        self.track_density(enabled)

    def stats(self):
        """``alpha`` (mean over the heads; learned α only, fixed ones are constants) and, while tracking,
        ``density``: the share of non-zero weights among the allowed (query, key) pairs of real queries."""
        out = {}
        alpha = self.alpha()
        if isinstance(alpha, Tensor):
            out["alpha"] = Statistic(float(alpha.detach().float().mean()), per_layer=True, model_wide=False)
        counts = self.density_counts()
        if counts is not None:
            nonzero, allowed = (float(c) for c in counts.sum(dim=1))
            if allowed > 0:
                out["density"] = Statistic(nonzero / allowed, weight=allowed, per_layer=True)
        return out

    # ------------------------------------------------------------------------------------- density
    def track_density(self, enabled: bool = True) -> None:
        """Start (and reset) or stop counting non-zero weights; see :meth:`density_counts`."""
        self._density = torch.zeros(2, self.num_heads, dtype=torch.float64) if enabled else None

    def density_counts(self) -> Optional[Tensor]:
        """(2, num_heads) float64: non-zero weights and allowed (query, key) pairs counted since
        :meth:`track_density`, over real queries (padded queries of a self attention are left out); None when not
        tracking. Density = row 0 / row 1: 1 for softmax, ``1/allowed keys`` for a one-hot head."""
        return getattr(self, "_density", None)

    def _count_density(self, probs: Tensor, masked: Optional[Tensor], key_padding_mask: Optional[Tensor],
                       query_offset: int) -> None:
        counts = self.density_counts()
        if counts is None:
            return
        bsz, heads, tgt_len, src_len = probs.shape
        allowed = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=probs.device)
        if masked is not None:
            allowed = ~masked
        real_queries = None
        if not self.cross and key_padding_mask is not None:
            # a self attention's query i is key i + query_offset: padded keys are padded queries
            positions = torch.arange(tgt_len, device=probs.device) + query_offset
            real_queries = ~key_padding_mask[:, positions].view(bsz, 1, tgt_len, 1)
            allowed = allowed & real_queries
        allowed = allowed.expand(bsz, heads, tgt_len, src_len)
        nonzero = (probs > 0) & allowed
        counts[0] += nonzero.sum(dim=(0, 2, 3)).to(torch.float64).cpu()
        counts[1] += allowed.sum(dim=(0, 2, 3)).to(torch.float64).cpu()

    # ---------------------------------------------------------------------------------------- math
    #: attention over this many queries or more runs in query blocks (see :meth:`query_blocks`)
    BLOCKED_FROM = 128
    #: at most this many query blocks: 8 do 56% of the full matrix's work, more would add only per-call overhead
    MAX_QUERY_BLOCKS = 8

    def query_blocks(self, tgt_len: int):
        """Query ranges ``[start, end)`` attended one at a time. A causal self attention's query block needs only
        the keys up to its last query, so with B blocks the scores, normaliser, ``p @ v`` and their backward touch
        ``(B + 1) / 2B`` of the full matrix (56% for B = 8, against 100% when the future half is formed and masked).
        Every row is normalised over exactly the keys it may see, so the result equals the full pass.

        Noncausal and cross attention run in the same blocks: that saves no work, but a block's scores, the
        normaliser's buffers and their gradients are an eighth of the full matrix, and with a plain
        ``need_weights`` each block is averaged over its heads as it is made, so the (B, H, Lq, Lk) probabilities
        are never differentiated through one head mean (whose backward and the sum with ``p @ v``'s gradient, each
        a fresh full-size tensor, took longer than the normaliser): noncausal 1.5-entmax at L=4096 with the
        default weights went from 1.25x to 1.02x its weight-free step (``benchmarks.need_weights``)."""
        if tgt_len < self.BLOCKED_FROM:
            return [(0, tgt_len)]
        size = max(self.BLOCKED_FROM // 2, -(-tgt_len // self.MAX_QUERY_BLOCKS))
        return [(start, min(start + size, tgt_len)) for start in range(0, tgt_len, size)]

    #: from this many probabilities per pass (B x H x Lq x Lk; 2^25 float32 = 128 MiB kept for backward by the
    #: plain computation) a pass that needs nothing but its output (no weights, additive mask or density count)
    #: keeps only three numbers per query row and recomputes each block in backward
    #: (:func:`~fluence_fairseq.ops.entmax_attention.blocked_entmax_attention`); below it the plain computation,
    #: which skips the recomputed product, is kept for speed
    RECOMPUTE_FROM_ELEMENTS = 1 << 25
    #: that pass's query blocks hold at most this many scores (B x H x rows x keys; 2^23 float32 = 32 MiB), so
    #: its transient memory (a block's scores, probabilities and their gradients) is a few such blocks whatever
    #: the length. Paired against the plain pass (noncausal 1.5-entmax, L=4096, 8 heads, two threads,
    #: benchmarks/results/paired_entmax_recompute_noncausal_4096.md): 2^22 took 1.16x its time at 138 MiB peak,
    #: 2^23 1.11x at 218 MiB, 2^24 1.11x at 378 MiB (the plain pass: 682 MiB)
    RECOMPUTE_BLOCK_ELEMENTS = 1 << 23

    def recompute_blocks(self, q, k, query_offset: int):
        """Query ranges of the recomputing pass: rows of at most :data:`RECOMPUTE_BLOCK_ELEMENTS` scores (causal:
        counted over the keys the block's last query sees), at least one row each."""
        return element_blocks(q.size(0) * q.size(1), q.size(2), k.size(2), causal=self.causal,
                              query_offset=query_offset, elements=self.RECOMPUTE_BLOCK_ELEMENTS)

    def _blocked_pass_applies(self, attn_mask, query_offset) -> bool:
        """What both passes through ``blocked_entmax_attention`` need: no additive mask, a query offset of at
        least 0 and no density count (its relative bias, ALiBi here, has fixed slopes: nothing of it needs a
        gradient, so it goes along)."""
        return attn_mask is None and query_offset >= 0 and self.density_counts() is None

    def _recomputes(self, q, k, attn_mask, query_offset, need_weights) -> bool:
        """Whether this pass takes the recomputing path."""
        if need_weights or not self._blocked_pass_applies(attn_mask, query_offset):
            return False
        return q.size(0) * q.size(1) * q.size(2) * k.size(2) >= self.RECOMPUTE_FROM_ELEMENTS

    #: from this many probabilities per pass (B x H x Lq x Lk) a pass of at least :data:`BLOCKED_FROM` queries that
    #: the recomputing pass does not take runs its blocks through the same function, keeping the probabilities of
    #: each block for backward as the plain computation does, except where a block's rows keep so few keys that
    #: it keeps their support instead and takes ``p @ v`` and its backward on it alone (the CPU, attention dropout
    #: drawn for the support's entries alone, an average of the heads' weights or none, no additive mask or density
    #: count)
    SUPPORT_FROM_ELEMENTS = 1 << 20

    def _by_support(self, q, k, attn_mask, query_offset, need_weights) -> bool:
        """Whether this pass runs its blocks where sparse ones may work on their support (see
        :data:`SUPPORT_FROM_ELEMENTS`)."""
        if not self._blocked_pass_applies(attn_mask, query_offset):
            return False
        if need_weights and not self.head_average_weights or q.size(2) < self.BLOCKED_FROM:
            return False
        if not lists_support(q):
            return False
        return q.size(0) * q.size(1) * q.size(2) * k.size(2) >= self.SUPPORT_FROM_ELEMENTS

    def _active_dropout(self) -> float:
        """The attention dropout this call applies (fairseq's dropout module: in training, or always when it is
        set to apply during inference)."""
        dropout = self.dropout_module
        applies = self.training or getattr(dropout, "apply_during_inference", False)
        return float(dropout.p) if applies else 0.0

    def attend(self, q, k, v, *, key_padding_mask, attn_mask, query_offset, need_weights):
        if self._recomputes(q, k, attn_mask, query_offset, need_weights):
            return blocked_entmax_attention(q, k, v, self._alpha_for_scores(),
                                            blocks=self.recompute_blocks(q, k, query_offset), causal=self.causal,
                                            query_offset=query_offset, key_padding_mask=key_padding_mask,
                                            dropout_p=self._active_dropout(), rel_bias=self.relative_bias()), None
        blocks = self.query_blocks(q.size(2))
        if self._by_support(q, k, attn_mask, query_offset, need_weights):
            result = blocked_entmax_attention(
                q, k, v, self._alpha_for_scores(), blocks=blocks, causal=self.causal, query_offset=query_offset,
                key_padding_mask=key_padding_mask, dropout_p=self._active_dropout(), rel_bias=self.relative_bias(),
                keep_probabilities=True, need_weights=need_weights)
            return result if need_weights else (result, None)
        if len(blocks) == 1:  # the base averages the heads' weights when that is all it needs
            return self._attend_rows(q, k, v, key_padding_mask, attn_mask, query_offset, need_weights)
        average = need_weights and self.head_average_weights  # only the mean over heads is returned
        src_len = k.size(2)
        outputs, probabilities = [], []
        # the block's last query sees keys up to its own position; split and prefixes give q, k and v one backward
        # each (a slice per block would zero and add a full-size gradient per block: a fifth of the attention's time)
        visible = [min(src_len, query_offset + end) if self.causal else src_len for _, end in blocks]
        q_blocks = q.split([end - start for start, end in blocks], dim=2)
        k_blocks, v_blocks = prefixes(k, visible), prefixes(v, visible)
        for (start, end), keys, q_b, k_b, v_b in zip(blocks, visible, q_blocks, k_blocks, v_blocks):
            out, probs = self._attend_rows(
                q_b, k_b, v_b,
                None if key_padding_mask is None else key_padding_mask[:, :keys],
                None if attn_mask is None else attn_mask[..., start:end, :keys],
                query_offset + start, need_weights,
            )
            outputs.append(out)
            # averaged block by block: the (B, 1, L, L) matrix is H times smaller to write and differentiate
            probabilities.append(probs.mean(dim=1, keepdim=True) if average else probs)
        weights = lower_blocks(probabilities, src_len) if need_weights else None
        return torch.cat(outputs, dim=2), weights

    def _attend_rows(self, q, k, v, key_padding_mask, attn_mask, query_offset, need_weights):
        tgt_len, src_len = q.size(2), k.size(2)
        scores = torch.matmul(q * (q.size(-1) ** -0.5), k.transpose(-1, -2))
        bias = self.relative_bias()
        # the future exists where the first query sees fewer than all keys (not at a decoding step's single query)
        has_future = self.causal and query_offset < src_len - 1
        rel = relative_positions(tgt_len, src_len, query_offset, q.device) if bias is not None or has_future else None
        if bias is not None:
            scores = scores + bias(rel).to(scores.dtype)
        masked = None
        if has_future:
            masked = (rel < 0).view(1, 1, tgt_len, src_len)  # the future
        if key_padding_mask is not None:
            padded = key_padding_mask.view(-1, 1, 1, src_len)
            masked = padded if masked is None else masked | padded
        if attn_mask is not None:
            scores = scores + attn_mask
            hard = attn_mask <= HARD_MASK
            masked = hard if masked is None else masked | hard
        probs = entmax(scores, self._alpha_for_scores(), mask=masked)
        self._count_density(probs, masked, key_padding_mask, query_offset)
        out = torch.matmul(self.dropout_module(probs), v)
        return out, (probs if need_weights else None)


class SparsemaxAttention(EntmaxAttentionBase):
    """Attention normalised by sparsemax (α = 2, Martins & Astudillo 2016): the Euclidean projection of the scores
    onto the simplex, the sparsest member of the entmax family.

    Example::

        >>> import torch
        >>> from fluence_fairseq import FSSparsemaxAttention
        >>> attn = FSSparsemaxAttention(64, 4, causal=True)
        >>> x = torch.randn(10, 2, 64)                        # (length, batch, dim)
        >>> out, weights = attn(x, x, x)
        >>> bool((weights == 0).any())                         # exact zeros
        True
    """

    fixed_alpha = 2.0


class Entmax15Attention(EntmaxAttentionBase):
    """Attention normalised by 1.5-entmax (Peters et al. 2019), between softmax and sparsemax.

    Example::

        >>> import torch
        >>> from fluence_fairseq import FSEntmax15Attention
        >>> attn = FSEntmax15Attention(64, 4)
        >>> x = torch.randn(10, 2, 64)
        >>> out, weights = attn(x, x, x)
        >>> torch.allclose(weights.sum(-1), torch.ones(2, 10))
        True
    """

    fixed_alpha = 1.5


def learned_alpha(pre_alpha: Tensor, alpha_lr_scale: float = 1.0) -> Tensor:
    """α of every head from its parameter: ``clamp(1 + sigmoid(alpha_lr_scale * pre_alpha), 1.01, 2)``. The one
    place this formula lives: the attention, ``fluence-plot entmax`` and the examples' diagnostics all call it."""
    return (1.0 + torch.sigmoid(alpha_lr_scale * pre_alpha)).clamp(ALPHA_MIN, ALPHA_MAX)


def parse_alpha_init(value) -> Union[float, str]:
    """``--alpha-init``: ``random`` or a number in [1.01, 2)."""
    return ALPHA_INIT.check("alpha_init", value)


class AlphaEntmaxAttention(EntmaxAttentionBase):
    """α-entmax attention with one learned α per head (the *adaptively sparse transformer*, Correia et al. 2019).

    Each head h has an unconstrained parameter ``pre_alpha[h]`` and uses ``α_h = clamp(1 + sigmoid(s *
    pre_alpha[h]), 1.01, 2)`` (``s = alpha_lr_scale``, 1 by default: the paper's parametrisation) in every forward, so α stays in range however the optimizer moves the parameter (Fluence's
    ``EntmaxAlpha`` applies the sigmoid once at construction and then trains α directly, which lets it leave
    (1, 2] and produce NaN). The gradient reaches α through the normaliser's analytic α-derivative.

    Args:
        alpha_init: ``"random"`` (the paper: ``pre_alpha ~ N(0, 1)``, so α starts between 1.01 and 2, mean 1.5)
            or one starting α in [1.01, 2) for every head.
        alpha_lr_scale: ``s`` > 0. The same α at the start whatever ``s`` (``pre_alpha`` holds the pre-activation
            divided by ``s``), but under Adam, whose steps do not depend on the gradient's scale, the pre-activation
            ``s * pre_alpha`` moves ``s`` times as far per update: α's own learning rate, without optimizer
            parameter groups. (Under plain SGD the factor is ``s**2``.) With the paper's sigmoid, α near 1.05
            moves 20x slower than its pre-activation; at lr 2e-3 a head's α barely leaves its start in 1,000
            updates (docs/sparse_attention.md).

    Example::

        >>> import torch
        >>> from fluence_fairseq import FSAlphaEntmaxAttention
        >>> attn = FSAlphaEntmaxAttention(64, 4, alpha_init=1.5)
        >>> attn.alpha()
        tensor([1.5000, 1.5000, 1.5000, 1.5000], grad_fn=<ClampBackward1>)
        >>> x = torch.randn(10, 2, 64)
        >>> out, _ = attn(x, x, x)
        >>> out.sum().backward()
        >>> attn.pre_alpha.grad.shape
        torch.Size([4])
    """


    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, *, alpha_init="random",
                 alpha_lr_scale: float = 1.0, **kwargs):
        super().__init__(embed_dim, num_heads, dropout=dropout, **kwargs)
        self.alpha_init = parse_alpha_init(alpha_init)
        self.alpha_lr_scale = ALPHA_LR_SCALE.check("alpha_lr_scale", alpha_lr_scale)
        self.pre_alpha = nn.Parameter(torch.empty(num_heads))
        self.reset_alpha()

    def reset_alpha(self) -> None:
        with torch.no_grad():
            if self.alpha_init == "random":
                self.pre_alpha.normal_()
            else:
                fraction = self.alpha_init - 1.0  # sigmoid(pre-activation) = alpha - 1
                self.pre_alpha.fill_(math.log(fraction / (1.0 - fraction)))
            self.pre_alpha.div_(self.alpha_lr_scale)

    def alpha(self) -> Tensor:
        return learned_alpha(self.pre_alpha, self.alpha_lr_scale)

    def _alpha_for_scores(self) -> Tensor:
        """α as the scores take it, made again for a call without gradients only when its parameter's values or
        the scale changed (four calls on eight numbers, measured at a few percent of a decoding step); with gradients,
        made every call. The values are compared, not the parameter's version: fairseq's optimizers write
        ``p.data``, whose writes the version counter does not see."""
        if torch.is_grad_enabled():
            return super()._alpha_for_scores()
        param = self.pre_alpha
        cached = self.__dict__.get("_alpha_without_grad")
        if (cached is None or cached[1] != self.alpha_lr_scale or cached[0].device != param.device
                or cached[0].dtype != param.dtype or not torch.equal(cached[0], param)):
            cached = self.__dict__["_alpha_without_grad"] = (param.detach().clone(), self.alpha_lr_scale,
                                                             super()._alpha_for_scores())
        return cached[2]


@fsmha
class FSSparsemaxAttention(SparsemaxAttention):
    """:class:`SparsemaxAttention` with fairseq's ``MultiheadAttention`` constructor keywords."""


@fsmha
class FSEntmax15Attention(Entmax15Attention):
    """:class:`Entmax15Attention` with fairseq's ``MultiheadAttention`` constructor keywords."""


@fsmha
class FSAlphaEntmaxAttention(AlphaEntmaxAttention):
    """:class:`AlphaEntmaxAttention` with fairseq's ``MultiheadAttention`` constructor keywords."""


ATTENTION_SPECS = (
    AttentionSpec("sparsemax", FSSparsemaxAttention, (), "sparsemax attention (alpha = 2): exact zeros (Correia et al. 2019)",
                  family="sparse"),
    AttentionSpec("entmax15", FSEntmax15Attention, (), "1.5-entmax attention: sparse, between softmax and sparsemax",
                  family="sparse"),
    AttentionSpec(
        "alpha_entmax", FSAlphaEntmaxAttention,
        (AttentionOption("alpha_init", ALPHA_INIT, help="initial alpha of every alpha-entmax head: 'random' (paper: 1 + sigmoid(N(0,1))) or a "
                         f"number in [{ALPHA_MIN}, {ALPHA_MAX})"),
         AttentionOption("alpha_lr_scale", ALPHA_LR_SCALE, help="alpha = 1 + sigmoid(s * pre_alpha): the same start, "
                         "but under Adam alpha's pre-activation moves s times as far per update (alpha's own "
                         "learning rate; 1 = the paper)")),
        "alpha-entmax attention with a learned alpha per head in [1.01, 2] (Correia et al. 2019)",
        family="sparse",
    ),
)


# the names before 0.2, kept for code that imports them
FSSparsemax = FSSparsemaxAttention
FSEntmax15 = FSEntmax15Attention
FSAlphaEntmax = FSAlphaEntmaxAttention
