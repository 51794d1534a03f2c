"""Tests of OGPO (labkit.rl.ogpo): group-relative conservative advantages by hand, the PPO step moves the
chain toward the critic's preferred chunks, the agent's update, errors by name."""

import numpy as np
import pytest
import torch

import labkit  # noqa: F401  (before anything imports mujoco: picks the GL backend, registers tasks)
from labkit.rl import Agent
from labkit.rl.best_of_n import critic_action
from labkit.rl.ogpo import OGPO, OGPOConfig, group_advantages

ENV = "labkit/Detour-v0"


def copy_of(policy):
    new = type(policy)(policy.config, policy.shapes, policy.stats)
    new.load_state_dict(policy.state_dict())
    return new.eval()


def small_config(**kw) -> OGPOConfig:
    return OGPOConfig(**{**dict(group=4, actor_batch=8, hidden=(64, 64), batch_size=32, utd=1, actor_every=1,
                                warmup_steps=40, critic_warmup=5, seed=0), **kw})


def test_group_advantages_by_hand():
    # two members, one state, four chains
    q = torch.tensor([[[1.0, 2.0, 3.0, 6.0]], [[2.0, 2.0, 5.0, 3.0]]])
    # relative to each member's group mean (3 and 3): [-2, -1, 0, 3] and [-1, -1, 2, 0]
    # conservative: both < 0 -> max (-1, -1); disagree or a zero -> 0; so [-1, -1, 0, 0]
    raw = torch.tensor([-1.0, -1.0, 0.0, 0.0])
    want = raw / raw.std(unbiased=False)
    torch.testing.assert_close(group_advantages(q)[0], want, atol=1e-5, rtol=0)
    mean = torch.tensor([-1.5, -1.0, 1.0, 1.5])
    torch.testing.assert_close(group_advantages(q, conservative=False)[0], mean / mean.std(unbiased=False),
                               atol=1e-5, rtol=0)
    # all members agree a chain is better: the smaller claim is kept
    q2 = torch.tensor([[[0.0, 4.0]], [[0.0, 2.0]]])  # relative: [-2, 2] and [-1, 1] -> [-1, 1]
    torch.testing.assert_close(group_advantages(q2)[0], torch.tensor([-1.0, 1.0]), atol=1e-5, rtol=0)
    # a group whose chains the critic cannot tell apart gives no signal (no division by zero)
    assert torch.equal(group_advantages(torch.ones(2, 3, 5)), torch.zeros(3, 5))


def test_bad_config_and_inputs_are_named(base_policy):
    with pytest.raises(ValueError, match="group"):
        OGPOConfig(group=1)
    with pytest.raises(ValueError, match="min_std"):
        OGPOConfig(min_std=0)
    with pytest.raises(ValueError, match="actor_batch"):
        OGPOConfig(actor_batch=0)
    with pytest.raises(ValueError, match="demos="):
        OGPO(copy_of(base_policy), ENV, small_config())
    assert Agent.registry["ogpo"] is OGPO


class _PreferPositive(torch.nn.Module):
    """A hand-made critic: the sum of the executed chunk (two identical members)."""

    def forward(self, x, a):
        return a.sum(-1).expand(2, -1)


def test_actor_updates_move_the_chain_toward_the_critic(base_policy, demos):
    agent = OGPO(copy_of(base_policy), ENV, small_config(bc_coef=0.0, offline_ratio=0.0, actor_lr=1e-3,
                                                         actor_batch=16, group=8, clip=0.2), demos=None)
    agent.critic = _PreferPositive()
    ema_before = [p.clone() for p in agent.policy.ema.model.parameters()]
    obs = agent.policy.normalize_obs({k: torch.as_tensor(v) for k, v in demos.windows(
        obs_horizon=agent.policy.config.obs_horizon, horizon=8, keys=agent.policy.config.obs_keys)["obs"].items()})
    obs = {k: v[:64] for k, v in obs.items()}

    def mean_q():
        torch.manual_seed(0)
        with torch.no_grad():
            return critic_action(agent.chains(obs, 4, use_ema=False).actions, agent.execute).sum(-1).mean().item()

    before = mean_q()
    x = torch.zeros(64, 1)
    for _ in range(30):
        out = agent.actor_update(obs, x)
    after = mean_q()
    assert after > before + 0.3, (before, after)
    assert np.isfinite(out["actor_loss"]) and 0 < out["adv_nonzero"] <= 1
    # the EMA copy (what acts) follows the live weights
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, agent.policy.ema.model.parameters(), strict=True))


def test_short_training(base_policy, demos):
    agent = OGPO(copy_of(base_policy), ENV, small_config(), demos=demos)
    live = [p.detach().clone() for p in agent.policy.model.parameters()]
    history = agent.train(200, eval_every=100, eval_episodes=2, progress=False)
    assert agent.env_steps >= 200 and len(history) == 3
    losses = np.array([r["critic_loss"] for r in agent.log])
    assert np.isfinite(losses).all() and len(losses) > 20
    actor = [r for r in agent.log if "actor_loss" in r]
    assert actor and np.isfinite([r["actor_loss"] for r in actor]).all()
    assert np.isfinite([r["bc_loss"] for r in actor]).all()
    assert any(not torch.equal(a, b) for a, b in zip(live, agent.policy.model.parameters(), strict=True))
    # the flow-matching term imitates the successful demos only
    won = np.asarray(demos.episodes["success"], bool)
    assert len(agent.successes) == int(demos.lengths[won].sum()) and len(agent.demos) == len(demos)
