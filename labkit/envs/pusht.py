"""`labkit/PushT-v0`: push a T-shaped block into a fixed target pose with a round pusher.

A MuJoCo remake of the Diffusion Policy benchmark task. The block slides on a floor with Coulomb
friction, so it moves only while pushed (quasi-static pushing) and stops when left alone.

Action: the TARGET position (x, y) of the pusher in metres, inside the workspace [-0.25, 0.25]^2,
tracked by position (PD) actuators. 10 Hz control, 300 steps at most.

Observation `state` (12-D, metres):
    0-1   pusher x, y
    2-3   block centre x, y (the T's centroid)
    4-5   block angle as cos, sin
    6-11  three block keypoints in the world frame: left end of the bar, right end of the bar,
          tip of the stem (with these the pose is unambiguous and continuous)
`proprio` (4-D): pusher x, y, vx, vy.

`frame="block"` shows the same task from the block: `state` holds the pusher's position, the target's
centre, cos/sin of the target's angle and the target's three keypoints, all in the block's own frame,
and the action is the pusher target in the block's frame (converted with the block's pose at the
step it is applied). The physics is unchanged. A pushing strategy is the same wherever the block lies
and however it is turned, and in this frame it looks the same too: the scripted expert's law no longer
has to be learnt once per block angle (lesson 02 measures what that is worth).

`actions="relative"` gives the pusher target relative to the pusher's current position, in the
env's frame (world or block axes), instead of as a point of that frame: the command becomes "move
by (dx, dy)". The expert never commands more than 2.5 cm away from the pusher, so relative actions
span +-2.5 cm where absolute ones span the workspace, and a policy's error in normalised units
costs ~10x less in metres (lesson 02: from 56-71% to 95.5-99.5% success, at the same training budget).

`info["coverage"]` is the fraction of the target T covered by the block; success is coverage >= 0.95.
The dense reward is the coverage itself (in [0, 1]); the sparse reward is 1 on success.
"""

from __future__ import annotations

import mujoco
import numpy as np
from gymnasium import spaces

from labkit.envs.base import MujocoTask, check_choice

WORKSPACE = 0.25  # half-width of the square the pusher may be commanded to (m)
# The T in its own frame, origin at its centroid: a bar (top) and a stem, as (centre, half-size).
BAR = (np.array([0.0, 0.0375]), np.array([0.06, 0.015]))
STEM = (np.array([0.0, -0.0375]), np.array([0.015, 0.06]))
KEYPOINTS = np.array([[-0.06, 0.0525], [0.06, 0.0525], [0.0, -0.0975]])
TARGET = np.array([0.0, 0.0, np.pi / 4])  # x, y, angle of the target pose
PUSHER_R = 0.015
HALF_H = 0.01  # half-height of the block
SUCCESS_COVERAGE = 0.95
FRAMES = ("world", "block")
ACTIONS = ("absolute", "relative")
# Bound on block-frame or relative actions: wide enough for any workspace point seen from any block
# or pusher position (the world-frame target is clipped to the workspace anyway).
REACH = 1.0


def _box_geoms(name: str, rgba: str, z: float, hz: float, extra: str = "") -> str:
    return "\n".join(
        f'<geom name="{name}_{part}" type="box" pos="{c[0]} {c[1]} {z}" size="{h[0]} {h[1]} {hz}" '
        f'rgba="{rgba}" {extra}/>'
        for part, (c, h) in (("bar", BAR), ("stem", STEM))
    )


