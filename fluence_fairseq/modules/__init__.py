"""Attention modules: the fairseq glue (:mod:`.attention_base`), one module per attention, and the registry.

Every attention module lists its public classes in ``__all__`` (a plain class and its ``@fsmha`` ``FS*`` class)
and defines ``ATTENTION_SPEC`` for :mod:`.registry`; both are re-exported here and from ``fluence_fairseq``.
"""
from .attention_base import (
    ALL_PATTERNS,
    PATTERNS,
    FluenceAttention,
    UnsupportedPatternError,
    fsmha,
)
from .registry import ATTENTIONS, AttentionOption, AttentionSpec, get_attention, register_attention
from .registry import _import_attention_modules

__all__ = [
    "ALL_PATTERNS", "PATTERNS", "FluenceAttention", "UnsupportedPatternError", "fsmha",
    "ATTENTIONS", "AttentionOption", "AttentionSpec", "get_attention", "register_attention",
]
for _module in _import_attention_modules():
    for _name in _module.__all__:
        globals()[_name] = getattr(_module, _name)
    __all__ += list(_module.__all__)
