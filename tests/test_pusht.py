"""labkit/PushT-v0: the task contract, the coverage measure, physics options and the scripted expert."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import labkit
from labkit.envs.pusht import BAR, KEYPOINTS, STEM, T_POINTS, TARGET, WORKSPACE, coverage, to_local, to_world


@pytest.mark.parametrize("obs_mode", ["state", "pixels"])
def test_pusht_passes_check_env(obs_mode):
    env = gym.make("labkit/PushT-v0", obs_mode=obs_mode)
    check_env(env.unwrapped, skip_render_check=True)
    obs, info = env.reset(seed=0)
    assert obs["state"].shape == (12,) and obs["proprio"].shape == (4,)
    assert "is_success" in info and 0.0 <= info["coverage"] < 0.3, "the block starts away from the target"
    space = env.action_space
    assert np.allclose(space.low, -WORKSPACE) and np.allclose(space.high, WORKSPACE)
    if obs_mode == "pixels":
        px = obs["pixels"]
        assert px.shape == (96, 96, 3) and px.dtype == np.uint8
        colours = {tuple(c) for c in (px // 32).reshape(-1, 3)}
        assert len(colours) >= 4, "floor, target, block and pusher should all be visible"


def test_pusht_is_deterministic_under_seed():
    def rollout(seed):
        env = gym.make("labkit/PushT-v0")
        obs, _ = env.reset(seed=seed)
        out = [obs["state"]]
        for t in range(20):
            action = np.array([0.2 * np.cos(t / 3), 0.2 * np.sin(t / 3)], np.float32)
            out.append(env.step(action)[0]["state"])
        return np.stack(out)

    np.testing.assert_array_equal(rollout(3), rollout(3))
    assert not np.array_equal(rollout(3), rollout(4))


def test_coverage_at_target_and_far_away():
    assert coverage(TARGET) >= 0.99
    assert coverage(TARGET + [0.2, 0.0, 0.0]) == 0.0
    assert coverage(TARGET + [0.0, 0.0, np.pi]) < 0.5  # upside down covers only part of the stem
    assert 0.5 < coverage(TARGET + [0.005, 0.0, 0.0]) < 0.95  # 5 mm off is not good enough

    env = gym.make("labkit/PushT-v0", reward_type="dense")
    env.reset(seed=0)
    pusher_far = np.array([-0.2, -0.2], np.float32)
    env.unwrapped.set_block_pose(TARGET, pusher=pusher_far)
    _, r, term, _, info = env.step(pusher_far)
    assert info["coverage"] >= 0.99 and info["is_success"] and term
    assert r == pytest.approx(info["coverage"])


def test_fast_coverage_counts_exactly_what_the_plain_formula_counts():
    """`coverage` runs every step, so it is written for speed; it must still count exactly the same
    sample points as the plain formula (transform the target's points, test each box, average),
    including at poses where points lie on the T's edges (the target pose, quarter turns)."""

    def plain(pose):
        local = to_local(pose, to_world(TARGET, T_POINTS))
        inside = np.zeros(len(local), bool)
        for c, h in (BAR, STEM):
            inside |= np.all(np.abs(local - c) <= h, axis=1)
        return float(inside.mean())

    rng = np.random.default_rng(0)
    poses = [TARGET, TARGET + [0, 0, np.pi / 2], TARGET + [0.0025, 0, 0], TARGET + [0, -0.005, np.pi]]
    poses += list(TARGET + rng.normal(0, [0.01, 0.01, 0.1], (300, 3)))
    poses += list(np.column_stack([rng.uniform(-0.2, 0.2, (200, 2)), rng.uniform(-np.pi, np.pi, 200)]))
    for pose in poses:
        assert coverage(pose) == plain(pose), pose
        assert type(coverage(pose)) is float
    assert coverage(TARGET, target_pose=TARGET + [0.2, 0, 0]) == 0.0  # another target: computed, not cached


def test_success_flag_matches_coverage():
    env = gym.make("labkit/PushT-v0")
    env.reset(seed=1)
    for _ in range(30):
        _, r, term, _, info = env.step(env.action_space.sample())
        assert info["is_success"] == (info["coverage"] >= 0.95) == (r == 1.0) == term
        if term:
            break


def test_block_stays_put_when_not_pushed():
    env = gym.make("labkit/PushT-v0")
    obs, _ = env.reset(seed=2)
    hold = obs["state"][:2].copy()
    for _ in range(20):
        obs2, *_ = env.step(hold)
    np.testing.assert_allclose(obs2["state"][2:], obs["state"][2:], atol=1e-4)


def test_pusht_expert_succeeds_with_two_strategies():
    env = gym.make("labkit/PushT-v0")
    expert = labkit.envs.expert(env)
    wins, modes, lengths = 0, [], []
    for seed in range(20):
        obs, _ = env.reset(seed=seed)
        expert.reset(seed=seed)
        modes.append(expert.mode)
        term = trunc = False
        steps = 0
        while not (term or trunc):  # the time limit (300 steps) truncates
            action = expert(obs)
            assert env.action_space.contains(action)
            obs, r, term, trunc, info = env.step(action)
            steps += 1
        wins += info["is_success"]
        lengths.append(steps)
    assert wins >= 17, f"expert succeeded in {wins}/20 episodes"
    assert np.mean(lengths) < 220
    assert set(modes) == {"bar", "stem"} and 0.2 <= modes.count("bar") / 20 <= 0.8


def test_pusht_expert_is_deterministic():
    env = gym.make("labkit/PushT-v0")
    expert = labkit.envs.expert(env)

    def actions(seed):
        obs, _ = env.reset(seed=seed)
        expert.reset(seed=seed)
        out = []
        for _ in range(30):
            out.append(expert(obs))
            obs, *_ = env.step(out[-1])
        return np.stack(out)

    np.testing.assert_array_equal(actions(5), actions(5))


def test_physics_options_and_bad_input():
    env = gym.make("labkit/PushT-v0", friction=0.5, mass=(0.5, 2.0), damping=1.5, obs_noise=0.001)
    obs, _ = env.reset(seed=0)
    assert env.unwrapped.model.geom_friction[0, 0] == pytest.approx(0.25)
    env.step(env.action_space.sample())
    with pytest.raises(ValueError, match="friction"):
        gym.make("labkit/PushT-v0", friction=-1)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(3, np.float32))