XML = f"""
<mujoco model="pusht">
  <compiler angle="radian"/>
  <option timestep="0.01" integrator="implicitfast"/>
  <visual>
    <quality shadowsize="0"/><global offwidth="640" offheight="640"/>
    <headlight ambient=".5 .5 .5" diffuse=".5 .5 .5" specular="0 0 0"/>
  </visual>
  <worldbody>
    <camera name="top" pos="0 0 0.66" xyaxes="1 0 0 0 1 0" fovy="45"/>
    <geom name="floor" type="plane" size=".4 .4 .05" rgba=".93 .93 .93 1" friction="0.5 0.005 0.0001"
          contype="1" conaffinity="1"/>
    <body name="target" pos="{TARGET[0]} {TARGET[1]} 0" euler="0 0 {TARGET[2]}">
      {_box_geoms("target", ".55 .87 .55 1", 0.0005, 0.0005, 'contype="0" conaffinity="0"')}
    </body>
    <body name="block" pos="0 0 {HALF_H}">
      <joint name="bx" type="slide" axis="1 0 0" damping="0.2"/>
      <joint name="by" type="slide" axis="0 1 0" damping="0.2"/>
      <joint name="bz" type="slide" axis="0 0 1"/>
      <joint name="bt" type="hinge" axis="0 0 1" damping="0.002"/>
      {_box_geoms("block", ".45 .52 .62 1", 0, HALF_H, 'mass="0.05" contype="1" conaffinity="3"')}
    </body>
    <body name="pusher" pos="0 0 {HALF_H + 0.002}">
      <joint name="px" type="slide" axis="1 0 0" damping="28"/>
      <joint name="py" type="slide" axis="0 1 0" damping="28"/>
      <geom name="pusher" type="cylinder" size="{PUSHER_R} {HALF_H}" mass="0.5" rgba=".25 .41 .88 1"
            contype="2" conaffinity="2" priority="1" friction="0.2 0.005 0.0001"/>
    </body>
  </worldbody>
  <actuator>
    <position name="ax" joint="px" kp="400" ctrlrange="-{WORKSPACE} {WORKSPACE}"/>
    <position name="ay" joint="py" kp="400" ctrlrange="-{WORKSPACE} {WORKSPACE}"/>
  </actuator>
</mujoco>
"""


def _grid(spacing: float = 0.0025) -> np.ndarray:
    """Sample points filling the T (in its own frame) at the centres of a regular grid."""
    pts = []
    for c, h in (BAR, STEM):
        xs = np.arange(-h[0] + spacing / 2, h[0], spacing) + c[0]
        ys = np.arange(-h[1] + spacing / 2, h[1], spacing) + c[1]
        pts.append(np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2))
    return np.concatenate(pts)


T_POINTS = _grid()


