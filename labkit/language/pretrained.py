"""The language-conditioned Tabletop policy that ships with labkit (lesson 12), and the command that
rebuilds it:

    python -m labkit.language.pretrained            # ~15 min on a 2-core laptop CPU (meta.json: how long)

One FlowPolicy reads the state (10-D, no task code) and a command's all-MiniLM-L6-v2 embedding, FiLM-
conditioned, and is trained on every command level (task paraphrases, subtasks, motions, points) of
the expert's episodes on the 9 SEEN_TASKS; HELD_OUT_TASKS (one per colour and per corner, so each word
was seen in other compositions) are never in its data. The checkpoint holds the weights only (loaded
with weights_only=True); `meta.json` beside it records how it was made and how long it took.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from labkit.envs.tabletop import TASKS

WEIGHTS = Path(__file__).resolve().parent / "weights"
CHECKPOINT = WEIGHTS / "tabletop_flow.pt"
HELD_OUT_TASKS = (0, 5, 10)  # red -> top-left, green -> top-right, blue -> bottom-left
SEEN_TASKS = tuple(t for t in range(len(TASKS)) if t not in HELD_OUT_TASKS)
# The task and motion levels twice (a third of the batches each; the task in two paraphrases per
# episode): told only the task, the policy must read it from the sentence and the scene for a whole
# episode, the hardest level to learn; motions are what the reasoner steers with. Measured on 100
# episodes (README): task x2 alone lifted task-sentence success 38% -> 50% but cut motion 93% -> 76%.
RECIPE = {"episodes_per_task": 100, "steps": 25000, "batch_size": 256, "seed": 0, "threads": 2,
          "levels": ("task", "task", "subtask", "motion", "motion", "point"),
          "policy": {"horizon": 8, "n_action_steps": 2, "activation": "silu"}}


class MissingPretrainedError(FileNotFoundError):
    """The shipped language policy's checkpoint is not there."""


def build(episodes_per_task: int = RECIPE["episodes_per_task"], steps: int = RECIPE["steps"],
          seed: int = RECIPE["seed"], out: Path = CHECKPOINT, progress: bool = True) -> Path:
    """Record the expert on SEEN_TASKS, label every level, train the flow policy, save it and its meta."""
    import torch

    from labkit.envs.tabletop import demos
    from labkit.language.steer import TEXT_KEY, command_dataset
    from labkit.language.text import PretrainedTextEncoder
    from labkit.policies import FlowPolicy
    from labkit.policies.train import fit

    torch.set_num_threads(RECIPE["threads"])  # both cores of a 2-core laptop: ~1.5x one at batch 256
    start, cpu = time.perf_counter(), time.process_time()
    data = demos("robot", SEEN_TASKS, episodes_per_task, seed, instruction="text")
    commands = command_dataset(data, PretrainedTextEncoder(), RECIPE["levels"])
    policy = FlowPolicy.from_dataset(commands, obs_keys=("observation.state", TEXT_KEY), **RECIPE["policy"])
    fit(policy, commands, steps=steps, batch_size=RECIPE["batch_size"], seed=seed, progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    policy.save(out)
    meta = {"seen_tasks": list(SEEN_TASKS), "held_out_tasks": list(HELD_OUT_TASKS), "encoder": "all-MiniLM-L6-v2",
            "episodes_per_task": episodes_per_task, "frames": len(data), "training_frames": len(commands),
            "levels": list(RECIPE["levels"]), "steps": steps, "seed": seed, "threads": RECIPE["threads"], "wall_minutes": round((time.perf_counter() - start) / 60, 1),
            "cpu_minutes": round((time.process_time() - cpu) / 60, 1), "final_loss": float(policy.losses()[-500:].mean()),
            "command": "python -m labkit.language.pretrained"}
    (out.parent / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def load_pretrained(path: Path = CHECKPOINT):
    """The shipped language-conditioned flow policy (weights only)."""
    from labkit.policies import load_policy

    if not Path(path).exists():
        raise MissingPretrainedError(f"no language policy at {path}: rebuild it with `python -m labkit.language.pretrained`")
    return load_policy(path)


def meta(path: Path = CHECKPOINT) -> dict:
    """How the shipped checkpoint was made (meta.json beside it)."""
    return json.loads((Path(path).parent / "meta.json").read_text())


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes-per-task", type=int, default=RECIPE["episodes_per_task"])
    p.add_argument("--steps", type=int, default=RECIPE["steps"])
    p.add_argument("--out", type=Path, default=CHECKPOINT)
    a = p.parse_args()
    print(build(a.episodes_per_task, a.steps, out=a.out))
