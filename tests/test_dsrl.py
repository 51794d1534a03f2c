"""Tests of DSRL (labkit.rl.dsrl): the noise-space env, and short SAC / noise-aliasing training runs."""

import gymnasium as gym
import numpy as np
import pytest
import torch

import labkit  # noqa: F401  (before anything imports mujoco: picks the GL backend, registers tasks)
from labkit.eval import evaluate
from labkit.rl.dsrl import DSRL, DSRLConfig, NoiseSpaceEnv

ENV = "labkit/Detour-v0"


def expected_chunk(policy, history: dict[str, np.ndarray], noise: torch.Tensor) -> np.ndarray:
    """The base policy's own deterministic chunk (physical units) for a history [To, ...] and noise."""
    obs = policy.normalize_obs({k: torch.as_tensor(v)[None] for k, v in history.items()})
    with torch.no_grad():
        chunk = policy.sample(obs, noise=noise, stochastic=False).actions
    return policy.normalizer.unnormalize("action", chunk)[0].numpy()


def test_zero_noise_reproduces_base_policy_chunks(base_policy):
    env = NoiseSpaceEnv(gym.make(ENV), base_policy, noise_bound=1.5)
    raw = gym.make(ENV)
    obs, _ = env.reset(seed=3)
    raw_obs, _ = raw.reset(seed=3)
    zeros = torch.zeros(1, 8, 2)
    # At reset the history repeats the first observation, as select_action does.
    np.testing.assert_array_equal(obs["observation.state"], np.stack([raw_obs["state"]] * 2))
    for _ in range(3):  # three chunks: checks the history carried across chunks too
        want = expected_chunk(base_policy, obs, zeros)[:4]
        obs, reward, term, trunc, info = env.step(np.zeros(16, np.float32))
        assert info["chunk_steps"] == 4
        np.testing.assert_array_equal(info["actions"], want)
        seen = []
        for a in want:  # the same actions on a plain env give the same observations
            raw_obs, *_ = raw.step(a)
            seen.append(raw_obs["state"])
        np.testing.assert_allclose(obs["observation.state"], np.stack(seen[-2:]), atol=1e-6)
    # Steering moves the chunk: a different noise gives a different chunk at the same state.
    assert not np.allclose(env.chunk(np.full(16, 1.5)), env.chunk(np.zeros(16)))


def test_action_space_bounds_and_bad_noise(base_policy):
    env = NoiseSpaceEnv(gym.make(ENV), base_policy, noise_bound=2.0)
    assert env.action_space.shape == (16,)
    np.testing.assert_array_equal(env.action_space.low, -2.0)
    np.testing.assert_array_equal(env.action_space.high, 2.0)
    assert env.observation_space["observation.state"].shape == (2, 6)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    # Noise beyond the bound is clipped onto it.
    _, _, _, _, info_far = env.step(np.full(16, 50.0))
    env.reset(seed=0)
    _, _, _, _, info_edge = env.step(np.full(16, 2.0))
    np.testing.assert_array_equal(info_far["actions"], info_edge["actions"])
    with pytest.raises(ValueError, match="noise must have 16"):
        env.chunk(np.zeros(5))
    with pytest.raises(ValueError, match="noise_bound"):
        NoiseSpaceEnv(gym.make(ENV), base_policy, noise_bound=0.0)


def small_config(variant: str) -> DSRLConfig:
    # NA denoises a batch per target and per distillation step, so it gets fewer updates per chunk.
    return DSRLConfig(variant=variant, hidden=(64, 64), utd=4 if variant == "sac" else 3, batch_size=64,
                      warmup_steps=100, distill_steps=1, init_temperature=0.01, seed=0)


@pytest.mark.parametrize("variant", ["sac", "na"])
def test_short_training_lowers_critic_loss(base_policy, variant):
    agent = DSRL(base_policy, ENV, small_config(variant))
    steps = 400 if variant == "sac" else 300
    history = agent.train(steps, eval_every=200, eval_episodes=2, progress=False)
    assert agent.env_steps >= steps
    # Evaluated before the first step (the base), at 200 env steps and at the end.
    assert [h["env_steps"] for h in history] == sorted(h["env_steps"] for h in history) and len(history) == 3
    assert history[0]["env_steps"] == 0
    assert agent.updates == len(agent.log) > 100
    losses = np.array([r["critic_loss"] for r in agent.log])
    assert np.isfinite(losses).all()
    assert losses[-20:].mean() < 0.5 * losses[:20].mean(), (losses[:20].mean(), losses[-20:].mean())
    for row in history:
        assert 0.0 <= row["success"] <= 1.0
        assert all(np.isfinite(v) for k, v in row.items() if k not in ("train_return", "train_success"))
    if variant == "na":
        assert np.isfinite([r["distill_loss"] for r in agent.log]).all()
    for p in agent.actor.parameters():
        assert torch.isfinite(p).all()
    # The base policy stayed frozen: DSRL only trains its own networks.
    assert not any(p.requires_grad for p in base_policy.parameters())


def test_steered_policy_with_zero_actor_is_the_base_policy(base_policy):
    """An actor whose mode is w = 0 steers nothing: batched evaluation of the steered policy gives
    exactly the episodes NoiseSpaceEnv runs with w = 0."""
    agent = DSRL(base_policy, ENV, small_config("sac"))
    torch.nn.init.zeros_(agent.actor.mean.weight)
    torch.nn.init.zeros_(agent.actor.mean.bias)
    steered = evaluate(agent.eval_policy(), ENV, episodes=3, seed=5, progress=False)

    env = NoiseSpaceEnv(gym.make(ENV), base_policy)
    for i in range(3):  # the same episodes, run chunk by chunk with w = 0 through NoiseSpaceEnv
        env.reset(seed=5 + i)
        total, length, done = 0.0, 0, False
        while not done:
            _, r, term, trunc, info = env.step(np.zeros(16, np.float32))
            total, length, done = total + r, length + info["chunk_steps"], term or trunc
        assert (total, length) == (pytest.approx(steered.returns[i]), steered.lengths[i])


def test_bad_config():
    with pytest.raises(ValueError, match="variant"):
        DSRLConfig(variant="ppo")
    with pytest.raises(ValueError, match="target_subset"):
        DSRLConfig(ensemble=2, target_subset=3)
