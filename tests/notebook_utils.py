"""Helpers for the notebook regression tests: run a notebook with papermill, find the cell that
failed, and check recorded metrics against their bars. Used by test_notebooks.py and test_teach.py."""

from __future__ import annotations

import operator
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat

REPO_ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = REPO_ROOT / "solutions"
NOTEBOOKS = REPO_ROOT / "notebooks"
FAST_PARAMETERS = {"FAST": True, "SEED": 0}
# Tags of the cells papermill inserts: the injected parameters and, after an error, two banners.
PAPERMILL_TAGS = {"injected-parameters", "papermill-error-cell-tag"}

_OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, ">": operator.gt, "<": operator.lt}


@contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    """Set (or unset) an environment variable for the duration of the block."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def run_notebook(src: Path, out: Path, metrics_path: Path | None = None,
                 parameters: Mapping[str, Any] | None = None, cwd: Path = REPO_ROOT,
                 cell_timeout: int = 600) -> nbformat.NotebookNode:
    """Execute ``src`` with papermill into ``out`` and return the executed notebook.

    ``LABKIT_METRICS`` is set to ``metrics_path`` while the kernel starts (it inherits the
    environment), so ``labkit.teach.record`` writes there. Raises papermill's
    ``PapermillExecutionError`` when a cell fails; ``out`` is written either way.
    """
    import papermill

    with _env("LABKIT_METRICS", str(metrics_path) if metrics_path else None):
        return papermill.execute_notebook(
            str(src), str(out),
            parameters=dict(FAST_PARAMETERS if parameters is None else parameters),
            kernel_name="python3", language="python", cwd=str(cwd), progress_bar=False, log_output=False,
            execution_timeout=cell_timeout,
        )


def source_cells(executed: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    """The executed notebook's cells without those papermill inserted, so index i is cell i of
    the source notebook."""
    return [c for c in executed.cells if not PAPERMILL_TAGS & set(c.get("metadata", {}).get("tags", []))]


def _has_error(cell: nbformat.NotebookNode) -> bool:
    if cell.cell_type != "code":
        return False
    if any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
        return True
    return cell.get("metadata", {}).get("papermill", {}).get("exception") is True


def failing_cell_index(executed: nbformat.NotebookNode) -> int | None:
    """Index, in the source notebook, of the first cell that raised; None when none did."""
    for i, cell in enumerate(source_cells(executed)):
        if _has_error(cell):
            return i
    return None


def cell_error(executed: nbformat.NotebookNode, index: int) -> dict[str, Any] | None:
    """The error output (ename, evalue, traceback) of source cell ``index``, if it has one."""
    cell = source_cells(executed)[index]
    return next((dict(o) for o in cell.get("outputs", []) if o.get("output_type") == "error"), None)


def first_stub_cell(nb: nbformat.NotebookNode) -> int | None:
    """Index of the first code cell whose source contains the student stub."""
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and "raise NotImplementedError()" in cell.source:
            return i
    return None


@dataclass(frozen=True)
class Rel:
    """A bar relative to another metric of the same run: `metrics[metric] + delta` (e.g. an RL method's
    success against its base's, with a margin measured over repeated FAST runs)."""

    metric: str
    delta: float = 0.0


def _resolve(bar: Any, metrics: Mapping[str, Any]) -> tuple[Any, str]:
    """(the bar's value, how to show it); a Rel bar reads the other metric."""
    if isinstance(bar, Rel):
        base = metrics[bar.metric]
        return base + bar.delta, f"{bar.metric} ({base!r}) {bar.delta:+g}"
    if isinstance(bar, tuple):
        values = [_resolve(b, metrics) for b in bar]
        return tuple(v for v, _ in values), " and ".join(s for _, s in values)
    return bar, repr(bar)


def _meets(value: Any, op: str, bar: Any) -> bool:
    if op == "between":
        lo, hi = bar
        return lo <= value <= hi
    if op not in _OPS:
        raise ValueError(f"unknown bar op {op!r}; use one of {sorted(_OPS) + ['between']}")
    return bool(_OPS[op](value, bar))


def assert_bars(notebook: str, metrics: Mapping[str, Any], bars: Mapping[str, tuple]) -> None:
    """Assert every bar ``{metric: (op, bar)}`` holds, listing every miss and every unrecorded metric."""
    problems = []
    for name, (op, bar) in bars.items():
        needs = [name] + [b.metric for b in (bar if isinstance(bar, tuple) else (bar,)) if isinstance(b, Rel)]
        missing = [n for n in needs if n not in metrics]
        if missing:
            problems += [f"{n}: not recorded (did the notebook call labkit.teach.record({n!r}, ...)?)" for n in missing]
            continue
        value, shown = _resolve(bar, metrics)
        if not _meets(metrics[name], op, value):
            shown = f"between {shown}" if op == "between" else f"{op} {shown}"
            problems.append(f"{name} = {metrics[name]!r}, expected {shown}")
    assert not problems, f"{notebook}: " + "; ".join(problems) + f"\n(all recorded metrics: {dict(metrics)})"


def stub_cells(nb: nbformat.NotebookNode) -> list[int]:
    """Indices of all code cells holding a student stub."""
    return [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "raise NotImplementedError()" in c.source]


def assert_fails_at(executed: nbformat.NotebookNode, stub: int, label: str, next_stub: int | None = None) -> None:
    """The first error is a NotImplementedError raised by the first exercise: in its own cell or in a
    later cell that calls it (its check), but before the next exercise; every code cell before the
    failing one ran without error."""
    failed = failing_cell_index(executed)
    # a lesson with one exercise: its check may sit anywhere after it
    upper = next_stub if next_stub is not None else len(source_cells(executed))
    assert failed is not None and stub <= failed < upper, (
        f"{label}: first error in cell {failed}, expected the first exercise (cell {stub}) or its check "
        f"(before cell {upper}). Make sure the cells before the exercise run and the check follows it."
    )
    error = cell_error(executed, failed)
    assert error is not None and error["ename"] == "NotImplementedError", f"{label}: cell {failed} raised {error}"
    for i, cell in enumerate(source_cells(executed)[:failed]):
        if cell.cell_type == "code" and cell.source.strip():
            assert cell.execution_count is not None, f"{label}: cell {i} did not run"
            assert not _has_error(cell), f"{label}: cell {i} failed"
