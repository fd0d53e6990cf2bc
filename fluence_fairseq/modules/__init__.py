"""Attention modules: the fairseq glue (:mod:`.attention_base`), one module per attention, and the registry.

Every attention module lists its public classes in ``__all__`` (a plain class, its ``@fsmha`` ``FS*`` class and
any older names kept as aliases) and defines ``ATTENTION_SPEC`` (or ``ATTENTION_SPECS``); :mod:`.registry`
discovers those modules, and their ``__all__`` is re-exported here and from ``fluence_fairseq``.
"""
from .attention_base import (
    ALL_PATTERNS,
    PATTERNS,
    FluenceAttention,
    Statistic,
    UnsupportedPatternError,
    fsmha,
)
from .registry import (
    ATTENTIONS,
    AttentionOption,
    AttentionSpec,
    attention_modules,
    discover,
    get_attention,
    on_register,
    register_attention,
)

__all__ = [
    "ALL_PATTERNS", "PATTERNS", "FluenceAttention", "Statistic", "UnsupportedPatternError", "fsmha",
    "ATTENTIONS", "AttentionOption", "AttentionSpec", "get_attention", "on_register", "register_attention",
]
discover()
for _module in attention_modules():
    for _name in _module.__all__:
        globals()[_name] = getattr(_module, _name)
    __all__ += list(_module.__all__)
