"""Seed studies: one RL method, one training seed, from one of lessons 04-05's bases, evaluated on 100
episodes from EVAL_SEED and appended as one row to results/rl_seeds.jsonl (the table lesson 15 reads).

    python -m labkit.rl.study rlt --seed 1 --config '{"beta": 0.0}'
    python -m labkit.rl.study dppo --seed 2 --env-steps 47000
    python -m labkit.rl.study expo-detour --seed 0        # a method in its regime: Detour

Bases (lesson 04's recipe: the 75 successful peg demos, chunks of 8 with 4 executed, 2 observations,
3,000 steps), trained once per (kind, seed) and kept under runs/study/:
    bc           BCPolicy, training seed 0 (lesson 04's; RLT and ResFiT start here)
    flow         FlowPolicy, 10 Euler steps, training seed 0 (lesson 04's; QAM and OGPO)
    flow-seeded  the flow recipe trained with the run's own seed (lesson 05: each DPPO seed has its own base)
    flow-detour  lesson 02's Detour flow (chunks of 16 with 8 executed, 2 observations, all 200 demos),
                 stopped at 500 steps, training seed 0: a base whose samples hold both the good and the
                 colliding behaviour, the regime where choosing among them (DSRL, EXPO) can help
One torch thread, as every timing in the README; minutes are wall-clock on whatever else shares the machine.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

ENV, DETOUR = "labkit/PegInsert-v0", "labkit/Detour-v0"
ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results" / "rl_seeds.jsonl"
BASES = ("bc", "flow", "flow-seeded", "flow-detour")

# study name -> (base, demos the agent gets: "all" episodes or the successful "wins" of the base's dataset,
# default env steps, config); the agent is the registered method before any "-detour"
METHODS = {
    "rlt": ("bc", "all", 10_000, {}),
    "residual": ("bc", "all", 10_000, {}),
    "qam": ("flow", "all", 8_000, {"inv_temp": 100.0, "batch_size": 128, "warmup_steps": 1000, "critic_warmup": 500}),
    "ogpo": ("flow", "wins", 10_000, {}),
    "dppo": ("flow-seeded", None, 47_000, {"num_envs": 8, "n_steps": 15, "clip_eps": 0.05, "clip_eps_base": 0.01,
                                           "actor_lr": 3e-5}),
    # lesson 04's null results on PegInsert (the base's samples do not hold the fix), the contrast to Detour
    "dsrl": ("flow", None, 3_000, {"utd": 4, "init_temperature": 0.01, "warmup_steps": 750}),
    "expo": ("flow", "all", 1_500, {"n_samples": 4, "n_edits": 4, "batch_size": 128}),
    "dsrl-detour": ("flow-detour", None, 4_000, {"utd": 4, "init_temperature": 0.01, "warmup_steps": 1000}),
    "expo-detour": ("flow-detour", "all", 4_000, {"n_samples": 4, "n_edits": 4, "batch_size": 128}),
}
NAMES = {"rlt": "RLT", "residual": "ResFiT", "qam": "QAM", "ogpo": "OGPO", "dppo": "DPPO", "dsrl": "DSRL", "expo": "EXPO"}


def task(base: str) -> str:
    return DETOUR if base.endswith("detour") else ENV


def demo_data(base: str, which: str):
    """The base's dataset (peg, or detour), all of it or its successful episodes."""
    from labkit.data import DATASETS, load_dataset

    data = load_dataset(DATASETS / ("detour" if base.endswith("detour") else "peg"))
    return data if which == "all" else data.select(np.flatnonzero(np.asarray(data.episodes["success"], bool)).tolist())


def base_policy(kind: str, seed: int, folder: Path = ROOT / "runs" / "study") -> tuple[object, dict]:
    """(the base policy, {"success", "ci", "episodes"}): trained and evaluated once, then read back."""
    from labkit.data import EVAL_SEED
    from labkit.eval import evaluate
    from labkit.policies import BCPolicy, FlowPolicy, fit, load_policy

    if kind not in BASES:
        raise ValueError(f"unknown base {kind!r}: one of {BASES}")
    train_seed = seed if kind == "flow-seeded" else 0
    path = folder / f"{kind.replace('-seeded', '')}_s{train_seed}.ckpt"
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        return load_policy(path), json.loads(meta_path.read_text())
    torch.manual_seed(train_seed)
    if kind == "flow-detour":
        demos = demo_data(kind, "all")
        policy = fit(FlowPolicy.from_dataset(demos, horizon=16, n_action_steps=8, obs_horizon=2, steps=10), demos,
                     steps=500, seed=train_seed, progress=False)
    else:
        demos = demo_data(kind, "wins")
        cls, kw = (BCPolicy, {}) if kind == "bc" else (FlowPolicy, {"steps": 10})
        policy = fit(cls.from_dataset(demos, horizon=8, n_action_steps=4, obs_horizon=2, **kw), demos, steps=3000,
                     seed=train_seed, progress=False)
    r = evaluate(policy, task(kind), episodes=100, seed=EVAL_SEED, progress=False)
    folder.mkdir(parents=True, exist_ok=True)
    policy.save(path)
    meta = {"success": r.success_rate, "ci": list(r.interval), "episodes": r.episodes, "train_seed": train_seed}
    meta_path.write_text(json.dumps(meta))
    return policy, meta


