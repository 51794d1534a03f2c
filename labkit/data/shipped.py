"""The datasets that ship with labkit, and the seeds evaluations use.

Shipped datasets live in `datasets/<name>/` (LeRobotDataset v3 layout, a CARD.md each) and are
re-recorded by `labkit datasets`. Episode i of a shipped dataset starts from `reset(seed=i)`;
evaluations start at EVAL_SEED, so no policy is scored on the states it was trained on.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
DATASETS = ROOT / "datasets"

# name -> (env id, env kwargs, episodes, seed). Seeds are disjoint from EVAL_SEED and up.
SHIPPED = {
    "detour": ("labkit/Detour-v0", {}, 200, 0),
    "pusht": ("labkit/PushT-v0", {}, 200, 0),
    "pusht_pixels": ("labkit/PushT-v0", {"obs_mode": "pixels"}, 50, 0),
    # The same expert, seen from the block: state and actions in the block's frame (lesson 02).
    "pusht_block": ("labkit/PushT-v0", {"frame": "block"}, 200, 0),
    # ... and its actions as moves relative to the pusher, not points (lesson 02, configs/flow_pusht.yaml).
    "pusht_block_rel": ("labkit/PushT-v0", {"frame": "block", "actions": "relative"}, 200, 0),
    # The imperfect expert's episodes, failures included (RECAP-style methods learn from both).
    "peg": ("labkit/PegInsert-v0", {}, 200, 0),
    # Pixel datasets at 64 px (lesson 11): PushT's top camera with relative world-frame actions, and
    # the arm's two cameras with its joints (what the real arm observes); `state` rides along for analysis.
    "pusht_rel_pixels": ("labkit/PushT-v0", {"obs_mode": "pixels", "image_size": 64, "actions": "relative"}, 200, 0),
    "arm_pixels": ("labkit/ArmPickCube-v0", {"obs_mode": "pixels", "image_size": 64}, 200, 0),
    "arm": ("labkit/ArmPickCube-v0", {}, 200, 0),  # the classroom arm's twin, teleop-style expert
    # The canonical PushT (gym-pusht, the `pusht` extra) in the interface of labkit's best PushT recipe:
    # block frame, relative actions (configs/flow_gym_pusht.yaml).
    "gym_pusht": ("labkit/GymPushT-v0", {"frame": "block", "actions": "relative"}, 200, 0),
    # Twelve tasks by composition, an instruction per episode (LeRobot's `task` per frame, meta/tasks):
    # the state without the task's code, the task drawn at each reset (lesson 12, labkit.language.steer).
    "tabletop": ("labkit/Tabletop-v0", {"instruction": "text"}, 600, 0),
}
EVAL_SEED = 1000  # the first evaluation seed: every lesson, `evaluate` and `labkit eval` start here


def open_dataset(dataset: str | Path):
    """A shipped dataset by name (`detour`, `peg`, ...) or a dataset folder by path."""
    from labkit.data.dataset import load_dataset

    path = Path(dataset)
    if not path.exists():
        path = DATASETS / str(dataset)
    if not path.exists():
        shipped = sorted(p.name for p in DATASETS.iterdir() if p.is_dir())
        raise ValueError(f"dataset {str(dataset)!r} is neither a folder nor a shipped dataset ({', '.join(shipped)})")
    return load_dataset(path)
