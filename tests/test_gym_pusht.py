"""labkit/GymPushT-v0: the canonical PushT (gym-pusht) behind labkit's contract, its expert and dataset.

Skipped where the `pusht` extra (gym-pusht) is not installed, except the check that says how to get it.
"""

import sys
from importlib.util import find_spec

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import labkit
from labkit.envs.gym_pusht import GymPushTEnv
from labkit.eval import evaluate

needs_gym_pusht = pytest.mark.skipif(find_spec("gym_pusht") is None, reason="gym-pusht (labkit[pusht]) not installed")
ID = "labkit/GymPushT-v0"
INTERFACES = [{"frame": f, "actions": a} for f in ("world", "block") for a in ("absolute", "relative")]


def test_missing_extra_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gym_pusht.envs.pusht", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install labkit\[pusht\]"):
        GymPushTEnv()


@needs_gym_pusht
@pytest.mark.parametrize("obs_mode", ["state", "pixels"])
def test_observation_and_info_contract(obs_mode):
    env = gym.make(ID, obs_mode=obs_mode)
    assert env.spec.max_episode_steps == 300
    check_env(env.unwrapped, skip_render_check=True)
    obs, info = env.reset(seed=0)
    assert obs["state"].shape == ((2,) if obs_mode == "pixels" else (12,)) and obs["proprio"].shape == (4,)
    assert {"is_success", "coverage", "max_coverage"} <= set(info) and not info["is_success"]
    if obs_mode == "pixels":  # as lerobot/pusht: the state is the agent's position, beside a 96 px image
        assert obs["pixels"].shape == (96, 96, 3) and obs["pixels"].dtype == np.uint8 and obs["pixels"].std() > 5
        np.testing.assert_allclose(obs["state"], info["pos_agent"], atol=1e-4)
    else:  # pusher, block position, cos/sin, keypoints: the pose without the 2 pi wrap
        np.testing.assert_allclose(obs["state"][:4], [*info["pos_agent"], *info["block_pose"][:2]], atol=1e-3)
        angle = info["block_pose"][2]
        np.testing.assert_allclose(obs["state"][4:6], [np.cos(angle), np.sin(angle)], atol=1e-6)
    seen = []
    for _ in range(20):
        obs, r, term, trunc, info = env.step(env.action_space.sample())
        seen.append(info["coverage"])
        assert info["max_coverage"] == pytest.approx(max(seen)) and r == float(info["is_success"])


@needs_gym_pusht
def test_physics_are_gym_pusht_own():
    """Same seed, same absolute actions: the adapter and gym-pusht's own env give identical poses."""
    ours, theirs = gym.make(ID), gym.make("gym_pusht/PushT-v0", obs_type="state")
    ours.reset(seed=5), theirs.reset(seed=5)
    rng, moved = np.random.default_rng(0), False
    for t in range(60):
        # walk the pusher towards the block so that it is pushed (random targets rarely touch it)
        block = theirs.unwrapped.block.position
        a = np.clip(np.array(block) + rng.normal(0, 40, 2), 0, 512).astype(np.float32)
        _, _, term_a, trunc_a, a_info = ours.step(a)
        _, reward, term_b, trunc_b, b_info = theirs.step(a)
        np.testing.assert_array_equal(a_info["block_pose"], b_info["block_pose"], err_msg=f"step {t}")
        np.testing.assert_array_equal(a_info["pos_agent"], b_info["pos_agent"])
        assert (a_info["coverage"], term_a, trunc_a) == (b_info["coverage"], term_b, trunc_b)
        moved |= ours.unwrapped.sim.n_contact_points > 0
    assert moved, "the pusher never touched the block: the test compared no pushing"
    dense = gym.make(ID, reward_type="dense")
    dense.reset(seed=5)
    assert dense.step(np.array([256, 256], np.float32))[1] == pytest.approx(
        np.clip(dense.unwrapped.sim._get_coverage() / 0.95, 0, 1))


