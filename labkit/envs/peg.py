"""`labkit/PegInsert-v0`: insert a square peg into a hole with 1.5 mm clearance per side.

The RL-finetuning task. A peg held by a position-controlled gripper (3-D translation) must go into
a square hole in a block placed at a random spot on the table. The hole is 1.5 mm wider than the
peg on each side and has no chamfer, so a peg that comes down more than 1.5 mm off centre lands on
the rim and stays there: precision, not strategy, decides success.

Action: a relative move (dx, dy, dz) of the gripper, at most 1 cm per step; the position actuators
track `current position + move`, so pushing against the block presses with a bounded force.
10 Hz control, 60 steps at most.

Observation `state` (8-D, metres): peg centre x, y, z, its velocity (3), the hole centre x, y.
`proprio` (6-D): peg position and velocity.
`info["depth"]` is how far the peg's bottom is below the block's top; success is depth >= 15 mm.
The dense reward is -(distance of the peg's bottom to the hole's bottom target), the sparse one is
1 on success.

The scripted expert is deliberately imperfect (`PegInsertExpert`): it sees the hole through a
miscalibrated camera (positions read 6% too far from the table's centre, plus 0.2 mm of noise per
episode) and comes straight down with no search, so it misses holes far from the centre. Behavior
cloning copies the bias (a systematic error does not average out), so BC misses the same holes,
which leaves RL finetuning a clear, learnable correction to find.
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

from labkit.envs.base import MujocoTask

PEG_HALF = 0.010  # peg half-width (square cross-section)
PEG_HALF_LEN = 0.030  # peg half-length
CLEARANCE = 0.0015  # hole half-width minus peg half-width
HOLE_HALF = PEG_HALF + CLEARANCE
BLOCK_HALF = 0.045  # outer half-width of the block
BLOCK_TOP = 0.040  # height of the block's top face
SUCCESS_DEPTH = 0.015  # peg bottom this far below the block top counts as inserted
MAX_MOVE = 0.010  # largest move per step (m)
HOLE_RANGE = 0.05  # the hole centre is uniform in [-0.05, 0.05]^2
START_RANGE = 0.08  # the peg starts uniform in [-0.08, 0.08]^2 (x, y) ...
START_Z = (0.11, 0.13)  # ... at this height of its centre


def _block_xml() -> str:
    """The block as four walls round a square hole (MuJoCo has no boolean geometry)."""
    h, o, z = HOLE_HALF, BLOCK_HALF, BLOCK_TOP / 2
    w = (o - h) / 2  # half-thickness of a wall
    walls = [((h + w, 0), (w, o)), ((-h - w, 0), (w, o)), ((0, h + w), (h, w)), ((0, -h - w), (h, w))]
    return "\n".join(
        f'<geom name="wall{i}" type="box" pos="{c[0]:.5f} {c[1]:.5f} {z}" size="{s[0]:.5f} {s[1]:.5f} {z}" '
        f'rgba=".55 .45 .35 1"/>' for i, (c, s) in enumerate(walls))


XML = f"""
<mujoco model="peg_insert">
  <compiler angle="radian"/>
  <option timestep="0.002" integrator="implicitfast"/>
  <visual>
    <quality shadowsize="0"/><global offwidth="640" offheight="640"/>
    <headlight ambient=".5 .5 .5" diffuse=".5 .5 .5" specular="0 0 0"/>
  </visual>
  <default><geom friction="0.6 0.005 0.0001" solref="0.004 1"/></default>
  <worldbody>
    <camera name="top" pos="0 -0.24 0.42" xyaxes="1 0 0 0 0.866 0.5" fovy="50"/>
    <geom name="table" type="plane" size=".3 .3 .05" rgba=".93 .93 .93 1"/>
    <body name="block" pos="0 0 0">
      {_block_xml()}
      <geom name="hole_floor" type="box" pos="0 0 0.001" size="{HOLE_HALF} {HOLE_HALF} 0.001" rgba=".2 .2 .2 1"
            contype="0" conaffinity="0"/>
    </body>
    <body name="peg" pos="0 0 0" gravcomp="1">  <!-- at the origin: qpos is the position -->
      <joint name="px" type="slide" axis="1 0 0" damping="40"/>
      <joint name="py" type="slide" axis="0 1 0" damping="40"/>
      <joint name="pz" type="slide" axis="0 0 1" damping="40"/>
      <geom name="peg" type="box" size="{PEG_HALF} {PEG_HALF} {PEG_HALF_LEN}" mass="0.1" rgba=".25 .41 .88 1"/>
    </body>
  </worldbody>
  <actuator>
    <position name="ax" joint="px" kp="800"/>
    <position name="ay" joint="py" kp="800"/>
    <position name="az" joint="pz" kp="800"/>
  </actuator>
