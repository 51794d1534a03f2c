"""Tests of labkit.rewards: augmentation labels, Bradley-Terry against a hand computation, metrics on known
cases, a reward model that learns and round-trips, and the LearnedReward wrapper's honesty."""

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

import labkit  # noqa: F401  (before anything imports mujoco: picks the GL backend, registers tasks)
import labkit.data
from labkit.data import load_dataset
from labkit.eval import evaluate
from labkit.rewards import (
    KINDS,
    LearnedReward,
    PreferenceReward,
    RewardModel,
    Trajectory,
    accuracy,
    auroc,
    bradley_terry_loss,
    counterfactuals,
    ece,
    fit_preference,
    fit_reward,
    load_reward,
    rank_correlation,
    real_examples,
    reliability,
    replay_episodes,
    split_episodes,
    temporal_clips,
)

PEG = "labkit/PegInsert-v0"


def toy_traj(episode: int, length: int, succeed: bool, target=(0.0, 0.0)) -> Trajectory:
    """A 4-D toy episode: state = (t, t, target x, target y); success at the last state if `succeed`."""
    t = np.arange(length, dtype=np.float32)
    states = np.stack([t, t, np.full(length, target[0]), np.full(length, target[1])], 1).astype(np.float32)
    success = np.zeros(length, bool)
    success[-1] = succeed
    return Trajectory(states, success, np.linspace(1, 0.2, length).astype(np.float32), episode, episode)


# ---- negative augmentation -----------------------------------------------------------------------------


def test_temporal_clips_are_graded_near_misses():
    trajs = [toy_traj(0, 11, True), toy_traj(1, 11, False)]  # success at t = 10
    clips = temporal_clips(trajs, fractions=(0.25, 0.5, 0.75))
    np.testing.assert_array_equal(clips["state"][:, 0], [2, 5, 8])  # round(f * 10); 2.5 rounds to even
    np.testing.assert_allclose(clips["progress"], [0.2, 0.5, 0.8])
    assert (clips["success"] == 0).all() and (clips["episode"] == 0).all()  # the failed episode gives none
    assert (clips["kind"] == KINDS.index("clip")).all()
    every = temporal_clips(trajs, fractions=None)
    np.testing.assert_allclose(every["progress"], np.arange(10) / 10)
    with pytest.raises(ValueError, match="fractions"):
        temporal_clips(trajs, fractions=(0.5, 1.0))


def test_counterfactuals_swap_the_target_and_label_failure():
    trajs = [toy_traj(0, 5, True, (0.0, 0.0)), toy_traj(1, 5, True, (0.005, 0.0)), toy_traj(2, 5, False, (0.03, 0.04))]
    cf = counterfactuals(trajs, target_dims=(2, 3), per_episode=3, min_distance=0.01, last=2)
    assert len(cf["state"]) == 2 * 3 * 2  # 2 successful episodes x 3 draws x last 2 states
    assert (cf["success"] == 0).all() and (cf["progress"] == 0).all()
    # Episodes 0 and 1 are 5 mm apart (< min_distance): the only target far enough is episode 2's.
    np.testing.assert_allclose(cf["state"][:, 2:], np.tile([0.03, 0.04], (12, 1)))
    np.testing.assert_array_equal(cf["state"][:, 0], np.tile([3, 4], 6))  # the rest of the state is kept
    with pytest.raises(ValueError, match="target dims"):
        counterfactuals(trajs, target_dims="labkit/Nope-v0")


def test_real_examples_labels():
    ex = real_examples([toy_traj(0, 5, True), toy_traj(1, 3, False)])
    np.testing.assert_array_equal(ex["success"], [0, 0, 0, 0, 1, 0, 0, 0])
    np.testing.assert_allclose(ex["progress"], [0, 0.25, 0.5, 0.75, 1, 0, 0, 0])


def test_split_is_by_episode_and_stratified():
    trajs = [toy_traj(i, 4, i % 3 == 0) for i in range(30)]
    train, test = split_episodes(trajs, 0.3, seed=1)
    assert len(train) + len(test) == 30 and not {t.episode for t in train} & {t.episode for t in test}
    assert sum(t.succeeded for t in test) == 3 and sum(not t.succeeded for t in test) == 6


