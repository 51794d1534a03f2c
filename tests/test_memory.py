"""The memory tasks hide what they showed, their experts succeed, memoryless policies sit at chance, and
the MEM-style memory (write an event log, read it as a vector) works by hand and end to end."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import labkit  # noqa: F401  (registers the tasks, picks a GL backend)
from labkit.data import EpisodeDataset
from labkit.envs.cups import CUE_STEPS, CUPS, GO_STEP, drive_to
from labkit.envs.doors import HANDLES
from labkit.eval import evaluate, rollout
from labkit.policies import BCPolicy, fit, load_policy
from labkit.policies.memory import (
    CUPS_EVENTS,
    DOORS_EVENTS,
    EVENTS_KEY,
    EventMemory,
    MemoryRuntime,
    ShortMemoryConfig,
    ShortMemoryPolicy,
    read_log,
    with_events,
    write_cups,
    write_doors,
)


@pytest.mark.parametrize("env_id", ["labkit/Cups-v0", "labkit/Doors-v0"])
def test_check_env_and_expert_succeeds(env_id):
    check_env(gym.make(env_id).unwrapped, skip_render_check=True)
    res = evaluate("expert", env_id, episodes=20, progress=False)
    assert res.success_rate == 1.0, res.summary()


def _run(env, actions, **reset):
    obs, _ = env.reset(**reset)
    seen = [obs]
    for a in actions:
        seen.append(env.step(a)[0])
    return seen


@pytest.mark.parametrize("obs_mode", ["state", "pixels"])
def test_cups_hides_the_cue_after_it_was_shown(obs_mode):
    env = gym.make("labkit/Cups-v0", obs_mode=obs_mode, image_size=32)
    actions = [np.array([0.3, 0.4])] * 20  # the same commands in the three episodes
    runs = [_run(env, actions, seed=5, options={"cup": k}) for k in range(3)]
    key = "pixels" if obs_mode == "pixels" else "state"
    for t in range(len(actions) + 1):
        same = all(np.array_equal(runs[0][t][key], r[t][key]) for r in runs[1:])
        assert same == (t >= CUE_STEPS), f"step {t}: observations {'differ' if not same else 'agree'}"
    # while held, commands do nothing: the robot stands still until the go signal
    states = np.stack([o["state"] for o in runs[0]]) if key == "state" else None
    if states is not None:
        assert np.allclose(states[:GO_STEP + 1, :2], states[0, :2]) and states[GO_STEP, 4] == 1.0
        assert states[GO_STEP - 1, 4] == 0.0 and not np.allclose(states[-1, :2], states[0, :2])


def test_doors_return_repeats_the_episode_start_exactly():
    env = gym.make("labkit/Doors-v0")
    for locked in (0, 1):
        obs, _ = env.reset(seed=3, options={"locked": locked})
        first = [obs]
        tried = locked  # drive at the locked door until the env sends the robot back
        while env.unwrapped.failures == 0:
            a = drive_to(obs["state"][:2], HANDLES[tried], np.random.default_rng(0), 0.0) if obs["state"][4] else np.zeros(2)
            obs, _, term, _, info = env.step(a)
            first.append(obs)
            assert not term
        assert info["failed_attempts"] == 1 and info["tried_locked"]
        # the observation after the failure is the reset observation, whichever door was locked
        np.testing.assert_array_equal(obs["state"], first[0]["state"])
        again = [obs] + [env.step(np.zeros(2))[0] for _ in range(GO_STEP)]
        for a, b in zip(again, first[:GO_STEP + 1], strict=True):
            np.testing.assert_array_equal(a["state"], b["state"])


def _fixed_choice(target):
    """A memoryless policy: a deterministic function of the current observation (drive to `target`)."""
    return lambda obs: drive_to(obs["state"][:2], target, np.random.default_rng(0), 0.0)


def test_memoryless_policies_are_at_chance():
    n = 60
    # Cups: any fixed choice finds the cube under 1/3 of the cups (uniform over 3)
    middle = rollout(_fixed_choice(CUPS[1]), "labkit/Cups-v0", range(1000, 1000 + n))
    rate = np.mean([e.success for e in middle])
    cups = gym.make("labkit/Cups-v0").unwrapped
    under_middle = [cups.reset(seed=s) and cups.cup == 1 for s in range(1000, 1000 + n)]
    assert rate == pytest.approx(np.mean(under_middle))  # success exactly when the cube is there
    assert 0.15 <= rate <= 0.55, rate
    # Doors: "always left" opens the door in 1/2 of the episodes and never on a second attempt
    left = rollout(_fixed_choice(HANDLES[0]), "labkit/Doors-v0", range(1000, 1000 + n))
    failed_first = np.array([e.info["failed_attempts"] >= 1 for e in left])
    success = np.array([e.success for e in left])
    assert 0.3 <= success.mean() <= 0.7 and not success[failed_first].any()
    assert all(e.info["failed_attempts"] == 2 for e, f in zip(left, failed_first, strict=True) if f)


def test_write_and_read_by_hand():
    cue = np.zeros(8, np.float32)
    cue[6] = 1.0  # cup 2 (index 1)
    log = write_cups([], None, cue)
    assert log == ["cue: cup 2"]
    assert write_cups(log, cue, cue) == log  # written once, not every frame it is shown
    assert write_cups(log, cue, np.zeros(8)) == log  # the cue gone: the log keeps it
    moving, held = np.array([-0.4, 0.4, 0, 0, 1.0]), np.array([0.0, -0.6, 0, 0, 0.0])
    assert write_doors([], moving, moving) == [] and write_doors([], None, held) == []
    assert write_doors([], moving, held) == ["door left: locked"]
    assert write_doors(["x"], moving * [-1, 1, 1, 1, 1], held) == ["x", "door right: locked"]
    np.testing.assert_array_equal(read_log(["cue: cup 2"], CUPS_EVENTS), [0, 1, 0])
    np.testing.assert_array_equal(read_log(["door right: locked", "door left: locked"], DOORS_EVENTS), [1, 1])
    with pytest.raises(ValueError, match="not in the memory's vocabulary"):
        read_log(["cue: cup 9"], CUPS_EVENTS)


def _tiny_cups(n=12):
    eps = rollout("expert", "labkit/Cups-v0", range(n), keep=("obs", "actions"))
    return EpisodeDataset.from_episodes(
        [{"observation.state": e.obs["state"][:-1], "action": e.actions} for e in eps], fps=10,
        success=[e.success for e in eps])


def test_with_events_is_causal_and_bad_input_is_named():
    ds = _tiny_cups(4)
    mem = EventMemory(write_cups, CUPS_EVENTS)
    de = with_events(ds, mem)
    for i in range(ds.num_episodes):
        ep = de.episode(i)
        cup = int(np.argmax(ep["observation.state"][0, 5:8]))
        assert (ep[EVENTS_KEY][:, cup] == 1).all() and ep[EVENTS_KEY].sum(1).max() == 1  # from frame 0 on, forever
    assert EVENTS_KEY not in ds.frames and EVENTS_KEY in de.stats
    with pytest.raises(KeyError, match="observation.proprio"):
        with_events(ds, mem, key="observation.proprio")
    with pytest.raises(ValueError, match="one value per vocabulary entry"):
        with_events(ds, EventMemory(write_cups, CUPS_EVENTS, read=lambda log, vocab: np.zeros(2)))
    with pytest.raises(ValueError, match="reads 'observation.events'|needs a policy that reads"):
        MemoryRuntime(BCPolicy.from_dataset(ds, env={}), mem)
    with pytest.raises(ValueError, match="pool"):
        ShortMemoryConfig(pool="max")
    with pytest.raises(ValueError, match="cup"):
        gym.make("labkit/Cups-v0").reset(seed=0, options={"cup": 3})


def test_attention_read_of_the_window():
    ds = _tiny_cups(2)
    p = ShortMemoryPolicy.from_dataset(ds, env={}, obs_horizon=5)
    obs = {"observation.state": torch.randn(3, 5, 8)}
    pooled, w = p.read_window(obs)
    assert pooled.shape == (3, p.config.embed_dim) and torch.allclose(w.sum(1), torch.ones(3))
    mean = ShortMemoryPolicy.from_dataset(ds, env={}, obs_horizon=5, pool="mean")
    assert torch.allclose(mean.read_window(obs)[1], torch.full((3, 5), 0.2))


def test_mem_policy_end_to_end(tmp_path):
    """MEM trained seconds on 40 demos finds the cube well above chance; it saves and reloads."""
    torch.set_num_threads(1)
    mem = EventMemory(write_cups, CUPS_EVENTS)
    ds = with_events(_tiny_cups(40), mem)
    policy = ShortMemoryPolicy.from_dataset(ds, env={"env_id": "labkit/Cups-v0"}, obs_horizon=4,
                                            obs_keys=("observation.state", EVENTS_KEY))
    fit(policy, ds, steps=400, progress=False)
    res = evaluate(MemoryRuntime(policy, mem), "labkit/Cups-v0", episodes=20, progress=False)
    assert res.success_rate >= 0.7, res.summary()
    again = load_policy(policy.save(tmp_path / "mem.pt"))
    batch = {k: torch.as_tensor(v[:3, None].repeat(4, 1)) for k, v in ds.frames.items() if k in policy.config.obs_keys}
    torch.testing.assert_close(again.predict_action_chunk(batch), policy.predict_action_chunk(batch))
