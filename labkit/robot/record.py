"""Record episodes from any robot into a LeRobotDataset v3 directory, and replay them.

Recording runs the fixed-rate ControlLoop (so every command went through the SafetyLayer) and stores,
per step, the observation and the command actually sent. `labkit.data.Recorder` commits each episode
to disk when it ends, so an interrupted session (Ctrl-C, a crash, a kill) loses at most the episode in
progress. Replay sends a recorded episode's actions back to a robot at the dataset's rate.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from labkit.data import Recorder, load_dataset
from labkit.robot.control import ControlLoop
from labkit.robot.safety import SafetyConfig, SafetyLayer

OBS_KEYS = ("state", "proprio", "joints", "pixels", "wrist")


def _reset(policy: Any, seed: int) -> None:
    reset = getattr(policy, "reset", None)
    if callable(reset):
        try:
            reset(seed=seed)
        except TypeError:
            reset()


def record_episodes(robot: Any, policy: Any, root: str | Path, episodes: int, steps: int, *, seed: int = 0,
                    task: str | None = None, fps: float | None = None, clock: Any = None,
                    safety: SafetyConfig | None = None, between: Callable[[int], None] | None = None,
                    overwrite: bool = False, progress: bool = True, **loop_kwargs) -> Path:
    """Record `episodes` episodes of at most `steps` steps of `policy` driving `robot`; returns `root`.

    `policy`: a labkit policy, a chunk source (PolicyClient) or a callable `obs -> action` (teleop,
    a scripted expert). A robot with `reset(seed)` (SimRobot) is reset to `seed + i` before episode i;
    otherwise `between(i)` is called (e.g. wait until a person has reset the scene). The robot must be
    connected. Extra keyword arguments go to `ControlLoop` (mode, execute_steps, ...).
    """
    from tqdm.auto import tqdm

    if episodes < 1 or steps < 1:
        raise ValueError(f"need episodes >= 1 and steps >= 1, got {episodes}, {steps}")
    safe = robot if isinstance(robot, SafetyLayer) else SafetyLayer(robot, safety, clock=clock)
    fps = float(fps or safe.spec.fps)
    env_id = getattr(safe, "env_id", None)
    rec = Recorder(root, fps, env_id=env_id, env_kwargs=getattr(safe, "env_kwargs", None),
                   task=task or env_id or safe.spec.name, robot_type=safe.spec.name, overwrite=overwrite)
    bar = tqdm(range(episodes), desc=f"recording {safe.spec.name}", disable=not progress, unit="ep")
    with rec:
        for i in bar:
            if hasattr(safe.robot, "reset"):
                safe.reset(seed + i)  # through the safety layer: it forgets the last episode's command
            elif between is not None:
                between(i)
            _reset(policy, seed + i)

            def on_step(k: int, obs: dict, sent: np.ndarray) -> None:
                info = getattr(safe.robot, "last_info", {}) or {}
                rec.add_frame({k_: v for k_, v in obs.items() if k_ in OBS_KEYS}, sent.astype(np.float32),
                              float(getattr(safe.robot, "reward", 0.0)), bool(getattr(safe.robot, "done", False)),
                              bool(info.get("is_success", False)))

            loop = ControlLoop(safe, policy, fps=fps, clock=safe.clock, on_step=on_step, **loop_kwargs)
            loop.run(steps)
            if safe.estopped:
                break  # the episode in progress is dropped: an e-stopped episode is not a demonstration
            rec.save_episode(seed=seed + i)
    return Path(root)


def replay(robot: Any, root: str | Path, episode: int = 0, *, clock: Any = None, safety: SafetyConfig | None = None,
           reset: bool = True) -> dict[str, Any]:
    """Send episode `episode` of the dataset at `root` back to `robot` at the dataset's rate.

    A robot with `reset(seed)` starts from the episode's recorded seed, so a sim replay retraces it.
    Returns the actions sent (after the SafetyLayer), the observations, and the loop's timing stats.
    """
    ds = load_dataset(root)
    frames = ds.episode(episode)
    actions = np.asarray(frames["action"], dtype=np.float64)
    safe = robot if isinstance(robot, SafetyLayer) else SafetyLayer(robot, safety, clock=clock)
    if reset and hasattr(safe.robot, "reset"):
        seeds = ds.episodes.get("seed")
        seed = None if seeds is None or int(seeds[episode]) < 0 else int(seeds[episode])  # -1: not recorded
        safe.robot.reset(seed)
    it = iter(actions)
    sent, observations = [], []

    def on_step(k: int, obs: dict, a: np.ndarray) -> None:
        sent.append(a)
        observations.append(obs)

    loop = ControlLoop(safe, lambda obs: next(it), fps=ds.fps, clock=safe.clock, on_step=on_step, stop_on_done=False)
    stats = loop.run(len(actions))
    return {"actions": np.asarray(sent), "recorded": actions, "observations": observations, "stats": stats}