INTERFACES = [{"frame": "block"}, {"actions": "relative"}, {"frame": "block", "actions": "relative"}]


@pytest.mark.parametrize("kwargs", INTERFACES, ids=lambda k: "-".join(k.values()))
def test_frames_and_relative_actions_are_the_same_task(kwargs):
    """frame="block": observations and actions in the block's frame; actions="relative": the target
    as a move from the pusher. Either way the physics is unchanged."""
    world, block = gym.make("labkit/PushT-v0"), gym.make("labkit/PushT-v0", **kwargs)
    check_env(block.unwrapped, skip_render_check=True)
    expert = labkit.envs.expert(world)
    obs_w, _ = world.reset(seed=7)
    obs_b, _ = block.reset(seed=7)
    expert.reset(seed=7)
    relative = kwargs.get("actions") == "relative"
    for _ in range(60):  # the world expert drives both; the other env gets its command converted
        a = expert(obs_w)
        here = block.unwrapped.to_env_frame(block.unwrapped.pusher_pos())
        if relative:  # staying put is the zero move; the expert never asks for more than 2.5 cm
            np.testing.assert_allclose(here, 0, atol=1e-12)
            assert np.linalg.norm(block.unwrapped.to_env_frame(a)) < 0.026
        else:
            np.testing.assert_allclose(obs_b["state"][:2], here, atol=1e-6)
        obs_w, *_ = world.step(a)
        obs_b, *_ = block.step(block.unwrapped.to_env_frame(a))
        np.testing.assert_allclose(block.unwrapped.block_pose(), world.unwrapped.block_pose(), atol=1e-5)
    assert np.linalg.norm(world.unwrapped.block_pose()[:2] - obs_w["state"][2:4]) < 1e-6
    if kwargs.get("frame") != "block":
        np.testing.assert_array_equal(obs_w["state"], obs_b["state"])  # relative actions: same observations
        return
    assert not np.allclose(obs_w["state"], obs_b["state"])

    # At the target pose the target sits on the block: centre 0, angle 0, keypoints the T's own.
    block.unwrapped.set_block_pose(TARGET, pusher=np.array([-0.2, -0.2]))
    state = block.unwrapped._state()
    np.testing.assert_allclose(state[2:6], [0, 0, 1, 0], atol=1e-9)
    np.testing.assert_allclose(state[6:].reshape(3, 2), KEYPOINTS, atol=1e-9)


def test_unknown_frame_or_actions_are_named_errors():
    with pytest.raises(ValueError, match="frame must be one of"):
        gym.make("labkit/PushT-v0", frame="pusher")
    with pytest.raises(ValueError, match="actions must be one of"):
        gym.make("labkit/PushT-v0", actions="delta")


@pytest.mark.parametrize("kwargs", INTERFACES[::2], ids=lambda k: "-".join(k.values()))
def test_expert_acts_in_the_block_frame(kwargs):
    env = gym.make("labkit/PushT-v0", **kwargs)
    expert = labkit.envs.expert(env)
    wins = 0
    for seed in range(5):
        obs, _ = env.reset(seed=seed)
        expert.reset(seed=seed)
        term = trunc = False
        while not (term or trunc):
            action = expert(obs)
            assert env.action_space.contains(action)
            obs, r, term, trunc, info = env.step(action)
        wins += info["is_success"]
    assert wins >= 4, f"expert succeeded in {wins}/5 episodes in the block frame"
