"""One set of value checks for settings from flags, config files and the Python API.

Each check raises :class:`ConfigError` naming the setting, the value it got
and what is valid, so a bad value is refused before anything is written (the
way scikit-learn's ``_parameter_constraints`` validate estimator parameters).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from knnsolver.errors import ConfigError

_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _describe(value: Any) -> str:
    return f"{value!r} (a {type(value).__name__})" if isinstance(value, str) else repr(value)


def check_type(name: str, value: Any, kind: type, optional: bool = False) -> Any:
    """``value`` as ``kind`` (an int is accepted as a float), or :class:`ConfigError`.

    Booleans must be real booleans (the string ``"false"`` is not false),
    integers must not be booleans, floats must be finite. ``None`` passes when ``optional``.
    """
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} must be {_KIND_WORDS.get(kind, kind.__name__)}, got None")
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, numbers.Integral) and not isinstance(value, bool),  # numpy integers too
        float: isinstance(value, numbers.Real) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(kind, isinstance(value, kind))
    if not ok:
        hint = " (write it without quotes in a config file)" if isinstance(value, str) and kind is not str else ""
        raise ConfigError(f"{name} must be {_KIND_WORDS.get(kind, kind.__name__)}{' or null' if optional else ''}, "
                          f"got {_describe(value)}{hint}")
    if kind is int:
        value = int(value)
    if kind is float:
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value}")
    return value


@dataclass(frozen=True)
class Interval:
    """A range of valid numbers: ``low``/``high`` bounds (None: unbounded), each closed unless said open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    hint: str = ""

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def check(self, name: str, value: float | None) -> None:
        """Raise :class:`ConfigError` when ``value`` (not None) is not a number, is NaN, or lies outside the
        interval (every comparison with NaN is false, so it would pass them all)."""
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
            raise ConfigError(f"{name} must be a number {self}{self.hint}, got {_describe(value)}")
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            raise ConfigError(f"{name} must be {self}{self.hint}, got {value}")


def check_choice(name: str, value: Any, choices: tuple[str, ...] | list[str]) -> None:
    """Raise :class:`ConfigError` listing ``choices`` when ``value`` is not one of them."""
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")