@needs_gym_pusht
@pytest.mark.parametrize("interface", INTERFACES[1:], ids=lambda k: f"{k['frame']}-{k['actions']}")
def test_interfaces_round_trip_to_gym_pusht_actions(interface):
    """A target written in another interface reaches gym-pusht as the same absolute target, and the
    episode then runs exactly as gym-pusht's own with those targets."""
    env, plain = gym.make(ID, **interface), gym.make(ID)
    env.reset(seed=2), plain.reset(seed=2)
    rng = np.random.default_rng(1)
    for _ in range(30):
        target = env.unwrapped.block_pose()[:2] + rng.normal(0, 50, 2)
        action = env.unwrapped.to_env_frame(target).astype(np.float32)
        assert env.action_space.contains(action)
        obs, *_ = env.step(action)
        sent = env.unwrapped.target
        np.testing.assert_allclose(sent, np.clip(target, 0, 512), atol=1e-3)  # float32 actions
        plain.step(sent)
        np.testing.assert_array_equal(env.unwrapped.block_pose(), plain.unwrapped.block_pose())
    if interface["frame"] == "block":  # the state is seen from the block: the pusher in its frame
        pose = env.unwrapped.block_pose()
        local = (env.unwrapped.pusher_pos() - pose[:2]) @ labkit.envs.pusht.rot(pose[2])
        np.testing.assert_allclose(obs["state"][:2], local, atol=1e-3)


@needs_gym_pusht
def test_expert_succeeds_and_is_multimodal():
    env = gym.make(ID, frame="block", actions="relative")
    expert = labkit.envs.expert(env)
    modes = []
    for seed in range(40):
        expert.reset(seed=seed)
        modes.append(expert.mode)
    assert 0.3 <= np.mean(np.array(modes) == "bar") <= 0.7, "each strategy should be drawn about half the time"
    # three episodes through labkit's rollout engine: each ends in gym-pusht's success (coverage > 0.95)
    run = evaluate("expert", ID, episodes=3, seed=0, env_kwargs={"frame": "block", "actions": "relative"},
                   progress=False)
    assert run.success_rate == 1.0 and run.mean_info("coverage") > 0.95, run.summary()


@needs_gym_pusht
def test_bad_options_and_actions_are_named_errors():
    for kwargs, name in [({"obs_mode": "rgb"}, "obs_mode"), ({"frame": "robot"}, "frame"),
                         ({"actions": "delta"}, "actions"), ({"reward_type": "shaped"}, "reward_type"),
                         ({"obs_mode": "pixels", "frame": "block"}, "frame='block'")]:
        with pytest.raises(ValueError, match=name):
            GymPushTEnv(**kwargs)
    with pytest.raises((TypeError, ValueError), match="image_size"):
        GymPushTEnv(image_size=0)
    env = GymPushTEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        env.step(np.array([np.nan, 1.0], np.float32))


@needs_gym_pusht
def test_shipped_dataset_loads_and_replays():
    """Episode 0 of datasets/gym_pusht, replayed open loop from its seed, gives back its observations,
    rewards, end and success: the dataset was recorded by this env, in the interface info.json names."""
    env_id, kwargs, episodes, seed = labkit.data.SHIPPED["gym_pusht"]
    ds = labkit.data.load_dataset(labkit.data.DATASETS / "gym_pusht")
    assert ds.num_episodes == episodes >= 200 and ds.success_rate >= 0.9
    assert ds.info["labkit"] == {"env_id": ID, "env_kwargs": {"frame": "block", "actions": "relative"}}
    ep = ds.episode(0)
    env = gym.make(env_id, **kwargs)
    obs, _ = env.reset(seed=seed)
    for t in range(len(ep["action"])):
        for key in ("state", "proprio"):  # pixels: 1e-3 is far below anything a policy sees
            np.testing.assert_allclose(obs[key], ep[f"observation.{key}"][t], rtol=0, atol=1e-3, err_msg=f"{key} {t}")
        obs, reward, term, trunc, info = env.step(ep["action"][t])
        assert reward == ep["next.reward"][t] and (term or trunc) == ep["next.done"][t]
        assert info["is_success"] == ep["next.success"][t], f"success at frame {t}"
    assert term or trunc, "the recorded episode ended here"