def run(method: str, seed: int, env_steps: int | None = None, config: dict | None = None, label: str | None = None,
        out: Path | None = RESULTS, episodes: int = 100) -> dict:
    """Train `method` from its base with training seed `seed`; return (and append to `out`) the row."""
    import labkit.envs  # noqa: F401  (registers the tasks)
    from labkit.data import EVAL_SEED
    from labkit.eval import evaluate, machine
    from labkit.rl.agent import Agent

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: one of {sorted(METHODS)}")
    base_kind, demos_kind, default_steps, defaults = METHODS[method]
    env_steps = env_steps or default_steps
    if env_steps < 1:
        raise ValueError(f"env_steps must be >= 1, got {env_steps}")
    cfg = {**defaults, **(config or {}), "seed": seed}
    base, base_meta = base_policy(base_kind, seed)
    t0 = time.perf_counter()
    env_id, agent_method = task(base_kind), method.split("-")[0]
    agent = Agent.registry[agent_method].from_config(base, env_id, cfg,
                                                     demos=demo_data(base_kind, demos_kind) if demos_kind else None)
    agent.train(env_steps=env_steps, progress=False)
    minutes = (time.perf_counter() - t0) / 60
    r = evaluate(agent.eval_policy(), env_id, episodes=episodes, seed=EVAL_SEED, progress=False)
    extra = dict(config or {})
    row = {
        "label": label or f"{NAMES[agent_method]} ({base_kind} base)" + (f" {json.dumps(extra)}" if extra else ""),
        "method": method, "task": env_id, "base": base_kind, "base_success": base_meta["success"], "base_ci": base_meta["ci"],
        "seed": seed, "env_steps": int(agent.counters()["env_steps"]), "config": cfg,
        "success": r.success_rate, "ci": list(r.interval), "episodes": r.episodes,
        "steps_to_success": float(r.lengths[r.success].mean()) if r.success.any() else None,
        "train_minutes": round(minutes, 2), "date": date.today().isoformat(), "machine": machine(),
        "command": "python -m labkit.rl.study " + shlex.join(
            [method, "--seed", str(seed), "--env-steps", str(env_steps)] + (["--config", json.dumps(extra)] if extra else [])
            + (["--label", label] if label else [])),
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def table(path: Path = RESULTS) -> str:
    """The rows of `path` as the README's markdown table: one line per label, each seed with its interval,
    the mean and spread of the seeds, and in how many seeds the interval lies above the base's interval."""
    def span(lo, hi):
        return f"{100 * lo:.0f}-{hi:.0%}"

    groups: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            groups.setdefault(r["label"], []).append(r)
    out = ["| Method (base) | Task | Env steps | Base (95% CI) | Per training seed: success (95% CI) | Mean (min-max) "
           "| Clear of the base's interval | Minutes per seed |", "|---|---|---:|---:|---|---:|---:|---:|"]
    for label, rows in groups.items():
        rows.sort(key=lambda r: r["seed"])
        rates = [r["success"] for r in rows]
        bases = sorted({(r["base_success"], tuple(r["base_ci"])) for r in rows})
        base = "; ".join(f"{b:.0%} ({span(lo, hi)})" for b, (lo, hi) in bases)
        seeds = ", ".join(f"s{r['seed']} {r['success']:.0%} ({span(*r['ci'])})" for r in rows)
        above = sum(r["ci"][0] > r["base_ci"][1] for r in rows)  # the seed's interval clear of the base's
        minutes = [r["train_minutes"] for r in rows]
        out.append(f"| {label} | {rows[0].get('task', ENV).split('/')[-1]} | {rows[0]['env_steps']:,} | {base} | {seeds} "
                   f"| {np.mean(rates):.0%} ({span(min(rates), max(rates))}) | {above} of {len(rows)} "
                   f"| {min(minutes):.1f}-{max(minutes):.1f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m labkit.rl.study", description=__doc__.split("\n\n")[0])
    p.add_argument("method", nargs="?", choices=sorted(METHODS))
    p.add_argument("--table", action="store_true", help="print the rows of --out as the README's table, train nothing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--env-steps", type=int, default=None, help="default: the method's budget in the README table")
    p.add_argument("--config", default="{}", help="JSON: the method's config fields over the defaults")
    p.add_argument("--label", default=None)
    p.add_argument("--out", default=str(RESULTS), help="the JSON-lines file a row is appended to")
    a = p.parse_args(argv)
    if a.table:
        print(table(Path(a.out)))
        return 0
    if a.method is None:
        p.error("name a method (or --table)")
    try:
        config = json.loads(a.config)
    except json.JSONDecodeError as e:
        p.error(f"--config is not JSON: {e}")
    if not isinstance(config, dict):
        p.error(f"--config must be a JSON object, got {a.config}")
    torch.set_num_threads(1)
    row = run(a.method, a.seed, a.env_steps, config, a.label, Path(a.out))
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
