"""The valid values of every flag the plugin adds, declared once and checked when the arguments are parsed.

A flag's ``type=`` is a :class:`Domain`: argparse calls it on the command-line string, and a value outside the
domain stops the command before anything is built, with argparse's one-line error naming the flag::

    fairseq-train: error: argument --attn-span: expected an integer >= 1, got '0'

The same object checks values that do not come through argparse (``--model-overrides``, the Python API) with
:meth:`Domain.check`, and tells the table-driven flag test (``tests/test_flags.py``) what to feed it
(:meth:`Domain.probes`): a value of the wrong type, values just outside the range, and the boundary values that
must be accepted. A new flag with a domain joins that test by itself.
"""
import argparse
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Optional, Sequence


@dataclass(frozen=True)
class Probes:
    wrong_type: Sequence[str]
    out_of_range: Sequence[str]
    boundary: Sequence[str]  # valid values at the edges of the domain


class Domain(ABC):
    """A set of valid flag values: ``domain("3")`` parses or raises ``argparse.ArgumentTypeError``."""

    @abstractmethod
    def describe(self) -> str:
        """The valid values in words, as the error message shows them."""

    @abstractmethod
    def convert(self, value) -> Any:
        """The value as this domain's type, or ``ValueError`` when it is not one."""

    def contains(self, value) -> bool:
        return True

    @abstractmethod
    def probes(self) -> Probes:
        """Values for the flag table: of the wrong type, just out of range, and valid at the edges."""

    def __call__(self, text):
        try:
            value = self.convert(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}") from None
        if not self.contains(value):
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}")
        return value

    def check(self, name: str, value):
        """``value`` (from a config, an override or Python) converted, or ``ValueError`` naming ``name``."""
        try:
            converted = self.convert(value)
        except (TypeError, ValueError):
            converted = None
        if converted is None or not self.contains(converted):
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")
        return converted

    def __eq__(self, other) -> bool:  # attentions that share an option share its flag only if the domains agree
        return type(other) is type(self) and vars(other) == vars(self)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted((k, repr(v)) for k, v in vars(self).items()))))

    @property
    def __name__(self) -> str:  # argparse names the type in some messages
        return type(self).__name__


def _number(lo, hi, lo_open, hi_open, kind):
    left = f"> {lo}" if lo_open else f">= {lo}"
    right = f"< {hi}" if hi_open else f"<= {hi}"
    if lo is not None and hi is not None:
        return f"{kind} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{kind} {left}"
    if hi is not None:
        return f"{kind} {right}"
    return kind