def test_replay_matches_the_shipped_peg_dataset():
    ds = load_dataset(labkit.data.DATASETS / "peg")
    wins = np.flatnonzero(ds.episodes["success"])[:2].tolist()
    fails = np.flatnonzero(~np.asarray(ds.episodes["success"], bool))[:1].tolist()
    trajs = replay_episodes(ds, PEG, wins + fails)  # raises if a replay drifts from the recording
    assert [t.succeeded for t in trajs] == [True, True, False]
    assert trajs[0].success[-1] and not trajs[0].success[:-1].any()  # the success state is the one after the last action
    assert all(len(t) == ds.lengths[i] + 1 for t, i in zip(trajs, wins + fails, strict=True))


# ---- Bradley-Terry ------------------------------------------------------------------------------------------


def test_bradley_terry_loss_by_hand():
    ra, rb = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 1.0])
    prefer = torch.tensor([1.0, 0.5, 0.0])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = (-math.log(sig(1.0)) - math.log(0.5) - math.log(1 - sig(-2.0))) / 3
    assert bradley_terry_loss(ra, rb, prefer).item() == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError, match="shape"):
        bradley_terry_loss(ra, rb[:2], prefer)


def test_preference_reward_learns_the_return_order():
    rng = np.random.default_rng(0)
    trajs = []
    for i in range(40):  # the true return is minus the summed distance; distance = |state[0]|
        x = rng.uniform(-1, 1) * np.ones((8, 1), np.float32) + rng.normal(0, 0.05, (8, 1)).astype(np.float32)
        trajs.append(Trajectory(np.concatenate([x, rng.normal(size=(8, 1)).astype(np.float32)], 1),
                                np.zeros(8, bool), np.abs(x[:, 0]), i, i))
    model = fit_preference(PreferenceReward.from_trajectories(trajs[:30], hidden=32), trajs[:30], steps=150,
                           pairs=1000, progress=False)
    assert np.mean(model.loss_history[-20:]) < np.mean(model.loss_history[:20])
    rho = rank_correlation([t.true_return for t in trajs[30:]], model.score(trajs[30:]))
    assert rho > 0.8


# ---- metrics --------------------------------------------------------------------------------------------------


def test_auroc_counts_ties_as_half():
    assert auroc([1, 0, 1, 0], [0.9, 0.9, 0.2, 0.1]) == pytest.approx(2.5 / 4)  # pairs: 1/2, 1, 0, 1
    rng = np.random.default_rng(0)
    y, s = rng.random(200) < 0.3, rng.integers(0, 5, 200).astype(float)  # many ties
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]])
    assert auroc(y, s) == pytest.approx(brute)
    with pytest.raises(ValueError, match="positives and negatives"):
        auroc([1, 1], [0.2, 0.3])


def test_ece_on_a_known_case():
    probs = [0.85] * 4 + [0.35] * 6 + [1.0]  # away from bin edges; 1.0 belongs to the last bin
    labels = [1, 1, 1, 0] + [0] * 6 + [1]
    want = 4 / 11 * abs(0.75 - 0.85) + 6 / 11 * 0.35 + 1 / 11 * 0.0
    assert ece(labels, probs) == pytest.approx(want)
    r = reliability(labels, probs, bins=10)
    assert r["count"].sum() == 11 and r["count"][9] == 1 and r["count"][8] == 4 and r["count"][3] == 6
    np.testing.assert_allclose(r["frequency"][[3, 8, 9]], [0, 0.75, 1])
    assert np.isnan(r["confidence"][0])
    assert ece([0, 1], [0.0, 1.0]) == 0.0
    assert accuracy([1, 0, 1], [0.7, 0.2, 0.4]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="0 or 1"):
        ece([2, 0], [0.1, 0.2])


# ---- reward models ------------------------------------------------------------------------------------------


