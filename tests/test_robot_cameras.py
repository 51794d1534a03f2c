"""The real-arm loop closes for a pixel policy: a policy trained in the twin on joints + two cameras reads
exactly what SO101Arm observes, runs one control step on a fake real arm, and every mismatch (privileged
state, camera size, dtype, layout, a missing or unknown camera) is a named error before any motion."""

import importlib.util

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import TINY

import labkit
from labkit.data import EpisodeDataset
from labkit.policies import FlowPolicy, fit
from labkit.robot import (
    ControlLoop,
    FakeCamera,
    FakeClock,
    FakeMotorBus,
    SafetyConfig,
    SafetyLayer,
    SimRobot,
    SO101Arm,
    center_crop_resize,
    check_policy_matches_robot,
    opencv_camera,
)
from labkit.robot.check import policy_inputs

ENV = "labkit/ArmPickCube-v0"
PIXEL_KEYS = ("observation.joints", "observation.images.top", "observation.images.wrist")


@pytest.fixture(scope="module")
def dataset():
    """3 short expert episodes in the twin at 64 px: joints, both cameras, the 26-D state, actions."""
    env = gym.make(ENV, obs_mode="pixels", image_size=64)
    expert = labkit.envs.expert(env)
    episodes = []
    for seed in range(3):
        obs, _ = env.reset(seed=seed)
        expert.reset(seed=seed)
        rows = {k: [] for k in (*PIXEL_KEYS, "observation.state", "action")}
        for _ in range(20):
            action = expert(obs)
            for key, name in (("observation.joints", "joints"), ("observation.images.top", "pixels"),
                              ("observation.images.wrist", "wrist"), ("observation.state", "state")):
                rows[key].append(obs[name])
            rows["action"].append(action)
            obs, *_ = env.step(action)
        episodes.append({k: np.stack(v) for k, v in rows.items()})
    return EpisodeDataset.from_episodes(episodes, fps=20)


