"""`labkit/Tabletop-v0`: a multi-task tabletop, "push the <colour> block to the <corner> corner",
done by one of two bodies: the robot, or a human hand.

Tasks are compositions: 3 block colours x 4 corner zones = 12 tasks (TASKS, one string each). The
task is fixed with `task=` (a string or its index) or drawn at every reset from `tasks=` (a list; all
twelve by default); `reset(options={"task": ...})` overrides both for one episode. `info["task"]` and
`info["task_index"]` name it every step, and `state` ends with the instruction's code (colour one-hot,
corner one-hot): the stand-in for a language embedding, so that a state policy knows what to do.

Bodies (`embodiment=`), the same tasks, different kinematics, actions and viewpoint:
- "robot": a small round pusher (r 1.5 cm) under a stiff position servo; the action is where its
  target goes, as an offset (dx, dy) from where the pusher is now, world frame, metres, |d_i| <= 5 cm
  (PushT's `actions="relative"`, which a regressor learns ~10x more precisely than absolute targets
  at the same budget). It observes in the world frame.
- "human": a bigger, heavier round hand (r 3.5 cm) under a velocity servo; the action is a VELOCITY
  (m/s, |v_i| <= 0.3) in the hand's own camera frame, which is turned by 90 degrees and shifted
  against the world's (`HUMAN_VIEW`). It observes everything in that frame too. Nothing in the
  observation says how the two frames or the two action spaces relate: that mapping is not given.

Observation `state` (17-D, in the body's own frame): effector x, y, vx, vy; the three blocks' x, y
(red, green, blue); the task code (3 colour + 4 corner one-hot). `proprio` (4-D): effector x, y, vx, vy.
With `instruction="text"` the state stops at the blocks (10-D) and the task comes as what a person would
type: `task` (int64 [1], the index of the sentence in TASKS), which a language-conditioned policy's
runtime turns into words and embeds (labkit.language.steer); nothing in `state` says what to do.
Success: the named block's centre within 4 cm of its corner's centre. 10 Hz control, 80 steps at most.
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

from labkit.envs.base import MujocoTask, check_choice

COLOURS = ("red", "green", "blue")
RGBA = {"red": ".85 .2 .2 1", "green": ".2 .7 .25 1", "blue": ".2 .35 .9 1"}
ZONES = {"top-left": (-0.17, 0.17), "top-right": (0.17, 0.17), "bottom-left": (-0.17, -0.17),
         "bottom-right": (0.17, -0.17)}
TASKS = tuple(f"push the {c} block to the {z} corner" for c in COLOURS for z in ZONES)  # index = 4 * colour + zone
EMBODIMENTS = ("robot", "human")
INSTRUCTIONS = ("code", "text")  # how the task reaches the observation: a one-hot code in `state`, or `task`
WORKSPACE = 0.25  # half-width of the square the robot's target may be in (m)
ROBOT_STEP = 0.05  # m bound on each component of the robot's target offset
BLOCK_R, ZONE_R, SUCCESS_R = 0.025, 0.05, 0.04
BODY_R = {"robot": 0.015, "human": 0.035}
HUMAN_SPEED = 0.3  # m/s bound on each component of the hand's velocity command
HUMAN_VIEW = (np.pi / 2, np.array([0.04, -0.03]))  # the hand camera's angle and origin in the world
ARENA = 0.3
ROBOT_SERVO = (400.0, 28.0, 0.5)  # the robot's position servo: stiffness (N/m), joint damping (N s/m), mass (kg)
TOP_CAMERA = (0.8, 45.0)  # the top camera's height (m) and vertical field of view (degrees), looking straight down


def to_pixel(xy, size: int = 64) -> np.ndarray:
    """World points [..., 2] on the table -> the top camera's pixel (column u, row v) in a size x size
    image: integers, row 0 at the top (+y), column 0 at the left (-x)."""
    height, fovy = TOP_CAMERA
    f = size / 2 / np.tan(np.radians(fovy) / 2) / (height - 0.012)  # pixels per metre at the blocks' height
    xy = np.asarray(xy, np.float64)
    return np.stack([np.floor(size / 2 + f * xy[..., 0]), np.floor(size / 2 - f * xy[..., 1])], -1).astype(int)


def from_pixel(uv, size: int = 64) -> np.ndarray:
    """The world point (m) at the centre of top-camera pixel (u, v): the inverse of `to_pixel`."""
    height, fovy = TOP_CAMERA
    f = size / 2 / np.tan(np.radians(fovy) / 2) / (height - 0.012)
    uv = np.asarray(uv, np.float64) + 0.5
    return np.stack([(uv[..., 0] - size / 2) / f, (size / 2 - uv[..., 1]) / f], -1)


def task_index(task: str | int) -> int:
    """The index of a task given as its string or index; a ValueError naming the tasks otherwise."""
    if isinstance(task, (int, np.integer)) and not isinstance(task, bool) and 0 <= task < len(TASKS):
        return int(task)
    if isinstance(task, str) and task in TASKS:
        return TASKS.index(task)
    raise ValueError(f"unknown task {task!r}: give an index 0-{len(TASKS) - 1} or one of "
                     + "; ".join(repr(t) for t in TASKS))


def task_code(index: int) -> np.ndarray:
    """The instruction's code: colour one-hot (3) then corner one-hot (4)."""
    code = np.zeros(len(COLOURS) + len(ZONES))
    code[index // len(ZONES)] = code[len(COLOURS) + index % len(ZONES)] = 1.0
    return code


def _rot(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


def _xml(embodiment: str) -> str:
    r = BODY_R[embodiment]
    joints = '<joint name="ex" type="slide" axis="1 0 0" damping="{0}"/><joint name="ey" type="slide" axis="0 1 0" damping="{0}"/>'
    contact = 'contype="2" conaffinity="2" priority="1" friction=".2 .005 .0001"'
    if embodiment == "robot":  # PushT's pusher: a stiff position servo
        kp, damping, mass = ROBOT_SERVO
        body = joints.format(damping) + f'<geom name="effector" type="cylinder" size="{r} .01" mass="{mass}" rgba=".3 .3 .35 1" {contact}/>'
        act = "".join(f'<position joint="{j}" kp="{kp}" ctrlrange="-{WORKSPACE} {WORKSPACE}"/>' for j in ("ex", "ey"))
    else:  # a heavier hand tracking a velocity
        body = joints.format(1) + f'<geom name="effector" type="sphere" size="{r}" mass="1" rgba=".93 .76 .62 1" {contact}/>'
        act = '<velocity joint="ex" kv="40"/><velocity joint="ey" kv="40"/>'
    blocks = "\n".join(
        f'<body name="{c}" pos="0 0 .01"><joint name="{c}x" type="slide" axis="1 0 0" damping="0.2"/>'
        f'<joint name="{c}y" type="slide" axis="0 1 0" damping="0.2"/><joint name="{c}z" type="slide" axis="0 0 1"/>'
        f'<geom type="cylinder" size="{BLOCK_R} .01" mass="0.05" rgba="{RGBA[c]}" contype="1" conaffinity="3"/></body>'
        for c in COLOURS)
    zones = "\n".join(f'<geom type="cylinder" pos="{x} {y} .0005" size="{ZONE_R} .0005" rgba=".8 .8 .55 1" '
                      'contype="0" conaffinity="0"/>' for x, y in ZONES.values())
    return f"""
<mujoco model="tabletop_{embodiment}">
  <option timestep="0.01" integrator="implicitfast"/>
  <visual><quality shadowsize="0"/><global offwidth="640" offheight="640"/>
    <headlight ambient=".5 .5 .5" diffuse=".5 .5 .5" specular="0 0 0"/></visual>
  <worldbody>
    <camera name="top" pos="0 0 {TOP_CAMERA[0]}" xyaxes="1 0 0 0 1 0" fovy="{TOP_CAMERA[1]}"/>
    <camera name="hand" pos="{HUMAN_VIEW[1][0]} {HUMAN_VIEW[1][1]} 0.8" xyaxes="0 1 0 -1 0 0" fovy="45"/>
    <geom name="floor" type="plane" size="{ARENA} {ARENA} .05" rgba=".93 .93 .93 1" friction="0.5 0.005 0.0001"/>
    {zones}
    {blocks}
    <body name="effector" pos="0 0 .012">{body}</body>
  </worldbody>
  <actuator>{act}</actuator>
</mujoco>
"""


class TabletopEnv(MujocoTask):
    """Push the named block to the named corner, as the robot or as a human hand."""

    frame_skip = 10
    state_dim = 4 + 2 * len(COLOURS) + len(COLOURS) + len(ZONES)
    proprio_dim = 4

    def __init__(self, *args, embodiment: str = "robot", task: str | int | None = None,
                 tasks: list | tuple | None = None, instruction: str = "code", **kwargs):
        check_choice("embodiment", embodiment, EMBODIMENTS)
        check_choice("instruction", instruction, INSTRUCTIONS)
        self.instruction = instruction
        if instruction == "text":  # the task leaves the state; it comes as `task` (an index into TASKS)
            self.state_dim = TabletopEnv.state_dim - len(COLOURS) - len(ZONES)
        if task is not None and tasks is not None:
            raise ValueError("give task= (one task) or tasks= (a list to draw from at each reset), not both")
        if tasks is not None and (isinstance(tasks, str) or len(tasks) == 0):
            raise ValueError(f"tasks must be a non-empty list of tasks (strings or indices), got {tasks!r}")
        allowed = [task] if task is not None else list(tasks) if tasks is not None else list(range(len(TASKS)))
        self.allowed = [task_index(t) for t in allowed]
        self.embodiment = embodiment
        self.xml = _xml(embodiment)
        # The hand camera's view of the world: a world point x appears at R^T (x - origin).
        angle, origin = HUMAN_VIEW if embodiment == "human" else (0.0, np.zeros(2))
        self.view_rot, self.view_origin = _rot(angle), origin
        self.camera = "hand" if embodiment == "human" else "top"
        super().__init__(*args, **kwargs)
        self._eq = self.model.joint("ex").qposadr[0]
        self._ev = self.model.joint("ex").dofadr[0]
        self._bq = [self.model.joint(f"{c}x").qposadr[0] for c in COLOURS]
        self.task_index = self.allowed[0]
        if instruction == "text":
            self.observation_space["task"] = spaces.Box(0, len(TASKS) - 1, (1,), np.int64)

    @property
    def task(self) -> str:
        """This episode's instruction."""
        return TASKS[self.task_index]

    def _action_space(self) -> spaces.Box:
        if self.embodiment == "robot":
            return spaces.Box(-ROBOT_STEP, ROBOT_STEP, (2,), np.float32)
        return spaces.Box(-HUMAN_SPEED, HUMAN_SPEED, (2,), np.float32)

    # ---- frames ---------------------------------------------------------------------------------
    def to_view(self, pts: np.ndarray) -> np.ndarray:
        """World points [..., 2] -> this body's observation frame."""
        return (np.asarray(pts) - self.view_origin) @ self.view_rot

    def effector(self) -> np.ndarray:
        return self.data.qpos[self._eq:self._eq + 2].copy()

    def blocks(self) -> np.ndarray:
        """[3, 2] world positions of the red, green and blue blocks."""
        return np.stack([self.data.qpos[q:q + 2] for q in self._bq])

    def goal(self) -> tuple[int, np.ndarray]:
        """(index of the block to move, world position of its corner) for this episode's task."""
        return self.task_index // len(ZONES), np.array(list(ZONES.values())[self.task_index % len(ZONES)])

    # ---- the task -------------------------------------------------------------------------------
    def _reset_task(self, rng, options):
        chosen = (options or {}).get("task")
        self.task_index = task_index(chosen) if chosen is not None else int(rng.choice(self.allowed))
        # Blocks in the middle, apart; the effector anywhere else in the workspace, not touching them.
        while True:
            b = rng.uniform(-0.1, 0.1, (len(COLOURS), 2))
            gaps = np.linalg.norm(b[:, None] - b[None], axis=-1)[np.triu_indices(len(COLOURS), 1)]
            if gaps.min() > 3 * BLOCK_R:
                break
        while True:
            e = rng.uniform(-0.2, 0.2, 2)
            if np.linalg.norm(b - e, axis=1).min() > BLOCK_R + BODY_R[self.embodiment] + 0.02:
                break
        q = self.data.qpos
        for qa, xy in zip(self._bq, b, strict=True):
            q[qa:qa + 3] = [*xy, 0.0]
        q[self._eq:self._eq + 2] = e
        self.data.ctrl[:] = e if self.embodiment == "robot" else 0.0

    def _apply_action(self, action):
        if self.embodiment == "robot":
            self.data.ctrl[:] = np.clip(self.effector() + action, -WORKSPACE, WORKSPACE)
        else:  # a velocity in the hand camera's frame -> the world's
            self.data.ctrl[:] = self.view_rot @ action

    def _state(self):
        vel = self.data.qvel[self._ev:self._ev + 2] @ self.view_rot
        code = task_code(self.task_index) if self.instruction == "code" else np.zeros(0)
        return np.concatenate([self.to_view(self.effector()), vel, self.to_view(self.blocks()).ravel(), code])

    def _obs(self):
        obs = super()._obs()
        if self.instruction == "text":
            obs["task"] = np.array([self.task_index], np.int64)
        return obs

    def _proprio(self):
        return np.concatenate([self.to_view(self.effector()), self.data.qvel[self._ev:self._ev + 2] @ self.view_rot])

    def _evaluate(self):
        block, corner = self.goal()
        dist = float(np.linalg.norm(self.blocks()[block] - corner))
        return dist < SUCCESS_R, -dist, {"distance": dist, "task": self.task, "task_index": self.task_index,
                                         "embodiment": self.embodiment}


class TabletopExpert:
    """Scripted expert for either body: walk round the named block to the point behind it (seen from
    its corner), then push it along the line to the corner. Plans in the world frame from the env's
    physics state and speaks the body's action space (a target point, or a velocity in the hand's frame)."""

    def __init__(self, env, noise: float = 0.003):
        self.env = env.unwrapped
        self.noise = noise
        self.reset()

    def reset(self, seed: int | None = None):
        self.rng = np.random.default_rng(seed)

    def __call__(self, obs) -> np.ndarray:
        env = self.env
        _, corner = env.goal()
        move = expert_move(env.effector(), env.blocks()[env.goal()[0]], corner, BODY_R[env.embodiment])[0]
        move = move + self.rng.normal(0, self.noise, 2)
        if env.embodiment == "robot":
            return np.clip(move, -ROBOT_STEP, ROBOT_STEP).astype(np.float32)
        v = (move / env.control_dt) @ env.view_rot  # the world displacement as a velocity in the hand's frame
        return np.clip(v, -HUMAN_SPEED, HUMAN_SPEED).astype(np.float32)


def expert_move(p: np.ndarray, b: np.ndarray, corner: np.ndarray, body_r: float = BODY_R["robot"]) -> tuple[np.ndarray, bool]:
    """The expert's rule, world frame: (its next displacement of the effector at `p`, whether it is
    pushing) for the block at `b` and its `corner`. Walk round the block to the point behind it (seen
    from the corner), then push along the line to the corner. Written once: the expert acts with it, and
    the scripted reasoner of labkit.language.commands plans with it."""
    d = (corner - b) / max(np.linalg.norm(corner - b), 1e-8)
    reach = BLOCK_R + body_r
    contact = b - d * (reach + 0.005)
    perp = np.array([-d[1], d[0]])
    along, side = np.dot(p - b, d), np.dot(p - b, perp)  # the effector in the push line's frame
    pushing = along < -0.5 * reach and abs(np.dot(p - contact, perp)) < 0.012
    if pushing:  # behind, on the line: push
        aim, step = b + d * 0.1 + perp * np.dot(contact - p, perp), 0.02
    elif along < -0.8 * reach:  # behind the block: straight to the contact point
        aim, step = contact, 0.025
    else:  # beside or in front of it: round it, on the side the effector is on
        s = 1.0 if side >= 0 else -1.0
        clear = reach + 0.02
        aim, step = (b + perp * s * clear + d * along if abs(side) < clear - 0.005 and along > 0
                     else b + (perp * s - d) * clear), 0.025
    move = aim - p
    return move / max(np.linalg.norm(move), 1e-8) * min(step, np.linalg.norm(move)), bool(pushing)


def servo_step(p: np.ndarray, v: np.ndarray, offset: np.ndarray, dt: float = 0.1, substeps: int = 10):
    """Where the robot's pusher is after one control step given target `offset` from `p` while moving at
    `v` (m, m/s), by the servo's equation in free space: m x'' = kp (target - x) - damping x'. What a
    planner that knows the robot's servo predicts (within ~2 mm of the simulator over 4 steps)."""
    kp, damping, mass = ROBOT_SERVO
    target, h = p + offset, dt / substeps
    for _ in range(substeps):
        v = v + h * (kp * (target - p) - damping * v) / mass
        p = p + h * v
    return p, v


def demos(embodiment: str, tasks, episodes_per_task: int, seed: int = 0, instruction: str = "code"):
    """An in-memory dataset of the expert's successful episodes on each of `tasks` (strings or
    indices), in `embodiment`'s body and frame: `observation.state`, `action`, and LeRobot's per-frame
    `task_index` into the dataset's `tasks` list (all twelve task strings, so indices agree across
    datasets). Episode j of task i starts from `reset(seed=100_000 * seed + 10_000 + 1000 * i + j)`:
    never an evaluation seed (EVAL_SEED = 1000 and up, below 10,000). `instruction` as the env's."""
    if not 1 <= episodes_per_task <= 1000:
        raise ValueError(f"episodes_per_task must be in 1-1000, got {episodes_per_task}")
    from labkit.data import EpisodeDataset
    from labkit.eval import rollout  # the one rollout engine (as envs/gym_pusht.py does)

    out = []
    for t in tasks:
        i = task_index(t)
        first = 100_000 * seed + 10_000 + 1000 * i
        eps = rollout("expert", "labkit/Tabletop-v0", range(first, first + episodes_per_task),
                      {"embodiment": embodiment, "task": i, "instruction": instruction}, keep=("obs", "actions"))
        out += [{"observation.state": e.obs["state"][:-1], "action": e.actions,
                 "task_index": np.full(e.length, i, np.int64)} for e in eps if e.success]
    if not out:
        raise ValueError(f"the expert succeeded in none of the episodes of {list(tasks)}")
    ds = EpisodeDataset.from_episodes(out, fps=10, tasks=list(TASKS))
    ds.info["labkit"] = {"env_id": "labkit/Tabletop-v0", "env_kwargs": {"embodiment": embodiment, "instruction": instruction}}
    return ds


def retarget_human(dataset):
    """The human's demonstrations mapped into the robot's frame and action space with the map this
    simulator knows (and the real world does not give): states from the hand camera's frame to the
    world's, velocities (m/s, hand frame) to target offsets (m, world frame) over one control step. The
    bodies still differ (a bigger hand pushes from further back): an upper bound on transfer, not a copy."""
    from labkit.data import EpisodeDataset

    r, origin = _rot(HUMAN_VIEW[0]), HUMAN_VIEW[1]
    state = np.array(dataset.frames["observation.state"], np.float64)
    points = state[:, :10].reshape(len(state), 5, 2)  # effector, velocity, three blocks
    world = points @ r.T
    world[:, [0, 2, 3, 4]] += origin  # positions move with the camera's origin; the velocity does not
    state[:, :10] = world.reshape(len(state), 10)
    dt = 1.0 / dataset.fps
    action = np.clip(np.asarray(dataset.frames["action"], np.float64) @ r.T * dt, -ROBOT_STEP, ROBOT_STEP)
    eps = [{"observation.state": state[a:b].astype(np.float32), "action": action[a:b].astype(np.float32),
            "task_index": dataset.frames["task_index"][a:b]} for a, b in zip(dataset.episode_from, dataset.episode_to, strict=True)]
    out = EpisodeDataset.from_episodes(eps, fps=dataset.fps, tasks=list(TASKS))
    out.info["labkit"] = {"env_id": "labkit/Tabletop-v0", "env_kwargs": {"embodiment": "robot"}}
    return out
