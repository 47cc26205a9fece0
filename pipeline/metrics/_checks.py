"""Checks of metric parameter values against the maps' size (their declarations check the rest,
:mod:`pipeline.parameters`); each raises ``ValueError`` whose message starts with the parameter's name."""
from __future__ import annotations

from numbers import Real
from typing import Any

__all__ = ["number_in"]


def number_in(name: str, value: Any, low: float, high: float, *, low_closed: bool, high_closed: bool) -> None:
    """Raise unless ``value`` is a real number (not a bool, not NaN) in the interval from ``low`` to ``high``."""
    inside = not isinstance(value, bool) and isinstance(value, Real)
    inside = inside and (low <= value if low_closed else low < value)
    inside = inside and (value <= high if high_closed else value < high)
    if not inside:
        interval = f"{'[' if low_closed else '('}{low:g}, {high:g}{']' if high_closed else ')'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
