"""What the attention registry knows of one attention: its FS class and its constructor options.

Each attention module defines ``ATTENTION_SPEC = AttentionSpec(...)``; :mod:`.registry` collects them.
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Tuple

from .attention_base import FluenceAttention


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
    #: option overrides for the ``*_tiny`` test architectures (short test sequences must still exercise the method)
    tiny: Mapping[str, Any] = field(default_factory=dict)

    def build(self, embed_dim: int, num_heads: int, dropout: float = 0.0, **kwargs) -> FluenceAttention:
        return self.cls(embed_dim, num_heads, dropout=dropout, **kwargs)


def parse_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes", "y", "on"):
        return True
    if str(value).lower() in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {value!r}")


def check_int(name: str, value, minimum: int = 1, meaning: str = "") -> int:
    """Refuse anything but an integer >= ``minimum`` (bools too), saying what the option means."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = f" ({meaning})" if meaning else ""
        raise ValueError(f"{name} must be an integer >= {minimum}{what}, got {value!r}")
    return value
