"""Shared pytest setup: make tests/notebook_utils.py importable under any import mode."""

import sys
from pathlib import Path

import gymnasium as gym
import pytest
import torch

import labkit
import labkit.data
from labkit.data import load_dataset, record
from labkit.policies import FlowPolicy, fit

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


def pytest_configure(config):
    # Also declared in pyproject.toml; repeated here so the marker is known however pytest is run.
    config.addinivalue_line("markers", "notebook: papermill runs of the lesson notebooks")
    config.addinivalue_line("markers", "slow: DDP, LightningCLI, browser and demo runs (make test runs them)")


@pytest.fixture(scope="module")
def detour_ds(tmp_path_factory):
    """12 expert Detour episodes recorded into a temporary dataset (shared by the policy tests)."""
    env = gym.make("labkit/Detour-v0")
    root = record(env, labkit.envs.expert(env), tmp_path_factory.mktemp("d") / "detour", episodes=12, seed=0,
                  progress=False)
    return load_dataset(root, env_id="labkit/Detour-v0")


# The tests' one tiny generative policy, and the demos the RL tests mix in (session-wide: built once per
# pytest worker). Tests that train the base itself (EXPO imitates) take a deep copy.
TINY = dict(horizon=8, n_action_steps=4, obs_horizon=2, hidden=64, layers=2, steps=5)


def tiny_flow(dataset, steps: int = 150, batch_size: int = 64) -> FlowPolicy:
    """A tiny flow policy: chunk 8 (4 executed), two observations stacked, a 2 x 64 MLP, K = 5 Euler steps."""
    torch.manual_seed(0)
    return fit(FlowPolicy.from_dataset(dataset, **TINY), dataset, steps=steps, batch_size=batch_size, progress=False)


@pytest.fixture(scope="session")
def demos():
    """6 shipped Detour demonstrations (with rewards and done flags, as RLPD's offline half needs)."""
    return load_dataset(labkit.data.DATASETS / "detour").select(range(6))


@pytest.fixture(scope="session")
def base_policy():
    """The tiny flow policy on 10 shipped Detour demonstrations (150 steps)."""
    return tiny_flow(load_dataset(labkit.data.DATASETS / "detour").select(range(10)))
