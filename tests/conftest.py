"""Shared pytest setup: make tests/notebook_utils.py importable under any import mode."""

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


def pytest_configure(config):
    # Also declared in pyproject.toml; repeated here so the marker is known however pytest is run.
    config.addinivalue_line("markers", "notebook: papermill runs of the lesson notebooks")
