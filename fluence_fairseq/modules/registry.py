"""One table of the attentions fluence_fairseq offers, by name.

Each entry knows its class and its constructor options beyond ``embed_dim, num_heads, dropout, causal, cross``.
Models turn the options into ``--flags`` (``attn_span`` -> ``--attn-span``), the benchmark builds any entry by
name, and later attentions only add a row here.
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Tuple

from .adaptive_span import FSAdaptiveSpan
from .attention_base import FluenceAttention
from .softmax_attention import FSSoftmax


@dataclass(frozen=True)
class AttentionOption:
    name: str  # constructor keyword; the flag is --name-with-dashes
    type: Callable[[str], Any]
    default: Any
    help: str


@dataclass(frozen=True)
class AttentionSpec:
    name: str
    cls: type
    options: Tuple[AttentionOption, ...] = field(default_factory=tuple)
    doc: str = ""

    def build(self, embed_dim: int, num_heads: int, dropout: float = 0.0, **kwargs) -> FluenceAttention:
        return self.cls(embed_dim, num_heads, dropout=dropout, **kwargs)


def _bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes", "y", "on"):
        return True
    if str(value).lower() in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {value!r}")


ATTENTIONS: Dict[str, AttentionSpec] = {}


def register_attention(spec: AttentionSpec) -> AttentionSpec:
    if spec.name in ATTENTIONS:
        raise ValueError(f"attention {spec.name!r} is already registered")
    ATTENTIONS[spec.name] = spec
    return spec


def get_attention(name: str) -> AttentionSpec:
    try:
        return ATTENTIONS[name]
    except KeyError:
        raise ValueError(f"unknown attention {name!r}; choose from {sorted(ATTENTIONS)}") from None


register_attention(AttentionSpec("softmax", FSSoftmax, (), "exact softmax attention (baseline)"))
register_attention(AttentionSpec(
    "adaptive_span", FSAdaptiveSpan,
    (
        AttentionOption("attn_span", int, 1024, "maximum attention span S in tokens"),
        AttentionOption("adapt_span_loss_coeff", float, 2e-6, "span loss weight: loss += coeff * S * mean(z)"),
        AttentionOption("adapt_span_ramp", int, 32, "length R of the soft ramp at the span edge, in tokens"),
        AttentionOption("adapt_span_init", float, 0.0, "initial span of every head as a fraction of S, in [0, 1]"),
        AttentionOption("adapt_span_cache", _bool, True,
                        "decoding caches keep only the current max span (true) or all S keys (false)"),
    ),
    "adaptive attention span (Sukhbaatar et al. 2019); noncausal and causal self attention",
))
