"""What the landmark attentions (Nyström, LARA) share; no attention of its own, so the registry skips it."""
from .attention_base import FluenceAttention
from .spec import check_int


class LandmarkAttention(FluenceAttention):
    """Base of the attentions that summarise the sequence by ``num_landmarks`` segment means.

    Landmarks average over future tokens and pair query and key segments, so only noncausal self attention is
    defined; an arbitrary ``attn_mask`` cannot be applied to segment means and is refused; nothing is cached for
    decoding."""

    decoding_state = "none (noncausal self only)"
    keeps_output = False  # its backward does not read its output (see FluenceAttention.keeps_output)
    position_scheme = "none"  # noncausal only
    supported_patterns = frozenset({(False, False)})
    supports_attn_mask = False

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, *, num_landmarks: int = 16, **kwargs):
        check_int("num_landmarks", num_landmarks, 1, "the number of segment-mean landmarks")
        super().__init__(embed_dim, num_heads, dropout=dropout, **kwargs)
        self.num_landmarks = num_landmarks