class IntRange(Domain):
    def __init__(self, lo: Optional[int] = None, hi: Optional[int] = None, *, meaning: str = "",
                 multiple_of: int = 1):
        self.lo, self.hi, self.meaning, self.multiple_of = lo, hi, meaning, multiple_of

    def describe(self) -> str:
        text = _number(self.lo, self.hi, False, False, "an integer")
        if self.multiple_of > 1:
            text += f" divisible by {self.multiple_of}"
        return text + (f" ({self.meaning})" if self.meaning else "")

    def convert(self, value) -> int:
        if isinstance(value, bool):
            raise ValueError(value)
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(value, int):
            return value
        return int(str(value).strip())

    def contains(self, value) -> bool:
        return ((self.lo is None or value >= self.lo) and (self.hi is None or value <= self.hi)
                and value % self.multiple_of == 0)

    def probes(self) -> Probes:
        out, edge = [], []
        step = self.multiple_of
        if self.lo is not None:
            first = -(-self.lo // step) * step
            out.append(str(first - step))
            edge.append(str(first))
        if self.hi is not None:
            last = (self.hi // step) * step
            out.append(str(last + step))
            edge.append(str(last))
        if step > 1:
            out.append(str((self.lo if self.lo is not None else 0) + step * 2 + 1))
        return Probes(wrong_type=["1.5", "ten"], out_of_range=out, boundary=edge)


class FloatRange(Domain):
    def __init__(self, lo: Optional[float] = None, hi: Optional[float] = None, *, lo_open=False, hi_open=False,
                 meaning: str = ""):
        self.lo, self.hi, self.lo_open, self.hi_open, self.meaning = lo, hi, lo_open, hi_open, meaning

    def describe(self) -> str:
        return _number(self.lo, self.hi, self.lo_open, self.hi_open, "a number") + (
            f" ({self.meaning})" if self.meaning else "")

    def convert(self, value) -> float:
        if isinstance(value, bool):
            raise ValueError(value)
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(value)
        return number

    def contains(self, value) -> bool:
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return False
        return True

    def probes(self) -> Probes:
        out, edge = [], []
        for bound, is_open, sign in ((self.lo, self.lo_open, -1), (self.hi, self.hi_open, 1)):
            if bound is None:
                continue
            if is_open:
                out.append(repr(float(bound)))
                edge.append(repr(bound - sign * 1e-3 * max(1.0, abs(bound))))
            else:
                out.append(repr(bound + sign * 1e-3 * max(1.0, abs(bound))))
                edge.append(repr(float(bound)))
        return Probes(wrong_type=["ten", "nan"], out_of_range=out, boundary=edge)


class Choice(Domain):
    """One of a few words (use argparse ``choices=`` where the value needs no conversion)."""

    def __init__(self, *values: str, meaning: str = ""):
        self.values, self.meaning = tuple(values), meaning

    def describe(self) -> str:
        return "one of " + ", ".join(self.values) + (f" ({self.meaning})" if self.meaning else "")

    def convert(self, value) -> str:
        if not isinstance(value, str):
            raise ValueError(value)
        return value.strip().lower()

    def contains(self, value) -> bool:
        return value in self.values

    def probes(self) -> Probes:
        return Probes(wrong_type=["3"], out_of_range=["nonsense"], boundary=list(self.values))


class Boolean(Domain):
    TRUE, FALSE = ("1", "true", "yes", "y", "on"), ("0", "false", "no", "n", "off")

    def describe(self) -> str:
        return "a boolean (true or false)"

    def convert(self, value) -> bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in self.TRUE:
            return True
        if text in self.FALSE:
            return False
        raise ValueError(value)

    def probes(self) -> Probes:
        return Probes(wrong_type=["maybe", "2"], out_of_range=[], boundary=["true", "false"])


class NumberOrWord(Domain):
    """A number in a range, or one of a few words (``--alpha-init random|1.5``)."""

    def __init__(self, number: FloatRange, *words: str):
        self.number, self.words = number, tuple(words)

    def describe(self) -> str:
        return " or ".join(repr(w) for w in self.words) + " or " + self.number.describe()

    def convert(self, value):
        if isinstance(value, str) and value.strip().lower() in self.words:
            return value.strip().lower()
        return self.number.convert(value)

    def contains(self, value) -> bool:
        return value in self.words or self.number.contains(value)

    def probes(self) -> Probes:
        inner = self.number.probes()
        return Probes(wrong_type=["sometimes"], out_of_range=inner.out_of_range,
                      boundary=list(self.words) + list(inner.boundary))


class ExistingFile(Domain):
    """A path to a file that exists (its content is checked by whoever reads it)."""

    def __init__(self, kind: str = "file"):
        self.kind = kind

    def describe(self) -> str:
        return f"the path of an existing {self.kind}"

    def convert(self, value) -> str:
        import os

        text = os.fspath(value)
        if not os.path.isfile(text):
            raise ValueError(value)
        return text

    def probes(self) -> Probes:
        return Probes(wrong_type=[], out_of_range=["/nonexistent/patterns.npy"], boundary=[])


def domain_of(action: argparse.Action) -> Optional[Domain]:
    return action.type if isinstance(action.type, Domain) else None


def restrict(parser, flag: str, domain: Domain, help_suffix: str = "") -> None:
    """Give an existing flag (fairseq's own, e.g. ``--decoder-layerdrop``) a domain: it is then checked when the
    arguments are parsed, like the plugin's own flags."""
    action = getattr(parser, "_option_string_actions", {}).get(flag)
    if action is None or isinstance(action.type, Domain):
        return
    action.type = domain
    if help_suffix and action.help and help_suffix not in action.help:
        action.help = f"{action.help} ({help_suffix})"


class OddOrOff(IntRange):
    """0 (off) or an odd integer >= 1 (a kernel centred on each token)."""

    def __init__(self, meaning: str = ""):
        super().__init__(0, meaning=meaning)

    def describe(self) -> str:
        return "0 (off) or an odd integer >= 1" + (f" ({self.meaning})" if self.meaning else "")

    def contains(self, value) -> bool:
        return value == 0 or (value > 0 and value % 2 == 1)

    def probes(self) -> Probes:
        return Probes(wrong_type=["1.5", "ten"], out_of_range=["-1", "4"], boundary=["0", "1"])
