"""Record the numbers a notebook produces, so tests can assert on them.

``record("success_rate", 0.92)`` keeps the value in an in-process dict and, when the environment
variable ``LABKIT_METRICS`` names a file, rewrites that JSON file atomically with every metric recorded
so far. The notebook regression tests set ``LABKIT_METRICS`` before papermill starts the kernel, then
read the file with ``load_metrics`` and check each metric against its bar.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

ENV_VAR = "LABKIT_METRICS"
MAX_LIST = 10_000  # arrays larger than this are not "metrics"; record a summary instead

_METRICS: dict[str, Any] = {}

Metric = bool | int | float | str | list


def _to_python(value: Any, name: str) -> Metric:
    """Convert numpy/torch scalars and small arrays to plain Python values; validate them."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch
        value = value.detach().cpu()
        value = value.item() if value.numel() == 1 and value.dim() == 0 else value.tolist()
    elif hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy array or numpy scalar
        size = getattr(value, "size", 1)
        if size > MAX_LIST:
            raise ValueError(f"record({name!r}): array of {size} values is too large for a metric; "
                             f"record a summary (mean, max) instead.")
        value = value.tolist()
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):
        if len(value) > MAX_LIST:
            raise ValueError(f"record({name!r}): a list of {len(value)} values is too large for a metric.")
        return [_to_python(v, name) for v in value]
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"record({name!r}): value is {value}, not a finite number; "
                             f"check the computation that produced it.")
        return value
    raise TypeError(f"record({name!r}): cannot record a {type(value).__name__}; use a finite number, "
                    f"bool, str, or a list of those (numpy/torch scalars and small arrays are converted).")


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to ``path`` via a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def record(name: str, value: Any) -> Any:
    """Record metric ``name`` = ``value`` and return ``value`` unchanged (so it can wrap an expression).

    Values must be finite numbers, bools, strings or (nested) lists of those; numpy and torch
    scalars and small arrays are converted. Recording the same name again overwrites it.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"record(): the metric name must be a non-empty string, got {name!r}.")
    _METRICS[name] = _to_python(value, name)
    path = os.environ.get(ENV_VAR)
    if path:
        _write_atomic(Path(path), _METRICS)
    return value


def metrics() -> dict[str, Any]:
    """A copy of every metric recorded in this process so far."""
    return dict(_METRICS)


def clear() -> None:
    """Forget the metrics recorded in this process (the file named by LABKIT_METRICS is left alone)."""
    _METRICS.clear()


def load_metrics(path: str | Path) -> dict[str, Any]:
    """Read a metrics file written by ``record``; a missing file means nothing was recorded ({})."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a valid metrics JSON file ({err}).") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of metrics, got {type(data).__name__}.")
    return data
