"""labkit/PegInsert-v0: the task contract, the clearance that decides success, and the imperfect expert."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import labkit
from labkit.envs.peg import CLEARANCE, MAX_MOVE, PegInsertExpert

ENV = "labkit/PegInsert-v0"


@pytest.mark.parametrize("obs_mode", ["state", "pixels"])
def test_peg_passes_check_env(obs_mode):
    env = gym.make(ENV, obs_mode=obs_mode)
    check_env(env.unwrapped, skip_render_check=True)
    obs, info = env.reset(seed=0)
    assert obs["state"].shape == (8,) and obs["proprio"].shape == (6,)
    assert not info["is_success"] and info["depth"] < 0, "the peg starts above the block"
    assert np.allclose(env.action_space.high, MAX_MOVE)
    if obs_mode == "pixels":
        px = obs["pixels"]
        assert px.shape == (96, 96, 3) and px.dtype == np.uint8
        assert (px[..., 2].astype(int) - px[..., 0] > 80).any(), "the blue peg should be in view"


def test_peg_is_deterministic_under_seed():
    def rollout(seed):
        env = gym.make(ENV)
        obs, _ = env.reset(seed=seed)
        out = [obs["state"]]
        for t in range(15):
            out.append(env.step(np.array([0.01 * np.cos(t), 0.01 * np.sin(t), -0.005], np.float32))[0]["state"])
        return np.stack(out)

    np.testing.assert_array_equal(rollout(3), rollout(3))
    assert not np.array_equal(rollout(3), rollout(4))


def _descend(env, seed: int, offset) -> dict:
    """Fly to `offset` (m) from the hole's centre, 15 mm above the block, then come straight down."""
    expert = PegInsertExpert(env, calibration_error=0.0, aim_noise=0.0, action_noise=0.0)
    obs, _ = env.reset(seed=seed)
    expert.reset(seed=seed)
    expert.aim_error = np.asarray(offset, float)
    info = {}
    for _ in range(60):
        obs, _, terminated, truncated, info = env.step(expert(obs))
        if terminated or truncated:
            break
    return info


def test_the_clearance_decides_success():
    env = gym.make(ENV)
    centred = [_descend(env, s, [0.0, 0.0]) for s in range(5)]
    assert all(i["is_success"] for i in centred)
    # 3 mm off centre is twice the clearance: the peg lands on the rim and stays there.
    off = [_descend(env, s, [2 * CLEARANCE, 0.0]) for s in range(5)]
    assert not any(i["is_success"] for i in off)
    assert all(abs(i["depth"]) < 0.002 for i in off), "a missed peg rests on the block's top face"


def test_expert_is_imperfect_and_bc_inherits_its_bias():
    """The default expert misses far holes (calibration error), hits centred ones; a perfectly
    calibrated one succeeds nearly always, so the failures come from the bias, not the physics."""
    env = gym.make(ENV)
    results = {}
    for name, kwargs in {"default": {}, "calibrated": {"calibration_error": 0.0}}.items():
        expert = labkit.envs.expert(env, **kwargs)
        wins, holes = [], []
        for seed in range(40):
            obs, _ = env.reset(seed=seed)
            expert.reset(seed=seed)
            for _ in range(60):
                obs, _, term, trunc, info = env.step(expert(obs))
                if term or trunc:
                    break
            wins.append(info["is_success"])
            holes.append(np.abs(env.unwrapped.hole).max())
        results[name] = (np.array(wins), np.array(holes))
    wins, holes = results["default"]
    assert 0.2 <= wins.mean() <= 0.6, wins.mean()
    assert holes[wins].max() < holes[~wins].max(), "misses are the far holes"
    assert results["calibrated"][0].mean() >= 0.95


def test_bad_action_is_rejected():
    env = gym.make(ENV)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(2, np.float32))
