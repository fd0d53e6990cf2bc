"""LARA, linear randomized attention (Zheng et al., 2022), with segment-mean proposals over the real tokens."""
from ..ops.landmarks import lara_attention
from .attention_base import fsmha
from .landmarks import LandmarkAttention
from ..flag_types import IntRange
from .spec import AttentionOption, AttentionSpec

__all__ = ["LaraAttention", "FSLaraAttention", "Lara", "FSLara"]


class LaraAttention(LandmarkAttention):
    """Linear randomized attention (Zheng et al., 2022, "Linear Complexity Randomized Self-attention Mechanism"),
    noncausal self only.

    A self-normalised importance-sampling estimate of softmax attention with ``c = num_landmarks`` proposals.
    Proposal ``c`` is centred on ``mu_c = q~_c + k~_c`` (segment means of queries and keys); its sample is
    ``w_c = mu_c + eps`` with ``eps ~ N(0, I)`` in training (the global RNG) and ``w_c = mu_c`` in eval
    (deterministic). With ``log phi(x, w) = s w.x - s |x|^2 / 2`` and ``s = head_dim^-1/2``::

        kv_c       = sum_j softmax_j(log phi(k_j, w_c)) v_j
        log r_{c,n} = s mu_c.q_n + log phi(q_n, w_c) + logsumexp_j log phi(k_j, w_c) - log phi(mu_c, w_c)
        out_n      = sum_c softmax_c(log r_{c,n}) kv_c

    O(L c d) time and memory per head. Landmarks average over future tokens and pair query and key segments,
    so only noncausal self attention is supported; nothing is cached for decoding.

    Padding: a token's segment follows from its rank among the real tokens of its sequence (Nyströmformer's
    segmentation), padded keys are excluded from every softmax over keys, so left, right and no padding give the
    same outputs. A sequence with at most ``num_landmarks`` real tokens gets exact softmax attention (each
    proposal would hold a single token).

    Differences from the reference (CAB ``Lara``): landmarks leave padded tokens out, each sequence's padding
    mask applies to its own heads (the reference's mask had the heads in another order), the short-sequence
    fallback is exact softmax, and an arbitrary ``attn_mask`` is refused. The math is otherwise the reference's (segment
    means, no antithetic sampling, no ``use_opt_approx``). ``dropout`` is accepted for the common interface and,
    as in the reference, not applied. ``need_head_weights=True`` returns the implied weights
    ``sum_c r_{c,n} softmax_j(log phi(k_j, w_c))``, O(L^2).

    Args:
        num_landmarks: number of proposals (segment means) c.

    Example::

        >>> import torch
        >>> from fluence_fairseq import FSLaraAttention
        >>> attn = FSLaraAttention(512, 8, num_landmarks=16).eval()           # eval: deterministic proposals
        >>> x = torch.randn(100, 2, 512)                              # (length, batch, dim)
        >>> out, _ = attn(x, x, x, need_weights=False)
        >>> out.shape
        torch.Size([100, 2, 512])
    """

    def attend(self, q, k, v, *, key_padding_mask, attn_mask, query_offset, need_weights):
        return lara_attention(
            q, k, v, num_landmarks=self.num_landmarks, noise=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, reuse_inputs=self.heads_exclusive,
        )



@fsmha
class FSLaraAttention(LaraAttention):
    """:class:`LaraAttention` accepting fairseq's ``MultiheadAttention`` constructor keywords."""

    pass


ATTENTION_SPEC = AttentionSpec(
    "lara", FSLaraAttention,
    (AttentionOption("num_landmarks", IntRange(1), help="number of segment-mean landmarks"),),
    "LARA, linear randomized attention (Zheng et al. 2022); noncausal self attention only",
    tiny={"num_landmarks": 4},
)


# the names before 0.2, kept for code that imports them
Lara = LaraAttention
FSLara = FSLaraAttention
