"""labkit/ArmPickCube-v0: the task contract, joint-limit actions, both cameras, the success test,
domain randomisation and the IK expert."""

import gymnasium as gym
import mujoco
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import labkit
from labkit.data.recorder import features_from_spaces
from labkit.envs.arm import GRIP_MAX, HIGH, JOINTS, LOW, ArmIK, ArmPickCubeExpert, _down_frame

ENV = "labkit/ArmPickCube-v0"
HOLD = np.append([0.0, -0.42, 0.73, 1.26, 0.0], 0.04).astype(np.float32)  # the start pose


@pytest.mark.parametrize("obs_mode", ["state", "pixels"])
def test_arm_passes_check_env(obs_mode):
    env = gym.make(ENV, obs_mode=obs_mode)
    check_env(env.unwrapped, skip_render_check=True)
    obs, info = env.reset(seed=0)
    assert obs["state"].shape == (26,) and obs["proprio"].shape == (12,)
    assert not info["is_success"] and env.spec.max_episode_steps == 300
    if obs_mode == "pixels":
        top, wrist = obs["pixels"], obs["wrist"]
        assert top.shape == wrist.shape == (96, 96, 3) and top.dtype == wrist.dtype == np.uint8
        red = lambda im: ((im[..., 0].astype(int) - im[..., 1] > 80) & (im[..., 0] > 150)).sum()  # noqa: E731
        assert red(top) > 5, "the red cube should be in the overhead view"
        assert np.abs(top.astype(int) - wrist).mean() > 10, "the two cameras should see different things"
        # The recorder stores both views as videos.
        names = features_from_spaces(env.observation_space, env.action_space, 20, "top")
        assert {"observation.images.top", "observation.images.wrist"} <= set(names)


def test_action_bounds_are_the_joint_limits():
    env = gym.make(ENV).unwrapped
    m = env.model
    ranges = np.array([m.jnt_range[m.joint(j).id] for j in JOINTS])
    np.testing.assert_allclose(env.action_space.low[:5], ranges[:, 0], atol=1e-6)
    np.testing.assert_allclose(env.action_space.high[:5], ranges[:, 1], atol=1e-6)
    np.testing.assert_allclose(env.action_space.low, m.actuator_ctrlrange[:, 0], atol=1e-6)
    np.testing.assert_allclose(env.action_space.high, m.actuator_ctrlrange[:, 1], atol=1e-6)
    assert env.action_space.low[5] == 0 and env.action_space.high[5] == pytest.approx(GRIP_MAX)
    assert (HIGH - LOW > np.radians(185)).all(), "SO-101 joints span +-95 degrees or more"


def test_arm_is_deterministic_under_seed():
    def rollout(seed):
        env = gym.make(ENV)
        obs, _ = env.reset(seed=seed)
        out = [obs["state"]]
        for t in range(12):
            out.append(env.step(HOLD + np.float32(0.2 * np.sin(t)) * np.array([1, 1, 1, 1, 1, 0], np.float32))[0]["state"])
        return np.stack(out)

    np.testing.assert_array_equal(rollout(3), rollout(3))
    assert not np.array_equal(rollout(3), rollout(4))


def test_ik_reaches_a_top_down_grasp():
    ik = ArmIK(mujoco.MjModel.from_xml_string(gym.make(ENV).unwrapped.xml))
    target, rot = np.array([0.22, -0.08, 0.03]), _down_frame(np.pi / 2 + 0.4)
    q = ik.solve(np.array([np.arctan2(-0.08, 0.22), 0.3, 0.6, 0.7, 0.0]), target, rot, iters=100)
    pos, r = ik.forward(q)
    assert np.linalg.norm(pos - target) < 1e-4 and np.abs(r - rot).max() < 1e-3
    assert (q >= LOW).all() and (q <= HIGH).all()