</mujoco>
"""


class PegInsertEnv(MujocoTask):
    """Insert the peg into the hole; success when its bottom is 15 mm below the block's top."""

    xml = XML
    frame_skip = 50
    state_dim = 8
    proprio_dim = 6

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._block = self.model.body("block").id
        self.hole = np.zeros(2)

    def _action_space(self) -> spaces.Box:
        return spaces.Box(-MAX_MOVE, MAX_MOVE, (3,), np.float32)

    def _reset_task(self, rng, options):
        self.hole = rng.uniform(-HOLE_RANGE, HOLE_RANGE, 2)
        self.model.body_pos[self._block, :2] = self.hole
        start = np.array([*rng.uniform(-START_RANGE, START_RANGE, 2), rng.uniform(*START_Z)])
        self.data.qpos[:] = start
        self.data.ctrl[:] = start

    def _apply_action(self, action):
        self.data.ctrl[:] = self.data.qpos + action

    def _state(self):
        return np.concatenate([self.data.qpos, self.data.qvel, self.hole])

    def _proprio(self):
        return np.concatenate([self.data.qpos, self.data.qvel])

    def _evaluate(self):
        q = self.data.qpos
        bottom = q[2] - PEG_HALF_LEN
        depth = BLOCK_TOP - bottom
        lateral = q[:2] - self.hole
        # The peg bottom's offset from its target, the hole's floor at (hole x, hole y, 0): filled in
        # place rather than as np.array([*qpos[:2], bottom]) - np.array([*hole, 0.0]) (the same numbers).
        to_target = np.empty(3)
        to_target[:2] = lateral
        to_target[2] = bottom
        dist = float(np.linalg.norm(to_target))
        offset = float(np.linalg.norm(lateral))
        return depth >= SUCCESS_DEPTH, -dist, {"depth": float(depth), "offset": offset}


class PegInsertExpert:
    """Scripted, imperfect expert: fly to above its estimate of the hole, then straight down.

    Its estimate of the hole is (1 + calibration_error) * hole + N(0, aim_noise^2) per axis, the
    noise drawn once per episode; there is no search, so an error beyond the 1.5 mm clearance ends on
    the rim. With the defaults it succeeds in about half the episodes (measured in the dataset card).
    Deterministic given `reset(seed)`.
    """

    def __init__(self, env, calibration_error: float = 0.06, aim_noise: float = 0.0002,
                 action_noise: float = 0.0005):
        self.env = env.unwrapped
        self.calibration_error, self.aim_noise, self.action_noise = calibration_error, aim_noise, action_noise
        self.reset()

    def reset(self, seed: int | None = None):
        self.rng = np.random.default_rng(seed)
        self.aim_error = self.rng.normal(0, self.aim_noise, 2)
        self.descending = False

    def __call__(self, obs) -> np.ndarray:
        s = np.asarray(obs["state"], dtype=np.float64)
        pos, aim = s[:3], (1 + self.calibration_error) * s[6:8] + self.aim_error
        above = BLOCK_TOP + PEG_HALF_LEN + 0.015  # peg centre height with its bottom 15 mm above the block
        lateral = aim - pos[:2]
        if not self.descending and np.linalg.norm(lateral) < 0.001 and abs(pos[2] - above) < 0.004:
            self.descending = True
        if self.descending:
            move = np.array([*lateral, -MAX_MOVE])
        else:
            move = np.array([*lateral, above - pos[2]])
        move = move + self.rng.normal(0, self.action_noise, 3)
        return np.clip(move, -MAX_MOVE, MAX_MOVE).astype(np.float32)