def tiny(dataset, obs_keys):
    torch.manual_seed(0)
    policy = FlowPolicy.from_dataset(dataset, **{**TINY, "hidden": 32}, obs_keys=obs_keys, image_dim=8)
    return fit(policy, dataset, steps=3, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def pixel_policy(dataset):
    return tiny(dataset, PIXEL_KEYS)


def fake_arm(**cameras):
    cams = cameras or {"top": FakeCamera(64, seed=0), "wrist": FakeCamera(64, seed=1)}
    arm = SO101Arm(FakeMotorBus(present={"shoulder_lift": -20.0, "elbow_flex": 40.0, "gripper": 50.0}), cameras=cams)
    arm.connect()
    return arm


def test_sim_joints_are_what_the_real_arm_observes():
    env = gym.make(ENV, obs_mode="pixels", image_size=64)
    obs, _ = env.reset(seed=0)
    assert obs["joints"].dtype == np.float32 and obs["joints"].shape == (6,)
    np.testing.assert_array_equal(obs["joints"], obs["proprio"][:6])
    assert env.observation_space["joints"].contains(obs["joints"])
    state_obs, _ = gym.make(ENV).reset(seed=0)
    assert sorted(state_obs) == ["proprio", "state"]  # state mode: unchanged
    # The real arm's joints are in the twin's units (radians, gripper metres), even with units="native".
    for units in ("radians", "native"):
        arm = SO101Arm(FakeMotorBus(present={"shoulder_pan": 90.0, "gripper": 50.0}), units=units)
        arm.connect()
        joints = arm.observe()["joints"]
        assert joints.dtype == np.float32
        np.testing.assert_allclose(joints[[0, 5]], [np.pi / 2, 0.035], rtol=1e-6)


def test_pixel_policy_reads_exactly_what_the_fake_real_arm_observes(pixel_policy):
    arm = fake_arm()
    obs = check_policy_matches_robot(pixel_policy, arm)
    needs = policy_inputs(pixel_policy)
    assert set(needs) == {"joints", "pixels", "wrist"} == set(obs) - {"state", "proprio"}
    for key, (shape, dtype) in needs.items():
        assert obs[key].shape == shape and obs[key].dtype == np.dtype(dtype), key
    pixel_policy.reset()
    assert pixel_policy.select_action(obs).shape == (6,)


def test_one_control_step_on_the_fake_real_arm(pixel_policy):
    arm = fake_arm()
    clock = FakeClock()
    safe = SafetyLayer(arm, SafetyConfig(max_delta=0.1), clock=clock)
    stats = ControlLoop(safe, pixel_policy, clock=clock, inference_delay=0, threaded=False).run(1)
    assert stats.steps == 1 and safe.counts["commands"] == 1
    assert len(arm.bus.writes) == 1 and set(arm.bus.writes[0]) == set(arm.names)
    assert np.isfinite(list(arm.bus.writes[0].values())).all()


def test_the_sim_twin_passes_the_same_check(pixel_policy):
    twin = SimRobot(ENV, obs_mode="pixels", image_size=64)
    twin.connect()
    check_policy_matches_robot(pixel_policy, twin)


def test_camera_naming_rule():
    top, wrist = FakeCamera(64, seed=0), FakeCamera(64, seed=1)
    arm = fake_arm(wrist=wrist, top=top)  # order does not matter: "top" is `pixels`
    obs = arm.observe()
    np.testing.assert_array_equal(obs["pixels"], FakeCamera(64, seed=0)())
    np.testing.assert_array_equal(obs["wrist"], FakeCamera(64, seed=1)())
    assert "pixels" not in fake_arm(wrist=FakeCamera()).observe()  # a wrist camera never stands in for the top one
    with pytest.raises(ValueError, match="'pixels'.*'top'"):
        SO101Arm(FakeMotorBus(), cameras={"pixels": top})


def test_mismatches_are_named_before_any_motion(pixel_policy, dataset):
    state_policy = tiny(dataset, ("observation.state",))
    with pytest.raises(ValueError, match=r"'state'.*6 values.*26.*cannot observe"):
        check_policy_matches_robot(state_policy, fake_arm())
    arm = fake_arm(top=FakeCamera(96), wrist=FakeCamera(64))
    with pytest.raises(ValueError, match=r"'top' camera\): gives 96x96x3 uint8.*trained on 64x64x3"):
        check_policy_matches_robot(pixel_policy, arm)
    bad = {"64x64x3 float32 frames": np.zeros((64, 64, 3), np.float32),
           "64x64x3 uint16 frames": np.zeros((64, 64, 3), np.uint16),
           r"3x64x64 uint8 frames \(channels first\)": np.zeros((3, 64, 64), np.uint8)}
    for says, frame in bad.items():
        arm = fake_arm(top=FakeCamera(64), wrist=lambda f=frame: f)
        with pytest.raises(ValueError, match=f"camera 'wrist': gives {says}, the policy was trained on 64x64x3 uint8"):
            check_policy_matches_robot(pixel_policy, arm)
        # The policy itself refuses the frame too, naming the camera and the trained size (never resizing).
        pixel_policy.reset()
        with pytest.raises(ValueError, match=f"camera 'wrist'.*{str(frame.dtype)}.*trained on 64x64x3 uint8"):
            pixel_policy.select_action(arm.observe())
    with pytest.raises(ValueError, match="camera 'wrist': the policy reads it, the robot has no such camera"):
        check_policy_matches_robot(pixel_policy, fake_arm(top=FakeCamera()))
    with pytest.raises(KeyError, match="wrist"):
        pixel_policy.select_action(fake_arm(top=FakeCamera()).observe())
    with pytest.raises(ValueError, match="camera 'side': the robot has it, the policy was not trained on it"):
        check_policy_matches_robot(pixel_policy, fake_arm(top=FakeCamera(), wrist=FakeCamera(), side=FakeCamera()))
    # Every mismatch at once, and the control loop sends nothing at all.
    arm = fake_arm(top=FakeCamera(96), side=FakeCamera())
    with pytest.raises(ValueError, match=r"3 mismatches") as err:
        ControlLoop(SafetyLayer(arm, clock=FakeClock()), pixel_policy, clock=FakeClock(), threaded=False).run(5)
    assert all(name in str(err.value) for name in ("top", "wrist", "side"))
    assert arm.bus.writes == []


def test_center_crop_resize_and_opencv_camera():
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[:, :80] = 255  # outside the centred 480x480 square
    frame[:, 80:320, 0] = 200  # the square's left half is red
    out = center_crop_resize(frame, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert (out[:, :32, 0] == 200).all() and (out[:, 32:] == 0).all() and (out[..., 1:] == 0).all()
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        center_crop_resize(frame.astype(np.float32), 64)
    if importlib.util.find_spec("lerobot") is None:
        with pytest.raises(ImportError, match="pip install lerobot"):
            opencv_camera(0, size=64)
