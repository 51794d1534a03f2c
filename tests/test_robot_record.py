"""Recording from a robot (crash-safe: a kill mid-episode loses only that episode) and replay."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import labkit
from labkit.data import load_dataset
from labkit.robot import FakeClock, SafetyConfig, SafetyLayer, SimRobot, record_episodes, replay

SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import labkit
    from labkit.robot import FakeClock, SimRobot, record_episodes
    robot = SimRobot("labkit/Detour-v0")
    robot.connect()
    expert = labkit.envs.expert(robot.env)
    kill_at = int(sys.argv[2])
    calls = [0]
    def policy(obs):
        calls[0] += 1
        if kill_at and calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a crash, mid-episode: no cleanup runs
        return expert(obs)
    policy.reset = expert.reset
    record_episodes(robot, policy, sys.argv[1], episodes=4, steps=25, clock=FakeClock(), progress=False)
""")


def run_recording(root, kill_at):
    return subprocess.run([sys.executable, "-c", SCRIPT, str(root), str(kill_at)], capture_output=True, text=True,
                          timeout=120)


def test_record_and_reload(tmp_path):
    robot = SimRobot("labkit/Detour-v0")
    robot.connect()
    expert = labkit.envs.expert(robot.env)
    root = record_episodes(robot, expert, tmp_path / "rec", episodes=3, steps=30, clock=FakeClock(), seed=5,
                           progress=False)
    ds = load_dataset(root)
    assert ds.num_episodes == 3 and ds.fps == 10
    assert ds.episodes["seed"].tolist() == [5, 6, 7]
    assert set(ds.frames) >= {"observation.state", "observation.proprio", "action", "next.success"}
    assert np.all(np.abs(ds.frames["action"]) <= 0.5 + 1e-6)
    assert ds.info["labkit"]["env_id"] == "labkit/Detour-v0"


def test_a_kill_mid_episode_loses_only_that_episode(tmp_path):
    full = run_recording(tmp_path / "full", 0)
    assert full.returncode == 0, full.stderr[-2000:]
    reference = load_dataset(tmp_path / "full")
    lengths = reference.episodes["length"]
    kill_at = int(lengths[0] + lengths[1] + 5)  # five steps into the third episode
    crashed = run_recording(tmp_path / "crash", kill_at)
    assert crashed.returncode == -9
    ds = load_dataset(tmp_path / "crash")
    assert ds.num_episodes == 2
    for key in ("observation.state", "action", "next.reward"):
        n = int(lengths[0] + lengths[1])
        assert np.array_equal(ds.frames[key], reference.frames[key][:n]), key


def test_replay_retraces_a_recorded_episode(tmp_path):
    robot = SimRobot("labkit/PegInsert-v0")
    robot.connect()
    root = record_episodes(robot, labkit.envs.expert(robot.env), tmp_path / "peg", episodes=2, steps=40,
                           clock=FakeClock(), seed=3, progress=False)
    fresh = SimRobot("labkit/PegInsert-v0")
    fresh.connect()
    safe = SafetyLayer(fresh, SafetyConfig(max_delta=0.02), clock=FakeClock())
    out = replay(safe, root, episode=1)
    ds = load_dataset(root)
    ep = ds.episode(1)
    assert np.allclose(out["actions"], out["recorded"], atol=1e-6)
    states = np.stack([o["state"] for o in out["observations"]])
    assert np.allclose(states, ep["observation.state"], atol=1e-5)  # the same trajectory again
    assert out["stats"].steps == len(ep["action"])
    with pytest.raises(IndexError):
        replay(safe, root, episode=5)
