"""Exercise checks: the feedback a student sees right after each exercise.

A passing check prints ``✅ <name>: correct``. A failing one prints ``❌ <name>: <what was wrong>.
Hint: <hint>`` and raises ``ExerciseFailed``, so a notebook run stops at the first wrong answer (and
papermill fails CI when a solution notebook regresses).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np


class ExerciseFailed(AssertionError):
    """An exercise check failed; the message says what was wrong and gives a hint."""

    def _render_traceback_(self) -> list[str]:
        # IPython calls this instead of printing a full traceback: the student already saw the
        # ❌ line, and a stack of labkit internals would only bury it.
        return [f"\x1b[31mExerciseFailed\x1b[0m: {self}"]


def _fail(name: str, what: str, hint: str) -> None:
    message = f"{name}: {what}." + (f" Hint: {hint}" if hint else "")
    print(f"❌ {message}", flush=True)
    raise ExerciseFailed(message)


def _ok(name: str) -> None:
    print(f"✅ {name}: correct", flush=True)


def check(name: str, passed: bool, hint: str = "", what: str = "not quite right") -> None:
    """Pass when ``passed`` is true; otherwise report ``what`` was wrong and the ``hint``."""
    if bool(passed):
        _ok(name)
    else:
        _fail(name, what, hint)


def _as_array(x: Any) -> np.ndarray | None:
    """numpy view of a number, sequence, numpy array or torch tensor (None when not numeric)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError):
        return None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        return None
    return arr


def _shape(x: Any) -> tuple[int, ...] | None:
    if hasattr(x, "shape"):
        return tuple(int(d) for d in x.shape)
    arr = _as_array(x)
    return None if arr is None else arr.shape


def check_close(name: str, got: Any, expected: Any, atol: float = 1e-6, rtol: float = 1e-5,
                hint: str = "") -> None:
    """Pass when ``got`` equals ``expected`` within ``atol + rtol * |expected|``, elementwise.

    Accepts numbers, sequences, numpy arrays and torch tensors; shapes must match exactly.
    """
    if got is None:
        _fail(name, "got None (did the exercise cell return or assign its result?)", hint)
    g, e = _as_array(got), _as_array(expected)
    if e is None:
        raise TypeError(f"check_close({name!r}): expected value of type {type(expected).__name__} is not numeric.")
    if g is None:
        _fail(name, f"expected a number or array, got a {type(got).__name__}", hint)
    if g.shape != e.shape:
        _fail(name, f"shape is {g.shape}, expected {e.shape}", hint)
    g, e = g.astype(np.float64), e.astype(np.float64)
    if not np.all(np.isfinite(g)):
        _fail(name, f"contains {'NaN' if np.isnan(g).any() else 'inf'} values", hint)
    err = np.abs(g - e)
    bad = err > atol + rtol * np.abs(e)
    if bad.any():
        if g.ndim == 0:
            what = f"got {g.item():.6g}, expected {e.item():.6g}"
        else:
            i = np.unravel_index(int(np.argmax(np.where(bad, err, -1.0))), g.shape)
            where = tuple(int(k) for k in i)
            what = (f"{int(bad.sum())} of {g.size} values differ; worst at index {where}: "
                    f"got {g[i]:.6g}, expected {e[i]:.6g}")
        _fail(name, f"{what} (tolerance atol={atol:g}, rtol={rtol:g})", hint)
    _ok(name)


def check_shape(name: str, x: Any, shape: Sequence[int | None], hint: str = "") -> None:
    """Pass when ``x`` (array, tensor or sequence) has ``shape``; ``None`` in ``shape`` matches any size."""
    got = _shape(x)
    want = tuple(shape)
    if got is None:
        _fail(name, f"expected an array of shape {want}, got a {type(x).__name__}", hint)
    if len(got) != len(want) or any(w is not None and w != g for g, w in zip(got, want, strict=False)):
        shown = "(" + ", ".join("*" if w is None else str(w) for w in want) + ("," if len(want) == 1 else "") + ")"
        _fail(name, f"shape is {got}, expected {shown}", hint)
    _ok(name)


@contextmanager
def without(*references: Callable, namespace: dict | None = None):
    """Within the block, labkit's `references` raise ExerciseFailed when called.

    A hidden test runs the student's function inside it, so an exercise that hands back labkit's own
    version (`def my_loss(*a): return labkit_loss(*a)`) fails, while one written out passes::

        with without(labkit.rl.dppo.gaussian_log_prob):
            check_close("log-prob", my_log_prob(x, mu, std), expected, hint=...)

    Each reference is replaced where it lives (its module, or its class for a method), wherever a labkit
    module re-exports it, and wherever `namespace` (default: the caller's globals, i.e. the notebook's)
    binds a name to it; all are restored on exit.
    """
    if namespace is None:
        namespace = inspect.currentframe().f_back.f_back.f_globals  # the caller of the `with`
    patched: list[tuple[Any, str, Any]] = []

    def refuse(ref: Callable) -> Callable:
        def call(*args, **kwargs):
            _fail(f"{ref.__qualname__} called", "this exercise asks for your own version, and it called "
                  f"labkit's {ref.__module__}.{ref.__qualname__}", "write the computation out yourself")
        return call

    try:
        for ref in references:
            ref = getattr(ref, "__func__", ref)  # a bound or class method: its function
            owner: Any = sys.modules[ref.__module__]
            *path, name = ref.__qualname__.split(".")
            for part in path:
                owner = getattr(owner, part)
            stand_in = refuse(ref)
            patched.append((owner, name, owner.__dict__[name]))
            setattr(owner, name, stand_in)
            # every other name bound to it: the notebook's, and labkit's re-exports (labkit.policies.fit)
            spaces = [namespace] + [vars(m) for n, m in list(sys.modules.items()) if n.split(".")[0] == "labkit"]
            for space in spaces:
                for key, value in list(space.items()):
                    if value is ref:
                        patched.append((space, key, value))
                        space[key] = stand_in
        yield
    finally:
        for owner, name, value in reversed(patched):
            if isinstance(owner, dict):
                owner[name] = value
            else:
                setattr(owner, name, value)
