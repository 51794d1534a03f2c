"""Tests of ResFiT (labkit.rl.residual): the residual starts at the base, demo relabelling, n-step
online transitions, and a short TD3 training run."""

import gymnasium as gym
import numpy as np
import pytest
import torch

import labkit  # noqa: F401  (before anything imports mujoco: picks the GL backend, registers tasks)
from labkit.eval import evaluate
from labkit.rl.residual import (
    BaseRuntime,
    ResidualConfig,
    ResidualRL,
    ResidualSpace,
    demo_transitions,
    td3_actor_loss,
    td3_critic_loss,
)

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


def test_the_td3_losses_a_lesson_hands_in_train(base_policy, demos):
    """Lesson 04 hands in its own TD3 losses: labkit's own, handed in, give the default run bit for bit;
    a critic that forgets to bootstrap, or an actor that descends Q, trains something else."""
    def run(**losses) -> ResidualRL:
        agent = ResidualRL(base_policy, ENV, small_config(warmup_steps=60, critic_warmup=20), demos=demos, **losses)
        agent.train(120, progress=False)
        return agent

    def weights(agent):
        return torch.cat([p.flatten() for p in [*agent.actor.parameters(), *agent.critic.parameters()]])

    default = weights(run())
    assert torch.equal(weights(run(critic_loss_fn=td3_critic_loss, actor_loss_fn=td3_actor_loss)), default)

    def no_bootstrap(agent, batch):  # y = R_n: the TD target without its bootstrap term
        return (agent.critic(batch["obs"], batch["action"]) - batch["reward"]).pow(2).mean(1).sum()

    def ascends_nothing(agent, x):  # the wrong sign: the residual moves towards lower Q
        return -td3_actor_loss(agent, x)

    for wrong in (dict(critic_loss_fn=no_bootstrap), dict(actor_loss_fn=ascends_nothing)):
        assert (weights(run(**wrong)) - default).abs().max() > 1e-3, wrong


def test_td3_critic_loss_by_hand(base_policy, demos):
    """No smoothing noise and a pair out of two heads: y = R_n + discount * min(Q1', Q2')."""
    agent = ResidualRL(base_policy, ENV, small_config(target_noise=0.0), demos=demos)
    batch = agent.demos.get(torch.arange(32))
    with torch.no_grad():
        x, x2, A = batch["obs"], batch["next_obs"], agent.space.action_dim
        a2 = (x2[:, -A:] + agent.actor_target(x2, deterministic=True)[0]).clamp(-1, 1)
        q2 = agent.critic_target(x2, a2)
        y = batch["reward"] + batch["discount"] * torch.minimum(q2[0], q2[1])
        q = agent.critic(x, batch["action"])
        want = ((q[0] - y) ** 2).mean() + ((q[1] - y) ** 2).mean()
        torch.testing.assert_close(td3_critic_loss(agent, batch), want)
        want_actor = -agent.critic(x, (x[:, -A:] + agent.actor(x, deterministic=True)[0]).clamp(-1, 1)).mean()
        torch.testing.assert_close(td3_actor_loss(agent, x), want_actor)


def test_bad_config(base_policy):
    with pytest.raises(ValueError, match="action_scale"):
        ResidualConfig(action_scale=0.0)
    with pytest.raises(ValueError, match="offline_ratio"):
        ResidualConfig(offline_ratio=1.5)
    with pytest.raises(ValueError, match="target_subset"):
        ResidualConfig(ensemble=2, target_subset=3)
    with pytest.raises(ValueError, match="demos="):
        ResidualRL(base_policy, ENV, small_config())
