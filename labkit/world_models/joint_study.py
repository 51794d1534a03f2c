"""Cosmos-style planning against acting directly, on lesson 07's planning set-up (Detour):

    python -m labkit.world_models.joint_study --steps 3000 --out results/cosmos.json

Data: the 200 shipped demos plus 100 rollouts of two weak policies (lesson 07's: a flow policy after 100
steps, seeds 5000-5049, and an MSE-BC policy after 400, seeds 6000-6049), labelled by `joint_dataset`.
One flow model over [action, state change, value] rows is trained on them (training seed `--seed`) and
evaluated on 100 episodes from EVAL_SEED: acting directly (N = 1), best-of-N by each sample's own value
draw, and best-of-N by the inpainted E[V | s, a] (k draws per candidate). Lesson 07's separate world
model + value function, on the same data, is in results/full.json (`plan_bon_success`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date

import torch

ENV = "labkit/Detour-v0"


def run(steps: int = 3000, seed: int = 0, n: int = 16, k: int = 8, episodes: int = 100, demos_only: bool = False) -> dict:
    import labkit.world_models as W
    from labkit.data import DATASETS, EVAL_SEED, load_dataset
    from labkit.eval import evaluate, machine
    from labkit.policies import BCPolicy, FlowPolicy, fit
    from labkit.world_models.joint import JointPlanner, joint_dataset

    t0 = time.perf_counter()
    data = load_dataset(DATASETS / "detour")
    episodes_ = W.episodes_from_dataset(data)
    weak = [fit(FlowPolicy.from_dataset(data), data, steps=100, seed=seed, progress=False),
            fit(BCPolicy.from_dataset(data), data, steps=400, seed=seed, progress=False)]
    env = weak[0].data_env
    if not demos_only:
        episodes_ += W.collect_episodes(weak[0], ENV, 50, seed=5000) + W.collect_episodes(weak[1], ENV, 50, seed=6000)
    joint_data = joint_dataset(episodes_)
    torch.manual_seed(seed)
    model = fit(FlowPolicy.from_dataset(joint_data, env=env), joint_data, steps=steps, seed=seed, progress=False)
    train_minutes = (time.perf_counter() - t0) / 60
    action_dim = len(episodes_[0]["action"][0])
    out = {"steps": steps, "seed": seed, "n": n, "k": k, "episodes": episodes, "demos_only": demos_only,
           "rollouts": 0 if demos_only else 100, "train_minutes": round(train_minutes, 2)}
    for name, planner in (("direct", JointPlanner(model, action_dim, n=1, env=env)),
                          ("sampled", JointPlanner(model, action_dim, n=n, env=env)),
                          ("inpainted", JointPlanner(model, action_dim, n=n, env=env, value="inpainted", k=k))):
        start = time.perf_counter()
        torch.manual_seed(seed)
        r = evaluate(planner, ENV, episodes=episodes, seed=EVAL_SEED, progress=False)
        out[name] = {"success": r.success_rate, "ci": list(r.interval), "crashes": r.mean_info("collision"),
                     "minutes": round((time.perf_counter() - start) / 60, 2)}
        print(name, out[name], flush=True)
    out.update(date=date.today().isoformat(), machine=machine(),
               command="python -m labkit.world_models.joint_study " + " ".join(
                   [f"--steps {steps} --seed {seed} --n {n} --k {k}"] + (["--demos-only"] if demos_only else [])))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m labkit.world_models.joint_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=16, help="candidates per decision")
    p.add_argument("--k", type=int, default=8, help="value draws per candidate (inpainted)")
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--demos-only", action="store_true", help="train on the 200 demos without the rollouts")
    p.add_argument("--out", default=None, help="a JSON-lines file the result is appended to")
    a = p.parse_args(argv)
    for name in ("steps", "n", "k", "episodes"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(a, name)}")
    torch.set_num_threads(1)
    row = run(a.steps, a.seed, a.n, a.k, a.episodes, a.demos_only)
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
