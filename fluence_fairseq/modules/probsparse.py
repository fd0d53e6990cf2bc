"""ProbSparse self-attention (Informer; Zhou et al., 2021) on the fluence base, noncausal self and cross."""
from typing import Dict, Optional, Tuple

from torch import Tensor

from ..ops.probsparse import probsparse_attention, real_value_mean, sample_keys
from .attention_base import FluenceAttention, fsmha
from ..flag_types import IntRange
from .spec import AttentionOption, AttentionSpec, check_int

__all__ = ["ProbSparseAttention", "FSProbSparseAttention", "ProbSparse", "FSProbSparse"]


class ProbSparseAttention(FluenceAttention):
    """ProbSparse attention (Zhou et al., 2021, "Informer"): only the "active" queries attend.

    Per head, ``U = factor * ceil(ln S)`` keys are sampled (capped at S) and every query gets the sparsity score
    ``M(q) = max_s q.k_s - mean_s q.k_s`` over them; the ``u = factor * ceil(ln L)`` queries with the largest
    ``M`` (capped at L, at least one) get exact ``softmax(q K^T / sqrt(d)) V`` over all keys, every other query
    outputs the mean of the values. S and L are each sentence's real (unpadded) lengths. Cost O(L log L d) per
    head, no (L, S) matrix.

    Patterns: noncausal self and noncausal cross. Causal patterns are refused: choosing the top queries compares
    every query's score, and the lazy queries' output (the mean of all values) sees the future.

    Decoding (cross attention): :meth:`summarize_keys` caches, once per source sentence, the keys and values,
    the key sample (``probsparse_sample`` (B, H, U), ``probsparse_sample_size`` (B,)) and the mean of the real
    values (``probsparse_value_mean`` (B, H, 1, D)). Each decoding call applies the method to the queries of
    that call: the top-u choice is made among them, so a single query (fairseq's one token per step) always gets
    exact attention. A full pass over all target positions chooses among all of them instead, so step-by-step
    decoding differs from the full pass by construction; each step equals the full pass on that step's queries.
    In a full cross-attention pass, :meth:`attend` is not told which target positions are padding, so they
    count as real queries (they may take top-u slots; the base zeroes their outputs).

    Differences from the reference (CAB ``efficient-attention`` ``ProbSparse``):

    * the projections are the base's ``q_proj``/``k_proj``/``v_proj``/``out_proj`` (the reference calls them
      ``query_projection``/``key_projection``/``value_projection``/``out_projection``); ``d_keys``,
      ``d_values``, ``mix``, ``scale`` and ``output_attention`` are not offered (scale is 1/sqrt(head_dim));
    * eval is deterministic: the U keys are evenly strided over the real keys (ranks ``floor((t + 1/2) S / U)``
      among the real keys, so left, right and no padding give the same outputs); the reference draws new keys
      on the global RNG in every eval call. Training samples at random (global RNG);
    * one sample of U distinct keys per (sentence, head), shared by all its queries, so the scores are one
      (L, U) matmul; the reference draws U keys per query with replacement, a gather of (L, U, d) keys;
    * the mean in ``M`` divides by the number of sampled keys U (a sample mean); the reference divides the sum
      over the U sampled keys by S, which weighs the mean term by U/S;
    * ``key_padding_mask`` is honoured (the reference ignores it): padded keys are never sampled, attended or
      averaged, padded queries (self attention) are never selected, U and u come from the real lengths;
    * attention dropout is applied to the selected queries' probabilities in training (the reference builds
      the dropout module and never uses it);
    * noncausal cross attention is supported (the reference asserts it out).

    ``attn_mask`` is refused (``supports_attn_mask = False``). With ``need_head_weights=True`` the weights are the
    softmax rows of the selected queries and uniform rows over the real keys for the others (this forms the
    (L, S) matrix, so ask for it only when needed).

    Args:
        factor: the sampling factor c of U = c ceil(ln S) and u = c ceil(ln L) (positive int, default 5).

    Example::

        >>> import torch
        >>> from fluence_fairseq import FSProbSparseAttention
        >>> attn = FSProbSparseAttention(512, 8, factor=5).eval()
        >>> x = torch.randn(100, 2, 512)                      # (length, batch, dim)
        >>> out, _ = attn(x, x, x, need_weights=False)
        >>> out.shape
        torch.Size([100, 2, 512])
    """

    decoding_state = "cross: keys, values, the key sample and the value mean"
    keeps_output = False  # its backward does not read its output (see FluenceAttention.keeps_output)
    float32_math = True  # its top-k selection of queries flips on 16-bit rounding
    autocast_tolerance = 0.25  # bf16 projections can still change which queries are selected
    position_scheme = "none"  # noncausal only

    supported_patterns = frozenset({(False, False), (True, False)})
    #: cross decoding selects the top queries among each call's queries, so step-by-step decoding equals the
    #: full pass applied call by call (a single query always gets exact attention), not the whole target
    cross_decoding_per_call = True
    supports_attn_mask = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        *,
        factor: int = 5,
        **kwargs,
    ):
        check_int("factor", factor, 1, "U = factor * ceil(ln S) sampled keys, u = factor * ceil(ln L) selected "
                  "queries; the reference default is 5")
        super().__init__(embed_dim, num_heads, dropout=dropout, **kwargs)
        self.factor = factor

    def summarize_keys(self, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor]) -> Dict[str, Optional[Tensor]]:
        """The source as the method needs it: keys, values, the key sample and the mean of the real values."""
        bsz, heads, src_len, _ = k.shape
        sample, size = sample_keys(
            key_padding_mask, bsz, heads, src_len, self.factor, random=self.training, device=k.device
        )
        return {
            "prev_key": k, "prev_value": v, "prev_key_padding_mask": key_padding_mask,
            "probsparse_sample": sample, "probsparse_sample_size": size,
            "probsparse_value_mean": real_value_mean(v, key_padding_mask),
        }

    def attend_summary(self, q, summary, *, attn_mask, query_offset, need_weights):
        """The method on the queries of this call against a cached source (all of them count as real)."""
        return self._attend(q, summary, None, need_weights)

    def attend(self, q, k, v, *, key_padding_mask, attn_mask, query_offset, need_weights):
        # self attention: the queries are the keys, so the key padding is the query padding
        query_padding_mask = None if self.cross else key_padding_mask
        return self._attend(q, self.summarize_keys(k, v, key_padding_mask), query_padding_mask, need_weights)

    def _attend(self, q, summary, query_padding_mask, need_weights) -> Tuple[Tensor, Optional[Tensor]]:
        return probsparse_attention(
            q, summary["prev_key"], summary["prev_value"],
            sample=summary["probsparse_sample"], sample_size=summary["probsparse_sample_size"],
            key_padding_mask=summary.get("prev_key_padding_mask"), query_padding_mask=query_padding_mask,
            factor=self.factor, value_mean=summary["probsparse_value_mean"],
            dropout_p=self.dropout_module.p if self.training else 0.0, need_weights=need_weights,
        )



@fsmha
class FSProbSparseAttention(ProbSparseAttention):
    """:class:`ProbSparseAttention` accepting fairseq's attention keywords."""


ATTENTION_SPEC = AttentionSpec(
    "probsparse", FSProbSparseAttention,
    (AttentionOption("factor", IntRange(1), help="ProbSparse sampling factor c: c*ceil(ln S) sampled keys, "
                                       "c*ceil(ln L) queries with exact attention"),),
    "ProbSparse attention (Informer, Zhou et al. 2021); noncausal self and cross attention",
    tiny={"factor": 1},
    bench_time_bound=2.5,
)


# the names before 0.2, kept for code that imports them
ProbSparse = ProbSparseAttention
FSProbSparse = FSProbSparseAttention
