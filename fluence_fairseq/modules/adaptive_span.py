"""Adaptive attention span (Sukhbaatar et al., 2019) with Fluence's API and the original semantics.

Each head ``h`` learns a span ratio ``z_h`` in [0, 1] (the span in tokens is ``z_h * attn_span``). A key at
distance ``x`` from the query (0 = the query's own position) gets the soft mask

    m_h(x) = clamp((R + z_h * S - x) / R, 0, 1),   S = attn_span, R = adapt_span_ramp,

and attention weights are multiplied by it and renormalised. The loss ``coeff * S * mean_h(z_h)`` pushes spans
down; spans are clamped to [0, 1] after every optimizer step.

Differences from Fluence's ``AdaptiveSpan`` (deliberate fixes): one span per head rather than per batch slot,
a constant initial value instead of a random one, masks over query-key distance rather than absolute key index
(for any batch size and key length), and a real saving in :class:`AdaptiveSpanAttention`: keys beyond the
current maximum span plus ramp are never scored.
"""
import math
import weakref
from typing import List, Optional

import torch
from torch import Tensor, nn

from ..ops.band import band_attention
from .attention_base import FluenceAttention, Statistic, fsmha
from ..flag_types import Boolean, FloatRange, IntRange
from .spec import AttentionOption, AttentionSpec

__all__ = ["AdaptiveSpan", "AdaptiveSpanAttention", "FSAdaptiveSpanAttention", "FSAdaptiveSpan"]


def _check_span_args(attn_span, ramp, init, nb_heads):
    if not isinstance(attn_span, int) or attn_span <= 0:
        raise ValueError(f"attn_span must be a positive integer (maximum span in tokens), got {attn_span!r}")
    if not (isinstance(ramp, (int, float)) and 0 < ramp <= attn_span):
        raise ValueError(
            f"adapt_span_ramp must be in (0, attn_span={attn_span}], got {ramp!r}: the ramp is the soft edge of "
            "the span and cannot be longer than the span itself"
        )
    if not 0.0 <= init <= 1.0:
        raise ValueError(
            f"adapt_span_init must be in [0, 1] (a fraction of attn_span), got {init!r}; "
            f"for a span of N tokens pass N / attn_span"
        )
    if not isinstance(nb_heads, int) or nb_heads <= 0:
        raise ValueError(f"nb_heads must be a positive integer, got {nb_heads!r}")


# The span ratios are clamped to [0, 1] after every optimizer step that updates them. torch offers no hook per
# parameter, so one global optimizer post-step hook does it: registered when the first AdaptiveSpan is built (so
# importing the package changes nothing), it returns at once for an optimizer that holds no span ratio (the
# optimizers of unrelated models are never touched) and clamps only the ratios that optimizer stepped.
_LIVE_SPANS: "weakref.WeakSet[AdaptiveSpan]" = weakref.WeakSet()
_CLAMP_HOOK = None


def _clamp_after_step(optimizer, args, kwargs):
    if not _LIVE_SPANS:
        return
    live = {id(span.current_val): span for span in list(_LIVE_SPANS)}
    for group in optimizer.param_groups:
        for p in group["params"]:
            span = live.get(id(p))
            if span is not None:
                span.clamp_param()


def _track_span(span: "AdaptiveSpan") -> None:
    global _CLAMP_HOOK
    if _CLAMP_HOOK is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _CLAMP_HOOK = register_optimizer_step_post_hook(_clamp_after_step)
    _LIVE_SPANS.add(span)


class _LogRamp(torch.autograd.Function):
    """``log(clamp(x, 0, 1))`` with ``clamp``'s gradient convention (live on the closed interval [0, 1]): at
    ``x = 0`` the value is ``log(FLOOR)`` instead of ``-inf`` and the gradient ``grad / FLOOR``, so that a
    softmax score biased by it passes the gradient of a mask multiplied into the probabilities."""

    FLOOR = 1e-20

    @staticmethod
    def forward(ctx, x):
        m = x.clamp(0.0, 1.0).clamp_min(_LogRamp.FLOOR)
        ctx.save_for_backward(m, (x >= 0) & (x <= 1))
        return torch.where(x >= 0, m.log(), torch.full_like(m, float("-inf")))

    @staticmethod
    def backward(ctx, grad):
        m, live = ctx.saved_tensors
        return torch.where(live, grad / m, torch.zeros_like(grad))


