"""One table of the attentions fluence_fairseq offers, by name, filled by discovery.

Every module of this package that defines ``ATTENTION_SPEC`` (or a tuple ``ATTENTION_SPECS``) is imported and its
specs registered, baselines first and then in module-name order: adding an attention is adding a module, no list to edit. Code outside the
package registers its own with :func:`register_attention`. Whatever is built from the table follows it, also for
attentions registered later: the model flags (read when a parser is built), the ``--arch`` families (a listener
registered by :mod:`fluence_fairseq.models.architectures`), the benchmark presets and the docs' tables.
"""
import importlib
import pkgutil
from typing import Callable, Dict, List

from .spec import FAMILIES, AttentionOption, AttentionSpec, parse_bool  # noqa: F401  (re-exported)

ATTENTIONS: Dict[str, AttentionSpec] = {}
_LISTENERS: List[Callable[[AttentionSpec], None]] = []


def register_attention(spec: AttentionSpec) -> AttentionSpec:
    """Add ``spec`` to the table and tell every listener (e.g. the architecture table) about it."""
    if spec.name in ATTENTIONS:
        raise ValueError(f"attention {spec.name!r} is already registered (by {ATTENTIONS[spec.name].cls.__module__})")
    spec.check()
    ATTENTIONS[spec.name] = spec
    for listener in _LISTENERS:
        listener(spec)
    return spec


def on_register(listener: Callable[[AttentionSpec], None]) -> None:
    """Call ``listener(spec)`` for every attention registered so far and every one registered later."""
    _LISTENERS.append(listener)
    for spec in list(ATTENTIONS.values()):
        listener(spec)


def get_attention(name: str) -> AttentionSpec:
    try:
        return ATTENTIONS[name]
    except KeyError:
        raise ValueError(f"unknown attention {name!r}; choose from {sorted(ATTENTIONS)}") from None


def module_specs(module):
    """A module's ``ATTENTION_SPEC``, or its ``ATTENTION_SPECS`` when it defines several attentions (or none)."""
    specs = getattr(module, "ATTENTION_SPECS", None)
    if specs is not None:
        return tuple(specs)
    spec = getattr(module, "ATTENTION_SPEC", None)
    return () if spec is None else (spec,)


def attention_modules():
    """Every module of this package that defines attentions, imported, in name order."""
    found = []
    package = importlib.import_module(__package__)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.ispkg:
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        if module_specs(module):
            found.append(module)
    return found


def discover() -> None:
    """Register the specs of every attention module of this package (once), baselines first (see
    :data:`~.spec.FAMILIES`), then in module-name order."""
    specs = [spec for module in attention_modules() for spec in module_specs(module)]
    for spec in sorted(specs, key=lambda s: FAMILIES.index(s.family)):
        if ATTENTIONS.get(spec.name) is not spec:
            register_attention(spec)
