"""The one validator of numbers and value types: every config's check and every file reader uses it.

Each function returns the value it accepted (ints as `int`, numbers as `float`) or raises a
`ConfigError` naming the value, what it must be and what it got, on one line. Callers that read a
file catch that error and put the file's name in front.
"""

from __future__ import annotations

import math
import numbers
import types
import typing
from dataclasses import fields
from typing import Any, Iterable, Mapping

from .errors import ConfigError

# The widest seed every RNG vitcompact seeds (Python, numpy, torch) accepts as it is.
MAX_SEED = 2**32 - 1
# Epochs (and states) of one run: far beyond any run vitcompact is for, and a typo's 2^63 refused
# before training starts instead of training forever.
MAX_EPOCHS = 100_000


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def finite(name: str, value: Any) -> float:
    """`value` as a float: refuses booleans, non-numbers, NaN and the infinities."""
    if not _is_number(value):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    return value


def _show(bound: float) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{_show(low)}, {_show(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {_show(low)}"
    return f"{'<' if high_open else '<='} {_show(high)}"


def in_range(name: str, value: Any, low: float | None = None, high: float | None = None, *,
             low_open: bool = False, high_open: bool = False, note: str = "") -> float:
    """`value` as a finite float within the bounds (closed unless `*_open`); `note` says why."""
    value = finite(name, value)
    if ((low is not None and (value <= low if low_open else value < low))
            or (high is not None and (value >= high if high_open else value > high))):
        why = f" ({note})" if note else ""
        raise ConfigError(f"{name} must be {_bounds(low, high, low_open, high_open)}{why}, got {value}")
    return value


def integer(name: str, value: Any, low: int | None = None, high: int | None = None, *,
            note: str = "") -> int:
    """`value` as an int within [low, high]; a float (even 4.0) or a boolean is refused."""
    if not _is_integer(value):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        why = f" ({note})" if note else ""
        raise ConfigError(f"{name} must be {_bounds(low, high, False, False)}{why}, got {value}")
    return value


def ratio(name: str, value: Any) -> float:
    """A fraction of units to remove: in [0, 1)."""
    return in_range(name, value, 0.0, 1.0, high_open=True)


def seed(name: str, value: Any) -> int:
    return integer(name, value, 0, MAX_SEED)


def one_of(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")
    return value


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def _of_type(name: str, value: Any, kind: Any) -> Any:
    """`value` checked (and converted where lossless) against a type annotation of a config field:
    int, float, str, bool, `X | None` and `tuple[int, ...]`."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _of_type(name, value, inner[0]) if len(inner) == 1 else value
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return tuple(_of_type(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value))
    if kind is bool:
        return flag(name, value)
    if kind is int:
        # No setting is wider than a seed; a file's 2^63 is a typo, refused whatever its field.
        if _is_integer(value) and abs(value) > MAX_SEED:
            raise ConfigError(f"{name} must be at most {MAX_SEED:,} in size, got {value}")
        return integer(name, value)
    if kind is float:
        return finite(name, value)
    if kind is str and not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


def field_types(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` (e.g. a TOML table) checked against the field types of the dataclass `cls`:
    `head_ratio = "half"`, `states = 2.7` and `batch_sizes = "1,2"` are refused, naming the key.
    Unknown keys are refused too."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return {key: _of_type(key, value, hints[key]) for key, value in values.items()}
