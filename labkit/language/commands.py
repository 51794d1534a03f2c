"""Commands at several levels of abstraction for the Tabletop tasks, labelled automatically from the
expert's episodes (as Steerable Policies labels its data), and the scripted reasoner that writes them.

    task      the instruction, in one of several paraphrases: "slide the red block to the top-left corner"
    subtask   the expert's current segment: "get behind the red block, facing the top-left corner", then
              "push the red block into the top-left corner"
    motion    where the pusher goes over the next MOTION_STEPS steps, in whole centimetres of the top
              camera's view: "move 3 cm left and 2 cm up" (right = +x, up = +y)
    point     the top camera's pixel (64 px image) the pusher should be at MOTION_STEPS steps from now:
              "move to pixel (40, 22)"

The task and subtask name the block and the corner; motions and points name neither, so a policy that
follows them can do a composition it never saw, if something (the reasoner) knows where to go. Every
label comes from the recorded states alone (segments by the expert's own rule, `expert_move`).
`ScriptedReasoner` is the stand-in for a VLM prompted in context: it reads the scene (the observed
state and the task) and writes the next command at a chosen level, planning with the expert's rule.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from labkit.envs.tabletop import BODY_R, COLOURS, ROBOT_STEP, ZONES, expert_move, servo_step, to_pixel

LEVELS = ("task", "subtask", "motion", "point")
MOTION_STEPS = 4  # a motion or point command covers this many control steps (0.4 s at 10 Hz)
POINT_SIZE = 64  # points are pixels of a POINT_SIZE x POINT_SIZE top-camera image (~1 cm a pixel)

# Paraphrases of the task. TRAIN_TEMPLATES label the training data; HELD_OUT_TEMPLATES never appear in it
# (a user's own words: what CoVer's rephrasing is for).
TRAIN_TEMPLATES = (
    "push the {colour} block to the {corner} corner",
    "move the {colour} block into the {corner} corner",
    "slide the {colour} block to the {corner} corner",
    "put the {colour} block in the {corner} corner",
)
HELD_OUT_TEMPLATES = (
    "shove the {colour} puck over to the {corner} corner",
    "the {colour} block belongs in the {corner} corner",
    "get the {colour} piece into the {corner} corner, please",
    "nudge the {colour} block until it sits in the {corner} corner",
)
SUBTASKS = ("get behind the {colour} block, facing the {corner} corner", "push the {colour} block into the {corner} corner")


def task_parts(task: int) -> tuple[str, str]:
    """(colour, corner) of a task index."""
    return COLOURS[task // len(ZONES)], list(ZONES)[task % len(ZONES)]


def task_text(task: int, template: str = TRAIN_TEMPLATES[0]) -> str:
    colour, corner = task_parts(task)
    return template.format(colour=colour, corner=corner)


def motion_text(dx_cm: int, dy_cm: int) -> str:
    """'move 3 cm left and 2 cm up' for a displacement in whole centimetres (x right, y up)."""
    parts = [f"{abs(v)} cm {name[v > 0]}" for v, name in ((dx_cm, ("left", "right")), (dy_cm, ("down", "up"))) if v]
    return "move " + " and ".join(parts) if parts else "hold still"


def parse_motion(text: str) -> np.ndarray:
    """The displacement (m, x right, y up) a motion command asks for; ValueError if it is not one."""
    if text.strip() == "hold still":
        return np.zeros(2)
    found = re.findall(r"(\d+) cm (left|right|up|down)", text)
    if not found or not text.startswith("move "):
        raise ValueError(f"not a motion command: {text!r} (e.g. 'move 3 cm left and 2 cm up')")
    out = np.zeros(2)
    for n, way in found:
        out[int(way in ("up", "down"))] += int(n) * (1 if way in ("right", "up") else -1)
    return out / 100.0


def point_text(u: int, v: int) -> str:
    return f"move to pixel ({u}, {v})"


def parse_point(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"move to pixel \((\d+), (\d+)\)", text.strip())
    if m is None:
        raise ValueError(f"not a point command: {text!r} (e.g. 'move to pixel (40, 22)')")
    return int(m[1]), int(m[2])


def motion_command(now: np.ndarray, later: np.ndarray) -> str:
    """The motion command from effector position `now` to `later` (m, world frame)."""
    dx, dy = np.rint((np.asarray(later) - np.asarray(now)) * 100).astype(int)
    return motion_text(int(dx), int(dy))


def point_command(later: np.ndarray) -> str:
    u, v = to_pixel(later, POINT_SIZE)
    return point_text(int(u), int(v))


def split_state(state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(effector xy, blocks [3, 2]) of one Tabletop robot state (world frame, either instruction mode)."""
    state = np.asarray(state, np.float64)
    return state[:2], state[4:10].reshape(len(COLOURS), 2)


