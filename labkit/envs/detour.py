"""`labkit/Detour-v0`: a point robot must reach a goal behind an obstacle, going left or right.

Both ways round are equally good, so the expert's demonstrations are bimodal: the multimodality
lesson. A mean-squared-error policy averages "left" and "right" into "straight ahead", into the wall.
Touching the wall ends the episode as a failure (`info["collision"]`).

Action: a planar velocity command in m/s, tracked by velocity actuators. State: position, velocity,
goal position. 10 Hz control, 100 steps at most.
"""

from __future__ import annotations

import math

import numpy as np
from gymnasium import spaces

from labkit.envs.base import PHYSICS_RANGE, MujocoTask

ARENA = 1.0  # half-width of the square arena (m)
WALL_HALF = (0.35, 0.06)  # obstacle half-extents (x, y), centred at the origin
GOAL_Y, START_Y = 0.7, -0.7
GOAL_RADIUS = 0.06
MAX_SPEED = 0.5

XML = f"""
<mujoco model="detour">
  <option timestep="0.01" gravity="0 0 0"/>
  <visual><quality shadowsize="0"/><global offwidth="640" offheight="640"/></visual>
  <asset>
    <texture name="grid" type="2d" builtin="checker" rgb1=".92 .92 .92" rgb2=".86 .86 .86" width="64" height="64"/>
    <material name="grid" texture="grid" texrepeat="4 4"/>
  </asset>
  <worldbody>
    <light pos="0 0 3" dir="0 0 -1" diffuse=".9 .9 .9"/>
    <camera name="top" pos="0 0 2.75" xyaxes="1 0 0 0 1 0" fovy="45"/>
    <geom name="floor" type="plane" size="{ARENA} {ARENA} .1" material="grid" contype="0" conaffinity="0"/>
    <geom name="wall" type="box" pos="0 0 .05" size="{WALL_HALF[0]} {WALL_HALF[1]} .05" rgba=".35 .35 .4 1"/>
    <body name="goal" pos="0 {GOAL_Y} 0.001">
      <geom name="goal" type="cylinder" size="{GOAL_RADIUS} .001" rgba=".2 .75 .3 1" contype="0" conaffinity="0"/>
    </body>
    <body name="robot" pos="0 0 .05">
      <joint name="x" type="slide" axis="1 0 0" damping="1"/>
      <joint name="y" type="slide" axis="0 1 0" damping="1"/>
      <geom name="robot" type="sphere" size=".04" mass="1" rgba=".2 .4 .9 1"/>
    </body>
  </worldbody>
  <actuator>
    <velocity name="vx" joint="x" kv="40"/>
    <velocity name="vy" joint="y" kv="40"/>
  </actuator>
</mujoco>
"""


class DetourEnv(MujocoTask):
    """Reach the goal behind the wall; left and right detours are equally good."""

    xml = XML
    frame_skip = 10
    state_dim = 6  # x, y, vx, vy, goal_x, goal_y
    proprio_dim = 4  # x, y, vx, vy
    # A lighter robot than 0.25x is unstable under the stiff velocity servos at this time step
    # (kv * dt / m > 2: MuJoCo reports a blow-up from 0.15x down).
    option_ranges = {**MujocoTask.option_ranges, "mass": (0.25, PHYSICS_RANGE[1])}

    def _action_space(self) -> spaces.Box:
        return spaces.Box(-MAX_SPEED, MAX_SPEED, (2,), np.float32)

    def _reset_task(self, rng, options):
        self.goal = np.array([rng.uniform(-0.1, 0.1), GOAL_Y])
        self.model.body_pos[self.model.body("goal").id, :2] = self.goal
        # The start is close to the centre line, so both detours are equally short.
        self.data.qpos[:] = [rng.uniform(-0.05, 0.05), START_Y + rng.uniform(-0.05, 0.05)]
        self._wall = self.model.geom("wall").id
        self._robot = self.model.geom("robot").id

    def _apply_action(self, action):
        self.data.ctrl[:] = action

    def _state(self):
        return np.concatenate([self.data.qpos, self.data.qvel, self.goal])

    def _proprio(self):
        return np.concatenate([self.data.qpos, self.data.qvel])

    def _collided(self) -> bool:
        # Leaving the arena counts as a crash too (there are no outer walls to stop it).
        x, y = self.data.qpos
        if abs(x) > ARENA or abs(y) > ARENA:
            return True
        n = self.data.ncon
        if n == 0:  # most steps: no contact at all (this check halves a step's Python)
            return False
        # The contact list as one array (iterating MjContact objects in Python cost 75% of a step).
        g = np.sort(self.data.contact.geom[:n], axis=1)
        wall = sorted((self._wall, self._robot))
        return bool(np.any((g[:, 0] == wall[0]) & (g[:, 1] == wall[1])))

    def _evaluate(self):
        d = self.data.qpos - self.goal
        dist = math.sqrt(d.dot(d))  # what np.linalg.norm computes for a real vector, without its wrapper
        self._crashed = self._collided()
        return dist < GOAL_RADIUS, -dist, {"distance": dist, "collision": self._crashed}

    def _failed(self):
        return self._crashed


