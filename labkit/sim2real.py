"""Sim-to-real tools: the "real" twin as a gym env, system identification by trajectory matching,
and joining sim and real datasets for co-training (lesson 09).

`TWIN` (`labkit/ArmTwin-v0`) is `labkit/ArmPickCube-v0` behind `labkit.robot.SimRobot`, so `evaluate`
and `record` run on it unchanged; by default it is the course's "real" arm (`real=True`). With
`real=False` and explicit gaps it is a *candidate simulator*: the model that system identification
tunes. `gain`, `offset` and `latency_steps` may be (low, high) ranges, sampled per reset (domain
randomisation of the actuation gap, which the plain task cannot randomise); an `offset` range is drawn
independently for each arm joint (the gripper's stays 0).

System identification replays recorded commands open-loop in candidate simulators from the same
initial state and keeps the parameters whose joint trajectories match the recording best.
"""

from __future__ import annotations

import itertools
from typing import Any

import gymnasium as gym
import numpy as np

from labkit.envs.base import check_bool, check_int, check_number, check_scale
from labkit.robot.sim import SimRobot

TWIN = "labkit/ArmTwin-v0"
ARM = "labkit/ArmPickCube-v0"
JOINTS = slice(0, 5)  # the arm's joint angles in `state` (the gripper opening depends on contacts)


# Allowed values of the twin's own options (the task's options are checked by the task).
GAIN_RANGE, OFFSET_RANGE, DEADBAND_RANGE, SENSOR_NOISE_RANGE = (0.1, 10.0), (-1.0, 1.0), (0.0, 1.0), (0.0, 1.0)
MAX_LATENCY = 100  # control steps, for latency_steps and obs_latency_steps


def _check_per_action(name: str, value, lo: float, hi: float, ranges: bool = True) -> None:
    """A number, a (low, high) tuple range (`ranges`), or a list/array with one finite value per action,
    all in [lo, hi]."""
    if ranges and isinstance(value, tuple):
        check_scale(name, value, lo, hi)
        return
    if isinstance(value, list | tuple | np.ndarray):
        arr = np.asarray(value)
        if arr.dtype.kind not in "iuf" or arr.ndim != 1 or arr.size == 0:
            raise TypeError(f"{name} must be a number, a (low, high) range or a list of numbers (one per action) "
                            f"in [{lo}, {hi}], got {value!r}")
        if not (np.isfinite(arr).all() and (arr >= lo).all() and (arr <= hi).all()):
            raise ValueError(f"{name} values must be finite and in [{lo}, {hi}], got {value!r}")
        return
    check_number(name, value, lo, hi)


def _check_twin_options(env_id, gain, offset, latency_steps, robot_kwargs: dict) -> None:
    """Every option of the twin finite, typed and in range, with an error naming it (NaN used to pass)."""
    if not isinstance(env_id, str):
        raise TypeError(f"env_id must be a registered env id (str), got {env_id!r}")
    if gain is not None:
        _check_per_action("gain", gain, *GAIN_RANGE)
    if offset is not None:
        _check_per_action("offset", offset, *OFFSET_RANGE)
    if latency_steps is not None:
        check_scale("latency_steps", latency_steps, 0, MAX_LATENCY, integer=True)
    kw = robot_kwargs
    if kw.get("deadband") is not None:
        _check_per_action("deadband", kw["deadband"], *DEADBAND_RANGE, ranges=False)  # no ranges: per action
    if kw.get("sensor_noise") is not None:
        check_number("sensor_noise", kw["sensor_noise"], *SENSOR_NOISE_RANGE)
    if "obs_latency_steps" in kw:
        check_int("obs_latency_steps", kw["obs_latency_steps"], 0, MAX_LATENCY)
    if "real" in kw:
        check_bool("real", kw["real"])
    if kw.get("seed") is not None:
        check_int("seed", kw["seed"], 0, 2**63 - 1)
    for name in ("action_mode", "ee_site"):
        if kw.get(name) is not None and not isinstance(kw[name], str):
            raise TypeError(f"{name} must be a str or None, got {kw[name]!r}")


