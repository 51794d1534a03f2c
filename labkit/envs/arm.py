"""`labkit/ArmPickCube-v0`: a simulated SO-101-class classroom arm picks a cube and places it in a zone.

The twin of the course's real arm: 5 revolute joints (shoulder_pan about z; shoulder_lift, elbow_flex,
wrist_flex about y; wrist_roll along the gripper) plus a parallel gripper, with link lengths and joint
ranges taken from the public SO-101 description (upper arm 0.116 m, forearm 0.135 m; wrist flex to
fingertips 0.114 m, shorter than the real ~0.16 m jaw) and simple box/capsule geometry. Joint zero:
upper arm vertical, forearm and gripper pointing forward (not LeRobot's calibration offsets, which a
real-arm backend maps). Each joint is a position servo like the
STS3215 (kp 17.8 N m/rad, +-3.35 N m, damping, armature and friction loss as identified for it),
so the arm sags a little under gravity, as the real one does.

Action (6-D, absolute joint targets, Box bounds = joint limits): the 5 joint angles in radians and
the gripper opening in metres (0 = closed, 0.07 = fully open); LeRobot's SO-101 action is the same
six joints in degrees with a 0-100 gripper.
20 Hz control (0.002 s physics, frame_skip 25), 300 steps (15 s) at most.

Observation `state` (26-D; the last five are differences an MLP would otherwise have to learn):
    0-5   joint positions (5 angles, gripper opening)      6-11  their velocities
    12-14 grasp point x, y, z (between the finger pads)    15-17 cube centre x, y, z
    18    cube yaw, wrapped to [-pi/4, pi/4) (the cube is square)    19-20  target zone centre x, y
    21-23 cube centre minus grasp point                     24-25 zone centre minus cube centre (x, y)
`proprio` (12-D): joint positions and velocities. With `obs_mode="pixels"`, `pixels` is the
overhead camera and `wrist` the gripper camera (both uint8 HxWx3), and `joints` (6-D float32) the
joint positions alone (5 angles in radians, gripper opening in metres: `proprio[:6]`). `joints` plus
the two cameras is exactly what the real arm observes (`labkit.robot.SO101Arm.observe()`): a policy
that reads only them runs on both. `state` holds the cube's and the zone's poses, which no real
sensor gives, so a `state` policy stays in simulation.

Success: the cube rests on the table with its centre inside the 6 cm target square, and no finger
pad touches it (released). Dense reward: -(grasp point to cube) - 2 (cube to zone centre).

Domain randomisation, beyond friction/mass/damping/obs_noise: `cube_size` (edge, m), `cube_mass`
(kg), `actuator_gain` (multiplier on every servo's kp) - each a number or a (low, high) range
sampled at every reset - and `latency` (control steps between an action and its effect; an int or an
(low, high) int range). The base's `mass` scales the arm's links; `cube_mass` sets the cube's.
`reset(options={"cube": (x, y, yaw), "zone": (x, y)})` places them by hand (otherwise uniform in
x 0.15-0.24 m, y +-0.12 m, yaw +-0.6 rad, at least 8 cm apart).

The scripted expert (`ArmPickCubeExpert`) solves inverse kinematics (damped least squares on the
MuJoCo Jacobian of the grasp point) along straight-line Cartesian waypoints: above the cube,
descend, close, lift, carry, lower, open, retreat. With `noise > 0` it imitates a human
teleoperator: uneven speed, hand tremor, small aiming errors and pauses.
"""

from __future__ import annotations

from collections import deque

import mujoco
import numpy as np
from gymnasium import spaces

from labkit.envs.base import MujocoTask, Scale, check_scale

