"""Checks of metric parameter values; each raises ``ValueError`` whose message starts with the parameter's name."""
from __future__ import annotations

from numbers import Integral, Real
from typing import Any

__all__ = ["positive_integer", "number_in", "boolean"]


def positive_integer(name: str, value: Any) -> None:
    """Raise unless ``value`` is an integer >= 1 (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def number_in(name: str, value: Any, low: float, high: float, *, low_closed: bool, high_closed: bool) -> None:
    """Raise unless ``value`` is a real number (not a bool, not NaN) in the interval from ``low`` to ``high``."""
    inside = not isinstance(value, bool) and isinstance(value, Real)
    inside = inside and (low <= value if low_closed else low < value)
    inside = inside and (value <= high if high_closed else value < high)
    if not inside:
        interval = f"{'[' if low_closed else '('}{low:g}, {high:g}{']' if high_closed else ')'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")


def boolean(name: str, value: Any) -> None:
    """Raise unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
