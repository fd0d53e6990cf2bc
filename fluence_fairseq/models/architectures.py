"""Named architectures (``--arch``), all from one table.

Each :class:`Architecture` row names the model, the attention of every sublayer role and default overrides
(sizes, attention options). :func:`register_architecture` turns a row into a fairseq arch function that, for every
value still missing from the args (not given on the command line, or absent from an old checkpoint):

1. sets the row's attention choices and overrides,
2. sets the registry defaults of the chosen attentions' options,
3. runs fairseq's base architecture (``transformer`` or ``transformer_lm`` defaults).

To add an architecture, append a row to :data:`ARCHITECTURES` (or call :func:`register_architecture` from your
own code), e.g.::

    Architecture("transformer_performer", ENC_DEC, enc_dec("performer", "performer"))
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping

from fairseq.models import ARCH_MODEL_NAME_REGISTRY, MODEL_REGISTRY, register_model_architecture
from fairseq.models.transformer.transformer_legacy import base_architecture as transformer_base_architecture
from fairseq.models.transformer_lm import base_lm_architecture
from fairseq.utils import safe_getattr

from ..modules.registry import AttentionSpec, on_register
from .attention_args import DECODER_CROSS, DECODER_SELF, ENCODER_SELF, fill_attention_defaults
from .encoder_decoder import FluenceTransformerModel  # noqa: F401  (registers the model)
from .language_model import FluenceTransformerLanguageModel  # noqa: F401

ENC_DEC = "fluence_transformer"
LM = "fluence_transformer_lm"

#: fairseq's defaults applied after a row's own, per model
BASE_ARCHITECTURES: Dict[str, Callable] = {
    ENC_DEC: transformer_base_architecture,
    LM: base_lm_architecture,
}


@dataclass(frozen=True)
class Architecture:
    name: str  # the --arch name
    model: str  # a registered fluence model: ENC_DEC or LM
    attention: Mapping[str, str]  # role (e.g. "decoder_self_attention") -> attention registry name
    defaults: Mapping[str, Any] = field(default_factory=dict)  # flat arg name -> default
    doc: str = ""

    @property
    def for_tests(self) -> bool:
        """``*_tiny`` architectures exist for the test suite: registered, but left out of user-facing lists."""
        return self.name.endswith("_tiny")


def user_architectures() -> List["Architecture"]:
    """The architectures users see (help, docs): every registered one but the ``*_tiny`` test sizes."""
    return [arch for arch in ARCHITECTURES if not arch.for_tests]


def enc_dec(encoder_self: str, decoder_self: str, cross: str = "softmax") -> Dict[str, str]:
    return {ENCODER_SELF.attr: encoder_self, DECODER_SELF.attr: decoder_self, DECODER_CROSS.attr: cross}


def lm(decoder_self: str) -> Dict[str, str]:
    return {DECODER_SELF.attr: decoder_self}


def sizes(layers: int, dim: int, heads: int, ffn: int, sides=("encoder", "decoder")) -> Dict[str, int]:
    out = {}
    for side in sides:
        out.update({f"{side}_layers": layers, f"{side}_embed_dim": dim, f"{side}_attention_heads": heads,
                    f"{side}_ffn_embed_dim": ffn})
    return out


def lm_sizes(layers: int, dim: int, heads: int, ffn: int) -> Dict[str, int]:
    return sizes(layers, dim, heads, ffn, sides=("decoder",))


# Tiny spans for the tiny archs: test sequences are short, and a span of 32 with a ramp of 8 keeps the span mask
# (and the banded computation) active on them.
_TINY_SPAN = {"attn_span": 32, "adapt_span_ramp": 8}

ARCHITECTURES: List[Architecture] = [
    # baselines: the same model code with exact softmax everywhere
    Architecture("fluence_transformer", ENC_DEC, enc_dec("softmax", "softmax"),
                 doc="transformer base sizes, softmax attention"),
    Architecture("fluence_transformer_small", ENC_DEC, enc_dec("softmax", "softmax"), sizes(3, 256, 4, 1024),
                 doc="3+3 layers, 256, 4 heads, ffn 1024; softmax attention (baseline of the _small archs)"),
    Architecture("fluence_transformer_lm", LM, lm("softmax"), doc="transformer_lm base sizes, softmax attention"),
    Architecture("fluence_transformer_tiny", ENC_DEC, enc_dec("softmax", "softmax"), sizes(2, 64, 4, 128),
                 doc="2+2 layers, 64, 4 heads, ffn 128; softmax attention, for tests"),
    Architecture("fluence_transformer_lm_tiny", LM, lm("softmax"), lm_sizes(2, 64, 4, 128),
                 doc="2 layers, 64, 4 heads, ffn 128; softmax attention, for tests"),
    # adaptive attention span (Sukhbaatar et al., 2019)
    Architecture("transformer_adaptive_span", ENC_DEC, enc_dec("adaptive_span", "adaptive_span"),
                 doc="transformer base sizes (6+6 layers, 512, 8 heads, ffn 2048); adaptive span self attention"),
    Architecture("transformer_adaptive_span_small", ENC_DEC, enc_dec("adaptive_span", "adaptive_span"),
                 sizes(3, 256, 4, 1024), doc="3+3 layers, 256, 4 heads, ffn 1024"),
    Architecture("transformer_adaptive_span_tiny", ENC_DEC, enc_dec("adaptive_span", "adaptive_span"),
                 {**sizes(2, 64, 4, 128), **_TINY_SPAN}, doc="2+2 layers, 64, 4 heads, ffn 128; for tests"),
    Architecture("transformer_lm_adaptive_span", LM, lm("adaptive_span"),
                 {**lm_sizes(8, 256, 4, 1024), "attn_span": 1024, "adapt_span_loss_coeff": 2e-6, "dropout": 0.0},
                 doc="the paper's enwik8 small character LM: 8 layers, 256, 4 heads, ffn 1024, span 1024"),
    Architecture("transformer_lm_adaptive_span_small", LM, lm("adaptive_span"),
                 {**lm_sizes(4, 256, 4, 1024), "attn_span": 512},
                 doc="4 layers, 256, 4 heads, ffn 1024, span 512"),
    Architecture("transformer_lm_adaptive_span_tiny", LM, lm("adaptive_span"),
                 {**lm_sizes(2, 64, 4, 128), **_TINY_SPAN}, doc="2 layers, 64, 4 heads, ffn 128; for tests"),
]


# ------------------------------------------------------------------ one family per efficient attention
#: attentions whose architectures are written out by hand above
_HANDWRITTEN = frozenset({"softmax", "adaptive_span"})


def where_supported(spec: AttentionSpec, fallback: str = "softmax") -> Dict[str, str]:
    """The encoder-decoder roles: ``spec`` wherever its math supports the role's pattern, ``fallback`` elsewhere."""
    patterns = spec.cls.supported_patterns
    return {role.attr: spec.name if role.pattern in patterns else fallback
            for role in (ENCODER_SELF, DECODER_SELF, DECODER_CROSS)}


