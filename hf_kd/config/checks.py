"""The checks an argument makes of its own value (finite, in range, one of the choices), and the base of a
group of fields that checks itself."""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any


def check_finite(arguments: Any) -> None:
    """Refuse inf and nan in every float field of an argument dataclass, naming the field and value."""
    for f in fields(arguments):
        value = getattr(arguments, f.name, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name}={value!r}: expected a finite number")


def check_range(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    """``value`` in ``[low, high]`` (``(low, high]`` when ``low_open``), or an error naming ``name``."""
    if not (low < value <= high if low_open else low <= value <= high):
        bracket = "(" if low_open else "["
        raise ValueError(f"{name}={value!r} is out of range: expected a number in {bracket}{low}, {high}]")


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """``value`` one of ``allowed``, or an error naming ``name`` and the choices."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")


def check_at_least(name: str, value: float, low: float, meaning: str = "") -> None:
    """``value`` ≥ ``low``, or an error naming ``name`` (and what the value means, when given)."""
    if not value >= low:
        raise ValueError(f"{name}={value!r} must be ≥ {low}{meaning}")


class Group:
    """A group of fields: built on its own, it checks them (in a ``DistillationConfig``, the config does)."""

    def __post_init__(self) -> None:
        check_finite(self)
        self.check()

    def check(self) -> None:
        """Refuse a bad value of this group's fields, naming the field and the value."""
        raise NotImplementedError
