"""Tests of RECAP (labkit.rl.recap): returns, value, advantages, the indicator, guidance and the loop."""

import numpy as np
import pytest
import torch

import labkit  # noqa: F401  (before anything imports mujoco: picks the GL backend, registers tasks)
from labkit.policies import FlowPolicy, fit, load_policy
from labkit.rl.recap import (
    INDICATOR,
    NULL,
    POSITIVE,
    RECAP,
    AdvantageFlowConfig,
    AdvantageFlowPolicy,
    RECAPConfig,
    ValueModel,
    binarize,
    fit_value,
    nstep_advantages,
    recap_rewards,
    two_hot,
)

ENV = "labkit/Detour-v0"
TINY = dict(horizon=8, n_action_steps=4, obs_horizon=2, hidden=64, layers=2, steps=5)


def scrambled(policy):
    """Perturbed weights everywhere (the FiLM layers start at zero, which would hide the indicator)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy


# ---- rewards, value, advantages, indicator ---------------------------------------------------------

def test_rewards_and_clipped_returns_by_hand():
    # A success of 3 frames and a failure of 2, T_max = 4: -1/4 per step, 0 on success, -1 on failure.
    rewards, returns = recap_rewards([3, 2], [True, False], t_max=4, fail_penalty=1.0)
    np.testing.assert_allclose(rewards, [-0.25, -0.25, 0.0, -0.25, -1.0])
    np.testing.assert_allclose(returns, [-0.5, -0.25, 0.0, -1.0, -1.0])  # -1.25 clipped to -1
    with pytest.raises(ValueError, match="t_max"):
        recap_rewards([3], [True], t_max=0)


def test_two_hot_keeps_the_target_as_its_expectation():
    target = torch.tensor([-1.0, -0.73, -0.5, -0.011, 0.0, 0.4])  # 0.4 is clipped to 0
    p = two_hot(target, 51)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)
    assert ((p > 0).sum(1) <= 2).all()
    np.testing.assert_allclose(p @ torch.linspace(-1, 0, 51), target.clamp(max=0), atol=1e-6)


def test_nstep_advantages_by_hand():
    rewards, _ = recap_rewards([3, 2], [True, False], t_max=4)
    ends = torch.tensor([False, False, True, False, True])
    values = torch.tensor([-0.5, -0.2, 0.0, -0.9, -1.0])
    adv = nstep_advantages(rewards, ends, values, n=2)
    # t=0: r0 + r1 + V(o2) - V(o0); t=1, 2: the episode ends inside the window (Monte-Carlo tail);
    # t=3: -0.25 - 1 + 0.9; t=4: -1 + 1. Nothing leaks across the episode boundary.
    np.testing.assert_allclose(adv, [-0.5 + 0.0 + 0.5, -0.25 + 0.2, 0.0, -1.25 + 0.9, 0.0], atol=1e-6)


def test_binarize_fraction_threshold_and_interventions():
    ind, thr = binarize(np.arange(10.0), positive_fraction=0.3)
    assert thr == pytest.approx(6.3)  # the 0.7 quantile, linearly interpolated
    np.testing.assert_array_equal(np.flatnonzero(ind), [7, 8, 9])
    # An intervention frame is positive whatever its advantage, and the quantile ignores it:
    # over the other nine values [0, 1, 3, ..., 9] the 0.7 quantile is 6 + 0.6 = 6.6.
    forced = np.zeros(10, bool)
    forced[2] = True
    ind, thr = binarize(np.arange(10.0), 0.3, forced)
    assert thr == pytest.approx(6.6)
    np.testing.assert_array_equal(np.flatnonzero(ind), [2, 7, 8, 9])
    with pytest.raises(ValueError, match="positive_fraction"):
        binarize(np.arange(3.0), 1.0)
    with pytest.raises(ValueError, match="one flag per advantage"):
        binarize(np.arange(3.0), 0.3, [True])


def test_value_cross_entropy_falls_and_value_tracks_targets():
    torch.manual_seed(0)
    x = torch.rand(2000, 3)
    target = -(x[:, 0] * 0.8 + 0.2 * x[:, 1])  # in [-1, 0]
    model = ValueModel(3, bins=51, hidden=64, layers=2)
    losses = fit_value(model, x, target, steps=400, batch_size=128, lr=3e-3)
    assert np.isfinite(losses).all()
    assert losses[-20:].mean() < 0.6 * losses[:20].mean(), (losses[:20].mean(), losses[-20:].mean())
    with torch.no_grad():
        err = (model.value(x) - target).abs().mean()
    assert err < 0.05, err


# ---- the conditional policy ------------------------------------------------------------------------

def test_guidance_arithmetic_on_a_net(demos):
    policy = scrambled(AdvantageFlowPolicy.from_dataset(demos, **TINY, ema=False)).eval()
    net, torch_gen = policy.model, torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, 2, generator=torch_gen)
    t = torch.rand(5, generator=torch_gen)
    feat = torch.randn(5, net["encoder"].out_dim, generator=torch_gen)
    with torch.no_grad():
        v_null = policy.conditional_velocity(net, x, t, feat, NULL)
        v_pos = policy.conditional_velocity(net, x, t, feat, POSITIVE)
        assert (v_pos - v_null).abs().mean() > 1e-2  # the indicator changes the velocity
        torch.testing.assert_close(policy.velocity(net, x, t, feat, 0.0), v_null)
        torch.testing.assert_close(policy.velocity(net, x, t, feat, 1.0), v_pos)
        for beta in (0.5, 1.5, 2.0, 3.0):
            torch.testing.assert_close(policy.velocity(net, x, t, feat, beta), v_null + beta * (v_pos - v_null),
                                       atol=1e-5, rtol=1e-5)
        # sample() integrates the guided velocity with K Euler steps.
        obs = policy.normalize_obs({"observation.state": torch.as_tensor(demos.frames["observation.state"][:5, None])
                                    .repeat(1, 2, 1)})
        policy.guidance = 2.0
        noise = torch.randn(5, 8, 2, generator=torch_gen)
        got = policy.sample(obs, noise=noise).actions
        z, f = noise, net["encoder"](obs)
        for i in range(5):
            z = z + policy.velocity(net, z, torch.full((5,), i / 5), f, 2.0) / 5
        torch.testing.assert_close(got, z, atol=1e-5, rtol=1e-5)


def test_training_needs_the_indicator_and_loss_falls(demos):
    policy = AdvantageFlowPolicy.from_dataset(demos, **TINY)
    with pytest.raises(ValueError, match=INDICATOR):
        fit(policy, demos, steps=2, batch_size=8, progress=False)
    labelled = demos.select(range(demos.num_episodes))
    labelled.frames[INDICATOR] = (np.arange(len(labelled)) % 2).astype(np.int64)
    fit(policy, labelled, steps=150, batch_size=64, progress=False)
    losses = policy.losses()
    assert np.isfinite(losses).all() and losses[-20:].mean() < 0.7 * losses[:20].mean()
    with pytest.raises(ValueError, match="null_dropout"):
        AdvantageFlowConfig(null_dropout=1.0)
    with pytest.raises(ValueError, match="guidance"):
        policy.guidance = -1.0


def test_checkpoint_round_trip(demos, tmp_path):
    policy = scrambled(AdvantageFlowPolicy.from_dataset(demos, **TINY)).eval()
    policy.guidance = 2.0  # set after construction: the checkpoint must carry it
    loaded = load_policy(policy.save(tmp_path / "recap.ckpt"))
    assert type(loaded) is AdvantageFlowPolicy and loaded.guidance == 2.0
    obs = {"observation.state": torch.as_tensor(demos.frames["observation.state"][:3, None]).repeat(1, 2, 1)}
    torch.manual_seed(5)
    want = policy.predict_action_chunk(obs)
    torch.manual_seed(5)
    torch.testing.assert_close(loaded.predict_action_chunk(obs), want)
    loaded.reset()
    assert loaded.select_action({"state": demos.frames["observation.state"][0]}).shape == (2,)


def test_warm_start_reproduces_the_flow_policy(demos):
    torch.manual_seed(0)
    base = fit(FlowPolicy.from_dataset(demos, **TINY), demos, steps=30, batch_size=32, progress=False)
    new = AdvantageFlowPolicy.from_flow_policy(base)
    obs = base.normalize_obs({"observation.state": torch.as_tensor(demos.frames["observation.state"][:4, None])
                              .repeat(1, 2, 1)})
    noise = torch.randn(4, 8, 2)
    with torch.no_grad():
        want = base.sample(obs, noise=noise).actions
        for beta in (0.0, 1.0, 2.0):  # zeroed indicator inputs: every conditioning is the old policy
            new.guidance = beta
            torch.testing.assert_close(new.sample(obs, noise=noise).actions, want)
    with pytest.raises(ValueError, match="can change"):
        AdvantageFlowPolicy.from_flow_policy(base, hidden=32)


# ---- the loop ----------------------------------------------------------------------------------------

def test_smoke_rounds_with_interventions(demos):
    cfg = RECAPConfig(rounds=2, rollouts=6, interventions=3, value_steps=60, policy_steps=60, batch_size=64,
                      eval_episodes=4, nstep=5, policy=TINY, seed=0)
    agent = RECAP(demos, ENV, cfg)
    history = agent.train(progress=False)
    assert [h["round"] for h in history] == [0, 1]
    assert "collected" not in history[0] and history[1]["collected"] == 6  # round 0 trains on the demos first
    for row in history:
        assert all(np.isfinite(v) for v in row.values() if isinstance(v, float)), row
        assert 0.0 <= row["success"] <= 1.0
    assert history[1]["env_steps"] > 0 and history[1]["episodes"] == 6 + 6 + history[1]["interventions"]
    for p in agent.policy.parameters():
        assert torch.isfinite(p).all()

    # An (untrained) tiny policy fails, so the expert corrects some rollouts: a prefix of the policy's
    # own frames (the same states, replayed from the seed), then expert frames flagged as interventions.
    fixes = [e for e in agent.episodes if e["source"] == "intervention"]
    assert fixes, "expected at least one successful intervention"
    by_seed = {e["seed"]: e for e in agent.episodes if e["source"] == "rollout"}
    for fix in fixes:
        k = int((~fix["intervention"]).sum())
        assert fix["success"] and fix["intervention"][k:].all()
        np.testing.assert_array_equal(fix["action"][:k], by_seed[fix["seed"]]["action"][:k])
        np.testing.assert_allclose(fix["obs"]["observation.state"][:k],
                                   by_seed[fix["seed"]]["obs"]["observation.state"][:k], atol=1e-6)
    labels = agent.advantages()
    flags = agent.labelled_dataset().frames["intervention"]
    assert labels["indicator"][flags].all()
    assert torch.isfinite(labels["advantages"]).all() and torch.isfinite(labels["values"]).all()


def test_the_binarize_a_lesson_hands_in_labels_the_training(demos):
    """Lesson 05 hands in its own binarize: labkit's own, handed in, gives the default round bit for bit;
    a wrong one (the bottom frames labelled positive) trains another policy."""
    cfg = RECAPConfig(rounds=1, value_steps=30, policy_steps=30, batch_size=32, eval_episodes=0, policy=TINY, seed=0)

    def round0(fn=None):
        agent = RECAP(demos, ENV, cfg, binarize_fn=fn)
        agent.run_round()
        return agent.advantages()["indicator"], torch.cat([p.flatten() for p in agent.policy.model.parameters()])

    default_labels, default = round0()
    labels, weights = round0(binarize)
    np.testing.assert_array_equal(labels, default_labels)
    assert torch.equal(weights, default)
    wrong_labels, wrong = round0(lambda a, f, forced: binarize(-np.asarray(a), f, forced))
    assert (wrong_labels != default_labels).mean() > 0.3
    assert not torch.equal(wrong, default)


def test_bad_config(demos):
    with pytest.raises(ValueError, match="positive_fraction"):
        RECAPConfig(positive_fraction=0.0)
    with pytest.raises(ValueError, match="takeover_back"):
        RECAPConfig(takeover_back=(10, 5))
    with pytest.raises(ValueError, match="source"):
        RECAP("not a dataset", ENV)
    with pytest.raises(ValueError, match="not both"):
        RECAP(demos, ENV, dataset=demos)


# ---- interventions -----------------------------------------------------------------------------------

def test_takeover_replaying_the_experts_own_actions_reproduces_its_rollout():
    import gymnasium as gym

    from labkit.eval import rollout
    from labkit.rl.interventions import Takeover, corrected_episode

    env = gym.make(ENV)
    for noise, ks in ((0.02, (0, None)), (0.0, (0, 3, 10, None))):
        # With the default noise the expert's random stream restarts at the takeover, so only k = 0 (all
        # expert) and k = T (all replay) reproduce it; a noiseless expert resumes exactly from any early k.
        expert = labkit.envs.expert(env, noise=noise)
        ref = rollout(expert, ENV, [7], keep=("obs", "actions"))[0]
        assert ref.success and ref.length > 10
        for k in ks:
            takeover = Takeover(expert, ref.actions, k)
            ep = rollout(takeover, ENV, [7], keep=("obs", "actions"))[0]
            assert ep.length == ref.length and ep.success, (noise, k)
            np.testing.assert_array_equal(ep.actions, ref.actions)
            np.testing.assert_array_equal(ep.obs["state"], ref.obs["state"])
            assert takeover.expert_acting == (k is not None)

    # The expert is reset (with its own seed) exactly when it takes over, and only then.
    resets = []

    class Spy:
        def reset(self, seed=None):
            resets.append((takeover.t, seed))

        def __call__(self, obs):
            return np.zeros(2, np.float32)

    takeover = Takeover(Spy(), np.ones((5, 2), np.float32), 3, expert_seed=11)
    takeover.reset(seed=99)
    actions = [takeover({"state": None}) for _ in range(5)]
    assert resets == [(3, 11)] and [a[0] for a in actions] == [1, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="steps"):
        Takeover(Spy(), np.ones((5, 2)), 6)

    failed = {"obs": {"observation.state": np.arange(8.0).reshape(4, 2)}, "action": np.arange(4.0).reshape(4, 1)}
    fixed = corrected_episode(failed, 2, {"observation.state": -np.ones((3, 2))}, -np.ones((3, 1)), seed=5)
    assert fixed["success"] and fixed["seed"] == 5 and fixed["intervention"].tolist() == [False, False, True, True, True]
    np.testing.assert_array_equal(fixed["obs"]["observation.state"][:2], failed["obs"]["observation.state"][:2])
    np.testing.assert_array_equal(fixed["action"][:, 0], [0, 1, -1, -1, -1])