class AdaptiveSpan(nn.Module):
    """Learned soft span per head.

    Args:
        attn_span: maximum span S in tokens (keys farther away are never attended).
        adapt_span_loss_coeff: weight of the span loss ``coeff * S * mean(z)``.
        adapt_span_ramp: ramp length R of the soft mask edge, in tokens.
        adapt_span_init: initial span ratio z in [0, 1] for every head.
        adapt_span_cache: decoding caches hold only the current maximum span (True) or all S keys (False).
        nb_heads: number of heads.
        bs, mask_size: accepted for compatibility with Fluence and ignored (spans are per head and work for any
            batch size and key length).
        causal: distances are ``query - key`` and future keys are masked (True), or ``|query - key|`` (False).
    """

    def __init__(
        self,
        attn_span: int,
        adapt_span_loss_coeff: float,
        adapt_span_ramp: int,
        adapt_span_init: float,
        adapt_span_cache: bool,
        nb_heads: int,
        bs: Optional[int] = None,
        mask_size=None,
        *,
        causal: bool = True,
    ):
        super().__init__()
        _check_span_args(attn_span, adapt_span_ramp, adapt_span_init, nb_heads)
        if not adapt_span_loss_coeff >= 0:
            raise ValueError(f"adapt_span_loss_coeff must be >= 0 (a negative weight rewards longer spans), got "
                             f"{adapt_span_loss_coeff!r}")
        self.attn_span = attn_span
        self.loss_coeff = float(adapt_span_loss_coeff)
        self.ramp = adapt_span_ramp
        self.cache = bool(adapt_span_cache)
        self.nb_heads = nb_heads
        self.causal = causal
        # stored as a ratio of attn_span, as in facebookresearch/adaptive-span
        self.current_val = nn.Parameter(torch.full((nb_heads, 1, 1), float(adapt_span_init)))
        _track_span(self)

    # -------------------------------------------------------------------------------------------- mask
    def ratio(self) -> Tensor:
        """The span ratios (H, 1, 1) as used: clamped to [0, 1] in value, with the gradient of the raw parameter.

        The parameter itself is clamped after every optimizer step; this guards the paths that step a copy of it
        (fairseq's --fp16/--bf16 flat fp32 master weights), where the model's copy may lie out of range.
        """
        z = self.current_val
        return z + (z.clamp(0.0, 1.0) - z).detach()

    def ratios(self) -> Tensor:
        """Per-head span ratios in [0, 1], detached, shape (H,)."""
        return self.current_val.detach().view(-1).clamp(0.0, 1.0)

    def mask_dtype(self) -> torch.dtype:
        """float32 for half-precision spans (a ramp of width R needs more than fp16's 11 bits at large S), the
        spans' own dtype otherwise: a float64 model's mask and span gradient are exact to float64."""
        return torch.promote_types(self.current_val.dtype, torch.float32)

    def distance(self, rel: Tensor) -> Tensor:
        """Query-minus-key offsets -> distances the mask is defined on (future keys get ``attn_span``)."""
        if self.causal:
            return torch.where(rel >= 0, rel, torch.full_like(rel, self.attn_span))
        return rel.abs()

    def _ramp(self, rel: Tensor):
        """``((R + z S - d) / R, d)`` in :meth:`mask_dtype` for offsets ``rel``: the unclamped ramp (H, *rel.shape),
        1 inside the span and 0 at its far end, and the distances."""
        dtype = self.mask_dtype()
        d = self.distance(rel).to(dtype)
        z = self.ratio().to(dtype).view(self.nb_heads, *([1] * rel.dim()))
        return (self.ramp + z * self.attn_span - d) / self.ramp, d

    def mask(self, rel: Tensor) -> Tensor:
        """Soft mask (H, *rel.shape) for query-minus-key offsets ``rel`` (in :meth:`mask_dtype`); zero beyond
        ``attn_span``."""
        x, d = self._ramp(rel)
        return x.clamp(0.0, 1.0).masked_fill(d >= self.attn_span, 0.0)

    def log_mask(self, rel: Tensor) -> Tensor:
        """log of :meth:`mask` for the attention's scores, -inf where the mask is zero, with the reference's
        gradient of the span ratio everywhere.

        The reference multiplies probabilities by the mask, so the key at the far end of the ramp (distance
        exactly ``R + z S``, where the mask is 0 but ``clamp`` still passes its gradient) gives ``z`` the gradient
        ``S/R`` times the derivative of the output in that key's weight. ``log 0`` would lose it (and understate
        the push to grow a span by 11-40% at z = 0, where ``z S`` is a whole number); here that key gets the mask
        ``LOG_FLOOR`` instead of 0 (a weight of ``e^-46``, invisible in the output) and the gradient of ``log m``
        is divided by it, which is exactly the reference's gradient."""
        x, d = self._ramp(rel)
        return _LogRamp.apply(x).masked_fill(d >= self.attn_span, float("-inf"))

    def log_mask_lookup(self, rel: Tensor, ratios: Optional[List[float]] = None) -> Tensor:
        """:meth:`log_mask` where no gradient is wanted (evaluation, decoding), read from its values at every
        distance 0..``attn_span`` (``attn_span``: -inf), which are made again whenever the spans' values change
        (compared by value: fairseq's fp16 optimizer writes them through ``.data``, which no version counter sees):
        the same numbers, in a few calls where the mask took about 30 (a decoding step's). ``ratios``: the values
        of :meth:`ratios` if the caller has read them (the mask depends on nothing else), else read here."""
        ratios = self.ratios().tolist() if ratios is None else ratios
        key = (tuple(ratios), rel.device, self.mask_dtype())
        if getattr(self, "_table_key", None) != key:
            with torch.no_grad():
                self._table = self.log_mask(torch.arange(self.attn_span + 1, device=rel.device))
            self._table_key = key
        at = self.distance(rel).clamp_(max=self.attn_span)
        return self._table.index_select(1, at.reshape(-1)).view((self.nb_heads,) + tuple(rel.shape))

    def forward(self, attn: Tensor, normalize: bool = True) -> Tensor:
        """Mask attention probabilities ``attn`` (B, H, Lq, Lk) and renormalise each row.

        The last query is aligned with the last key (query ``i`` sits at key position ``i + Lk - Lq``).
        """
        if attn.dim() != 4 or attn.size(1) != self.nb_heads:
            raise ValueError(
                f"attn must be (batch, heads={self.nb_heads}, tgt_len, src_len) probabilities, got {tuple(attn.shape)}"
            )
        tgt_len, src_len = attn.shape[-2:]
        rel = (torch.arange(tgt_len, device=attn.device).unsqueeze(1) + (src_len - tgt_len)
               - torch.arange(src_len, device=attn.device).unsqueeze(0))
        out = attn * self.mask(rel).to(attn.dtype)
        if normalize:
            out = out / (out.sum(dim=-1, keepdim=True) + 1e-8)
        return out

    # --------------------------------------------------------------------------------------- statistics
    def _span(self, ratio: float, include_ramp: bool) -> int:
        span = math.ceil(ratio * self.attn_span) + (self.ramp if include_ramp else 0)
        return int(max(0, min(self.attn_span, span)))

    def get_current_max_span(self, include_ramp: bool = True) -> int:
        """Largest span over heads, in tokens (with the ramp, clipped to attn_span)."""
        return self._span(self.ratios().max().item(), include_ramp)

    def get_current_avg_span(self, include_ramp: bool = True) -> int:
        return self._span(self.ratios().mean().item(), include_ramp)

    def get_spans(self, include_ramp: bool = False) -> Tensor:
        """Per-head spans in tokens (float), for plots and logs."""
        spans = self.ratios().float() * self.attn_span
        return (spans + self.ramp).clamp(max=self.attn_span) if include_ramp else spans

    def get_trim_len(self) -> int:
        """How many of the attn_span context keys can be dropped, floored to a multiple of 64."""
        trim = min(self.attn_span - 1, self.attn_span - self.get_current_max_span())
        return max(0, trim // 64 * 64)

    def get_cache_size(self) -> int:
        """Context to keep between segments (with a 64-token margin for spans that grow), as in the original."""
        if self.cache:
            return min(self.attn_span, self.attn_span - self.get_trim_len() + 64)
        return self.attn_span

    def get_loss(self) -> Tensor:
        return self.loss_coeff * self.attn_span * self.ratio().mean()

    @torch.no_grad()
    def clamp_param(self):
        self.current_val.clamp_(0.0, 1.0)

    def extra_repr(self) -> str:
        return (f"attn_span={self.attn_span}, ramp={self.ramp}, nb_heads={self.nb_heads}, "
                f"loss_coeff={self.loss_coeff}, cache={self.cache}, causal={self.causal}")


#: extra keys per query a band call scores beyond its reach (its blocks' edges), and the cost of one more call, in
#: keys per query per head: what :func:`head_groups` weighs a split against
_BAND_EDGE = 64
_CALL_COST = 64


def head_groups(reaches, reachable: int) -> list:
    """Heads grouped for band attention: each group is scored over the band of its widest head, so one head whose
    span has grown (the heads of a layer rarely agree: 32 to 1,386 keys in one layer of the long-context LM) does
    not make the others score its band too. Groups are runs of heads sorted by reach, chosen to minimise
    ``sum_g heads_g * (reach_g + edge) + (groups - 1) * call cost * heads`` (a split that saves little is not worth a
    call); ``reachable`` (the farthest key of this input) caps the reaches. Exact: a head's scores outside its own
    band are zero in any case."""
    heads = sorted(range(len(reaches)), key=lambda h: reaches[h])
    capped = [min(reaches[h], reachable) for h in heads]
    best = [0.0] + [math.inf] * len(heads)  # best[j]: cost of the first j sorted heads
    cut = [0] * (len(heads) + 1)
    for j in range(1, len(heads) + 1):
        for i in range(j):
            cost = best[i] + (j - i) * (capped[j - 1] + _BAND_EDGE) + (_CALL_COST * len(heads) if i else 0)
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(heads)
    while j:
        groups.append(sorted(heads[cut[j]:j]))
        j = cut[j]
    return groups[::-1]


def _heads(x: Tensor, heads: list) -> Tensor:
    """The heads ``heads`` of x (B, H, L, D): a view when they are consecutive."""
    if heads == list(range(heads[0], heads[-1] + 1)):
        return x[:, heads[0]: heads[-1] + 1]
    return x.index_select(1, torch.tensor(heads, device=x.device))


class AdaptiveSpanAttention(FluenceAttention):
    """Self attention with a learned span per head; noncausal (encoder) or causal (decoder/LM).

    Keys farther than the current maximum span plus ramp are never scored: training and full-sequence
    inference use banded block computation, decoding keeps a cache of at most that many keys (or ``attn_span``
    keys with ``adapt_span_cache=False``). When every head's span covers the whole input the mask is all ones
    and the fused SDPA kernel runs.

    Example::

        >>> import torch
        >>> from fluence_fairseq import FSAdaptiveSpanAttention
        >>> attn = FSAdaptiveSpanAttention(512, 8, attn_span=256, causal=True)
        >>> x = torch.randn(100, 2, 512)                      # (length, batch, dim)
        >>> out, _ = attn(x, x, x, need_weights=False)
        >>> loss = attn.adaptive_span.get_loss()              # add to the training loss
    """

    decoding_state = "K/V cache of at most the current max span + ramp"

    supported_patterns = frozenset({(False, False), (False, True)})
    #: score heads in groups of similar span (:func:`head_groups`); False scores every head over the widest head's
    #: band, as the references do (``benchmarks.span_groups`` compares the two)
    group_heads: bool = True

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        *,
        attn_span: int = 1024,
        adapt_span_loss_coeff: float = 2e-6,
        adapt_span_ramp: int = 32,
        adapt_span_init: float = 0.0,
        adapt_span_cache: bool = True,
        block_size: Optional[int] = None,
        bs: Optional[int] = None,
        mask_size=None,
        **kwargs,
    ):
        super().__init__(embed_dim, num_heads, dropout=dropout, **kwargs)
        self.adaptive_span = AdaptiveSpan(
            attn_span, adapt_span_loss_coeff, adapt_span_ramp, adapt_span_init, adapt_span_cache, num_heads,
            causal=self.causal,
        )
        self.block_size = block_size

    def head_windows(self, ratios: Optional[list] = None) -> list:
        """Keys per query each head's span reaches, the query itself included: distances ``0 .. floor(z S) + R``
        (clipped to attn_span). The farthest of them has mask 0 when ``z S`` is a whole number, but its gradient
        moves the span (see :meth:`AdaptiveSpan.log_mask`). ``ratios``: the span ratios as a list, if already read."""
        span = self.adaptive_span
        ratios = span.ratios().tolist() if ratios is None else ratios
        return [min(span.attn_span, math.floor(z * span.attn_span + span.ramp) + 1) for z in ratios]

    def window(self) -> int:
        """Keys per query the widest head's span reaches (see :meth:`head_windows`)."""
        return max(self.head_windows())

    def max_cached_keys(self) -> Optional[int]:
        return self.window() if self.adaptive_span.cache else self.adaptive_span.attn_span

    def attend(self, q, k, v, *, key_padding_mask, attn_mask, query_offset, need_weights):
        ratios = self.adaptive_span.ratios().tolist()  # read once per call (one host sync)
        reaches = [w - 1 for w in self.head_windows(ratios)]  # largest distance with a nonzero mask, per head
        # the keys a query can reach at all: the segment's earlier positions and the memory before it
        reachable = max(query_offset + q.size(2) - 1, k.size(2) - 1 - query_offset)
        if need_weights or not self.group_heads:
            groups = [list(range(self.num_heads))]
        else:
            groups = head_groups(reaches, reachable)
        if len(groups) == 1:
            return self._attend_heads(q, k, v, groups[0], ratios, reaches, reachable, key_padding_mask, attn_mask,
                                      query_offset, need_weights)
        outs = [self._attend_heads(_heads(q, g), _heads(k, g), _heads(v, g), g, ratios, reaches, reachable,
                                   key_padding_mask, attn_mask, query_offset, False)[0] for g in groups]
        order = [h for g in groups for h in g]
        out = torch.cat(outs, dim=1)
        if order != sorted(order):
            out = out.index_select(1, torch.tensor(order, device=out.device).argsort())
        return out, None

    def _attend_heads(self, q, k, v, heads, ratios, reaches, reachable, key_padding_mask, attn_mask, query_offset,
                      need_weights):
        """Band attention of the heads ``heads`` (q, k, v hold just those) over the band of the widest of them."""
        span = self.adaptive_span
        reach = max(reaches[h] for h in heads)
        # every allowed key has mask 1 when the smallest span reaches the farthest key: skip the bias
        saturated = min(ratios[h] for h in heads) * span.attn_span > min(reach, reachable)  # strictly: m = 1
        # without a gradient to pass (evaluation, decoding), the mask's values are read from a table
        graded = torch.is_grad_enabled() and span.current_val.requires_grad
        lookup = lambda rel: span.log_mask_lookup(rel, ratios)  # noqa: E731  (the values this call read once)
        bias = self.relative_bias(None if saturated else (span.log_mask if graded else lookup))
        if bias is not None and len(heads) < self.num_heads:
            full, index = bias, torch.tensor(heads, device=q.device)
            bias = lambda rel: full(rel).index_select(0, index)  # noqa: E731
        return band_attention(
            q, k, v, query_offset=query_offset, left=reach, right=0 if self.causal else reach,
            rel_bias=bias, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
            dropout_p=self.dropout_module.p if self.training else 0.0,
            need_weights=need_weights, block_size=self.block_size,
        )

    def get_loss(self) -> Tensor:
        return self.adaptive_span.get_loss()

    def aux_losses(self):
        return {"span_loss": self.adaptive_span.get_loss()}

    def stats(self):
        span = self.adaptive_span
        return {"span_avg": Statistic(span.get_current_avg_span(), digits=1),
                "span_max": Statistic(span.get_current_max_span(), reduce="max", digits=1)}


@fsmha
class FSAdaptiveSpanAttention(AdaptiveSpanAttention):
    pass


ATTENTION_SPEC = AttentionSpec(
    "adaptive_span", FSAdaptiveSpanAttention,
    (
        AttentionOption("attn_span", IntRange(1, meaning="tokens"), help="maximum attention span S in tokens"),
        AttentionOption("adapt_span_loss_coeff", FloatRange(0.0), help="span loss weight: loss += coeff * S * mean(z)"),
        AttentionOption("adapt_span_ramp", IntRange(1, meaning="tokens, at most --attn-span"), help="length R of the soft ramp at the span edge, in tokens"),
        AttentionOption("adapt_span_init", FloatRange(0.0, 1.0, meaning="a fraction of --attn-span"), help="initial span of every head as a fraction of S, in [0, 1]"),
        AttentionOption("adapt_span_cache", Boolean(), help="decoding caches keep only the current max span (true) or all S keys (false)"),
    ),
    "adaptive attention span (Sukhbaatar et al. 2019); noncausal and causal self attention",
    tiny={"attn_span": 32, "adapt_span_ramp": 8},
    family="adaptive",
)


# the names before 0.2, kept for code that imports them
FSAdaptiveSpan = FSAdaptiveSpanAttention
