"""The language-conditioned Tabletop policy that ships with labkit (lesson 12), its learned reasoner, and
the command that rebuilds them:

    python -m labkit.language.pretrained            # ~15 min on a 2-core laptop CPU (meta.json: how long)
    python -m labkit.language.pretrained --parts reasoner     # one part alone: policy, dagger, polish, reasoner

One FlowPolicy reads the state (10-D, no task code) and a command's all-MiniLM-L6-v2 embedding through an
MLP, FiLM-conditioned on its output, and is trained on every command level (task paraphrases, subtasks,
motions, points) of the expert's episodes on the 9 SEEN_TASKS, then finetuned with DAgger rounds told
the task sentence and briefly on motions; HELD_OUT_TASKS (one per colour and per corner, so each word
was seen in other compositions) are never in its data. The checkpoints hold weights only (loaded with
weights_only=True); `meta.json` beside them records how they were made and how long it took.
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
# An MLP over [state, sentence] before the FiLM denoiser (obs_layers) and 300 episodes a task: told the
# task sentence 41% -> 64%, motions 89% -> 92% (README's probes). One thread: two gave 12.3 min for 100
# episodes a task, one 11.9 (small matrices do not split well over two cores).
RECIPE = {"episodes_per_task": 300, "steps": 25000, "batch_size": 256, "seed": 0, "threads": 1,
          "levels": ("task", "task", "subtask", "motion", "motion", "point"),
          "policy": {"horizon": 8, "n_action_steps": 2, "activation": "silu", "obs_layers": 2, "obs_hidden": 256},
          # The learned reasoner (LearnedReasoner) on the same episodes: with the earlier policy, 2 x 256 and
          # 30,000 cosine steps steered 72% of seen-task episodes, 3 x 512 at 15,000 steps 74% (100 each).
          "reasoner": {"steps": 30000, "hidden": 256, "layers": 2, "schedule": "cosine"},
          # Then DAgger at the task level: roll the policy out told the task sentence (4 paraphrases), label
          # every visited state with the expert's rule, finetune on every level of the demos + the labels
          # (task level, 6 paraphrase copies: ~1/3 of the batches). Told the sentence 67% -> 92%, motions
          # kept at 97% (2 rounds; README). The same steps with no DAgger labels: 65%.
          "dagger": {"rounds": 2, "episodes_per_task": 50, "steps": 4000, "task_copies": 6, "first_seed": 50_000},
          # Last, a short finetune on the motion level of the demos at a lower rate: DAgger's task-level
          # rounds loosen the motions (builds 0.91-1.04 cm median error); this brought one build's
          # 1.03 cm to 0.96, told the task sentence 90% -> 89% (README). 2,000 steps on all levels: 1.01.
          "polish": {"level": "motion", "steps": 2000, "lr": 3e-4, "seed": 7}}


class MissingPretrainedError(FileNotFoundError):
    """The shipped language policy's checkpoint is not there."""


def build(episodes_per_task: int = RECIPE["episodes_per_task"], steps: int = RECIPE["steps"],
          seed: int = RECIPE["seed"], out: Path = CHECKPOINT, progress: bool = True,
          parts=("policy", "dagger", "polish", "reasoner")) -> Path:
    """Record the expert on SEEN_TASKS, label every level, train the flow policy, finetune it with DAgger
    rounds, then briefly on the motion level, train the learned reasoner on the same episodes; save them
    and meta.json. A part left out is kept as saved (e.g. `parts=("reasoner",)` retrains the reasoner
    alone; `("dagger",)` finetunes the saved policy)."""
    import torch

    from labkit.envs.tabletop import demos
    from labkit.language.steer import TEXT_KEY, LearnedReasoner, command_dataset
    from labkit.language.text import PretrainedTextEncoder
    from labkit.policies import FlowPolicy
    from labkit.policies.train import fit

    torch.set_num_threads(RECIPE["threads"])
    start, cpu = time.perf_counter(), time.process_time()
    data = demos("robot", SEEN_TASKS, episodes_per_task, seed, instruction="text")
    encoder, out = PretrainedTextEncoder(), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = meta(out) if "policy" not in parts else {}
    # every level of the demos: the policy's data, and the base DAgger's labels are mixed into
    commands = command_dataset(data, encoder, RECIPE["levels"]) if {"policy", "dagger"} & set(parts) else None
    if "policy" in parts:
        policy = FlowPolicy.from_dataset(commands, obs_keys=("observation.state", TEXT_KEY), **RECIPE["policy"])
        fit(policy, commands, steps=steps, batch_size=RECIPE["batch_size"], seed=seed, progress=progress)
        policy.save(out)
        info = {"seen_tasks": list(SEEN_TASKS), "held_out_tasks": list(HELD_OUT_TASKS), "encoder": encoder.name,
                "episodes_per_task": episodes_per_task, "frames": len(data), "training_frames": len(commands),
                "levels": list(RECIPE["levels"]), "policy": RECIPE["policy"], "steps": steps, "seed": seed,
                "threads": RECIPE["threads"], "wall_minutes": round((time.perf_counter() - start) / 60, 1),
                "cpu_minutes": round((time.process_time() - cpu) / 60, 1),
                "final_loss": float(policy.losses()[-500:].mean()), "command": "python -m labkit.language.pretrained"}
    if "dagger" in parts:
        d_start, d_cpu = time.perf_counter(), time.process_time()
        policy = load_pretrained(out)
        rates = dagger_rounds(policy, commands, encoder)
        policy.save(out)
        info["dagger"] = {**RECIPE["dagger"], "rollout_success": rates,
                          "wall_minutes": round((time.perf_counter() - d_start) / 60, 1),
                          "cpu_minutes": round((time.process_time() - d_cpu) / 60, 1)}
    if "polish" in parts:
        p_start, p_cpu, pol = time.perf_counter(), time.process_time(), RECIPE["polish"]
        policy = load_pretrained(out)
        lr, policy.config.lr = policy.config.lr, pol["lr"]  # the rate of this stage only
        fit(policy, command_dataset(data, encoder, [pol["level"]]), steps=pol["steps"], batch_size=RECIPE["batch_size"],
            seed=pol["seed"], progress=False)
        policy.config.lr = lr
        policy.save(out)
        info["polish"] = {**pol, "wall_minutes": round((time.perf_counter() - p_start) / 60, 1),
                          "cpu_minutes": round((time.process_time() - p_cpu) / 60, 1)}
    if "reasoner" in parts:
        r_start, r_cpu, r = time.perf_counter(), time.process_time(), RECIPE["reasoner"]
        reasoner = LearnedReasoner(encoder, hidden=r["hidden"], layers=r["layers"])
        reasoner.fit(data, steps=r["steps"], batch_size=RECIPE["batch_size"], seed=seed, schedule=r["schedule"])
        reasoner.save(reasoner_path(out))
        info["reasoner"] = {**r, "episodes_per_task": episodes_per_task, "final_loss_cm2": reasoner.final_loss,
                            "wall_minutes": round((time.perf_counter() - r_start) / 60, 1),
                            "cpu_minutes": round((time.process_time() - r_cpu) / 60, 1)}
    (out.parent / "meta.json").write_text(json.dumps(info, indent=1) + "\n")
    return out


