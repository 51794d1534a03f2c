"""`labkit/GymPushT-v0`: the canonical PushT (`gym-pusht`) behind labkit's observation contract.

The benchmark Diffusion Policy and LeRobot report on: pymunk physics, a 512 x 512 workspace, the
goal pose fixed at (256, 256, pi/4), success when coverage > 0.95 (which ends the episode), 300
steps at most. This adapter steps gym-pusht's own env and leaves its physics, action semantics and
success rule untouched; it only changes what the policy reads and how its action is written:

Observation (`Dict`, float32, gym-pusht's pixel units):
    `state`, obs_mode="state" (12-D): pusher x, y; block x, y (gym-pusht's block position: the
        middle of the bar's outer edge); cos, sin of the block angle; three block keypoints (the bar's
        outer corners and the stem's tip). gym-pusht's raw state wraps the angle at 2 pi, a jump a
        regressor must learn across; cos/sin and keypoints are continuous, and the keypoints pin the
        pose in the same units as the positions (labkit's PushT uses the same layout).
    `state`, obs_mode="pixels" (2-D): the pusher's position, as LeRobot's `lerobot/pusht` records
        `observation.state` (agent_pos) beside its 96 x 96 `observation.image` (`pixels` here).
    `proprio` (4-D): pusher x, y, vx, vy.
`info`: gym-pusht's own (`is_success`, `coverage`, `block_pose`, ...) and `max_coverage`, the
largest coverage since reset (Diffusion Policy's metric, averaged over episodes).
Reward: "sparse" is 1 on success; "dense" is gym-pusht's own reward, clip(coverage / 0.95, 0, 1).

Action: by default gym-pusht's own, the pusher's absolute target in [0, 512]^2 (clipped to that box,
as every labkit task clips to its exact bounds). labkit's PushT options re-parametrise it, and are
turned back into that absolute target before gym-pusht steps:
`frame="block"`: `state` holds the pusher, the goal's position, cos/sin of the goal's angle and the
    goal's keypoints, all in the block's frame; actions are targets in the block's frame.
`actions="relative"`: the target as an offset from the pusher (in the world's or the block's axes).
labkit's best PushT recipe uses both (configs/flow_gym_pusht.yaml).

Needs the `pusht` extra (`pip install labkit[pusht]`); labkit imports without it. Evaluate a policy
with the anchors' protocol (success over >= 500 episodes, mean max coverage):

    python -m labkit.envs.gym_pusht evaluate CKPT --episodes 500      (or `expert`)
"""

from __future__ import annotations

import argparse
import os

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from labkit.data.shipped import EVAL_SEED
from labkit.envs.checks import check_choice, check_int
from labkit.envs.pusht import ACTIONS, FRAMES, PushTExpert, _ring, rot, to_local, to_world

SIZE = 512.0  # gym-pusht's workspace side (pixels); actions are absolute targets in [0, SIZE]^2
GOAL = np.array([256.0, 256.0, np.pi / 4])  # gym-pusht's fixed goal pose (x, y, angle)
# The T in gym-pusht's body frame: bar's outer corners and the stem's tip (the stem points along +y).
KEYPOINTS = np.array([[-60.0, 0.0], [60.0, 0.0], [0.0, 120.0]])
GOAL_KEYPOINTS = to_world(GOAL, KEYPOINTS)
REACH = 2 * SIZE  # bound on block-frame or relative actions: any target, seen from any block or pusher


def _gym_pusht():
    """gym-pusht's env class, imported on first use: labkit works without the optional extra."""
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")  # pygame's banner on import
    try:
        from gym_pusht.envs.pusht import PushTEnv
    except ImportError as e:
        raise ImportError(f"labkit/GymPushT-v0 needs gym-pusht, which is not installed ({e}); "
                          "install it with `pip install labkit[pusht]`") from e
    return PushTEnv


