"""Exact softmax attention on the fluence base: the baseline every other attention is compared with."""
import torch

from ..ops.band import band_attention
from ..ops.pruned_attention import PrunedPlan, pruned_attention
from .attention_base import FluenceAttention, fsmha
from ..pruning.masks import roll_rows
from .spec import AttentionSpec

__all__ = ["SoftmaxAttention", "FSSoftmaxAttention", "FSSoftmax"]


class SoftmaxAttention(FluenceAttention):
    """Standard scaled dot-product attention in all four patterns.

    Uses ``torch.nn.functional.scaled_dot_product_attention`` unless weights are requested, or attention
    dropout on the CPU for a long input (query blocks that keep no (L, L) tensor,
    :mod:`~fluence_fairseq.ops.softmax_dropout`).

    Example::

        >>> import torch
        >>> from fluence_fairseq import FSSoftmaxAttention
        >>> attn = FSSoftmaxAttention(512, 8, causal=True)
        >>> x = torch.randn(10, 2, 512)                       # (length, batch, dim)
        >>> out, weights = attn(x, x, x)                      # weights: (batch, length, length)
    """

    weights_by_default = True  # fairseq's MultiheadAttention contract: need_weights returns the weights
    shares_source = True  # each query row on its own, no query position without ALiBi (see FluenceAttention)

    def attend(self, q, k, v, *, key_padding_mask, attn_mask, query_offset, need_weights):
        return band_attention(
            q, k, v, query_offset=query_offset, right=0 if self.causal else None, rel_bias=self.relative_bias(),
            key_padding_mask=key_padding_mask, attn_mask=attn_mask,
            dropout_p=self.dropout_module.p if self.training else 0.0, need_weights=need_weights,
            average_heads=self.head_average_weights,
        )

    def attend_pruned(self, q, k, v, *, key_padding_mask, attn_mask, query_offset, query_start, key_start,
                      need_weights):
        """Global-mask pruning with a block-sparse kernel: pruned blocks are never computed.

        The kernel needs one mask for the whole batch, so left-padded rows are first rolled into right-padded
        ones (their positions then start at index 0) and the results rolled back. Calls the kernel cannot serve
        (an extra ``attn_mask``, or queries of one batch at different positions) take the base's masked path."""
        bsz, _, tgt_len, _ = q.shape
        src_len = k.size(2)
        shift = -key_start  # leading padding of every row
        if self.cross:
            q_shift = torch.zeros_like(shift)
        elif tgt_len == src_len or not bool(shift.any()):
            q_shift = shift
        else:
            q_shift = None
        starts = None if q_shift is None else query_start + q_shift
        mask = self.global_mask
        block = mask.block
        short = tgt_len <= block or src_len <= block  # one block (or a decoding step): the masked path is cheaper
        if (short or attn_mask is not None or starts is None or self.relative_bias() is not None or bool((starts != starts[0]).any())
                or bool((shift < 0).any())):
            return super().attend_pruned(q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                         query_offset=query_offset, query_start=query_start, key_start=key_start,
                                         need_weights=need_weights)
        start = int(starts[0])

        def build():
            keep = mask.shared(start, tgt_len, src_len).to(q.device)
            if self.causal:
                keep = keep & (torch.arange(src_len, device=keep.device)
                               <= torch.arange(tgt_len, device=keep.device).view(-1, 1) + start)
            return PrunedPlan(keep, block, tune=True)  # the path is measured at its first call

        plan = mask.layout((start, tgt_len, src_len, self.causal, q.device), build)
        rolled = bool(shift.any())
        if rolled:
            k, v = roll_rows(k, shift, 2), roll_rows(v, shift, 2)
            key_padding_mask = roll_rows(key_padding_mask, shift, 1)
            q = roll_rows(q, q_shift, 2)
        out, weights = pruned_attention(
            q, k, v, plan.keep, key_padding_mask=key_padding_mask,
            dropout_p=self.dropout_module.p if self.training else 0.0, need_weights=need_weights, plan=plan,
            block=block,
        )
        if rolled:
            out = roll_rows(out, -q_shift, 2)
            if weights is not None:
                weights = roll_rows(roll_rows(weights, -q_shift, 2), -shift, 3)
        return out, weights


@fsmha
class FSSoftmaxAttention(SoftmaxAttention):
    pass


ATTENTION_SPEC = AttentionSpec("softmax", FSSoftmaxAttention, (), "exact softmax attention (baseline)", family="baseline")


# the names before 0.2, kept for code that imports them
FSSoftmax = FSSoftmaxAttention
