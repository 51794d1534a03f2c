"""PushT from the top camera through an estimated block frame (labkit.vision.estimate)."""

import gymnasium as gym
import numpy as np
import pytest
import torch

import labkit  # noqa: F401  (registers the tasks, picks the GL backend)
from labkit.data import EpisodeDataset, load_dataset
from labkit.data.shipped import DATASETS
from labkit.envs.pusht import block_frame_state
from labkit.eval import evaluate
from labkit.policies import FlowPolicy, fit
from labkit.vision import PretrainedEncoder
from labkit.vision.estimate import (
    EstimatedBlockPolicy,
    estimated_block_dataset,
    estimated_states,
    read_pose,
    rotate,
)


@pytest.fixture(scope="module")
def encoder():
    return PretrainedEncoder.load("pusht_top")


@pytest.fixture(scope="module")
def pixels():
    """The first 6 episodes of the shipped pixel dataset (world-frame relative moves, 64 px top camera)."""
    return load_dataset(DATASETS / "pusht_rel_pixels").select(range(6))


def test_block_frame_state_is_what_the_block_frame_env_observes():
    env = gym.make("labkit/PushT-v0", frame="block")
    obs, _ = env.reset(seed=3)
    for _ in range(5):
        obs, *_ = env.step(env.action_space.sample() * 0.02)
    u = env.unwrapped
    np.testing.assert_allclose(block_frame_state(u.block_pose(), u.pusher_pos()), obs["state"], atol=1e-6)


def test_rotate_by_hand():
    v = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    theta = np.array([np.pi / 2, np.pi / 2, 0.3])
    np.testing.assert_allclose(rotate(v, theta)[:2], [[0, 1], [-2, 0]], atol=1e-6)
    np.testing.assert_allclose(rotate(rotate(v, theta), -theta), v, atol=1e-6)
    c, s = np.cos(0.3), np.sin(0.3)
    np.testing.assert_allclose(rotate(v, theta)[2], [3 * c - 4 * s, 3 * s + 4 * c], atol=1e-6)


def test_the_encoder_reads_the_block_pose_from_fresh_frames(encoder):
    """Frames the encoder never trained on (evaluation seeds): the pose within millimetres and degrees,
    and the estimated frame within millimetres of the true one."""
    env = gym.make("labkit/PushT-v0", obs_mode="pixels", image_size=64)
    imgs, poses, pushers, states = [], [], [], []
    for s in range(1000, 1012):
        obs, _ = env.reset(seed=s)
        u = env.unwrapped
        imgs.append(obs["pixels"]), poses.append(u.block_pose()), pushers.append(u.pusher_pos())
        states.append(block_frame_state(u.block_pose(), u.pusher_pos()))
    est = read_pose(encoder, np.stack(imgs))
    poses = np.stack(poses)
    xy_mm = np.linalg.norm(est[:, :2] - poses[:, :2], axis=1) * 1000
    deg = np.degrees(np.abs(np.angle(np.exp(1j * (est[:, 2] - poses[:, 2])))))
    assert np.median(xy_mm) < 5 and xy_mm.max() < 15, xy_mm
    assert np.median(deg) < 3 and deg.max() < 10, deg
    frame_mm = np.abs(estimated_states(est, np.stack(pushers))[:, :2] - np.stack(states)[:, :2]).max(1) * 1000
    assert np.median(frame_mm) < 10, frame_mm


def test_the_dataset_turns_world_moves_into_the_estimated_block_axes(encoder, pixels):
    data = estimated_block_dataset(pixels, encoder)
    assert len(data) == len(pixels) and data.num_episodes == pixels.num_episodes
    f = pixels.frames
    poses = read_pose(encoder, f["observation.images.top"])
    back = rotate(data.frames["action"], poses[:, 2])  # the runtime's arithmetic undoes the dataset's
    np.testing.assert_allclose(back, f["action"], atol=1e-6)
    want = estimated_states(poses[:3], f["observation.proprio"][:3, :2])
    np.testing.assert_allclose(data.frames["observation.state"][:3], want, atol=1e-6)