JOINTS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll")
# Joint ranges (rad) as the SO-101 description gives them.
LOW = np.array([-1.92, -1.745, -1.69, -1.658, -2.744])
HIGH = np.array([1.92, 1.745, 1.69, 1.658, 2.841])
GRIP_MAX = 0.07  # widest gripper opening (m)
KP, FORCE = 17.8, 3.35  # STS3215 servo: position gain (N m/rad) and torque limit (N m)
CUBE = 0.03  # nominal cube edge (m)
CUBE_MASS = 0.03  # nominal cube mass (kg)
ZONE_HALF = 0.03  # half-side of the target square
REGION = ((0.15, 0.24), (-0.12, 0.12))  # x and y ranges of cube and zone centres (m)
MIN_SEPARATION = 0.08  # cube and zone centres at least this far apart
CUBE_YAW = 0.6  # the cube's yaw is uniform in [-0.6, 0.6] rad
HOME = np.array([0.0, -0.42, 0.73, 1.26, 0.0])  # start pose: grasp point 0.10 m above the table, pointing down


def _link(name: str, frm: str, to: str, r: float, mass: float) -> str:
    return (f'<geom name="{name}" type="capsule" fromto="{frm} {to}" size="{r}" mass="{mass}" '
            f'class="link"/>')


XML = f"""
<mujoco model="so101_pick_cube">
  <compiler angle="radian" autolimits="true"/>
  <option timestep="0.002" integrator="implicitfast" cone="elliptic" impratio="10"/>
  <visual>
    <quality shadowsize="0"/><global offwidth="640" offheight="640"/>
    <headlight ambient=".5 .5 .5" diffuse=".5 .5 .5" specular="0 0 0"/>
  </visual>
  <default>
    <joint damping="0.6" armature="0.028" frictionloss="0.052"/>
    <position kp="{KP}" forcerange="-{FORCE} {FORCE}"/>
    <geom friction="1 0.005 0.0001"/>
    <!-- arm links touch the table and the cube but not each other (contype 2 vs conaffinity 1) -->
    <default class="link"><geom contype="2" conaffinity="1" rgba="1 .82 .12 1"/></default>
    <default class="pad">
      <geom type="box" contype="2" conaffinity="1" condim="4" friction="1.5 0.01 0.001" solref="0.01 1"
            rgba=".15 .15 .15 1" mass="0.012"/>
    </default>
  </default>
  <worldbody>
    <camera name="top" pos="0.18 0 0.42" xyaxes="0 -1 0 1 0 0" fovy="45"/>
    <geom name="table" type="plane" size=".5 .5 .05" rgba=".93 .93 .93 1"/>
    <body name="zone" pos="0.2 0.08 0">
      <geom name="zone" type="box" size="{ZONE_HALF} {ZONE_HALF} 0.0005" rgba=".55 .87 .55 1"
            contype="0" conaffinity="0"/>
    </body>
    <body name="cube" pos="0.2 -0.05 {CUBE / 2}">
      <freejoint name="cube"/>
      <geom name="cube" type="box" size="{CUBE / 2} {CUBE / 2} {CUBE / 2}" mass="{CUBE_MASS}" condim="4"
            friction="1.5 0.01 0.001" rgba=".85 .2 .2 1"/>
    </body>
    <geom name="base" type="cylinder" pos="0 0 0.03" size="0.045 0.03" rgba=".2 .2 .2 1"/>
    <body name="shoulder" pos="0 0 0.0624">
      <joint name="shoulder_pan" axis="0 0 1" range="{LOW[0]} {HIGH[0]}"/>
      <geom name="shoulder" type="box" pos="0.012 0 0.027" size="0.03 0.025 0.027" mass="0.1" class="link"/>
      <body name="upper_arm" pos="0.03 0 0.054">
        <joint name="shoulder_lift" axis="0 1 0" range="{LOW[1]} {HIGH[1]}"/>
        {_link("upper_arm", "0 0 0", "0.028 0 0.1126", 0.018, 0.103)}
        <body name="lower_arm" pos="0.028 0 0.1126">
          <joint name="elbow_flex" axis="0 1 0" range="{LOW[2]} {HIGH[2]}"/>
          {_link("lower_arm", "0 0 0", "0.1349 0 0.0052", 0.016, 0.104)}
          <body name="wrist" pos="0.1349 0 0.0052">
            <joint name="wrist_flex" axis="0 1 0" range="{LOW[3]} {HIGH[3]}"/>
            <geom name="wrist" type="box" pos="0.02 0 0" size="0.022 0.018 0.016" mass="0.079" class="link"/>
            <body name="gripper" pos="0.045 0 0">
              <joint name="wrist_roll" axis="1 0 0" range="{LOW[4]} {HIGH[4]}"/>
              <geom name="palm" type="box" pos="0.012 0 0" size="0.012 0.042 0.018" mass="0.087" class="link"/>
              <site name="grasp" pos="0.05 0 0" size="0.004" rgba="0 1 0 0"/>
              <camera name="wrist" pos="0.026 0 0.035" xyaxes="0 -1 0 0.5 0 0.866" fovy="75"/>
              <body name="finger_left" pos="0.024 0 0">
                <joint name="finger_left" type="slide" axis="0 1 0" range="0 {GRIP_MAX / 2}" damping="2"
                       armature="0.01" frictionloss="0"/>
                <geom name="pad_left" class="pad" pos="0.0225 0.004 0" size="0.0225 0.004 0.012"/>
              </body>
              <body name="finger_right" pos="0.024 0 0">
                <joint name="finger_right" type="slide" axis="0 -1 0" range="0 {GRIP_MAX / 2}" damping="2"
                       armature="0.01" frictionloss="0"/>
                <geom name="pad_right" class="pad" pos="0.0225 -0.004 0" size="0.0225 0.004 0.012"/>
              </body>
            </body>
          </body>
        </body>
      </body>
    </body>
  </worldbody>
  <equality>
    <joint joint1="finger_right" joint2="finger_left" solref="0.01 1"/>
  </equality>
  <actuator>
    {"".join(f'<position name="{j}" joint="{j}" ctrlrange="{lo} {hi}"/>' for j, lo, hi in zip(JOINTS, LOW, HIGH, strict=True))}
    <position name="gripper" joint="finger_left" gear="2" kp="300" forcerange="-6 6" ctrlrange="0 {GRIP_MAX}"/>
  </actuator>
</mujoco>
"""