def family(spec: AttentionSpec) -> List[Architecture]:
    """``transformer_<name>`` (base sizes), ``_small`` and ``_tiny`` (tests), plus ``transformer_lm_<name>`` and
    ``transformer_lm_<name>_tiny`` when the attention can be a causal self attention."""
    roles = where_supported(spec)
    uses = ", ".join(role.replace("_attention", "").replace("_", " ") for role, name in roles.items()
                     if name == spec.name)
    rows = [
        Architecture(f"transformer_{spec.name}", ENC_DEC, roles,
                     doc=f"transformer base sizes; {spec.name} in {uses}, softmax elsewhere"),
        Architecture(f"transformer_{spec.name}_small", ENC_DEC, roles, sizes(3, 256, 4, 1024),
                     doc="3+3 layers, 256, 4 heads, ffn 1024"),
        Architecture(f"transformer_{spec.name}_tiny", ENC_DEC, roles, {**sizes(2, 64, 4, 128), **spec.tiny},
                     doc="2+2 layers, 64, 4 heads, ffn 128; for tests"),
    ]
    if DECODER_SELF.pattern in spec.cls.supported_patterns:
        rows += [
            Architecture(f"transformer_lm_{spec.name}", LM, lm(spec.name), doc="transformer_lm base sizes"),
            Architecture(f"transformer_lm_{spec.name}_tiny", LM, lm(spec.name),
                         {**lm_sizes(2, 64, 4, 128), **spec.tiny}, doc="2 layers, 64, 4 heads, ffn 128; for tests"),
        ]
    return rows




def _arch_function(arch: Architecture) -> Callable:
    roles = MODEL_REGISTRY[arch.model].ATTENTION_ROLES
    unknown = set(arch.attention) - {r.attr for r in roles}
    if unknown:
        raise ValueError(f"architecture {arch.name!r}: model {arch.model!r} has no attention role {sorted(unknown)}")

    def apply(args):
        for key, value in {**arch.attention, **arch.defaults}.items():
            if safe_getattr(args, key, None) is None:
                setattr(args, key, value)
        fill_attention_defaults(args, roles)
        BASE_ARCHITECTURES[arch.model](args)

    apply.__name__ = arch.name
    apply.__qualname__ = arch.name
    apply.__doc__ = f"--arch {arch.name} ({arch.model}): {arch.doc}".strip()
    return apply


def register_architecture(arch: Architecture) -> Callable:
    """Register one row as a fairseq ``--arch`` (idempotent for the same row and model)."""
    if arch.model not in BASE_ARCHITECTURES:
        raise ValueError(f"architecture {arch.name!r}: unknown model {arch.model!r}; use one of "
                         f"{sorted(BASE_ARCHITECTURES)}")
    fn = _arch_function(arch)
    if ARCH_MODEL_NAME_REGISTRY.get(arch.name) == arch.model:
        return fn  # this module was imported again: fairseq already knows the arch
    register_model_architecture(arch.model, arch.name)(fn)
    if arch not in ARCHITECTURES:
        ARCHITECTURES.append(arch)
    return fn


def markdown_table(rows: List[Architecture] = None) -> str:
    """The architecture table as Markdown (for the docs and ``fluence-help``; the test sizes are left out)."""
    lines = ["| --arch | model | attention | option defaults | description |", "|---|---|---|---|---|"]
    size_keys = {"layers", "embed_dim", "attention_heads", "ffn_embed_dim"}
    for arch in user_architectures() if rows is None else rows:
        attention = ", ".join(f"{role.replace('_attention', '')}={name}" for role, name in arch.attention.items())
        options = ", ".join(f"{k}={v}" for k, v in arch.defaults.items()
                            if k.split("_", 1)[-1] not in size_keys) or "-"
        lines.append(f"| `{arch.name}` | `{arch.model}` | {attention} | {options} | {arch.doc} |")
    return "\n".join(lines)


def _register_family(spec: AttentionSpec) -> None:
    if spec.name not in _HANDWRITTEN:
        for arch in family(spec):
            register_architecture(arch)


for _arch in list(ARCHITECTURES):
    register_architecture(_arch)
# every attention of the registry, also one registered later, gets its family of --arch names
on_register(_register_family)