def test_the_wrong_dataset_is_named(encoder):
    block = load_dataset(DATASETS / "pusht_block_rel").select([0])
    with pytest.raises(ValueError, match="world-frame relative actions"):
        estimated_block_dataset(block, encoder)
    arm = PretrainedEncoder.load("arm_top")
    with pytest.raises(ValueError, match="block's pose"):
        read_pose(arm, np.zeros((1, 64, 64, 3), np.uint8))


class _Constant(FlowPolicy):
    """A state policy that always moves +x in the block's axes: shows the runtime's conversion."""

    def select_action(self, obs):
        return np.tile(np.array([0.01, 0.0], np.float32), (len(obs["state"]), 1))


def _tiny(cls, encoder, pixels, steps=5):
    data = estimated_block_dataset(pixels, encoder)
    policy = cls.from_dataset(data, env={}, horizon=4, n_action_steps=2, obs_horizon=4, steps=3, hidden=32, layers=1)
    return fit(policy, data, steps=steps, batch_size=32, progress=False)


def test_the_runtime_reads_camera_and_pusher_and_moves_in_world_axes(encoder, pixels):
    policy = EstimatedBlockPolicy(_tiny(_Constant, encoder, pixels, steps=1), encoder)
    env = gym.make("labkit/PushT-v0", obs_mode="pixels", image_size=64, actions="relative")
    obs, _ = env.reset(seed=1000)
    policy.reset()
    move = policy.select_action(obs)
    theta = read_pose(encoder, obs["pixels"][None])[0, 2]
    np.testing.assert_allclose(move, [0.01 * np.cos(theta), 0.01 * np.sin(theta)], atol=1e-6)
    # the true state is in the observation too; the runtime must not read it
    obs2 = dict(obs, state=np.full_like(obs["state"], np.nan))
    policy.reset()
    np.testing.assert_allclose(policy.select_action(obs2), move)


def test_the_runtime_names_bad_input(encoder, pixels):
    policy = EstimatedBlockPolicy(_tiny(FlowPolicy, encoder, pixels), encoder)
    policy.reset()
    env = gym.make("labkit/PushT-v0", actions="relative")
    obs, _ = env.reset(seed=1000)
    with pytest.raises(KeyError, match="obs_mode='pixels'"):
        policy.select_action(obs)
    with pytest.raises(ValueError, match="uint8"):
        policy.select_action({"pixels": np.zeros((64, 64, 3), np.float32), "proprio": obs["proprio"]})
    with pytest.raises(ValueError, match="64x64"):
        policy.select_action({"pixels": np.zeros((96, 96, 3), np.uint8), "proprio": obs["proprio"]})
    world = EpisodeDataset.from_episodes([{"observation.state": np.zeros((8, 10), np.float32),
                                           "action": np.zeros((8, 2), np.float32)}], fps=10)
    with pytest.raises(ValueError, match="estimated_block_dataset"):
        EstimatedBlockPolicy(FlowPolicy.from_dataset(world, env={}, horizon=4, n_action_steps=2, obs_horizon=2), encoder)


def test_evaluate_rolls_it_out_in_pixel_mode_by_itself(encoder, pixels):
    """No env options given: the runtime's interface (pixels at 64 px, relative moves) is used, and asking
    for the state mode is refused by name."""
    policy = EstimatedBlockPolicy(_tiny(FlowPolicy, encoder, pixels), encoder)
    r = evaluate(policy, "labkit/PushT-v0", episodes=2, num_envs=2, progress=False)
    assert r.episodes == 2 and len(r.lengths) == 2
    with pytest.raises(ValueError, match="obs_mode"):
        evaluate(policy, "labkit/PushT-v0", episodes=1, env_kwargs={"obs_mode": "state"}, progress=False)
    torch.testing.assert_close(policy.encoder.target_std, encoder.target_std)
