"""Exact softmax attention on the fluence base: the baseline every other attention is compared with."""
from ..ops.band import band_attention
from .attention_base import FluenceAttention, fsmha
from .spec import AttentionSpec

__all__ = ["SoftmaxAttention", "FSSoftmax"]


class SoftmaxAttention(FluenceAttention):
    """Standard scaled dot-product attention in all four patterns.

    Uses ``torch.nn.functional.scaled_dot_product_attention`` unless weights are requested.

    Example::

        >>> import torch
        >>> from fluence_fairseq import FSSoftmax
        >>> attn = FSSoftmax(512, 8, causal=True)
        >>> x = torch.randn(10, 2, 512)                       # (length, batch, dim)
        >>> out, weights = attn(x, x, x)                      # weights: (batch, length, length)
    """

    def attend(self, q, k, v, *, key_padding_mask, attn_mask, query_offset, need_weights):
        return band_attention(
            q, k, v, query_offset=query_offset, right=0 if self.causal else None,
            key_padding_mask=key_padding_mask, attn_mask=attn_mask,
            dropout_p=self.dropout_module.p if self.training else 0.0, need_weights=need_weights,
        )


@fsmha
class FSSoftmax(SoftmaxAttention):
    pass


ATTENTION_SPEC = AttentionSpec("softmax", FSSoftmax, (), "exact softmax attention (baseline)")
