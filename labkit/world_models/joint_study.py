"""Cosmos-style planning against acting directly, on lesson 07's planning set-up (Detour):

    python -m labkit.world_models.joint_study --two-models --seed 0 --out results/cosmos.jsonl

Data: the 200 shipped demos plus 100 rollouts of two weak policies (lesson 07's: a flow policy after 100
steps, seeds 5000-5049, and an MSE-BC policy after 400, seeds 6000-6049), labelled by `joint_dataset`.
One flow model over [action, state change, value] rows is trained on them (training seed `--seed`) and
evaluated on 100 episodes from EVAL_SEED: acting directly (N = 1), best-of-N by each sample's own value
draw, and best-of-N by the inpainted E[V | s, a] (k draws per candidate). With `--two-models`, as Cosmos
Policy deploys it: the model trained on the demos acts, and a copy fine-tuned `--finetune` steps on demos and
rollouts scores its candidates ("planned"). Lesson 07's separate world model + value function, on the same
data, is in results/full.json (`plan_bon_success`).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from datetime import date

import torch

ENV = "labkit/Detour-v0"


def planning_data(seed: int = 0) -> tuple[list[dict], list[dict], dict]:
    """Lesson 07's planning set-up on Detour: (the 200 demos as episodes, 100 rollouts of two weak policies
    trained with `seed`, the env interface the models run in)."""
    import labkit.world_models as W
    from labkit.data import DATASETS, load_dataset
    from labkit.policies import BCPolicy, FlowPolicy, fit

    data = load_dataset(DATASETS / "detour")
    weak = [fit(FlowPolicy.from_dataset(data), data, steps=100, seed=seed, progress=False),
            fit(BCPolicy.from_dataset(data), data, steps=400, seed=seed, progress=False)]
    rollouts = W.collect_episodes(weak[0], ENV, 50, seed=5000) + W.collect_episodes(weak[1], ENV, 50, seed=6000)
    return W.episodes_from_dataset(data), rollouts, weak[0].data_env


def two_checkpoints(demos: list[dict], rollouts: list[dict], env: dict, steps: int = 3000, finetune: int = 1500,
                    seed: int = 0):
    """Cosmos Policy's two checkpoints: (a joint model trained `steps` on the demos, which acts; a copy trained
    `finetune` steps more on demos + rollouts, whose values have seen failures, which scores)."""
    from labkit.policies import FlowPolicy, fit
    from labkit.world_models.joint import joint_dataset

    torch.manual_seed(seed)
    rows = joint_dataset(demos)
    actor = fit(FlowPolicy.from_dataset(rows, env=env), rows, steps=steps, seed=seed, progress=False)
    planning = fit(copy.deepcopy(actor), joint_dataset(demos + rollouts), steps=finetune, seed=seed + 1, progress=False)
    return actor, planning


def run(steps: int = 3000, seed: int = 0, n: int = 16, k: int = 8, episodes: int = 100, demos_only: bool = False,
        two_models: bool = False, finetune: int = 1500) -> dict:
    from labkit.data import EVAL_SEED
    from labkit.eval import evaluate, machine
    from labkit.policies import FlowPolicy, fit
    from labkit.world_models.joint import JointPlanner, joint_dataset

    t0 = time.perf_counter()
    demos, rollouts, env = planning_data(seed)
    planners = {"direct": dict(n=1), "sampled": dict(n=n), "inpainted": dict(n=n, value="inpainted", k=k)}
    if two_models:
        model, planning = two_checkpoints(demos, rollouts, env, steps, finetune, seed)
        planners["planned"] = dict(n=n, k=k, planning=planning)
    else:  # one model, acting and planning with itself
        torch.manual_seed(seed)
        rows = joint_dataset(demos if demos_only else demos + rollouts)
        model = fit(FlowPolicy.from_dataset(rows, env=env), rows, steps=steps, seed=seed, progress=False)
    train_minutes = (time.perf_counter() - t0) / 60
    action_dim = len(demos[0]["action"][0])
    out = {"steps": steps, "seed": seed, "n": n, "k": k, "episodes": episodes, "demos_only": demos_only,
           "two_models": two_models, "finetune": finetune if two_models else 0,
           "rollouts": 0 if demos_only else 100, "train_minutes": round(train_minutes, 2)}
    for name, kw in planners.items():
        planner = JointPlanner(model, action_dim, env=env, **kw)
        start = time.perf_counter()
        torch.manual_seed(seed)
        r = evaluate(planner, ENV, episodes=episodes, seed=EVAL_SEED, progress=False)
        out[name] = {"success": r.success_rate, "ci": list(r.interval), "crashes": r.mean_info("collision"),
                     "minutes": round((time.perf_counter() - start) / 60, 2)}
        print(name, out[name], flush=True)
    out.update(date=date.today().isoformat(), machine=machine(),
               command="python -m labkit.world_models.joint_study " + " ".join(
                   [f"--steps {steps} --seed {seed} --n {n} --k {k}"] + (["--demos-only"] if demos_only else [])
                   + ([f"--two-models --finetune {finetune}"] if two_models else [])))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m labkit.world_models.joint_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=16, help="candidates per decision")
    p.add_argument("--k", type=int, default=8, help="value draws per candidate (inpainted)")
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--demos-only", action="store_true", help="train on the 200 demos without the rollouts")
    p.add_argument("--two-models", action="store_true", help="act with the demos model, score with a fine-tuned copy")
    p.add_argument("--finetune", type=int, default=1500, help="steps of the planning copy on demos + rollouts")
    p.add_argument("--out", default=None, help="a JSON-lines file the result is appended to")
    a = p.parse_args(argv)
    if a.demos_only and a.two_models:
        p.error("--demos-only and --two-models exclude each other (the planning copy trains on the rollouts)")
    for name in ("steps", "n", "k", "episodes", "finetune"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(a, name)}")
    torch.set_num_threads(1)
    row = run(a.steps, a.seed, a.n, a.k, a.episodes, a.demos_only, a.two_models, a.finetune)
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
