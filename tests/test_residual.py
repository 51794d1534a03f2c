"""Tests of ResFiT (labkit.rl.residual): the residual starts at the base, demo relabelling, n-step
online transitions, and a short TD3 training run."""

import gymnasium as gym
import numpy as np
import pytest
import torch

import labkit  # noqa: F401  (before anything imports mujoco: picks the GL backend, registers tasks)
from labkit.eval import evaluate
from labkit.rl.residual import BaseRuntime, ResidualConfig, ResidualRL, ResidualSpace, demo_transitions

ENV = "labkit/Detour-v0"
GAMMA = 0.9


def small_config(**kw) -> ResidualConfig:
    return ResidualConfig(**{**dict(hidden=(64, 64), batch_size=64, utd=1, warmup_steps=100, critic_warmup=100,
                                    gamma=GAMMA, nstep=3, seed=0), **kw})


def episode_actions(policy, env, seed: int) -> np.ndarray:
    """The actions `policy` takes in one seeded episode (global torch seed fixed: the flow base
    draws its noise from it)."""
    torch.manual_seed(0)
    obs, _ = env.reset(seed=seed)
    policy.reset()
    actions, done = [], False
    while not done:
        actions.append(policy.select_action(obs))
        obs, _, term, trunc, _ = env.step(actions[-1])
        done = term or trunc
    return np.stack(actions)


def test_residual_policy_starts_exactly_at_the_base(base_policy, demos):
    agent = ResidualRL(base_policy, ENV, small_config(), demos=demos)
    env = gym.make(ENV)
    want = np.clip(episode_actions(base_policy, env, 7), env.action_space.low, env.action_space.high)  # as the env does
    np.testing.assert_array_equal(episode_actions(agent.eval_policy(), env, 7), want)
    # Batched evaluation agrees episode for episode.
    torch.manual_seed(1)
    base = evaluate(base_policy, ENV, episodes=4, seed=3, progress=False)
    torch.manual_seed(1)
    residual = evaluate(agent.eval_policy(), ENV, episodes=4, seed=3, progress=False)
    np.testing.assert_array_equal(residual.returns, base.returns)
    np.testing.assert_array_equal(residual.lengths, base.lengths)


def test_demo_transitions_by_hand(base_policy, demos):
    agent = ResidualRL(base_policy, ENV, small_config(), demos=demos)
    assert len(agent.demos) == len(demos)
    b = agent.demos.get(torch.arange(len(demos)))
    ep = demos.episode(0)
    L = len(ep["action"])
    # x = (normalised state, a_base in [-1, 1]); the stored action is the demo's own.
    frame = {"observation.state": torch.as_tensor(ep["observation.state"])}
    np.testing.assert_allclose(b["obs"][:L], agent.space.features(frame, agent.space.to_env(b["obs"][:L, -2:])),
                               atol=1e-6)
    np.testing.assert_allclose(agent.space.to_env(b["action"][:L]).numpy(), ep["action"], atol=1e-6)
    # Sparse reward 1 on the last (successful, terminal) step: 3-step returns by hand.
    assert ep["next.success"][-1] and L < 100
    np.testing.assert_allclose(b["reward"][L - 3:L].numpy(), [GAMMA**2, GAMMA, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(b["discount"][L - 3:L].numpy(), 0.0)
    np.testing.assert_allclose(b["discount"][: L - 3].numpy(), GAMMA**3, rtol=1e-6)
    np.testing.assert_array_equal(b["reward"][: L - 3].numpy(), 0.0)
    np.testing.assert_array_equal(b["next_obs"][: L - 3].numpy(), b["obs"][3:L].numpy())


def test_relabelled_base_action_is_the_base_queue_along_the_demo(base_policy, demos):
    one = demos.select([1])
    env = gym.make(ENV)
    space = ResidualSpace(base_policy, env.action_space.low, env.action_space.high)
    torch.manual_seed(5)
    runner = BaseRuntime(base_policy)
    want = np.stack([runner.select_action({"state": s}) for s in one.frames["observation.state"]])
    torch.manual_seed(5)
    out = demo_transitions(base_policy, space, one, GAMMA, 3, max_episode_steps=100)
    np.testing.assert_allclose(space.to_env(out["obs"][:, -2:]).numpy(), want, atol=1e-6)
    assert len(np.unique(want.round(5), axis=0)) > 4  # the base's action varies along the demo


def test_online_nstep_transitions(base_policy):
    agent = ResidualRL(base_policy, ENV, small_config(offline_ratio=0.0))
    info = {"episode_done": False}
    while not info["episode_done"]:
        info = agent.collect(random=True)
    L, success = agent.env_steps, float(info["is_success"])
    assert agent.episodes == 1 and len(agent.buffer) == L  # every step of the episode was flushed
    b = agent.buffer.get(torch.arange(L))
    # Consecutive transitions chain: next_obs of t is obs of t+3 (the base action included).
    np.testing.assert_array_equal(b["next_obs"][: L - 3].numpy(), b["obs"][3:].numpy())
    np.testing.assert_allclose(b["discount"][: L - 3].numpy(), GAMMA**3, rtol=1e-6)
    # The episode's end: a terminal (success or crash) or the 100-step time limit, by hand.
    end_discount = 0.0 if L < 100 else GAMMA
    np.testing.assert_allclose(b["reward"][-2:].numpy(), [GAMMA * success, success], rtol=1e-6)
    np.testing.assert_allclose(b["discount"][-2:].numpy(), [end_discount * GAMMA, end_discount], rtol=1e-6)
    # Warm-up acts as a_base + U(-warmup_noise, warmup_noise) in [-1, 1] units, clipped.
    delta = b["action"] - b["obs"][:, -2:].clamp(-1, 1)
    assert torch.all(b["action"].abs() <= 1) and delta.abs().max() <= agent.config.warmup_noise + 1e-6
    assert delta.abs().max() > 0.5 * agent.config.warmup_noise


def test_short_training_lowers_critic_loss(base_policy, demos):
    agent = ResidualRL(base_policy, ENV, small_config(critic_warmup=100), demos=demos)
    history = agent.train(600, eval_every=300, eval_episodes=2, progress=False)
    assert agent.env_steps == 600 and agent.updates == 500 == len(agent.log)
    assert [h["env_steps"] for h in history] == [0, 300, 600]  # the base first
    losses = np.array([r["critic_loss"] for r in agent.log])
    assert np.isfinite(losses).all()
    assert losses[-50:].mean() < 0.5 * losses[:20].mean(), (losses[:20].mean(), losses[-50:].mean())
    actor_rows = [r for r in agent.log if "actor_loss" in r]
    assert len(actor_rows) == 400  # the residual trains only after the critic's warm-up
    assert np.isfinite([r["actor_loss"] for r in actor_rows]).all()
    assert actor_rows[-1]["delta"] > 0  # the residual has moved off zero
    assert actor_rows[-1]["delta"] <= agent.config.action_scale
    for row in history:
        assert 0.0 <= row["success"] <= 1.0
    for p in [*agent.actor.parameters(), *agent.critic.parameters()]:
        assert torch.isfinite(p).all()
    assert not any(p.requires_grad for p in base_policy.parameters())


def test_bad_config(base_policy):
    with pytest.raises(ValueError, match="action_scale"):
        ResidualConfig(action_scale=0.0)
    with pytest.raises(ValueError, match="offline_ratio"):
        ResidualConfig(offline_ratio=1.5)
    with pytest.raises(ValueError, match="target_subset"):
        ResidualConfig(ensemble=2, target_subset=3)
    with pytest.raises(ValueError, match="demos="):
        ResidualRL(base_policy, ENV, small_config())