def toy_examples(n: int, seed: int) -> dict:
    """Success iff state[0] > 0.5 in a 3-D state."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
    y = (s[:, 0] > 0.5).astype(np.float32)
    return {"state": s, "success": y, "progress": (s[:, 0] + 1) / 2, "episode": np.arange(n), "kind": np.zeros(n, int)}


def test_success_classifier_learns_and_round_trips(tmp_path):
    train, test = toy_examples(2000, 0), toy_examples(500, 1)
    model = fit_reward(RewardModel.from_examples(train, hidden=64), train, steps=300, progress=False)
    p = model.predict(test)
    assert p.shape == (500,) and auroc(test["success"], p) > 0.98 and accuracy(test["success"], p) > 0.95
    again = load_reward(model.save(tmp_path / "r.pt"))
    np.testing.assert_allclose(again.predict(test), p, atol=1e-6)  # the normaliser travels in the checkpoint
    assert np.ndim(model.predict({"state": test["state"][0]})) == 0
    with pytest.raises(ValueError, match="expected states"):
        model.predict({"state": np.zeros((2, 5))})


def test_fit_reward_trains_with_a_handed_in_training_step():
    """`fit_reward(training_step=fn)`: what a lesson hands in is what trains; the default is unchanged."""
    ex = toy_examples(600, 0)

    def run(step, **kw):
        torch.manual_seed(0)
        model = fit_reward(RewardModel.from_examples(ex, hidden=32), ex, steps=30, batch_size=64, progress=False,
                           training_step=step, **kw)
        assert model.batch_loss_fn is None  # only for the length of one fit
        return torch.nn.utils.parameters_to_vector(model.parameters()).detach()

    def flipped(model, batch):  # a plausible wrong answer: the labels the wrong way round
        return torch.nn.functional.binary_cross_entropy_with_logits(model.logits(batch["state"]), 1 - batch["success"])

    default = run(None)
    assert torch.equal(default, run(lambda m, b: m.batch_loss(b)))  # bit-identical
    assert not torch.allclose(default, run(flipped))
    assert not torch.allclose(run(None, positive_fraction=0.5), run(flipped, positive_fraction=0.5))
    with pytest.raises(TypeError, match="training_step must be a function"):
        fit_reward(RewardModel.from_examples(ex), ex, steps=1, progress=False, training_step="bce")


def test_fit_preference_trains_with_a_handed_in_loss():
    rng = np.random.default_rng(0)
    trajs = [Trajectory(rng.normal(size=(5, 2)).astype(np.float32), np.zeros(5, bool), np.full(5, i, np.float32), i, i)
             for i in range(12)]  # true returns 0, -4, -8, ...

    def run(loss_fn):
        torch.manual_seed(0)
        model = fit_preference(PreferenceReward.from_trajectories(trajs, hidden=16), trajs, steps=20, pairs=100,
                               batch_size=16, progress=False, loss_fn=loss_fn)
        assert model.loss_fn is bradley_terry_loss  # only for the length of one fit
        return torch.nn.utils.parameters_to_vector(model.parameters()).detach()

    default = run(None)
    assert torch.equal(default, run(lambda ra, rb, p: bradley_terry_loss(ra, rb, p)))
    assert not torch.allclose(default, run(lambda ra, rb, p: bradley_terry_loss(rb, ra, p)))  # the order reversed


def test_balanced_batches_and_prior_correction():
    from labkit.rewards.classifier import BalancedBatches

    ex = toy_examples(1000, 0)  # ~25% positives
    tensors = {k: torch.as_tensor(ex[k]) for k in ("state", "success")}
    for batch in BalancedBatches(tensors, 40, 3, positive_fraction=0.5):
        assert batch["success"].sum() == 20
    model = fit_reward(RewardModel.from_examples(ex, hidden=32), ex, steps=100, batch_size=64, progress=False,
                       positive_fraction=0.5)
    prior = ex["success"].mean()
    assert model.logit_offset.item() == pytest.approx(math.log(prior / (1 - prior)), rel=1e-5)
    with pytest.raises(ValueError, match="positive_fraction"):
        fit_reward(RewardModel.from_examples(ex, head="progress"), ex, steps=1, positive_fraction=0.5)


def test_progress_regressor_and_pixel_model_shapes():
    train = toy_examples(1000, 0)
    prog = fit_reward(RewardModel.from_examples(train, head="progress", hidden=64), train, steps=200, progress=False)
    assert rank_correlation(train["progress"], prog.predict(train)) > 0.9
    pix = RewardModel.from_examples(train, obs="pixels", target_dims=(1, 2), image_dim=16, hidden=32)
    images = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    assert pix.predict({"state": train["state"][:6], "pixels": images}).shape == (6,)
    with pytest.raises(ValueError, match="pixels"):
        pix.predict({"state": train["state"][:6]})
    with pytest.raises(ValueError, match="head"):
        RewardModel.from_examples(train, head="value")


# ---- the wrapper ---------------------------------------------------------------------------------------------


class Constant:
    """A reward model that always answers `value`."""

    def __init__(self, value: float):
        self.value = value

    def predict(self, obs):
        return np.float32(self.value)


def run_expert(env, seed):
    expert = labkit.envs.expert(env)
    obs, _ = env.reset(seed=seed)
    expert.reset(seed=seed)
    steps = []
    while True:
        obs, r, term, trunc, info = env.step(expert(obs))
        steps.append((r, term, info))
        if term or trunc:
            return steps


def test_learned_reward_hides_the_true_success():
    seed = int(np.flatnonzero(load_dataset(labkit.data.DATASETS / "peg").episodes["success"])[0])  # the expert wins
    never = run_expert(LearnedReward(gym.make(PEG), Constant(0.0)), seed)
    assert any(info["is_success"] for _, _, info in never)  # the true success still shows in info ...
    assert len(never) == 60 and not any(term for _, term, _ in never)  # ... but no longer ends the episode
    assert all(r == 0 for r, _, _ in never) and all("true_reward" in info for _, _, info in never)
    always = run_expert(LearnedReward(gym.make(PEG), Constant(0.9), threshold=0.5), seed)
    assert len(always) == 1 and always[0][0] == 1.0 and always[0][1]  # the model's success ends it
    assert not always[0][2]["is_success"] and always[0][2]["learned_success"]
    with pytest.raises(TypeError, match="terminate_on_success"):
        LearnedReward(gym.make("Pendulum-v1"), Constant(0.0))


def test_terminate_on_success_switch_and_true_evaluation():
    seed = int(np.flatnonzero(load_dataset(labkit.data.DATASETS / "peg").episodes["success"])[0])
    default = run_expert(gym.make(PEG), seed)
    assert default[-1][1] and default[-1][2]["is_success"]  # the default still ends on success
    assert len(run_expert(gym.make(PEG, terminate_on_success=False), seed)) == 60
    # evaluate() measures the true task: the expert's success on those seeds is what the dataset recorded.
    res = evaluate("expert", PEG, episodes=3, seed=seed, progress=False)
    assert res.success[0]


def test_dppo_trains_on_the_wrapped_reward_only():
    from labkit.policies import FlowPolicy, fit
    from labkit.rl.dppo import DPPO, DPPOConfig

    demos = load_dataset(labkit.data.DATASETS / "detour").select(range(5))
    torch.manual_seed(0)
    policy = fit(FlowPolicy.from_dataset(demos, horizon=8, n_action_steps=4, obs_horizon=2, hidden=32, layers=1,
                                         steps=3), demos, steps=20, batch_size=32, progress=False)
    cfg = DPPOConfig(num_envs=2, n_steps=3, minibatch_size=6, epochs=1, critic_hidden=16, critic_layers=1)
    agent = DPPO(policy, "labkit/Detour-v0", cfg, env_wrapper=lambda e: LearnedReward(e, Constant(1.0)))
    batch = agent.collect()
    assert agent.env_steps == 2 * 3  # the model's "success" ends every episode after its first step
    assert len(batch["finished"]) == 6 and all(ret == 1.0 for _, ret in batch["finished"])
    assert not agent.envs.envs[0].unwrapped.terminate_on_success
    res = agent.evaluate(episodes=2, seed=0)  # evaluation runs the true task: full episodes, no learned reward
    assert (res.lengths > 1).all()
