"""`labkit/Doors-v0`: two doors, one locked at random; if the first one tried is locked, try the other.

The memory lesson's in-context adaptation task (MEM: "try the other handle if the first one did not
open"). Pushing the unlocked door's handle opens it: success. Pushing the locked one does nothing but
send the robot back to its start, where it is held again until the go signal (`state[4]`): from then
on every observation is exactly what it was at the episode's start, so which door failed is visible
to no single frame. A policy without memory repeats its first choice; a second failure ends the
episode (`info["failed_attempts"]` counts them).

Chance: the first attempt succeeds in 1/2 of the episodes whatever the policy does; the second attempt
(after a failed first one) succeeds 0% of the time for a memoryless policy that is deterministic, 1/2
for one that picks at random. The expert always tries the left door first.
`reset(options={"locked": k})` locks door k (0 left, 1 right) in an otherwise identical episode.
10 Hz, 90 steps at most.
"""

from __future__ import annotations

import mujoco
import numpy as np

from labkit.envs.cups import GO_STEP, REACH, WaitingPointTask, check_choice_index, drive_to, point_robot_xml

HANDLES = np.array([[-0.5, 0.5], [0.5, 0.5]])  # left, right
MAX_FAILURES = 2


class DoorsEnv(WaitingPointTask):
    """Open the unlocked door; a locked one sends the robot back to the start."""

    xml = point_robot_xml("doors", "\n    ".join(
        ['<geom name="wall" type="box" pos="0 .62 .04" size="1 .04 .04" rgba=".35 .35 .4 1" contype="0" conaffinity="0"/>']
        + [f'<geom name="door{k}" type="box" pos="{x} .62 .05" size=".12 .05 .05" rgba=".55 .35 .2 1" '
           f'contype="0" conaffinity="0"/><geom name="handle{k}" type="sphere" pos="{x} {y} .03" size=".03" '
           'rgba=".8 .7 .2 1" contype="0" conaffinity="0"/>' for k, (x, y) in enumerate(HANDLES)]))
    state_dim = 5  # x, y, vx, vy, go

    def _reset_task(self, rng, options):
        super()._reset_task(rng, options)
        self.locked = int(rng.integers(len(HANDLES)))
        if options and "locked" in options:  # the same episode with the other door locked (tests, demos)
            self.locked = check_choice_index("locked", options["locked"], len(HANDLES))
        self.failures = 0
        self._doors = [self.model.geom(f"door{k}").id for k in range(len(HANDLES))]
        self._door_rgba = self.model.geom_rgba[self._doors[0]].copy()

    def _state(self):
        return np.concatenate([self.data.qpos, self.data.qvel, [self._go()]])

    def _evaluate(self):
        dists = np.linalg.norm(HANDLES - self.data.qpos, axis=1)
        reached = int(np.argmin(dists)) if dists.min() < REACH else -1
        if reached == self.locked:  # the door does not open: back to the start, held again
            self.failures += 1
            self._place_at_start()
            mujoco.mj_forward(self.model, self.data)
        opened = reached not in (-1, self.locked)
        for k, g in enumerate(self._doors):  # an opened door turns green (for videos; no state shows it)
            self.model.geom_rgba[g] = (.3, .8, .35, 1) if opened and k == reached else self._door_rgba
        self._out = self.failures >= MAX_FAILURES or self._left_arena()
        free = 1 - self.locked
        return opened, -float(dists[free]), {"distance": float(dists[free]), "failed_attempts": self.failures,
                                             "tried_locked": reached == self.locked}

    def _failed(self):
        return self._out


class DoorsExpert:
    """Scripted expert: after the go signal, tries the left door; if it is sent back, tries the right one.
    It notices the failure as a jump back to the start (the go flag dropping): its own memory."""

    def __init__(self, env, noise: float = 0.02):
        self.env = env.unwrapped
        self.noise = noise
        self.reset()

    def reset(self, seed: int | None = None):
        self.rng = np.random.default_rng(seed)
        self.door, self.prev_go = 0, 0.0

    def __call__(self, obs) -> np.ndarray:
        s = np.asarray(obs["state"], dtype=np.float64)
        if self.prev_go > 0.5 and s[4] < 0.5:  # sent back: the door it tried was locked
            self.door = 1 - self.door
        self.prev_go = s[4]
        if s[4] < 0.5:
            return np.zeros(2, np.float32)
        return drive_to(s[:2], HANDLES[self.door], self.rng, self.noise)


__all__ = ["DoorsEnv", "DoorsExpert", "GO_STEP"]
