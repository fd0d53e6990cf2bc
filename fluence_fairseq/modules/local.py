"""Local (sliding-window) attention (Luong et al., 2015) on the fluence base.

Each query attends only the keys within a fixed window of positions around it; everything else is exact
softmax attention. Work and memory are O(length * wsize) through the banded kernel of :mod:`..ops.band`.
"""
from typing import Optional

from ..ops.band import band_attention
from .attention_base import FluenceAttention, fsmha
from ..flag_types import IntRange
from .spec import AttentionOption, AttentionSpec, check_int

__all__ = ["LocalAttention", "FSLocalAttention"]


class LocalAttention(FluenceAttention):
    """Sliding-window softmax attention (Luong et al., 2015, "Effective Approaches to Attention-based Neural
    Machine Translation", local attention with a fixed window).

    * causal: query ``i`` attends keys ``j`` in ``[i - wsize + 1, i]`` (``wsize`` keys, itself included);
    * noncausal: keys ``j`` in ``[i - wsize, i + wsize]`` (``2 * wsize + 1`` keys).

    Patterns: noncausal and causal self attention. Cross attention is refused: a window is a range of positions
    of one sequence and means nothing across two.

    Decoding state: a sliding cache of the last ``wsize`` keys and values (``prev_key``/``prev_value``
    (B, H, <= wsize, Dh), ``prev_key_padding_mask`` (B, <= wsize)), so a step costs O(wsize) at any position.

    Differences from the CAB reference ``LocalAttention``:

    * the key padding mask is OR-ed with the window mask (the reference AND-ed them, so padded keys and clamped
      out-of-range duplicates of the first/last key were attended); outputs of real tokens do not depend on
      padding, left or right;
    * ``attn_mask`` is applied (additively, on top of the window) instead of being silently ignored;
    * the windows are never gathered into (L, W, Dh) copies of K and V: a blocked band kernel scores each block
      of queries against the keys its band reaches, and recomputes the probabilities in backward;
    * ``need_head_weights=True`` returns the (H, B, L, L) weights, zero outside the window, computed inside the
      band; a plain ``need_weights=True`` returns None (see ``weights_by_default``).

    Example::

        >>> import torch
        >>> from fluence_fairseq import FSLocalAttention
        >>> attn = FSLocalAttention(512, 8, wsize=15, causal=True)
        >>> x = torch.randn(100, 2, 512)                      # (length, batch, dim)
        >>> out, _ = attn(x, x, x, need_weights=False)
        >>> out.shape
        torch.Size([100, 2, 512])
    """

    decoding_state = "the last wsize keys/values"

    supported_patterns = frozenset({(False, False), (False, True)})

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        *,
        wsize: int = 15,
        **kwargs,
    ):
        check_int("wsize", wsize, 1, "the window: causal queries see the last wsize keys, noncausal ones wsize "
                  "keys on each side")
        super().__init__(embed_dim, num_heads, dropout=dropout, **kwargs)
        self.wsize = wsize

    def band(self):
        """(left, right): query at position p attends keys j with -right <= p - j <= left."""
        return (self.wsize - 1, 0) if self.causal else (self.wsize, self.wsize)

    def max_cached_keys(self) -> Optional[int]:
        return self.wsize

    def attend(self, q, k, v, *, key_padding_mask, attn_mask, query_offset, need_weights):
        left, right = self.band()
        return band_attention(
            q, k, v, query_offset=query_offset, left=left, right=right, rel_bias=self.relative_bias(),
            key_padding_mask=key_padding_mask, attn_mask=attn_mask,
            dropout_p=self.dropout_module.p if self.training else 0.0, need_weights=need_weights,
            reuse_buffers=self.heads_exclusive,  # a whole pass: backward runs once through it
        )



@fsmha
class FSLocalAttention(LocalAttention):
    """:class:`LocalAttention` accepting fairseq's MultiheadAttention constructor keywords."""


ATTENTION_SPEC = AttentionSpec(
    "local", FSLocalAttention,
    (AttentionOption("wsize", IntRange(1, meaning="tokens"), help="local attention window: causal queries see the last wsize keys (itself "
                                       "included), noncausal ones wsize keys on each side"),),
    "local sliding-window attention (Luong et al. 2015); noncausal and causal self attention",
    tiny={"wsize": 4},
)
