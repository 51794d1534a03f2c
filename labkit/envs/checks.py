"""Validation of task options: every check names the option, the value and what is allowed."""

from __future__ import annotations

import math
import numbers

import numpy as np


def _is_bool(value) -> bool:
    return isinstance(value, bool | np.bool_)


def _finite_in(value, lo: float, hi: float) -> bool:
    if isinstance(value, numbers.Integral):  # exact, and no OverflowError for huge ints
        return lo <= value <= hi
    v = float(value)
    return math.isfinite(v) and lo <= v <= hi


def check_number(name: str, value, lo: float, hi: float) -> None:
    """`value` a real number (not a bool) with lo <= value <= hi; TypeError / ValueError naming `name`."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [{lo}, {hi}], got {value!r} ({type(value).__name__})")
    if not _finite_in(value, lo, hi):
        raise ValueError(f"{name} must be a finite number in [{lo}, {hi}], got {value!r}")


def check_int(name: str, value, lo: int, hi: int) -> None:
    """`value` an int (not a bool) with lo <= value <= hi."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be an int in [{lo}, {hi}], got {value!r} ({type(value).__name__})")
    if not isinstance(value, numbers.Integral) or not lo <= value <= hi:  # 1.5, nan: a wrong value
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")


def check_scale(name: str, value, lo: float, hi: float, *, integer: bool = False) -> None:
    """A number, or a (low, high) range (tuple or list) with lo <= low <= high <= hi."""
    kind = "an int" if integer else "a number"
    allowed = f"{kind} in [{lo}, {hi}] or a (low, high) range with {lo} <= low <= high <= {hi}"
    vals = tuple(value) if isinstance(value, tuple | list) else (value,)
    if len(vals) not in (1, 2) or (len(vals) == 1 and isinstance(value, tuple | list)):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    for v in vals:
        if _is_bool(v) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name} must be {allowed}, got {value!r} ({type(v).__name__} inside)")
    if integer and not all(isinstance(v, numbers.Integral) for v in vals):  # 1.5, nan: a wrong value
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    if not all(_finite_in(v, lo, hi) for v in vals) or vals[0] > vals[-1]:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_choice(name: str, value, choices: tuple) -> None:
    """`value` one of `choices` (compared by type first, so arrays or lists are refused cleanly)."""
    ok = any(value is c if c is None or isinstance(c, bool) else (type(value) is str and value == c)
             for c in choices)
    if not ok:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_bool(name: str, value) -> None:
    if not _is_bool(value):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r} ({type(value).__name__})")