def rot(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


def to_world(pose: np.ndarray, pts: np.ndarray, r: np.ndarray | None = None) -> np.ndarray:
    """Points given in the frame of a T at `pose` (x, y, angle) -> world coordinates.
    `r`: `rot(pose[2])` when the caller has it already."""
    return pts @ (rot(pose[2]) if r is None else r).T + pose[:2]


def to_local(pose: np.ndarray, pts: np.ndarray, r: np.ndarray | None = None) -> np.ndarray:
    """World points -> the frame of a T at `pose` (x, y, angle): the inverse of `to_world`.
    `r`: `rot(pose[2])` when the caller has it already."""
    return (pts - pose[:2]) @ (rot(pose[2]) if r is None else r)


def block_frame_state(pose: np.ndarray, pusher: np.ndarray, r: np.ndarray | None = None) -> np.ndarray:
    """What `frame="block"` observes with the block at `pose` (x, y, angle): everything the task depends
    on, seen from the block (the pusher, the target's centre, cos/sin of the target's angle relative to
    the block's, the target's three keypoints). `pose` may be an estimate (labkit.vision.estimate)."""
    r = rot(pose[2]) if r is None else r
    dt = TARGET[2] - pose[2]
    return np.concatenate([to_local(pose, pusher, r), to_local(pose, TARGET[:2], r),
                           [np.cos(dt), np.sin(dt)], to_local(pose, TARGET_KEYPOINTS, r).ravel()])


# Both parts of the T are centred on its x = 0 axis, which `inside_t` uses: |x - 0| is |x|.
assert BAR[0][0] == STEM[0][0] == 0.0


def inside_t(pts: np.ndarray) -> np.ndarray:
    """Which points (in the T's own frame) lie inside the T."""
    # Per column, not np.all(np.abs(pts - c) <= h, axis=1): the same comparisons of the same numbers,
    # without the slow axis reduction (coverage calls this every env step; it was half a PushT step).
    x, y = pts[:, 0], pts[:, 1]
    ax = np.abs(x)
    (bar_c, bar_h), (stem_c, stem_h) = BAR, STEM
    inside = (ax <= bar_h[0]) & (np.abs(y - bar_c[1]) <= bar_h[1])
    inside |= (ax <= stem_h[0]) & (np.abs(y - stem_c[1]) <= stem_h[1])
    return inside


# The target never moves: its sample points and keypoints in the world are computed once.
TARGET_POINTS = to_world(TARGET, T_POINTS)
TARGET_KEYPOINTS = to_world(TARGET, KEYPOINTS)


def coverage(block_pose: np.ndarray, target_pose: np.ndarray = TARGET, r: np.ndarray | None = None) -> float:
    """Fraction of the target T's area covered by the block's T (both T's have the same area).
    `r`: `rot(block_pose[2])` when the caller has it already."""
    # The default target's points are precomputed.
    world = TARGET_POINTS if target_pose is TARGET else to_world(target_pose, T_POINTS)
    # to_local(block_pose, world, r), with `world - block_pose[:2]` taken one column at a time: the
    # same differences, 3x faster than numpy's broadcast over a length-2 axis. Then the same matrix
    # product as ever (not an unrolled x*c - y*s: BLAS may fuse or order that sum differently, and a
    # point on the T's edge could then flip).
    d = np.empty_like(world)
    np.subtract(world[:, 0], block_pose[0], out=d[:, 0])
    np.subtract(world[:, 1], block_pose[1], out=d[:, 1])
    local = d @ (rot(block_pose[2]) if r is None else r)
    return float(np.count_nonzero(inside_t(local)) / len(local))  # == float(mean): the same count / N


class PushTEnv(MujocoTask):
    """Push the T block onto the green target T; success when 95% of the target is covered."""

    xml = XML
    frame_skip = 10
    state_dim = 12
    proprio_dim = 4

    def __init__(self, *args, frame: str = "world", actions: str = "absolute", **kwargs):
        check_choice("frame", frame, FRAMES)
        check_choice("actions", actions, ACTIONS)
        self.frame, self.actions = frame, actions
        super().__init__(*args, **kwargs)
        self._bq = self.model.joint("bx").qposadr[0]  # block qpos: x, y, z, angle
        self._pq = self.model.joint("px").qposadr[0]  # pusher qpos: x, y
        self._pv = self.model.joint("px").dofadr[0]
        self._pose_key = None  # see _block()
        self._world_absolute = frame == "world" and actions == "absolute"

    def _action_space(self) -> spaces.Box:
        if self.frame == "world" and self.actions == "absolute":
            return spaces.Box(-WORKSPACE, WORKSPACE, (2,), np.float32)
        # a target anywhere the workspace can be, seen from the block or the pusher
        return spaces.Box(-REACH, REACH, (2,), np.float32)

    def action_frame(self) -> np.ndarray:
        """The pose (x, y, angle) whose frame actions are given in: the world's or the block's axes,
        with the origin at the world's or block's origin, or at the pusher for relative actions."""
        block = self._block()[0] if self.frame == "block" else np.zeros(3)
        origin = self.pusher_pos() if self.actions == "relative" else block[:2]
        return np.array([*origin, block[2]])

    def to_env_frame(self, target: np.ndarray) -> np.ndarray:
        """A world-frame pusher target as this env's action (see `action_frame`)."""
        return to_local(self.action_frame(), np.asarray(target))

    def block_pose(self) -> np.ndarray:
        """(x, y, angle) of the block, angle wrapped to (-pi, pi]."""
        x, y, _, t = self.data.qpos[self._bq : self._bq + 4]
        return np.array([x, y, np.arctan2(np.sin(t), np.cos(t))])

    def pusher_pos(self) -> np.ndarray:
        return self.data.qpos[self._pq : self._pq + 2].copy()

    def _block(self) -> tuple[np.ndarray, np.ndarray]:
        """`block_pose()` and its rotation matrix, computed once per physics state (read-only): the
        reward, the observation and the next action's frame all use them, and about half the steps
        leave the block exactly where it was (it rests while the pusher walks round it). Keyed on the
        exact qpos values they come from, so they cannot go stale; coverage is cached with them."""
        q = self.data.qpos[self._bq : self._bq + 4].tobytes()
        key = q[:16] + q[24:]  # x, y and angle, not the height: it jitters while the pose rests
        if key != self._pose_key:
            pose = self.block_pose()
            self._pose_key, self._pose, self._rot, self._coverage = key, pose, rot(pose[2]), None
        return self._pose, self._rot

    def _reset_task(self, rng, options):
        # The block starts well away from the target (little coverage), at a random angle.
        while True:
            pose = np.array([*rng.uniform(-0.12, 0.12, 2), rng.uniform(-np.pi, np.pi)])
            if coverage(pose) < 0.3:
                break
        # The pusher starts anywhere in the workspace not touching the block.
        while True:
            pusher = rng.uniform(-0.2, 0.2, 2)
            local = to_local(pose, pusher)
            if signed_distance(local)[0] > PUSHER_R + 0.02:
                break
        q = self.data.qpos
        q[self._bq : self._bq + 4] = [pose[0], pose[1], 0.0, pose[2]]
        q[self._pq : self._pq + 2] = pusher
        self.data.ctrl[:] = pusher

    def _apply_action(self, action):
        if self._world_absolute:
            # The action frame is the world's: the general transform below computes action @ I + (0, 0),
            # which is the action itself with any -0.0 made 0.0; `+ 0.0` gives exactly that, without
            # building a frame and a rotation matrix every step.
            target = action + 0.0
        else:
            target = to_world(self.action_frame(), action[None])[0]
        self.data.ctrl[:] = np.minimum(np.maximum(target, -WORKSPACE), WORKSPACE)  # == np.clip, cheaper

    def _state(self):
        pose, r = self._block()
        pusher = self.data.qpos[self._pq : self._pq + 2]
        if self.frame == "block":
            return block_frame_state(pose, pusher, r)
        kp = to_world(pose, KEYPOINTS, r).ravel()
        return np.concatenate([pusher, pose[:2], r[:, 0], kp])  # r[:, 0] is cos, sin of the angle

    def _proprio(self):
        q, v = self.data.qpos, self.data.qvel
        return np.concatenate([q[self._pq : self._pq + 2], v[self._pv : self._pv + 2]])

    def _evaluate(self):
        pose, r = self._block()
        if self._coverage is None:
            self._coverage = coverage(pose, r=r)
        cov = self._coverage
        return cov >= SUCCESS_COVERAGE, cov, {"coverage": cov}

    def set_block_pose(self, pose, pusher=None) -> None:
        """Place the block at (x, y, angle), and the pusher at (x, y) if given, at rest (for tests
        and teaching)."""
        self.data.qpos[self._bq : self._bq + 4] = [pose[0], pose[1], 0.0, pose[2]]
        if pusher is not None:
            self.data.qpos[self._pq : self._pq + 2] = self.data.ctrl[:] = pusher
        self.data.qvel[:] = 0
        mujoco.mj_forward(self.model, self.data)


def signed_distance(local: np.ndarray, bar=BAR, stem=STEM) -> np.ndarray:
    """Signed distance from points (in the T's frame) to the T's boundary; negative inside.
    `bar`, `stem`: another T's parts as (centre, half-size), bar on top (gym-pusht's has a shorter stem)."""
    local = np.atleast_2d(local)
    dists = []
    for c, h in (bar, stem):
        q = np.abs(local - c) - h
        outside = np.linalg.norm(np.maximum(q, 0), axis=1)
        dists.append(outside + np.minimum(q.max(axis=1), 0))
    return np.minimum(*dists)


def _t_corners(bar=BAR, stem=STEM) -> tuple[float, float, float, float, float]:
    """The numbers that place a T's edges: bar half-width, bar top, bar bottom (where the stem
    starts), stem half-width, stem tip (with labkit's T: 0.06, 0.0525, 0.0225, 0.015, -0.0975)."""
    (bc, bh), (sc, sh) = bar, stem
    return bh[0], bc[1] + bh[1], bc[1] - bh[1], sh[0], sc[1] - sh[1]


def _contact_candidates(spacing: float = 0.005, bar=BAR, stem=STEM,
                        pusher_r: float = PUSHER_R) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points on the T's boundary the pusher can reach, their outward normals and which part
    (0 = bar, 1 = stem) they lie on. Points too close to a corner, or inside the notches under
    the bar where the round pusher would touch two faces, are left out."""
    m = 0.004  # margin from convex corners
    reach = pusher_r + 0.002  # how far from a concave corner the pusher's centre can come
    bw, top, low, sw, tip = _t_corners(bar, stem)
    edges = [  # (start, end, normal, part)
        ((-bw + m, top), (bw - m, top), (0, 1), 0),
        ((-bw, low + m), (-bw, top - m), (-1, 0), 0),
        ((bw, low + m), (bw, top - m), (1, 0), 0),
        ((-bw + m, low), (-sw - reach - pusher_r, low), (0, -1), 0),
        ((sw + reach + pusher_r, low), (bw - m, low), (0, -1), 0),
        ((-sw, tip + m), (-sw, low - reach - pusher_r), (-1, 0), 1),
        ((sw, tip + m), (sw, low - reach - pusher_r), (1, 0), 1),
        ((-sw + m, tip), (sw - m, tip), (0, -1), 1),
    ]
    pts, normals, parts = [], [], []
    for a, b, n, part in edges:
        a, b = np.array(a), np.array(b)
        k = max(2, int(np.ceil(np.linalg.norm(b - a) / spacing)) + 1)
        for t in np.linspace(0, 1, k):
            pts.append(a + t * (b - a)), normals.append(n), parts.append(part)
    return np.array(pts), np.array(normals, float), np.array(parts)


def _ring(n: int = 180, clearance: float = PUSHER_R + 0.008, bar=BAR, stem=STEM) -> np.ndarray:
    """Radius, at n angles about the centroid, of a closed path that keeps the pusher clear of
    the block: the T's convex hull grown by `clearance` (found by bisection along each ray)."""
    bw, top, low, sw, tip = _t_corners(bar, stem)
    hull = np.array([[-bw, top], [bw, top], [bw, low],  # corners of the T's convex hull
                     [sw, tip], [-sw, tip], [-bw, low]])  # fmt: skip
    edges = np.roll(hull, -1, axis=0) - hull

    def dist_to_hull(q):  # distance from points outside the hull to it
        t = np.clip(np.einsum("nek,ek->ne", q[:, None] - hull, edges) / (edges**2).sum(1), 0, 1)
        nearest = hull + t[..., None] * edges
        return np.linalg.norm(q[:, None] - nearest, axis=2).min(1)

    angles = np.linspace(-np.pi, np.pi, n, endpoint=False)
    dirs = np.column_stack([np.cos(angles), np.sin(angles)])
    lo, hi = np.zeros(n), np.full(n, 0.3)
    for _ in range(40):
        mid = (lo + hi) / 2
        q = dirs * mid[:, None]
        outside = (dist_to_hull(q) >= clearance) & (signed_distance(q, bar, stem) > 0)
        lo, hi = np.where(outside, lo, mid), np.where(outside, mid, hi)
    return hi


RING = _ring()


def ring(angle: float, radii: np.ndarray = RING) -> np.ndarray:
    """The point of the safe ring round the block (block frame) at `angle`, interpolated.
    `radii`: another T's ring (`_ring(bar=..., stem=...)`)."""
    n = len(radii)
    k = (angle + np.pi) / (2 * np.pi) * n
    i, frac = int(np.floor(k)) % n, k - np.floor(k)
    r = radii[i] * (1 - frac) + radii[(i + 1) % n] * frac
    return r * np.array([np.cos(angle), np.sin(angle)])


class PushTExpert:
    """Scripted closed-loop pushing expert; deterministic given `reset(seed)`.

    Every step it predicts, for each reachable point on the block's boundary, how pushing there
    would move the block (quasi-static pushing with an ellipsoidal limit surface: the block moves
    along the force and turns with its moment). It picks the contact that removes pose error
    fastest, counting the time to walk the pusher round the block to it, walks there without
    touching the block, then pushes, re-planning every step. It reads the block pose from
    `env.unwrapped` (privileged state).

    Two strategies, drawn ~50/50 per episode (`self.mode`): "bar" favours contacts on the T's bar,
    "stem" favours the stem (and each circles the block its own way when both ways are equally
    long). Both succeed; together they make the demonstrations multimodal.

    Another PushT (gym-pusht's: `labkit.envs.gym_pusht`) reuses the plan by giving its own geometry
    (the class attributes below, in metres, the T's frame at its centre of mass with the bar on top)
    and its own `_observe` / `_command`.
    """

    MODES = ("bar", "stem")
    BAR, STEM, PUSHER_R, TARGET, WORKSPACE = BAR, STEM, PUSHER_R, TARGET, WORKSPACE
    RADII = RING  # the safe ring round this T (`_ring`)
    RHO = 0.07  # limit-surface radius: rotation per unit moment (m), measured in this model
    L = 0.06  # length that weighs angle error against position error (m)
    DEPTHS = np.geomspace(0.002, 0.15, 16)  # pusher travels considered for one push (m)

    def __init__(
        self,
        env,
        noise: float = 0.0005,
        max_step: float = 0.02,
        max_push: float = 0.02,
        preference: float = 1.0,
        switch: float = 2.0,
    ):
        self.env = env.unwrapped
        self.noise, self.max_step, self.max_push = noise, max_step, max_push
        self.preference, self.switch = preference, switch
        self.cand, self.normals, self.parts = _contact_candidates(bar=self.BAR, stem=self.STEM, pusher_r=self.PUSHER_R)
        # Block motion (body frame) per metre of pusher travel through each contact.
        f = -self.normals
        m = self.cand[:, 0] * f[:, 1] - self.cand[:, 1] * f[:, 0]
        k = 1 / (1 + m**2 / self.RHO**2)
        self.v, self.w = f * k[:, None], m / self.RHO**2 * k
        self.reset()

    def reset(self, seed: int | None = None):
        self.rng = np.random.default_rng(seed)
        self.mode = self.MODES[int(self.rng.integers(2))]
        self.current: int | None = None  # index of the contact being approached or pushed
        self.pushing = False  # lined up behind the current contact and pushing through it

    # ---- what the expert reads and commands (overridden for another PushT) ----------------------
    def _observe(self) -> tuple[np.ndarray, np.ndarray]:
        """The block's pose (x, y, angle) and the pusher's position, in metres, world frame."""
        return self.env.block_pose(), self.env.pusher_pos()

    def _command(self, target: np.ndarray) -> np.ndarray:
        """A world-frame pusher target (metres, inside the workspace) as the env's action."""
        return self.env.to_env_frame(target).astype(np.float32)

    def _sd(self, local: np.ndarray) -> np.ndarray:
        return signed_distance(local, self.BAR, self.STEM)

    # ---- the plan ------------------------------------------------------------------------------
    def _gains(self, pose: np.ndarray) -> np.ndarray:
        """Predicted drop of the weighted pose error after pushing each contact (rows) by each of
        DEPTHS (columns), integrating the constant body twist exactly (an SE(2) arc)."""
        th = self.w[:, None] * self.DEPTHS  # (N, D) rotation
        small = np.abs(th) < 1e-6
        a = np.where(small, 1.0, np.sin(th) / np.where(small, 1, th))
        b = np.where(small, 0.0, (1 - np.cos(th)) / np.where(small, 1, th))
        vx, vy = self.v[:, :1] * self.DEPTHS, self.v[:, 1:] * self.DEPTHS
        dx, dy = a * vx - b * vy, b * vx + a * vy  # body-frame displacement
        c, s = np.cos(pose[2]), np.sin(pose[2])
        ex = self.TARGET[0] - pose[0] - (c * dx - s * dy)
        ey = self.TARGET[1] - pose[1] - (s * dx + c * dy)
        et = np.angle(np.exp(1j * (self.TARGET[2] - pose[2] - th)))
        e0 = np.hypot(
            np.hypot(*(self.TARGET[:2] - pose[:2])), self.L * np.angle(np.exp(1j * (self.TARGET[2] - pose[2])))
        )
        return e0 - np.sqrt(ex**2 + ey**2 + (self.L * et) ** 2)

    def _travel_steps(self, p: np.ndarray, goals: np.ndarray) -> np.ndarray:
        """Rough number of steps to walk from `p` to each goal (block frame) without touching."""
        ts = np.linspace(0, 1, 8)[None, :, None]
        path = p + ts * (goals - p)[:, None]
        clear = (self._sd(path.reshape(-1, 2)) > self.PUSHER_R + 0.003).reshape(len(goals), -1).all(1)
        straight = np.linalg.norm(goals - p, axis=1)
        turn = np.abs(np.angle(np.exp(1j * (np.arctan2(goals[:, 1], goals[:, 0]) - np.arctan2(p[1], p[0])))))
        around = 0.1 * turn + 0.04
        return np.where(clear, straight, around) / self.max_step + 1

    def __call__(self, obs) -> np.ndarray:
        pose, pusher = self._observe()
        p_local = to_local(pose, pusher)
        approach = self.cand + self.normals * (self.PUSHER_R + 0.006)
        # Contacts whose approach point lies outside the workspace cannot be used.
        valid = np.all(np.abs(to_world(pose, approach)) < self.WORKSPACE - 0.005, axis=1)
        steps = self._travel_steps(p_local, approach)
        if self.pushing:
            steps[self.current] = 1
        # Error removed per step, counting the walk there and the push itself.
        gains = self._gains(pose)
        rates = gains / (steps[:, None] + self.DEPTHS / self.max_push)
        rate = rates.max(axis=1) * np.where(self.parts == self.MODES.index(self.mode), 1 + self.preference, 1)
        rate = np.where(valid, rate, -np.inf)
        best = int(np.argmax(rate))
        i = self.current
        if i is None or not valid[i] or rate[i] <= 0 or rate[best] > self.switch * rate[i]:
            self.current, self.pushing = best, False
        i = self.current
        c, n = self.cand[i], self.normals[i]
        # Where is the pusher relative to the contact: along the normal (d) and along the edge (s)?
        rel = p_local - c
        d, s = rel @ n, rel @ np.array([-n[1], n[0]])
        # Start pushing when lined up behind the contact; keep pushing while the pusher stays near it
        # (it slides a little along the edge as the block turns).
        tol = 0.01 if self.pushing else 0.004
        self.pushing = abs(s) < tol and self.PUSHER_R - 0.006 < d < self.PUSHER_R + 0.015
        if self.pushing:  # push through the contact along the inward normal, slower near the goal
            step = np.clip(0.5 * self.DEPTHS[np.argmax(gains[i])], 0.001, self.max_push)
            target_local = c + n * (self.PUSHER_R - 0.002 - step)
        else:
            target_local = self._navigate(p_local, approach[i])
        target = to_world(pose, target_local[None])[0] + self.rng.normal(0, self.noise, 2)
        # Smooth commands: the target never runs far ahead of the pusher.
        delta = target - pusher
        dist = np.linalg.norm(delta)
        if dist > 0.025:
            target = pusher + delta * 0.025 / dist
        return self._command(np.clip(target, -self.WORKSPACE, self.WORKSPACE))

    def _navigate(self, p: np.ndarray, goal: np.ndarray) -> np.ndarray:
        """Next pusher target (block frame) on the way to `goal`: straight there when the way is
        clear, otherwise along a closed path that rings the block at a safe distance."""
        delta = goal - p
        dist = np.linalg.norm(delta)
        path = p + np.linspace(0, 1, 12)[:, None] * delta
        if dist < 0.005 or np.all(self._sd(path) > self.PUSHER_R + 0.003):
            return p + delta * min(1.0, self.max_step / max(dist, 1e-9))
        d = self._sd(p)[0]
        if d < self.PUSHER_R + 0.005:  # touching the block: back off first, so as not to drag it along
            eps = 1e-4
            g = np.array([self._sd(p + [eps, 0])[0] - d, self._sd(p + [0, eps])[0] - d])
            return p + g / (np.linalg.norm(g) + 1e-12) * (self.PUSHER_R + 0.008 - d)
        a_p, a_g = np.arctan2(p[1], p[0]), np.arctan2(goal[1], goal[0])
        turn = np.arctan2(np.sin(a_g - a_p), np.cos(a_g - a_p))
        if abs(abs(turn) - np.pi) < 0.3:  # about as far either way: the strategy decides
            turn = 1.0 if self.mode == "bar" else -1.0
        radius = max(np.linalg.norm(p), 0.03)
        a_next = a_p + np.sign(turn) * min(abs(turn), 1.5 * self.max_step / radius)
        return ring(a_next, self.RADII)