def _down_frame(yaw: float) -> np.ndarray:
    """Rotation of the grasp frame pointing straight down with the fingers closing along `yaw`."""
    x = np.array([0.0, 0.0, -1.0])  # the gripper's long axis, towards the fingertips
    y = np.array([np.cos(yaw), np.sin(yaw), 0.0])  # the direction the fingers close along
    return np.column_stack([x, y, np.cross(x, y)])


class ArmIK:
    """Damped-least-squares inverse kinematics of the grasp point on a private copy of the model."""

    def __init__(self, model: mujoco.MjModel, damping: float = 1e-3, rot_weight: float = 0.1):
        self.model, self.data = model, mujoco.MjData(model)
        self.qadr = np.array([model.joint(j).qposadr[0] for j in JOINTS])
        self.dadr = np.array([model.joint(j).dofadr[0] for j in JOINTS])
        self.site = model.site("grasp").id
        self.damping, self.rot_weight = damping, rot_weight
        self._jp, self._jr = np.zeros((3, model.nv)), np.zeros((3, model.nv))

    def forward(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Grasp point position and rotation matrix at joint angles `q`."""
        self.data.qpos[self.qadr] = q
        mujoco.mj_kinematics(self.model, self.data)
        return self.data.site_xpos[self.site].copy(), self.data.site_xmat[self.site].reshape(3, 3).copy()

    def solve(self, q0: np.ndarray, pos: np.ndarray, rot: np.ndarray, iters: int = 30) -> np.ndarray:
        """Joint angles near `q0` that put the grasp point at `pos` with orientation `rot`."""
        q, quat_t, quat, err_r = np.array(q0, float), np.zeros(4), np.zeros(4), np.zeros(3)
        mujoco.mju_mat2Quat(quat_t, rot.ravel())
        for _ in range(iters):
            p, r = self.forward(q)
            mujoco.mj_comPos(self.model, self.data)
            mujoco.mju_mat2Quat(quat, r.ravel())
            mujoco.mju_subQuat(err_r, quat_t, quat)  # rotation from current to target, in the local frame
            err = np.concatenate([pos - p, self.rot_weight * (r @ err_r)])
            if np.linalg.norm(err) < 1e-5:
                break
            mujoco.mj_jacSite(self.model, self.data, self._jp, self._jr, self.site)
            jac = np.vstack([self._jp[:, self.dadr], self.rot_weight * self._jr[:, self.dadr]])
            dq = jac.T @ np.linalg.solve(jac @ jac.T + self.damping**2 * np.eye(6), err)
            q = np.clip(q + dq, LOW, HIGH)
        return q

    def gravity(self, q: np.ndarray) -> np.ndarray:
        """Joint torques that hold the arm still at `q` against gravity (for sag compensation)."""
        self.data.qpos[self.qadr] = q
        self.data.qvel[:] = 0
        mujoco.mj_forward(self.model, self.data)
        return self.data.qfrc_bias[self.dadr].copy()


MAX_LATENCY = 100  # control steps (5 s): the action queue holds latency + 1 actions


def _check_range(name: str, value, lo: float, hi: float) -> None:
    """A finite number or (low, high) range inside [lo, hi], else a ValueError (TypeError for a
    non-number) that names the option."""
    check_scale(name, value, lo, hi)


def _sample(value, rng: np.random.Generator, integer: bool = False) -> float:
    if not isinstance(value, tuple | list):
        return value
    return int(rng.integers(value[0], value[1] + 1)) if integer else float(rng.uniform(*value))


class ArmPickCubeEnv(MujocoTask):
    """Pick the cube and place it in the green zone with a 5-DoF arm under joint-position control."""

    xml = XML
    frame_skip = 25
    state_dim = 26
    proprio_dim = 12

    def __init__(self, *args, cube_size: Scale = CUBE, cube_mass: Scale = CUBE_MASS, actuator_gain: Scale = 1.0,
                 latency: int | tuple[int, int] = 0, **kwargs):
        _check_range("cube_size", cube_size, 0.02, 0.045)  # what the open gripper can take
        _check_range("cube_mass", cube_mass, 1e-3, 0.3)
        _check_range("actuator_gain", actuator_gain, 0.1, 10.0)
        check_scale("latency", latency, 0, MAX_LATENCY, integer=True)  # control steps
        self.cube_size_opt, self.cube_mass_opt, self.gain_opt, self.latency_opt = (
            cube_size, cube_mass, actuator_gain, latency)
        super().__init__(*args, **kwargs)
        m = self.model
        self._qadr = np.array([m.joint(j).qposadr[0] for j in JOINTS])
        self._dadr = np.array([m.joint(j).dofadr[0] for j in JOINTS])
        self._fq = np.array([m.joint(f).qposadr[0] for f in ("finger_left", "finger_right")])
        self._fd = np.array([m.joint(f).dofadr[0] for f in ("finger_left", "finger_right")])
        self._cq, self._cd = m.joint("cube").qposadr[0], m.joint("cube").dofadr[0]
        self._cube_body, self._cube_geom = m.body("cube").id, m.geom("cube").id
        self._zone, self._site = m.body("zone").id, m.site("grasp").id
        self._pads = np.array([m.geom("pad_left").id, m.geom("pad_right").id])
        self._kp = (m.actuator_gainprm[:, 0].copy(), m.actuator_biasprm[:, 1].copy())
        self.cube_size, self.zone = CUBE, np.zeros(2)
        self._queue: deque = deque([np.zeros(6)], maxlen=1)
        if self.obs_mode == "pixels":  # the wrist camera rides along as its own image key
            # `joints`: what the real arm's encoders give (no velocities: the real backend reads positions
            # only). Unbounded like `proprio`, since obs_noise may push a reading past a joint limit.
            # Only in pixel mode: state-mode observations (and the shipped state datasets) stay as they were.
            self.observation_space = spaces.Dict({
                **self.observation_space.spaces,
                "joints": spaces.Box(-np.inf, np.inf, (6,), np.float32),
                "wrist": spaces.Box(0, 255, (self.image_size, self.image_size, 3), np.uint8)})

    def _action_space(self) -> spaces.Box:
        return spaces.Box(np.append(LOW, 0.0).astype(np.float32), np.append(HIGH, GRIP_MAX).astype(np.float32))

    # ---- episode setup ------------------------------------------------------------------------
    def _reset_task(self, rng, options):
        m, d = self.model, self.data
        # Domain randomisation of the cube and the servos (friction, masses, damping: in the base).
        s = self.cube_size = _sample(self.cube_size_opt, rng)
        m.geom_size[self._cube_geom] = s / 2
        m.geom_rbound[self._cube_geom] = np.sqrt(3) * s / 2
        m.geom_aabb[self._cube_geom, 3:] = s / 2
        mass = _sample(self.cube_mass_opt, rng)
        m.body_mass[self._cube_body], m.body_inertia[self._cube_body] = mass, mass * s * s / 6
        gain = _sample(self.gain_opt, rng)
        m.actuator_gainprm[:, 0], m.actuator_biasprm[:, 1] = self._kp[0] * gain, self._kp[1] * gain
        self.latency = _sample(self.latency_opt, rng, integer=True)
        mujoco.mj_setConst(m, d)  # refresh what the compiler derived from masses and sizes (constraint scaling)

        options = options or {}
        for key, n in (("cube", 3), ("zone", 2)):  # placed by hand: (x, y, yaw) and (x, y), finite
            if options.get(key) is not None:
                try:
                    v = np.asarray(options[key], dtype=np.float64)
                except (TypeError, ValueError):
                    v = None
                if v is None or v.shape != (n,) or not np.isfinite(v).all():
                    raise ValueError(f"reset option {key!r} must be {n} finite numbers, got {options[key]!r}")
        cube = np.asarray(options.get("cube", (*rng.uniform(*np.array(REGION).T), rng.uniform(-CUBE_YAW, CUBE_YAW))))
        zone = options.get("zone")
        while zone is None:
            z = rng.uniform(*np.array(REGION).T)
            zone = z if np.linalg.norm(z - cube[:2]) >= MIN_SEPARATION else None
        self.zone = np.asarray(zone, float)
        m.body_pos[self._zone, :2] = self.zone
        d.qpos[self._cq:self._cq + 7] = [cube[0], cube[1], s / 2, np.cos(cube[2] / 2), 0, 0, np.sin(cube[2] / 2)]

        start = np.append(HOME + rng.uniform(-0.05, 0.05, 5), 0.04)
        d.qpos[self._qadr], d.qpos[self._fq] = start[:5], start[5] / 2
        d.ctrl[:] = start
        self._queue = deque([start] * (self.latency + 1), maxlen=self.latency + 1)

    def _apply_action(self, action):
        self._queue.append(action)  # with latency k the servos get the action from k steps ago
        self.data.ctrl[:] = self._queue[0]

    # ---- observations -------------------------------------------------------------------------
    def _joints(self) -> np.ndarray:
        d = self.data
        return np.concatenate([d.qpos[self._qadr], [d.qpos[self._fq].sum()], d.qvel[self._dadr], [d.qvel[self._fd].sum()]])

    def cube_yaw(self) -> float:
        w, x, y, z = self.data.qpos[self._cq + 3:self._cq + 7]
        yaw = np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))
        return float((yaw + np.pi / 4) % (np.pi / 2) - np.pi / 4)  # a square looks the same every 90 degrees

    def _state(self):
        d = self.data
        site, cube = d.site_xpos[self._site], d.qpos[self._cq:self._cq + 3]
        return np.concatenate([self._joints(), site, cube, [self.cube_yaw()], self.zone, cube - site,
                               self.zone - cube[:2]])

    def _proprio(self):
        return self._joints()

    def _obs(self):
        obs = super()._obs()
        if self.obs_mode == "pixels":
            obs["joints"] = obs["proprio"][:6].copy()  # the same (noisy) reading as proprio, positions only
            obs["wrist"] = self.render_camera("wrist", self.image_size)  # the second view
        return obs

    # ---- success ------------------------------------------------------------------------------
    def _touching(self) -> np.ndarray:
        """Which finger pads touch the cube now."""
        g = self.data.contact.geom[: self.data.ncon]
        with_cube = g[(g == self._cube_geom).any(axis=1)]
        return np.isin(self._pads, with_cube)

    def _evaluate(self):
        d = self.data
        cube = d.qpos[self._cq:self._cq + 3]
        to_zone = float(np.linalg.norm(cube[:2] - self.zone))
        inside = bool(np.abs(cube[:2] - self.zone).max() <= ZONE_HALF)
        resting = cube[2] < self.cube_size / 2 + 0.003 and np.linalg.norm(d.qvel[self._cd:self._cd + 3]) < 0.05
        touching = self._touching()
        success = inside and resting and not touching.any()
        reach = float(np.linalg.norm(d.site_xpos[self._site] - cube))
        info = {"cube_to_zone": to_zone, "grasped": bool(touching.all()),
                "lifted": bool(cube[2] > self.cube_size / 2 + 0.01)}
        return success, -reach - 2 * to_zone, info


CARRY_Z = 0.08  # grasp-point height while moving above the table (m)
APPROACH = 0.05  # start of the vertical approach, above the grasp height (m)


class ArmPickCubeExpert:
    """Scripted pick-and-place through inverse kinematics, optionally with a teleoperator's imperfection.

    A commanded grasp point moves in straight lines (at `speed` m/s) through the waypoints; IK on
    the nominal model turns it into joint targets, plus the gravity torque over kp so that the
    servos' sag is cancelled. It re-grasps when the cube slips out. `noise` (0 = exact, 1 = the
    shipped data) scales the teleoperator's imperfection: pace 0.7-1.3x, hand tremor (~0.008 rad),
    aiming errors (2 mm at the grasp, 6 mm at the place) and occasional pauses.
    Deterministic given `reset(seed)`.
    """

    def __init__(self, env, noise: float = 1.0, speed: float = 0.12):
        if noise < 0 or speed <= 0:
            raise ValueError(f"need noise >= 0 and speed > 0, got noise={noise}, speed={speed}")
        self.env, self.noise, self.speed = env.unwrapped, float(noise), float(speed)
        self.ik = ArmIK(mujoco.MjModel.from_xml_string(XML))  # the nominal arm: blind to randomised physics
        self.reset()

    def reset(self, seed: int | None = None):
        self.rng, n = np.random.default_rng(seed), self.noise
        self.phase, self.timer, self.pause = "above", 0, 0
        self.cmd = self.q = self.yaw = self.last = None
        self.tremor, self.offset = np.zeros(5), np.zeros(3)  # offset: correction learnt from the seen error
        self.pace = 1 + 0.3 * min(n, 1) * self.rng.uniform(-1, 1)
        self.grasp_err, self.place_err = self.rng.normal(0, 0.002 * n, 2), self.rng.normal(0, 0.006 * n, 2)
        self.open = GRIP_MAX - self.rng.uniform(0, 0.015 * min(n, 1))
        self.close_steps = 8 + int(self.rng.integers(0, 5 * min(n, 1) + 1))

    def _waypoint(self, site, cube, zone) -> tuple[np.ndarray, float, bool]:
        """This phase's target for the grasp point, the gripper opening, and whether it is reached."""
        grasp_z = max(cube[2] + 0.006, 0.021)  # pads round the cube's upper part, tips clear of the table
        near = lambda goal, tol: np.linalg.norm(site - goal) < tol  # noqa: E731
        if self.phase == "above":
            goal = np.array([*(cube[:2] + self.grasp_err), grasp_z + APPROACH])
            return goal, self.open, near(goal, 0.008) or self.timer > 60
        if self.phase == "descend":
            goal = np.array([*(cube[:2] + self.grasp_err), grasp_z])
            self.grasp_height = grasp_z
            return goal, self.open, near(goal, 0.004) or self.timer > 40
        if self.phase == "close":
            return self.cmd, 0.0, self.timer >= self.close_steps
        if self.phase == "lift":
            goal = np.array([*self.cmd[:2], CARRY_Z])
            return goal, 0.0, site[2] > CARRY_Z - 0.01 or self.timer > 40
        target = np.array([*(zone + self.place_err), 0.0])
        if self.phase == "carry":
            goal = target + [0, 0, CARRY_Z]
            return goal, 0.0, np.linalg.norm(site[:2] - goal[:2]) < 0.006 or self.timer > 80
        if self.phase == "lower":
            goal = target + [0, 0, self.grasp_height + 0.001]  # set it down on the table, then let go
            return goal, 0.0, near(goal, 0.004) or self.timer > 40
        if self.phase == "release":
            return self.cmd, self.open, self.timer >= 6
        return target + [0, 0, CARRY_Z], self.open, False  # retreat and wait

    def __call__(self, obs) -> np.ndarray:
        s = np.asarray(obs["state"], dtype=np.float64)
        q, site, cube, zone = s[:5], s[12:15], s[15:18], s[19:21]
        if self.cmd is None:
            self.cmd, self.q, self.yaw = site.copy(), q.copy(), s[18] + np.pi / 2
        if self.pause > 0:  # a teleoperator's hesitation: hold the last command
            self.pause -= 1
            return self.last
        if self.noise > 0 and self.rng.random() < 0.02 * self.noise:
            self.pause = int(self.rng.integers(3, 12))
        if self.phase in ("lift", "carry", "lower") and np.linalg.norm(cube - site) > 0.025:
            self.phase, self.timer, self.yaw = "above", 0, s[18] + np.pi / 2  # the cube slipped: grasp again
        goal, grip, reached = self._waypoint(site, cube, zone)
        self.timer += 1
        if reached:
            order = ("above", "descend", "close", "lift", "carry", "lower", "release", "retreat")
            self.phase, self.timer = order[order.index(self.phase) + 1], 0
        step = goal - self.cmd  # move the commanded point towards the goal at a bounded speed
        reach = self.speed * self.pace * self.env.control_dt
        self.cmd = self.cmd + step * min(1.0, reach / max(np.linalg.norm(step), 1e-9))
        # Arrived above the cube or the zone: correct for the error it sees (sag, lag), as a person would.
        # Not near the table, where pushing harder would only press the cube into it.
        if self.phase in ("above", "lift", "carry") and np.linalg.norm(goal - self.cmd) < 1e-6:
            self.offset = np.clip(self.offset + 0.3 * (self.cmd - site), -0.02, 0.02)
        self.q = self.ik.solve(self.q, self.cmd + self.offset, _down_frame(self.yaw), iters=15)
        target = self.q + self.ik.gravity(self.q) / KP  # servo sag: kp (target - q) = gravity torque
        self.tremor = 0.85 * self.tremor + self.rng.normal(0, 0.004 * self.noise, 5)
        action = np.append(target + self.tremor, grip)
        self.last = np.clip(action, self.env.action_space.low, self.env.action_space.high).astype(np.float32)
        return self.last
