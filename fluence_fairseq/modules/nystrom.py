"""Nyströmformer attention (Xiong et al., 2021) with segment-mean landmarks over the real tokens."""
import torch.nn.functional as F
from torch import nn

from ..ops.landmarks import nystrom_attention
from .attention_base import fsmha
from .landmarks import LandmarkAttention
from ..flag_types import IntRange, OddOrOff
from .spec import AttentionOption, AttentionSpec, check_int

__all__ = ["NystromAttention", "FSNystromAttention"]



class NystromAttention(LandmarkAttention):
    """Nyström approximation of softmax attention (Xiong et al., 2021, "Nyströmformer"), noncausal self only.

    With ``m = num_landmarks`` segment means ``Q~``, ``K~`` of the queries and keys and ``s = head_dim^-1/2``::

        out = softmax(Q K~^T s) . pinv(softmax(Q~ K~^T s)) . (softmax(Q~ K^T s) V)  [+ conv(V)]

    where ``pinv`` is the iterative Moore-Penrose approximation with ``pinv_iterations`` steps. Time and memory
    are O(L m d + m^3) per head. Landmarks average over future tokens, so only noncausal self attention is
    supported; nothing is cached for decoding.

    Landmarks are means over the real tokens only: a token's segment follows from its rank among the unpadded
    tokens of its sequence (Nyströmformer's segmentation when ``m`` does not divide the length), so left, right
    and no padding give the same outputs; padded keys are also excluded from the third kernel. A sequence with at
    most ``m`` real tokens gets exact softmax attention.

    Differences from the reference (CAB ``NystromAttention``, adapted from mlpen/Nystromformer), all fixes:

    * logits are scaled by ``head_dim^-1/2`` once; the reference divides both q and k by sqrt(d) (temperature 1/d);
    * the pinv's initial scaling ``1 / (||A||_1 ||A||_inf)`` is computed per sequence and head; the reference takes
      the maximum over the whole batch, so a sequence's output depended on the rest of its batch;
    * padded tokens are left out of the landmark means (the reference averages zeroed padded keys in), each
      sequence's padding mask applies to its own heads (the reference's mask had the heads in another order),
      and the short-sequence fallback is per sequence (the reference decides on the padded length);
    * ``pinv_iterations`` is an option (the reference fixes 6, its default here);
    * the optional depthwise convolution over V (``conv_kernel_size``, reference ``Conv2d(H, H, (k, 1))``) sees
      zeros at padded positions; an arbitrary ``attn_mask`` is refused (the kernels are never formed in full).

    ``dropout`` is accepted for the common interface and, as in the reference, not applied.
    ``need_head_weights=True`` returns the implied (not necessarily nonnegative) matrix ``kernel_1 pinv kernel_3``, O(L^2).

    Args:
        num_landmarks: number of segment-mean landmarks m.
        pinv_iterations: iterations of the pseudo-inverse approximation.
        conv_kernel_size: odd kernel length of the depthwise convolution over V added to the output; 0 = off.

    Example::

        >>> import torch
        >>> from fluence_fairseq import FSNystromAttention
        >>> attn = FSNystromAttention(512, 8, num_landmarks=16)
        >>> x = torch.randn(100, 2, 512)                              # (length, batch, dim)
        >>> pad = torch.zeros(2, 100, dtype=torch.bool); pad[1, 80:] = True
        >>> out, _ = attn(x, x, x, key_padding_mask=pad, need_weights=False)
        >>> out.shape
        torch.Size([100, 2, 512])
    """

    def __init__(
        self,
        embed_dim,
        num_heads,
        dropout=0.0,
        *,
        num_landmarks=16,
        pinv_iterations=6,
        conv_kernel_size=0,
        **kwargs,
    ):
        check_int("pinv_iterations", pinv_iterations,
                  meaning="iterations of the pseudo-inverse approximation; 6 is the reference's choice")
        check_int("conv_kernel_size", conv_kernel_size, 0, meaning="0 turns the convolution off")
        if conv_kernel_size and conv_kernel_size % 2 == 0:
            raise ValueError(
                f"conv_kernel_size must be odd so that the convolution is centred on each token, got "
                f"{conv_kernel_size}; use {conv_kernel_size + 1} or {conv_kernel_size - 1} (0 = off)"
            )
        super().__init__(embed_dim, num_heads, dropout=dropout, num_landmarks=num_landmarks, **kwargs)
        self.pinv_iterations = pinv_iterations
        self.conv_kernel_size = conv_kernel_size
        if conv_kernel_size:
            # one length-k filter per head, shared over the head's channels (the reference's Conv2d(H, H, (k, 1)))
            self.conv = nn.Conv2d(num_heads, num_heads, (conv_kernel_size, 1), padding=(conv_kernel_size // 2, 0),
                                  groups=num_heads, bias=False)
        else:
            self.conv = None

    def attend(self, q, k, v, *, key_padding_mask, attn_mask, query_offset, need_weights):
        out, weights = nystrom_attention(
            q, k, v, num_landmarks=self.num_landmarks, pinv_iterations=self.pinv_iterations,
            key_padding_mask=key_padding_mask, need_weights=need_weights,
        )
        if self.conv is not None:
            if key_padding_mask is not None:
                # padded values read as the zeros beyond the sequence's ends: left/right padding change nothing
                v = v.masked_fill(key_padding_mask[:, None, :, None], 0.0)
            out = out + F.conv2d(v, self.conv.weight, padding=self.conv.padding, groups=self.num_heads)
        return out, weights



@fsmha
class FSNystromAttention(NystromAttention):
    """:class:`NystromAttention` accepting fairseq's ``MultiheadAttention`` constructor keywords."""

    pass


ATTENTION_SPEC = AttentionSpec(
    "nystrom", FSNystromAttention,
    (
        AttentionOption("num_landmarks", IntRange(1), help="number of segment-mean landmarks"),
        AttentionOption("pinv_iterations", IntRange(1), help="iterations of Nystrom's Moore-Penrose pseudo-inverse"),
        AttentionOption("conv_kernel_size", OddOrOff(), help="odd kernel length of Nystrom's depthwise convolution over V (0 = off)"),
    ),
    "Nystromformer (Xiong et al. 2021): landmark Nystrom approximation; noncausal self attention only",
    tiny={"num_landmarks": 4},
)
