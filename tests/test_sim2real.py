"""Sim-to-real tools: the twin env, system identification recovering a known gap, dataset joining."""

import gymnasium as gym
import numpy as np
import pytest

import labkit  # noqa: F401  (headless GL first)
from labkit.data import DATASETS, load_dataset
from labkit.sim2real import ARM, TWIN, RobotEnv, cem, concat_episodes, identify, replay, trajectory_error


@pytest.fixture(scope="module")
def arm():
    return load_dataset(DATASETS / "arm", env_id=ARM)


def test_twin_env_runs_and_matches_the_plain_task_without_gaps():
    env = gym.make(TWIN, real=False)
    plain = gym.make(ARM)
    obs, _ = env.reset(seed=3)
    ref, _ = plain.reset(seed=3)
    a = plain.action_space.sample()
    for _ in range(3):
        obs, r, term, trunc, info = env.step(a)
        ref, *_ = plain.step(a)
    np.testing.assert_allclose(obs["state"], ref["state"], atol=1e-9)
    assert obs["state"].shape == (26,) and "is_success" in info
    env.close()


def test_twin_samples_gain_and_latency_ranges_per_reset():
    env = RobotEnv(real=False, gain=(0.9, 1.1), latency_steps=(0, 3))
    gains, lats = set(), set()
    for s in range(12):
        env.reset(seed=s)
        gains.add(round(float(env.robot.gain[0]), 6))
        lats.add(env.robot.latency_steps)
    assert len(gains) > 6 and lats <= {0, 1, 2, 3} and len(lats) > 1
    with pytest.raises(ValueError, match="latency_steps"):
        RobotEnv(real=False, latency_steps=(2, 1))


def test_identify_recovers_a_known_gain_and_latency(arm):
    ep = arm.episode(0)
    acts, seed = ep["action"][:60], int(arm.episodes["seed"][0])
    truth = dict(gain=0.95, latency_steps=2)
    rec = [dict(seed=seed, actions=acts, joints=replay(acts, seed, **truth))]
    best, errors = identify(rec, {"gain": [0.93, 0.95, 0.97, 1.0], "latency_steps": [0, 1, 2, 3]})
    assert best == truth
    assert errors.shape == (4, 4) and errors.min() < 1e-9 < errors[3, 0]
    with pytest.raises(ValueError):
        trajectory_error(np.zeros((3, 5)), np.zeros((4, 5)))


def test_concat_episodes_repeats_and_windows(arm):
    a, b = arm.select([0, 1]), arm.select([2])
    joined = concat_episodes(a, b, repeat=(1, 3))
    assert joined.num_episodes == 5
    assert len(joined) == len(a) + 3 * len(b)
    np.testing.assert_array_equal(joined.episode(4)["action"], b.episode(0)["action"])
    np.testing.assert_array_equal(joined.frames["index"], np.arange(len(joined)))
    np.testing.assert_array_equal(joined.frames["episode_index"], np.repeat(np.arange(5), joined.lengths))
    np.testing.assert_array_equal(joined.episode(3)["frame_index"], b.episode(0)["frame_index"])
    union = np.concatenate([a.frames["action"], *[b.frames["action"]] * 3])
    np.testing.assert_allclose(joined.stats["action"]["mean"], union.mean(0), rtol=1e-5, atol=1e-7)
    assert joined.info["features"] == a.info["features"] and joined.info["total_episodes"] == 5
    w = joined.windows(2, 16)
    assert w["action"].shape == (len(joined), 16, 6)
    with pytest.raises(ValueError):
        concat_episodes(a, b, repeat=(1,))


def test_cem_finds_a_quadratic_minimum_with_an_integer_coordinate():
    target = np.array([0.3, -0.6, 2.0])
    x, f, hist = cem(lambda x: float(((x - target) ** 2).sum()), [-1, -1, 0], [1, 1, 4], iters=12,
                     population=24, elite=6, seed=0, integer=(2,))
    assert x[2] == 2.0 and np.abs(x[:2] - target[:2]).max() < 0.05 and f < 3e-3
    assert [h["best"] for h in hist] == sorted([h["best"] for h in hist], reverse=True)
    with pytest.raises(ValueError):
        cem(lambda x: 0.0, [1.0], [0.0])


def test_cem_runs_a_handed_in_update():
    """`sample=` and `refit=` replace CEM's two halves: the same code written out is bit-identical to
    labkit's, and a wrong refit (the *worst* samples kept) no longer finds the minimum."""
    from labkit.sim2real import cem_refit, cem_sample

    quad = lambda x: float(((x - np.array([0.3, -0.6, 2.0])) ** 2).sum())  # noqa: E731
    args = dict(low=[-1, -1, 0], high=[1, 1, 4], iters=8, population=16, elite=4, seed=0, integer=(2,))

    def sample(mean, std, low, high, population, rng, integer):
        xs = np.clip(rng.normal(mean, std, (population, len(mean))), low, high)
        xs[:, list(integer)] = np.round(xs[:, list(integer)])
        return xs

    def refit(xs, fs, elite):
        top = xs[np.argsort(fs)[:elite]]
        return top.mean(0), top.std(0)

    def worst(xs, fs, elite):
        top = xs[np.argsort(fs)[-elite:]]
        return top.mean(0), top.std(0)

    x0, f0, h0 = cem(quad, **args)
    x1, f1, h1 = cem(quad, **args, sample=sample, refit=refit)
    assert f1 == f0 and np.array_equal(x1, x0) and all(np.array_equal(a["std"], b["std"]) for a, b in zip(h0, h1, strict=True))
    _, f2, _ = cem(quad, **args, refit=worst)
    assert f0 < 0.05 and f2 > 5 * f0
    rng = np.random.default_rng(3)
    xs = cem_sample(np.zeros(3), np.ones(3), -np.ones(3) / 2, np.ones(3) * 3, 200, rng, integer=(2,))
    assert xs.shape == (200, 3) and xs.min() >= -0.5 and np.all(xs[:, 2] == np.round(xs[:, 2]))
    m, s = cem_refit(np.array([[0.0, 1.0], [2.0, 3.0], [10.0, 10.0], [4.0, 5.0]]), np.array([1.0, 3.0, 0.5, 9.0]), 2)
    np.testing.assert_allclose(np.r_[m, s], [5.0, 5.5, 5.0, 4.5])
    with pytest.raises(ValueError, match="population"):
        cem(quad, **args, sample=lambda *a: np.zeros((3, 3)))
