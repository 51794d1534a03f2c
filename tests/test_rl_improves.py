"""End to end: an RL method improves the policy it starts from (lesson 05's DPPO on PegInsert).

The lessons' FAST runs train for seconds and only check that no method wrecks its base; this test
trains long enough for the gain to show. Measured here (flow base 1,500 steps on the 75 successful peg
demos, DPPO 40 iterations of 8 envs x 15 chunks, ~19,000 env steps, 100 evaluation episodes each,
~1 min per seed on one core): training seeds 0-3 went 45 -> 99%, 39 -> 20%, 42 -> 68%, 42 -> 82%.
DPPO at this budget improves its base in most seeds, not all (seed 1 collapses), so the test asks what
was measured of the first three seeds: at least two of them gain 10 points or more.
"""

import numpy as np
import pytest
import torch

from labkit.data import DATASETS, EVAL_SEED, load_dataset
from labkit.eval import evaluate
from labkit.policies import FlowPolicy, fit
from labkit.rl.dppo import DPPO, DPPOConfig

pytestmark = pytest.mark.slow  # ~3 minutes on one core (still in make test; skipped by make test-fast)

ENV = "labkit/PegInsert-v0"


def dppo_gain(seed: int) -> tuple[float, float]:
    """(base success, DPPO success) over 100 evaluation episodes, for one training seed."""
    data = load_dataset(DATASETS / "peg")
    demos = data.select(np.flatnonzero(np.asarray(data.episodes["success"], bool)).tolist())
    torch.manual_seed(seed)
    base = fit(FlowPolicy.from_dataset(demos, horizon=8, n_action_steps=4, obs_horizon=2, steps=10), demos,
               steps=1500, seed=seed, progress=False)
    before = evaluate(base, ENV, episodes=100, seed=EVAL_SEED, progress=False).success_rate
    agent = DPPO(base, ENV, DPPOConfig(num_envs=8, n_steps=15, clip_eps=0.05, clip_eps_base=0.01, actor_lr=3e-5,
                                       seed=seed))  # lesson 05's settings (configs/rl/dppo_peg.yaml)
    agent.train(steps=40, progress=False)
    return before, agent.evaluate(100, seed=EVAL_SEED).success_rate


def test_dppo_improves_its_base_in_most_seeds():
    runs = {seed: dppo_gain(seed) for seed in (0, 1, 2)}
    gains = [after - before for before, after in runs.values()]
    assert sum(g >= 0.10 for g in gains) >= 2, f"base -> DPPO success per seed: {runs}"