class RobotEnv(gym.Env):
    """A `SimRobot` as a gymnasium env: reset(seed) / step(action) go through the robot's gaps."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, env_id: str = ARM, render_mode: str | None = None, gain: Any = None, offset: Any = None,
                 latency_steps: int | tuple[int, int] | None = None, **robot_kwargs):
        # Ranges are sampled at each reset; the robot is built with their lower end.
        self.gain_opt, self.offset_opt, self.latency_opt = gain, offset, latency_steps
        fixed = lambda v: v[0] if isinstance(v, tuple) else v  # noqa: E731
        for name, v in (("gain", gain), ("offset", offset), ("latency_steps", latency_steps)):
            if isinstance(v, tuple) and (len(v) != 2 or not v[0] <= v[1]):
                raise ValueError(f"{name} range must be (low, high) with low <= high, got {v}")
        _check_twin_options(env_id, gain, offset, latency_steps, robot_kwargs)
        try:
            self.robot = SimRobot(env_id, gain=fixed(gain), offset=0.0 if isinstance(offset, tuple) else offset,
                                  latency_steps=fixed(latency_steps), render_mode=render_mode, **robot_kwargs)
        except ValueError as e:
            if "broadcast" not in str(e):
                raise
            raise ValueError(f"gain, offset and deadband lists need one value per action of {env_id}: {e}") from e
        self.render_mode = render_mode
        task = self.robot.env
        self.action_space, self.observation_space = task.action_space, task.observation_space
        self.metadata = {**self.metadata, "render_fps": task.metadata.get("render_fps")}
        self.control_dt = task.unwrapped.control_dt  # the scripted expert reads it
        self.robot.connect()
        self._rng = np.random.default_rng(0)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._rng = np.random.default_rng(seed + 7_777)
        if isinstance(self.gain_opt, tuple):
            self.robot.gain[:] = self._rng.uniform(*self.gain_opt)
        if isinstance(self.offset_opt, tuple):
            self.robot.offset[:] = 0.0
            self.robot.offset[JOINTS] = self._rng.uniform(*self.offset_opt, 5)
        if isinstance(self.latency_opt, tuple):
            self.robot.latency_steps = int(self._rng.integers(self.latency_opt[0], self.latency_opt[1] + 1))
        obs = self.robot.reset(seed)
        return obs, dict(self.robot.last_info)

    def step(self, action):
        self.robot.act(np.asarray(action, np.float64))
        info = dict(self.robot.last_info)
        return self.robot.observe(), self.robot.reward, self.robot.done, False, info

    def render(self):
        return self.robot.env.render()

    def close(self):
        self.robot.disconnect()


gym.register(TWIN, entry_point="labkit.sim2real:RobotEnv", kwargs={"real": True})


# ---- system identification ------------------------------------------------------------------------

def replay(actions: np.ndarray, seed: int, key: str = "state", **twin_kwargs) -> np.ndarray:
    """Send `actions` [T, A] open-loop to a twin built with `twin_kwargs`, from `reset(seed)`;
    returns the joint angles [T + 1, 5] it observed (the reset observation first)."""
    actions = np.asarray(actions, np.float64)
    if actions.ndim != 2 or len(actions) == 0:
        raise ValueError(f"actions must be [T, A] with T >= 1, got shape {actions.shape}")
    env = RobotEnv(**{"real": False, **twin_kwargs})
    obs, _ = env.reset(seed=seed)
    out = [obs[key][JOINTS]]
    for a in actions:  # keep going after a success: the recording did too
        env.robot.done = False
        obs, *_ = env.step(a)
        out.append(obs[key][JOINTS])
    env.close()
    return np.stack(out)


def trajectory_error(sim: np.ndarray, real: np.ndarray) -> float:
    """Root-mean-square joint-angle difference (rad) between two equally long trajectories."""
    sim, real = np.asarray(sim), np.asarray(real)
    if sim.shape != real.shape:
        raise ValueError(f"trajectories differ in shape: {sim.shape} vs {real.shape}")
    return float(np.sqrt(np.mean((sim - real) ** 2)))


def identify(recordings: list[dict], grid: dict[str, list], fixed: dict | None = None,
             error=trajectory_error) -> tuple[dict, np.ndarray]:
    """Grid search: every combination of `grid` values (SimRobot/task kwargs such as gain,
    latency_steps, damping, mass), scored by the mean `error` over `recordings` (dicts with
    `seed`, `actions` [T, A] and `joints` [T + 1, 5]). Returns the best parameters and the error
    array, shaped like the grid (axes in `grid`'s order) for plotting the landscape."""
    if not recordings or not grid or any(len(v) == 0 for v in grid.values()):
        raise ValueError("need at least one recording and a non-empty list of values per parameter")
    names = list(grid)
    errors = np.zeros([len(grid[n]) for n in names])
    for idx in itertools.product(*[range(len(grid[n])) for n in names]):
        params = {**(fixed or {}), **{n: grid[n][i] for n, i in zip(names, idx, strict=True)}}
        errors[idx] = np.mean([error(replay(r["actions"], r["seed"], **params), r["joints"]) for r in recordings])
    best = np.unravel_index(np.argmin(errors), errors.shape)
    return {n: grid[n][i] for n, i in zip(names, best, strict=True)}, errors


def cem_sample(mean: np.ndarray, std: np.ndarray, low: np.ndarray, high: np.ndarray, population: int,
               rng: np.random.Generator, integer: tuple[int, ...] = ()) -> np.ndarray:
    """CEM's proposal: `population` points [N, D] drawn from N(mean, std^2) with `rng.normal`, clipped to
    the box [low, high], the `integer` coordinates rounded."""
    xs = np.clip(rng.normal(mean, std, (population, len(mean))), low, high)
    xs[:, list(integer)] = np.round(xs[:, list(integer)])
    return xs


def cem_refit(xs: np.ndarray, fs: np.ndarray, elite: int) -> tuple[np.ndarray, np.ndarray]:
    """CEM's update: mean and std (ddof 0) per coordinate of the `elite` points xs [N, D] with the lowest fs [N]."""
    top = xs[np.argsort(fs)[:elite]]
    return top.mean(0), top.std(0)


def cem(objective, low, high, iters: int = 6, population: int = 16, elite: int = 4, seed: int = 0,
        integer: tuple[int, ...] = (), sample=None, refit=None) -> tuple[np.ndarray, float, list[dict]]:
    """Cross-entropy method: minimise `objective(x)` over the box [low, high]. Each iteration samples
    `population` points from a Gaussian (clipped to the box; the `integer` coordinates rounded), and
    refits its mean and std to the `elite` best. Returns the best point seen, its value, and a history
    (mean, std, best value per iteration) for plotting. `sample` and `refit` (what a lesson hands in,
    signatures of `cem_sample` and `cem_refit`) replace labkit's two halves of the update."""
    low, high = np.asarray(low, float), np.asarray(high, float)
    if low.shape != high.shape or (low > high).any() or not 1 <= elite <= population:
        raise ValueError("need low <= high of one shape and 1 <= elite <= population")
    sample, refit = sample or cem_sample, refit or cem_refit
    rng = np.random.default_rng(seed)
    mean, std = (low + high) / 2, (high - low) / 2
    best_x, best_f, history = mean, float("inf"), []
    for _ in range(iters):
        xs = np.asarray(sample(mean, std, low, high, population, rng, tuple(integer)), float)
        if xs.shape != (population, len(mean)):
            raise ValueError(f"sample must return [population, D] = [{population}, {len(mean)}], got {xs.shape}")
        fs = np.array([objective(x) for x in xs])
        mean, std = (np.asarray(v, float) for v in refit(xs, fs, elite))
        std = std + 1e-3 * (high - low)  # a floor keeps it searching
        if fs.min() < best_f:
            best_x, best_f = xs[np.argmin(fs)].copy(), float(fs.min())
        history.append({"mean": mean.copy(), "std": std.copy(), "best": best_f})
    return best_x, best_f, history


# ---- co-training --------------------------------------------------------------------------------

def concat_episodes(*datasets, repeat: tuple[int, ...] | None = None):
    """One `EpisodeDataset` holding the episodes of all `datasets` (each repeated `repeat[i]`
    times, to weight a small real set against a large sim set); stats recomputed on the union."""
    from labkit.data.dataset import EpisodeDataset

    repeat = repeat or (1,) * len(datasets)
    if len(repeat) != len(datasets) or min(repeat) < 1:
        raise ValueError(f"repeat needs one count >= 1 per dataset, got {repeat} for {len(datasets)}")
    first = datasets[0]
    keys = [k for k in first.frames if all(k in d.frames for d in datasets)]  # the features all share
    episodes = [{k: d.frames[k][a:b] for k in keys}
                for d, r in zip(datasets, repeat, strict=True) for _ in range(r)
                for a, b in zip(d.episode_from, d.episode_to, strict=True)]
    return EpisodeDataset.from_episodes(episodes, like=first)  # the first's info and image stats