def test_success_needs_the_cube_released_in_the_zone():
    env = gym.make(ENV, reward_type="dense")
    # The cube placed at the zone's centre, on the table, gripper away: success at once.
    _, info = env.reset(seed=0, options={"cube": (0.2, 0.05, 0.0), "zone": (0.2, 0.05)})
    assert info["is_success"] and info["cube_to_zone"] == pytest.approx(0.0, abs=1e-9)
    # 2 cm outside the zone's edge: no success; the dense reward counts twice the distance to the zone.
    _, info = env.reset(seed=0, options={"cube": (0.2, 0.05 + 0.05, 0.0), "zone": (0.2, 0.05)})
    assert not info["is_success"]
    _, r, _, _, info = env.step(HOLD)
    u = env.unwrapped
    reach = np.linalg.norm(u.data.site_xpos[u._site] - u.data.qpos[u._cq:u._cq + 3])
    assert r == pytest.approx(-reach - 2 * info["cube_to_zone"], rel=1e-6)


def _run_expert(env, seeds, **kwargs):
    expert = labkit.envs.expert(env, **kwargs)
    wins, lifted = [], []
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        expert.reset(seed=seed)
        ever_lifted = False
        while True:
            obs, _, term, trunc, info = env.step(expert(obs))
            ever_lifted |= info["lifted"] and info["grasped"]
            if term or trunc:
                break
        wins.append(info["is_success"])
        lifted.append(ever_lifted)
    return np.array(wins), np.array(lifted)


def test_expert_picks_and_places():
    env = gym.make(ENV)
    wins, lifted = _run_expert(env, range(20))  # the teleop-style expert the dataset is recorded with
    assert wins.mean() >= 0.85, wins.mean()
    assert lifted[wins].all(), "every success should have carried the cube in the gripper"
    exact, _ = _run_expert(env, range(100, 108), noise=0.0)
    assert exact.all()


def test_domain_randomisation_changes_physics():
    def settle(**kwargs):
        env = gym.make(ENV, **kwargs)
        env.reset(seed=0)
        for _ in range(20):
            env.step(HOLD)
        return env.unwrapped

    nominal, weak = settle(), settle(actuator_gain=0.5)
    sag = lambda e: np.abs(e.data.qpos[e._qadr] - HOLD[:5]).max()  # noqa: E731
    assert sag(weak) > 1.5 * sag(nominal), "weaker servos should sag further under gravity"
    big = settle(cube_size=0.04, cube_mass=0.1)
    assert big.data.qpos[big._cq + 2] == pytest.approx(0.02, abs=1e-3), "a 4 cm cube rests with its centre at 2 cm"
    assert big.model.body_mass[big._cube_body] == pytest.approx(0.1)

    env = gym.make(ENV, latency=2).unwrapped
    env.reset(seed=0)
    start = env.data.ctrl.copy()
    move = HOLD + np.array([0.3, 0, 0, 0, 0, 0], np.float32)
    for _ in range(2):
        env.step(move)
        np.testing.assert_allclose(env.data.ctrl, start), "the servos still get the old targets"
    env.step(move)
    np.testing.assert_allclose(env.data.ctrl, move, atol=1e-6)

    env = gym.make(ENV, friction=(0.5, 1.5), cube_size=(0.025, 0.04)).unwrapped
    env.reset(seed=0)
    first = env.model.geom_friction[env._cube_geom, 0], env.cube_size
    env.reset(seed=1)
    assert env.model.geom_friction[env._cube_geom, 0] != first[0] and env.cube_size != first[1]


@pytest.mark.parametrize("kwargs, name", [
    ({"cube_size": 0.1}, "cube_size"), ({"cube_size": (0.04, 0.03)}, "cube_size"), ({"cube_mass": 0}, "cube_mass"),
    ({"actuator_gain": -1}, "actuator_gain"), ({"latency": -1}, "latency"), ({"latency": 1.5}, "latency"),
    ({"friction": 0}, "friction"), ({"obs_mode": "rgb"}, "obs_mode"),
])
def test_bad_options_are_clear_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        gym.make(ENV, **kwargs)


def test_bad_action_and_expert_options_are_rejected():
    env = gym.make(ENV)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="noise"):
        ArmPickCubeExpert(env, noise=-1)
