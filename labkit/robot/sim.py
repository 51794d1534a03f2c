"""`SimRobot`: any labkit MuJoCo task behind the robot contract, with the gaps a real robot has.

The gaps are injectable, each off by default: `latency_steps` (a command runs that many control steps
after it is sent), `obs_latency_steps` (observations arrive late), `sensor_noise` (Gaussian, on
`state` and `proprio`), and an actuation gap between command and executed action
(`executed = gain * command + offset`, and a `deadband`: changes smaller than it do not move the
motor). `real=True` is the "real robot" of sim-to-real lessons: shifted physics through the task's
physics options (friction, mass, damping) plus a little of every gap; any explicit argument wins.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np

from labkit.robot.base import NotConnectedError, RobotSpec

# What a task's action means, for tasks that do not say it themselves (attribute `action_mode`).
TASK_ACTION_MODES = {"labkit/Detour-v0": "velocity", "labkit/PegInsert-v0": "delta", "labkit/PushT-v0": "position",
                     "labkit/ArmPickCube-v0": "position"}
# The end-effector site of position-controlled tasks (forward kinematics for the workspace bound).
TASK_EE_SITES = {"labkit/ArmPickCube-v0": "grasp"}

# The "real" variant: physics multipliers and gaps (units of the task's commands and observations).
REAL = {"friction": 0.7, "mass": 1.25, "damping": 1.5, "latency_steps": 1, "sensor_noise": 0.002,
        "gain": 0.97, "offset": 0.0, "deadband": 0.001}


class SimRobot:
    """A labkit gym task as a robot: `act` runs one control step, `observe` returns its observation.

    `reset(seed)` starts a new episode (a real arm has no such call: record.py uses it when present).
    `done`, `last_info` (with `is_success`) and `reward` report the episode. `fk(joints)` is the
    end-effector position of a position-controlled task with an `ee_site` (for the workspace bound).
    """

    def __init__(self, env_id: str, *, latency_steps: int | None = None, obs_latency_steps: int = 0,
                 sensor_noise: float | None = None, gain: Any = None, offset: Any = None,
                 deadband: Any = None, real: bool = False, seed: int = 0, action_mode: str | None = None,
                 ee_site: str | None = None, **env_kwargs):
        base = REAL if real else {}
        if real:
            for key in ("friction", "mass", "damping"):
                env_kwargs.setdefault(key, base[key])
        self.env_id, self.env_kwargs, self.real, self.seed = env_id, env_kwargs, real, seed
        pick = lambda v, k, d: v if v is not None else base.get(k, d)  # noqa: E731
        self.latency_steps = int(pick(latency_steps, "latency_steps", 0))
        self.obs_latency_steps = int(obs_latency_steps)
        self.sensor_noise = float(pick(sensor_noise, "sensor_noise", 0.0))
        if self.latency_steps < 0 or self.obs_latency_steps < 0 or self.sensor_noise < 0:
            raise ValueError("latency_steps, obs_latency_steps and sensor_noise must be >= 0")
        self.env = gym.make(env_id, **env_kwargs)
        task = self.env.unwrapped
        space = self.env.action_space
        self.gain = np.broadcast_to(np.asarray(pick(gain, "gain", 1.0), np.float64), space.shape).copy()
        self.offset = np.broadcast_to(np.asarray(pick(offset, "offset", 0.0), np.float64), space.shape).copy()
        self.deadband = np.broadcast_to(np.asarray(pick(deadband, "deadband", 0.0), np.float64), space.shape).copy()
        mode = action_mode or getattr(task, "action_mode", None) or TASK_ACTION_MODES.get(env_id, "position")
        model: mujoco.MjModel = task.model
        names = [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_ACTUATOR, i) or f"a{i}" for i in range(model.nu)]
        if len(names) != space.shape[0]:
            names = [f"joint{i}" for i in range(space.shape[0])]
        fps = task.metadata.get("render_fps") or 1.0 / task.control_dt
        self.spec = RobotSpec(tuple(names), space.low, space.high, float(fps), mode, name=f"SimRobot({env_id})")
        self.ee_site = ee_site or getattr(task, "ee_site", None) or TASK_EE_SITES.get(env_id)
        self._scratch = mujoco.MjData(model)  # for forward kinematics, never stepped
        self._rng = np.random.default_rng(seed)
        self.connected = False
        self.done, self.reward, self.last_info = False, 0.0, {}
        self.steps = 0

    # ---- the robot contract --------------------------------------------------------------------------
    def connect(self) -> None:
        if not self.connected:
            self.connected = True
            self.reset(self.seed)

    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        """Start a new episode (seeded); returns its first observation."""
        if not self.connected:
            raise NotConnectedError(f"{self.spec.name}: call connect() first")
        obs, info = self.env.reset(seed=seed)
        if seed is not None:
            self._rng = np.random.default_rng(seed + 1_000_003)
        self._obs = deque([obs] * (self.obs_latency_steps + 1), maxlen=self.obs_latency_steps + 1)
        hold = self.hold_action()
        self._queue = deque([hold] * self.latency_steps)
        self._last_exec = hold.copy()
        self.done, self.reward, self.last_info, self.steps = False, 0.0, info, 0
        return self.observe()

    def observe(self) -> dict[str, np.ndarray]:
        """The observation `obs_latency_steps` old, with sensor noise on `state`, `proprio` and `joints`."""
        if not self.connected:
            raise NotConnectedError(f"{self.spec.name}: call connect() first")
        obs = {k: np.array(v, copy=True) for k, v in self._obs[0].items()}
        if self.sensor_noise > 0:
            for key in ("state", "proprio", "joints"):
                if key in obs:
                    obs[key] = (obs[key] + self._rng.normal(0, self.sensor_noise, obs[key].shape)).astype(obs[key].dtype)
        return obs

    def act(self, action: Any) -> np.ndarray:
        """Queue `action`; run the command that is due (after the latency) through the actuation gap
        and one control step. Wrong shape: ValueError; NaN: ValueError (the env refuses it)."""
        if not self.connected:
            raise NotConnectedError(f"{self.spec.name}: call connect() first")
        cmd = self.spec.check_shape(action)
        if not np.all(np.isfinite(cmd)):
            raise ValueError(f"{self.spec.name}: command has NaN/inf: {cmd}")
        self._queue.append(cmd)
        due = self._queue.popleft()
        executed = self.gain * due + self.offset
        small = np.abs(executed - self._last_exec) < self.deadband
        executed = np.where(small, self._last_exec, executed)
        executed = np.clip(executed, self.spec.low, self.spec.high)
        self._last_exec = executed
        obs, reward, terminated, truncated, info = self.env.step(executed.astype(np.float32))
        self._obs.append(obs)
        self.reward, self.last_info = float(reward), info
        self.done = self.done or bool(terminated or truncated)
        self.steps += 1
        return cmd

    def hold_action(self) -> np.ndarray:
        """Present joint positions (position mode: each actuator's length, i.e. joint position times
        its gear, so a gripper driven through a geared finger reads as its opening) or zeros."""
        task = self.env.unwrapped
        if hasattr(task, "hold_action"):
            return np.asarray(task.hold_action(), dtype=np.float64)
        if self.spec.action_mode != "position":
            return np.zeros(self.spec.dim)
        model, data = task.model, task.data
        out = np.array(data.ctrl[: self.spec.dim], dtype=np.float64)
        for i in range(min(model.nu, self.spec.dim)):
            if model.actuator_trntype[i] == mujoco.mjtTrn.mjTRN_JOINT:
                out[i] = data.actuator_length[i]
        return out

    def disconnect(self) -> None:
        if self.connected:
            self.connected = False
            self.env.close()

    # ---- extras --------------------------------------------------------------------------------------
    def fk(self, joints: Any) -> np.ndarray:
        """End-effector position (the `ee_site`) for joint targets `joints` (position mode only)."""
        if self.ee_site is None or self.spec.action_mode != "position":
            raise ValueError(f"{self.spec.name} has no forward kinematics: pass ee_site=<site name> "
                             "for a position-controlled task")
        model = self.env.unwrapped.model
        d = self._scratch
        d.qpos[:] = self.env.unwrapped.data.qpos
        joints = np.asarray(joints, dtype=np.float64)
        for i in range(min(model.nu, len(joints))):
            if model.actuator_trntype[i] == mujoco.mjtTrn.mjTRN_JOINT:
                d.qpos[model.jnt_qposadr[model.actuator_trnid[i, 0]]] = joints[i] / model.actuator_gear[i, 0]
        mujoco.mj_kinematics(model, d)
        return d.site(self.ee_site).xpos.copy()

    def __enter__(self) -> SimRobot:
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.disconnect()
