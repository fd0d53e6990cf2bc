"""One table of the attentions fluence_fairseq offers, by name.

Each entry knows its class and its constructor options beyond ``embed_dim, num_heads, dropout, causal, cross``.
Models turn the options into ``--flags`` (``attn_span`` -> ``--attn-span``), the benchmark builds any entry by
name. A new attention defines ``ATTENTION_SPEC`` (or a tuple ``ATTENTION_SPECS``) in its module and is listed in :data:`ATTENTION_MODULES`.
"""
import importlib
from typing import Dict

from .spec import AttentionOption, AttentionSpec, parse_bool  # noqa: F401  (re-exported)

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


#: the modules that define an ``ATTENTION_SPEC``, in the order the attentions are listed
ATTENTION_MODULES = (
    "softmax_attention", "adaptive_span", "local_attention", "abc_attention", "nystrom", "performer", "lara",
    "cosformer", "probsparse", "s4d", "long_short", "entmax_attention",
)


def _import_attention_modules():
    return [importlib.import_module(f"{__package__}.{name}") for name in ATTENTION_MODULES]


def module_specs(module):
    """A module's ``ATTENTION_SPEC``, or its ``ATTENTION_SPECS`` when it defines several attentions."""
    return getattr(module, "ATTENTION_SPECS", None) or (module.ATTENTION_SPEC,)


for _module in _import_attention_modules():
    for _spec in module_specs(_module):
        register_attention(_spec)
