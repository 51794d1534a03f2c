"""Shared pytest setup: make tests/notebook_utils.py importable under any import mode."""

import sys
from pathlib import Path

import gymnasium as gym
import pytest

import labkit
from labkit.data import load_dataset, record

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


def pytest_configure(config):
    # Also declared in pyproject.toml; repeated here so the marker is known however pytest is run.
    config.addinivalue_line("markers", "notebook: papermill runs of the lesson notebooks")


@pytest.fixture(scope="module")
def detour_ds(tmp_path_factory):
    """12 expert Detour episodes recorded into a temporary dataset (shared by the policy tests)."""
    env = gym.make("labkit/Detour-v0")
    root = record(env, labkit.envs.expert(env), tmp_path_factory.mktemp("d") / "detour", episodes=12, seed=0,
                  progress=False)
    return load_dataset(root, env_id="labkit/Detour-v0")
