"""`labkit/Cups-v0`: three cups, a cube hidden under one; which one is shown only at the start.

The memory lesson's first task (MEM, "information shown early and hidden later"). For the first
`CUE_STEPS` observations a cue names the cup that hides the cube (the cube is visible: `state[5:8]` is
its one-hot, and the cube is drawn); then the cups are covered and the cue is all zeros. The robot is
held at its start until the go signal (`state[4]`, after `GO_STEP` steps), so neither its position nor
its motion can carry the cue: after the cue, the observations are identical whichever cup hides the
cube. A policy without memory of the cue can only guess: chance is 1/3.

`reset(options={"cup": k})` puts the cube under cup k (the rest of the episode unchanged).
Reaching the right cup is a success; reaching a wrong one ends the episode as a failure
(`info["wrong_cup"]`). Action: a planar velocity command (m/s). 10 Hz, 60 steps at most.
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

from labkit.envs.base import PHYSICS_RANGE, MujocoTask

ARENA = 1.0
MAX_SPEED = 0.5
START = np.array([0.0, -0.6])
REACH = 0.08  # a cup (or handle) counts as reached within this distance of its centre
CUPS = np.array([[-0.5, 0.55], [0.0, 0.55], [0.5, 0.55]])
CUE_STEPS = 3  # observations 0, 1, 2 show the cue
GO_STEP = 12  # the robot may move from step 12 on: 9 cue-free steps before it can act on the cue


def point_robot_xml(name: str, bodies: str) -> str:
    """The MJCF of a point robot on a plane (Detour's robot and velocity servos) with extra `bodies`."""
    return f"""
<mujoco model="{name}">
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
    {bodies}
    <body name="robot" pos="0 0 .05">
      <joint name="x" type="slide" axis="1 0 0" damping="1"/>
      <joint name="y" type="slide" axis="0 1 0" damping="1"/>
      <geom name="robot" type="sphere" size=".04" mass="1" rgba=".2 .4 .9 1" contype="0" conaffinity="0"/>
    </body>
  </worldbody>
  <actuator>
    <velocity name="vx" joint="x" kv="40"/>
    <velocity name="vy" joint="y" kv="40"/>
  </actuator>
</mujoco>
"""


class WaitingPointTask(MujocoTask):
    """A point robot held at its start until a go signal: the shared part of the memory tasks.

    `self.t` counts steps since the robot was (re)placed at the start; actions are ignored (the robot
    is held still) until `t >= GO_STEP`, and `state[4]` is the go flag."""

    frame_skip = 10
    proprio_dim = 4  # x, y, vx, vy
    # as Detour: a lighter robot is unstable under the stiff velocity servos
    option_ranges = {**MujocoTask.option_ranges, "mass": (0.25, PHYSICS_RANGE[1])}

    def _action_space(self) -> spaces.Box:
        return spaces.Box(-MAX_SPEED, MAX_SPEED, (2,), np.float32)

    def _place_at_start(self) -> None:
        self.data.qpos[:] = self.start
        self.data.qvel[:] = 0.0
        self.t = 0

    def _reset_task(self, rng, options):
        self.start = START + rng.uniform(-0.05, 0.05, 2)
        self._place_at_start()

    def _apply_action(self, action):
        self.data.ctrl[:] = action if self.t >= GO_STEP else 0.0
        self.t += 1

    def _proprio(self):
        return np.concatenate([self.data.qpos, self.data.qvel])

    def _go(self) -> float:
        return float(self.t >= GO_STEP)

    def _left_arena(self) -> bool:
        return bool(np.any(np.abs(self.data.qpos) > ARENA))


class CupsEnv(WaitingPointTask):
    """Go to the cup that hides the cube: shown at the start, then covered."""

    xml = point_robot_xml("cups", "\n    ".join(
        [f'<geom name="cup{k}" type="cylinder" pos="{x} {y} .03" size=".07 .03" rgba=".55 .35 .2 1" '
         'contype="0" conaffinity="0"/>' for k, (x, y) in enumerate(CUPS)]
        + ['<body name="cube" pos="0 0 .09"><geom name="cube" type="box" size=".04 .04 .04" rgba=".9 .15 .15 1" '
           'contype="0" conaffinity="0"/></body>']))
    state_dim = 8  # x, y, vx, vy, go, cue one-hot (3; zeros once the cups are covered)

    def _reset_task(self, rng, options):
        super()._reset_task(rng, options)
        self.cup = int(rng.integers(len(CUPS)))
        if options and "cup" in options:  # the same episode with the cube under another cup (tests, demos)
            self.cup = check_choice_index("cup", options["cup"], len(CUPS))
        self.model.body_pos[self.model.body("cube").id, :2] = CUPS[self.cup]
        self._cube = self.model.geom("cube").id

    def _cue(self) -> np.ndarray:
        cue = np.zeros(len(CUPS))
        if self.t < CUE_STEPS:
            cue[self.cup] = 1.0
        return cue

    def _state(self):
        return np.concatenate([self.data.qpos, self.data.qvel, [self._go()], self._cue()])

    def _evaluate(self):
        # What a camera sees follows the state: the cube is drawn only while the cue is shown.
        self.model.geom_rgba[self._cube, 3] = float(self.t < CUE_STEPS)
        dists = np.linalg.norm(CUPS - self.data.qpos, axis=1)
        reached = int(np.argmin(dists)) if dists.min() < REACH else -1
        self._wrong = reached not in (-1, self.cup) or self._left_arena()
        return reached == self.cup, -float(dists[self.cup]), {
            "distance": float(dists[self.cup]), "reached_cup": reached, "wrong_cup": self._wrong}

    def _failed(self):
        return self._wrong


class CupsExpert:
    """Scripted expert: waits for the go signal, remembers the cue when it is shown, and drives to that cup.
    (The expert has memory: it is what the policies must learn to imitate.)"""

    def __init__(self, env, noise: float = 0.02):
        self.env = env.unwrapped
        self.noise = noise
        self.reset()

    def reset(self, seed: int | None = None):
        self.rng = np.random.default_rng(seed)
        self.cup: int | None = None

    def __call__(self, obs) -> np.ndarray:
        s = np.asarray(obs["state"], dtype=np.float64)
        if s[5:8].any():
            self.cup = int(np.argmax(s[5:8]))
        if s[4] < 0.5 or self.cup is None:  # held: any command is ignored; send zeros
            return np.zeros(2, np.float32)
        return drive_to(s[:2], CUPS[self.cup], self.rng, self.noise)


def check_choice_index(name: str, value, n: int) -> int:
    """`value` an int in [0, n): the `options` of reset that pick a hidden choice."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 0 <= value < n:
        raise ValueError(f"reset option {name!r} must be an int in [0, {n - 1}], got {value!r}")
    return int(value)


def drive_to(pos: np.ndarray, target: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """A velocity command towards `target`, slowing down near it so the 10 Hz loop does not overshoot."""
    delta = target - pos
    dist = float(np.linalg.norm(delta))
    v = delta / max(dist, 1e-8) * min(MAX_SPEED, 3.0 * dist) + rng.normal(0, noise, 2)
    return np.clip(v, -MAX_SPEED, MAX_SPEED).astype(np.float32)
