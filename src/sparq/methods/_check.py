"""Checks for method settings, shared by the method classes and the spec parser (no torch here).

Every check names the setting and its allowed range, so ``sparq-sketch:bits=0`` or
``H2O(0.125, recent_fraction=5)`` fail at once with a message instead of NaN or a wrong answer.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def integer(owner: str, name: str, value: Any, lo: int, hi: int | None = None) -> int:
    """An int in [lo, hi] (strings such as "4" are parsed); ValueError naming `owner` `name` otherwise."""
    where = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"{owner} {name} must be an integer {where}, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner} {name} must be an integer {where}, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{owner} {name} must be an integer {where}, got {value}")
    return value


def number(owner: str, name: str, value: Any, lo: float, hi: float) -> float:
    """A finite number in [lo, hi] (strings parsed, "1/4" too); ValueError naming it otherwise."""
    text = value
    if isinstance(value, str):
        try:
            if "/" in value:
                a, b = value.split("/", 1)
                value = float(a) / float(b)
            else:
                value = float(value.strip())
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"{owner} {name} must be a number in [{lo:g}, {hi:g}], got {text!r}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{owner} {name} must be a number in [{lo:g}, {hi:g}], got {text!r}")
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ValueError(f"{owner} {name} must be a number in [{lo:g}, {hi:g}], got {text!r}")
    return float(value)


def boolean(owner: str, name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "on", "yes"):
        return True
    if s in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"{owner} {name} must be a boolean (1/0, true/false, on/off, yes/no), got {value!r}")


def fraction(owner: str, value: Any) -> float:
    """A method's target share of dense data: a number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1 \
            or not math.isfinite(value):
        raise ValueError(f"{owner} fraction must be a number in (0, 1] (e.g. 0.125 for 1/8), got {value!r}")
    return float(value)