class DetourExpert:
    """Scripted expert: picks a side at random (50/50) each episode and follows two waypoints round
    the wall, then heads for the goal. Deterministic given `reset(seed)`."""

    def __init__(self, env, noise: float = 0.02):
        self.env = env.unwrapped
        self.noise = noise
        self.reset()

    def reset(self, seed: int | None = None):
        self.rng = np.random.default_rng(seed)
        self.side = float(self.rng.choice([-1.0, 1.0]))
        self.wp = 0

    def __call__(self, obs) -> np.ndarray:
        s = np.asarray(obs["state"], dtype=np.float64)
        pos, goal = s[:2], s[4:6]
        side_x = self.side * (WALL_HALF[0] + 0.15)
        waypoints = [np.array([side_x, -0.2]), np.array([side_x, 0.2]), goal]
        while self.wp < 2 and np.linalg.norm(waypoints[self.wp] - pos) < 0.08:
            self.wp += 1
        delta = waypoints[self.wp] - pos
        dist = np.linalg.norm(delta)
        # Slow down near the goal so the 10 Hz controller does not overshoot it.
        speed = MAX_SPEED if self.wp < 2 else min(MAX_SPEED, 3.0 * dist)
        v = delta / max(dist, 1e-8) * speed + self.rng.normal(0, self.noise, 2)
        return np.clip(v, -MAX_SPEED, MAX_SPEED).astype(np.float32)


class PursuitExpert:
    """A state-feedback expert with one mode, for interactive imitation (DAgger): pure pursuit along the
    path start -> (side, -0.2) -> (side, 0.2) -> goal. Its command points at the path point `lookahead`
    metres of arc length beyond the robot's projection onto the path, at full speed, slowing near the
    goal. Unlike DetourExpert, whose waypoint switches (and whose side is drawn per episode), its answer
    is a continuous function of the observation alone, so it can label any state a learner visits.
    `side`: +1 round the right of the wall, -1 the left. `noise`: std of Gaussian noise on the command."""

    def __init__(self, env=None, side: float = 1.0, noise: float = 0.0, lookahead: float = 0.15):  # env: unused (an expert factory takes one)
        if side not in (1.0, -1.0):
            raise ValueError(f"side is +1 (right) or -1 (left), got {side!r}")
        self.side, self.noise, self.lookahead = float(side), float(noise), float(lookahead)
        self.reset()

    def reset(self, seed: int | None = None):
        self.rng = np.random.default_rng(seed)

    def __call__(self, obs) -> np.ndarray:
        s = np.asarray(obs["state"], dtype=np.float64)
        pos, goal = s[:2], s[4:6]
        x = self.side * (WALL_HALF[0] + 0.15)
        path = np.array([[0.0, START_Y], [x, -0.2], [x, 0.2], goal])
        seg = path[1:] - path[:-1]
        length = np.linalg.norm(seg, axis=1)
        ends = np.concatenate([[0.0], np.cumsum(length)])
        t = np.clip(((pos - path[:-1]) * seg).sum(1) / length**2, 0.0, 1.0)  # projection on each segment
        i = int(np.argmin(np.linalg.norm(path[:-1] + t[:, None] * seg - pos, axis=1)))
        ahead = min(ends[i] + t[i] * length[i] + self.lookahead, ends[-1])
        j = min(int(np.searchsorted(ends, ahead, side="right")) - 1, len(length) - 1)
        delta = path[j] + (ahead - ends[j]) / length[j] * seg[j] - pos
        speed = min(MAX_SPEED, 3.0 * np.linalg.norm(goal - pos))  # slow near the goal, as DetourExpert does
        v = delta / max(np.linalg.norm(delta), 1e-8) * speed
        if self.noise:
            v = v + self.rng.normal(0, self.noise, 2)
        return np.clip(v, -MAX_SPEED, MAX_SPEED).astype(np.float32)