class GymPushTEnv(gym.Env):
    """Push the T block onto the goal T in gym-pusht (canonical PushT); success at coverage > 0.95."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}
    camera = "top"  # the one view (the recorder names the camera feature after it)

    def __init__(self, obs_mode: str = "state", reward_type: str = "sparse", render_mode: str | None = None,
                 image_size: int = 96, frame: str = "world", actions: str = "absolute"):
        check_choice("obs_mode", obs_mode, ("state", "pixels"))
        check_choice("reward_type", reward_type, ("sparse", "dense"))
        check_choice("render_mode", render_mode, (None, "rgb_array"))
        check_choice("frame", frame, FRAMES)
        check_choice("actions", actions, ACTIONS)
        check_int("image_size", image_size, 16, 512)
        if obs_mode == "pixels" and frame == "block":
            raise ValueError("frame='block' needs the block's pose as state, which obs_mode='pixels' does not "
                             "give (its state is the pusher, as in lerobot/pusht); use frame='world'")
        self.obs_mode, self.reward_type, self.render_mode = obs_mode, reward_type, render_mode
        self.frame, self.actions = frame, actions
        # gym-pusht renders only when asked: in state mode its observation is never drawn (0.6 ms a step).
        self.sim = _gym_pusht()(obs_type="pixels_agent_pos" if obs_mode == "pixels" else "state",
                                render_mode="rgb_array", observation_width=image_size,
                                observation_height=image_size)
        self.render_size = 256
        dim = 2 if obs_mode == "pixels" else 12
        obs = {"state": spaces.Box(-np.inf, np.inf, (dim,), np.float32),
               "proprio": spaces.Box(-np.inf, np.inf, (4,), np.float32)}
        if obs_mode == "pixels":
            obs["pixels"] = spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        self.observation_space = spaces.Dict(obs)
        bound = (0.0, SIZE) if frame == "world" and actions == "absolute" else (-REACH, REACH)
        self.action_space = spaces.Box(*bound, (2,), np.float32)
        self.target = np.zeros(2)  # the absolute target gym-pusht was last given
        self.max_coverage = 0.0

    @property
    def render_size(self) -> int:
        """Side of `render()` frames (gym-pusht's visualisation, with the commanded target marked)."""
        return self.sim.visualization_width

    @render_size.setter
    def render_size(self, value: int) -> None:
        check_int("render_size", value, 16, 2048)
        self.sim.visualization_width = self.sim.visualization_height = int(value)

    # ---- poses, and the action frame --------------------------------------------------------------
    def block_pose(self) -> np.ndarray:
        """(x, y, angle) of the block in gym-pusht's units: the pose its state and goal are given in."""
        b = self.sim.block
        return np.array([b.position.x, b.position.y, b.angle])

    def pusher_pos(self) -> np.ndarray:
        return np.array(self.sim.agent.position)

    def action_frame(self) -> np.ndarray:
        """The pose (x, y, angle) whose frame actions are given in: the world's or the block's axes, with
        the origin at the world's or block's origin, or at the pusher for relative actions."""
        block = self.block_pose() if self.frame == "block" else np.zeros(3)
        origin = self.pusher_pos() if self.actions == "relative" else block[:2]
        return np.array([*origin, block[2]])

    def to_env_frame(self, target: np.ndarray) -> np.ndarray:
        """gym-pusht's absolute target (pixels) as this env's action (see `action_frame`)."""
        return to_local(self.action_frame(), np.asarray(target, np.float64))

    def to_gym_action(self, action: np.ndarray) -> np.ndarray:
        """This env's action as the absolute target gym-pusht steps with, inside [0, 512]^2."""
        action = np.asarray(action)
        if self.frame != "world" or self.actions != "absolute":
            action = to_world(self.action_frame(), action.astype(np.float64)[None])[0]
        return np.clip(action, 0.0, SIZE)

    # ---- the gymnasium contract --------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        raw, info = self.sim.reset(seed=seed, options=options)
        self.target = self.pusher_pos()
        self.max_coverage = info["coverage"] = self.sim._get_coverage()
        info["max_coverage"] = self.max_coverage
        return self._obs(raw), info

    def step(self, action):
        action = np.asarray(action)
        if action.shape != self.action_space.shape:
            raise ValueError(f"action must have shape {self.action_space.shape}, got {action.shape}")
        if not np.isfinite(action).all():
            raise ValueError(f"action contains NaN or inf: {action}")
        self.target = self.to_gym_action(action)
        raw, reward, terminated, truncated, info = self.sim.step(self.target)
        self.max_coverage = max(self.max_coverage, info["coverage"])
        info["max_coverage"] = self.max_coverage
        if self.reward_type == "sparse":
            reward = float(info["is_success"])
        return self._obs(raw), float(reward), bool(terminated), bool(truncated), info

    def render(self):
        return self.sim.render() if self.render_mode == "rgb_array" else None

    def close(self):
        self.sim.close()

    def _obs(self, raw) -> dict[str, np.ndarray]:
        pusher = self.pusher_pos()
        proprio = np.concatenate([pusher, self.sim.agent.velocity]).astype(np.float32)
        if self.obs_mode == "pixels":
            return {"state": pusher.astype(np.float32), "proprio": proprio, "pixels": raw["pixels"]}
        pose = self.block_pose()
        r = rot(pose[2])
        if self.frame == "block":  # everything the task depends on, seen from the block (as labkit's PushT)
            dt = GOAL[2] - pose[2]
            state = np.concatenate([to_local(pose, pusher, r), to_local(pose, GOAL[:2], r),
                                    [np.cos(dt), np.sin(dt)], to_local(pose, GOAL_KEYPOINTS, r).ravel()])
        else:
            state = np.concatenate([pusher, pose[:2], r[:, 0], to_world(pose, KEYPOINTS, r).ravel()])
        return {"state": state.astype(np.float32), "proprio": proprio}


# ---- the scripted expert: labkit's PushT plan, in gym-pusht's geometry ----------------------------------
MM = 1e-3  # gym-pusht's pixel is the expert's millimetre: its T is then labkit's T with a shorter stem
# gym-pusht's body centre of gravity, in its body frame: the point its block turns about when pushed.
COG = np.array([0.0, 45.0])


def _expert_pose(pose: np.ndarray) -> np.ndarray:
    """A gym-pusht block pose (pixels, body origin) in the expert's frame: metres from the workspace's
    centre, origin at the centre of gravity, turned by pi so that the bar is on top (labkit's T)."""
    cog = to_world(pose, COG[None])[0]
    return np.array([*(cog - SIZE / 2) * MM, np.angle(np.exp(1j * (pose[2] + np.pi)))])


class GymPushTExpert(PushTExpert):
    """labkit's PushT expert (`labkit.envs.pusht.PushTExpert`) on gym-pusht: the same plan, multimodal in
    the same way (a "bar" and a "stem" strategy, ~50/50 per episode), given gym-pusht's T, goal, workspace
    and pushing response. It reads the block's pose from the env (privileged state)."""

    # gym-pusht's T in the expert's frame (see _expert_pose): bar 120 x 30, stem 30 x 90 (pixels).
    BAR = (np.array([0.0, 0.030]), np.array([0.060, 0.015]))
    STEM = (np.array([0.0, -0.030]), np.array([0.015, 0.045]))
    PUSHER_R = 15 * MM
    TARGET = _expert_pose(GOAL)
    WORKSPACE = SIZE / 2 * MM  # all of the action box: the pusher passes through the walls (5 and 506 px)
    # A frictionless kinematic pusher (gym-pusht's shapes have no friction) on a block whose velocity
    # is damped away every physics step: the block moves along the contact normal and turns about its
    # centre of gravity with the radius of gyration sqrt(I / m) = sqrt(3000 / 1) px.
    RHO = np.sqrt(3000.0) * MM
    RADII = _ring(clearance=PUSHER_R + 0.008, bar=BAR, stem=STEM)  # the safe ring round this T

    def _observe(self) -> tuple[np.ndarray, np.ndarray]:
        return _expert_pose(self.env.block_pose()), (self.env.pusher_pos() - SIZE / 2) * MM

    def _command(self, target: np.ndarray) -> np.ndarray:
        return self.env.to_env_frame(target / MM + SIZE / 2).astype(np.float32)


# ---- the anchors' evaluation protocol, as a command ------------------------------------------------------
def evaluate_gym_pusht(policy, episodes: int = 500, seed: int = EVAL_SEED, num_envs: int = 10):
    """`labkit.eval.evaluate` on labkit/GymPushT-v0 (gym-pusht's success rule), plus the mean over
    episodes of the maximum coverage reached (Diffusion Policy's metric). Returns (EvalResult, mean max
    coverage)."""
    from labkit.eval import evaluate

    res = evaluate(policy, "labkit/GymPushT-v0", episodes=episodes, seed=seed, num_envs=num_envs)
    return res, res.mean_info("max_coverage")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m labkit.envs.gym_pusht", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("evaluate", help="success rate (Wilson 95%%) and mean max coverage on gym-pusht")
    e.add_argument("checkpoint", help="a policy checkpoint, or `expert` for the scripted expert")
    e.add_argument("--episodes", type=int, default=500)
    e.add_argument("--seed", type=int, default=EVAL_SEED, help="first evaluation seed (default: %(default)s, "
                   "labkit's EVAL_SEED; the dataset was recorded on seeds 0-199)")
    a = p.parse_args(argv)
    import labkit.envs  # noqa: F401  (registers labkit/GymPushT-v0)

    if a.checkpoint == "expert":
        policy = "expert"
    else:
        from labkit.policies import load_policy

        policy = load_policy(a.checkpoint)
    res, max_cov = evaluate_gym_pusht(policy, a.episodes, a.seed)
    lo, hi = res.interval
    print(f"{res.env_id}: success {int(res.success.sum())}/{res.episodes} = {res.success_rate:.1%} (Wilson 95% "
          f"{lo:.1%}-{hi:.1%}), seeds {a.seed}-{a.seed + a.episodes - 1}; mean max coverage "
          f"{max_cov:.3f} (Diffusion Policy's metric), mean final coverage {res.mean_info('coverage'):.3f}; "
          f"mean length {res.lengths.mean():.0f}; {res.seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
