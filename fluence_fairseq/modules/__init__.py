from .attention_base import (
    ALL_PATTERNS,
    PATTERNS,
    FluenceAttention,
    UnsupportedPatternError,
    fsmha,
)
from .softmax_attention import FSSoftmax, SoftmaxAttention
from .adaptive_span import AdaptiveSpan, AdaptiveSpanAttention, FSAdaptiveSpan

__all__ = [
    "ALL_PATTERNS", "PATTERNS", "FluenceAttention", "UnsupportedPatternError", "fsmha",
    "SoftmaxAttention", "FSSoftmax", "AdaptiveSpan", "AdaptiveSpanAttention", "FSAdaptiveSpan",
]
from .registry import ATTENTIONS, AttentionOption, AttentionSpec, get_attention, register_attention  # noqa: E402

__all__ += ["ATTENTIONS", "AttentionOption", "AttentionSpec", "get_attention", "register_attention"]
