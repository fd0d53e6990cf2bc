"""What the attention registry knows of one attention: its FS class, its constructor options and its family.

Each attention module defines ``ATTENTION_SPEC = AttentionSpec(...)``; :mod:`.registry` discovers and collects
them. A hyper-parameter is declared once, in the constructor signature: an :class:`AttentionOption` names it,
gives its flag's type and help, and takes its default from the signature (:meth:`AttentionSpec.check` refuses an
option the constructor does not take, or a default that contradicts it).
"""
import inspect
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Tuple

from .attention_base import FluenceAttention

#: the families of attentions, in the order tables list them
FAMILIES = ("baseline", "adaptive", "sparse", "efficient")


class _FromConstructor:
    def __repr__(self) -> str:
        return "<the constructor's default>"


#: the default of an option that the constructor signature supplies
FROM_CONSTRUCTOR: Any = _FromConstructor()


@dataclass(frozen=True)
class AttentionOption:
    name: str  # constructor keyword; the flag is --name-with-dashes
    type: Callable[[str], Any]
    default: Any = FROM_CONSTRUCTOR
    help: str = ""


def constructor_defaults(cls: type) -> Mapping[str, Any]:
    """Keyword -> default of ``cls``'s constructor (through ``@fsmha``, which keeps the signature)."""
    params = inspect.signature(cls.__init__).parameters
    return {name: p.default for name, p in params.items()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and name != "self"}


@dataclass(frozen=True)
class AttentionSpec:
    name: str
    cls: type
    options: Tuple[AttentionOption, ...] = field(default_factory=tuple)
    doc: str = ""
    #: option overrides for the ``*_tiny`` test architectures and the contract suite (short test sequences must
    #: still exercise the method)
    tiny: Mapping[str, Any] = field(default_factory=dict)
    #: one of :data:`FAMILIES`: "efficient" attentions are in the efficient-attention benchmark presets
    family: str = "efficient"
    #: options of the efficient-attention benchmark at long lengths, and its time bound relative to the
    #: projections alone at L=8192
    bench_options: Mapping[str, Any] = field(default_factory=dict)
    bench_time_bound: float = 1.4

    def __post_init__(self):
        defaults = constructor_defaults(self.cls) if isinstance(self.cls, type) else {}
        options = tuple(replace(o, default=defaults[o.name]) if o.default is FROM_CONSTRUCTOR and o.name in defaults
                        else o for o in self.options)
        object.__setattr__(self, "options", options)

    def check(self) -> None:
        """Refuse a spec whose declarations disagree (run when it is registered)."""
        where = f"attention {self.name!r}"
        if not (isinstance(self.cls, type) and issubclass(self.cls, FluenceAttention)):
            raise TypeError(f"{where}: cls must be a FluenceAttention subclass, got {self.cls!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"{where}: family must be one of {FAMILIES}, got {self.family!r}")
        defaults = constructor_defaults(self.cls)
        for opt in self.options:
            if opt.name not in defaults:
                raise ValueError(f"{where}: option {opt.name!r} is not a keyword of {self.cls.__name__}.__init__")
            if opt.default is FROM_CONSTRUCTOR or defaults[opt.name] is inspect.Parameter.empty:
                raise ValueError(f"{where}: option {opt.name!r} needs a default in {self.cls.__name__}.__init__")
            if defaults[opt.name] != opt.default:
                raise ValueError(f"{where}: option {opt.name!r} defaults to {opt.default!r} in the spec but to "
                                 f"{defaults[opt.name]!r} in {self.cls.__name__}.__init__; declare it once, in "
                                 "the constructor")
        names = {o.name for o in self.options}
        for key in list(self.tiny) + list(self.bench_options):
            if key not in names:
                raise ValueError(f"{where}: tiny/bench option {key!r} is not one of its options {sorted(names)}")

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