def dagger_rounds(policy, commands, encoder) -> list[float]:
    """RECIPE["dagger"]'s rounds on `policy` (trained on `commands`, every level of the demos), in place:
    returns the rollouts' success rate of each round (the policy told the task sentence)."""
    import numpy as np

    from labkit.data import EpisodeDataset
    from labkit.envs.tabletop import TASKS
    from labkit.eval import rollout
    from labkit.language.commands import TRAIN_TEMPLATES, ScriptedReasoner, expert_action
    from labkit.language.steer import ENV, LanguageRuntime, command_dataset, join_commands
    from labkit.policies.train import fit

    d, visited, rates = RECIPE["dagger"], [], []
    n = d["episodes_per_task"] * len(SEEN_TASKS) // len(TRAIN_TEMPLATES)  # rollouts per paraphrase
    for r in range(1, d["rounds"] + 1):
        episodes = []
        for k, template in enumerate(TRAIN_TEMPLATES):
            first = d["first_seed"] + 10_000 * r + n * k  # never a demo (10,000-21,999) or evaluation seed
            episodes += rollout(LanguageRuntime(policy, encoder, ScriptedReasoner("task", template)), ENV["env_id"],
                                range(first, first + n), {"instruction": "text", "tasks": list(SEEN_TASKS)}, keep=("obs",))
        rates.append(float(np.mean([e.success for e in episodes])))
        for e in episodes:
            states, task = e.obs["state"][:-1], int(e.obs["task"][0, 0])
            visited.append({"observation.state": states.astype(np.float32), "task_index": np.full(len(states), task),
                            "action": np.stack([expert_action(s, task) for s in states])})
        labelled = EpisodeDataset.from_episodes(visited, fps=commands.fps, tasks=list(TASKS))
        labelled.info["labkit"] = {"env_id": ENV["env_id"], "env_kwargs": {"instruction": "text"}}
        data = join_commands(commands, command_dataset(labelled, encoder, ["task"] * d["task_copies"]))
        fit(policy, data, steps=d["steps"], batch_size=RECIPE["batch_size"], seed=r, progress=False)
    return rates


def reasoner_path(policy_path: Path = CHECKPOINT) -> Path:
    return Path(policy_path).parent / "tabletop_reasoner.pt"


def load_pretrained(path: Path = CHECKPOINT):
    """The shipped language-conditioned flow policy (weights only)."""
    from labkit.policies import load_policy

    if not Path(path).exists():
        raise MissingPretrainedError(f"no language policy at {path}: rebuild it with `python -m labkit.language.pretrained`")
    return load_policy(path)


def load_reasoner(encoder, path: Path = CHECKPOINT):
    """The shipped learned reasoner (state + task sentence -> the next motion command), trained on the same
    episodes as the shipped policy; with it the policy is told the task sentence only, as two levels."""
    from labkit.language.steer import LearnedReasoner

    if not reasoner_path(path).exists():
        raise MissingPretrainedError(f"no learned reasoner at {reasoner_path(path)}: rebuild it with "
                                     "`python -m labkit.language.pretrained --parts reasoner`")
    return LearnedReasoner.load(reasoner_path(path), encoder)


def meta(path: Path = CHECKPOINT) -> dict:
    """How the shipped checkpoints were made (meta.json beside them)."""
    return json.loads((Path(path).parent / "meta.json").read_text())


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes-per-task", type=int, default=RECIPE["episodes_per_task"])
    p.add_argument("--steps", type=int, default=RECIPE["steps"])
    p.add_argument("--seed", type=int, default=RECIPE["seed"], help="the demos' and the training's seed")
    p.add_argument("--out", type=Path, default=CHECKPOINT)
    p.add_argument("--parts", nargs="+", choices=("policy", "dagger", "polish", "reasoner"),
                   default=("policy", "dagger", "polish", "reasoner"),
                   help="what to (re)train: the flow policy, its DAgger finetuning, its motion finetuning, the reasoner")
    a = p.parse_args()
    print(build(a.episodes_per_task, a.steps, a.seed, out=a.out, parts=a.parts))