def is_pushing(state: np.ndarray, task: int) -> bool:
    """The expert's segment at this state: pushing the named block (True) or getting behind it."""
    p, blocks = split_state(state)
    return expert_move(p, blocks[task // len(ZONES)], np.array(list(ZONES.values())[task % len(ZONES)]),
                       BODY_R["robot"])[1]


def expert_action(state: np.ndarray, task: int) -> np.ndarray:
    """What the robot's expert would do at an observed state (its rule, noise-free): DAgger's label."""
    p, blocks = split_state(state)
    move = expert_move(p, blocks[task // len(ZONES)], np.array(list(ZONES.values())[task % len(ZONES)]),
                       BODY_R["robot"])[0]
    return np.clip(move, -ROBOT_STEP, ROBOT_STEP).astype(np.float32)


def subtask_command(state: np.ndarray, task: int) -> str:
    colour, corner = task_parts(task)
    return SUBTASKS[is_pushing(state, task)].format(colour=colour, corner=corner)


def label_episode(states: np.ndarray, task: int, template: str = TRAIN_TEMPLATES[0],
                  levels: Sequence[str] = LEVELS) -> dict[str, list[str]]:
    """Commands at each of `levels` (default: every level) for each frame of one expert episode (its
    states [T, D], world frame): {level: [T strings]}. Motion and point look MOTION_STEPS frames ahead
    (the last frame past the end). Only the levels asked for are computed (labelling is per frame)."""
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad:
        raise ValueError(f"levels must be among {LEVELS}, got {bad}")
    states = np.asarray(states)
    T = len(states)
    later = states[np.minimum(np.arange(T) + MOTION_STEPS, T - 1), :2]
    make = {
        "task": lambda: [task_text(task, template)] * T,
        "subtask": lambda: [subtask_command(s, task) for s in states],
        "motion": lambda: [motion_command(s[:2], q) for s, q in zip(states, later, strict=True)],
        "point": lambda: [point_command(q) for q in later],
    }
    return {lv: make[lv]() for lv in dict.fromkeys(levels)}


class ScriptedReasoner:
    """Writes the next command at `level` from what it reads of the scene: the observed state (effector,
    blocks) and the task. For motions and points it plans MOTION_STEPS steps ahead with the expert's rule
    and the robot's servo equation (`servo_step`), moving the block along while pushing (a guess, not the
    simulator). The stand-in for a VLM that is prompted with the image and the task and answers in words."""

    def __init__(self, level: str, template: str = TRAIN_TEMPLATES[0]):
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        self.level, self.template = level, template

    def plan(self, state: np.ndarray, task: int) -> np.ndarray:
        """Where the effector should be MOTION_STEPS steps from now (m, world frame)."""
        p, blocks = split_state(state)
        v = np.asarray(state, np.float64)[2:4]
        k, corner = task // len(ZONES), np.array(list(ZONES.values())[task % len(ZONES)])
        b = blocks[k].copy()
        for _ in range(MOTION_STEPS):
            move, pushing = expert_move(p, b, corner, BODY_R["robot"])
            q, v = servo_step(p, v, move)
            if pushing:
                b = b + (q - p)
            p = q
        return p

    def __call__(self, state: np.ndarray, task: int) -> str:
        task = int(task)
        if self.level == "task":
            return task_text(task, self.template)
        if self.level == "subtask":
            return subtask_command(state, task)
        later = self.plan(state, task)
        return motion_command(np.asarray(state)[:2], later) if self.level == "motion" else point_command(later)


__all__ = ["HELD_OUT_TEMPLATES", "LEVELS", "MOTION_STEPS", "POINT_SIZE", "SUBTASKS", "TRAIN_TEMPLATES",
           "ScriptedReasoner", "expert_action", "is_pushing", "label_episode", "motion_command", "motion_text", "parse_motion",
           "parse_point", "point_command", "point_text", "split_state", "subtask_command", "task_parts", "task_text"]
