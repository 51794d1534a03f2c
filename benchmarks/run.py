"""Speed measurements for labkit on this machine; writes benchmarks/results.json.

    python benchmarks/run.py [--quick]

1. Env steps/s for each task against raw `mujoco.mj_step` on the same model, single env and
   vectorised (gymnasium SyncVectorEnv and AsyncVectorEnv with the spawn context), state and pixels.
2. BC training steps/s through labkit's Lightning path (`labkit.policies.fit`) against a plain
   PyTorch loop on the same model, batch and in-memory data, and a default Lightning Trainer fed
   by a torch DataLoader (the slow path labkit avoids).
"""

from __future__ import annotations

# isort: off
import labkit  # noqa: F401  (first: picks the headless GL backend before mujoco is imported)
# isort: on

import argparse
import json
import os
import platform
import time
from pathlib import Path

import gymnasium as gym
import mujoco
import torch

HERE = Path(__file__).resolve().parent
TASKS = ["labkit/Detour-v0", "labkit/PushT-v0"]


def _rate(fn, seconds: float) -> float:
    """Calls per second of fn over about `seconds` (after one warm-up call)."""
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - start)


def bench_envs(seconds: float) -> list[dict]:
    rows = []
    for env_id in TASKS:
        env = gym.make(env_id)
        env.reset(seed=0)
        model, data = env.unwrapped.model, env.unwrapped.data
        skip = env.unwrapped.frame_skip
        raw = _rate(lambda model=model, data=data: mujoco.mj_step(model, data), seconds)
        rows.append({"task": env_id, "mode": "raw mj_step", "physics_steps_per_s": raw, "env_steps_per_s": raw / skip})

        for obs_mode in ("state", "pixels"):
            env = gym.make(env_id, obs_mode=obs_mode)
            env.reset(seed=0)
            act = env.action_space.sample

            def step(env=env, act=act):
                if env.step(act())[2]:
                    env.reset()

            r = _rate(step, seconds)
            rows.append({"task": env_id, "mode": f"single env, {obs_mode}", "env_steps_per_s": r,
                         "physics_steps_per_s": r * skip, "fraction_of_raw": r * skip / raw})
            # Async workers with pixels failed to create an EGL context in the spawned process here;
            # measured for state only (see benchmarks/README.md).
            for kind, n in (("sync", 4), ("async-spawn", 2)) if obs_mode == "state" else (("sync", 4),):
                fns = [lambda obs_mode=obs_mode, env_id=env_id: gym.make(env_id, obs_mode=obs_mode) for _ in range(n)]
                venv = (gym.vector.SyncVectorEnv(fns) if kind == "sync"
                        else gym.vector.AsyncVectorEnv(fns, context="spawn"))
                venv.reset(seed=0)
                r = _rate(lambda venv=venv: venv.step(venv.action_space.sample()), seconds) * n
                venv.close()
                rows.append({"task": env_id, "mode": f"{kind} x{n}, {obs_mode}", "env_steps_per_s": r,
                             "physics_steps_per_s": r * skip, "fraction_of_raw": r * skip / raw})
        print(*[f"{row['task']:18s} {row['mode']:26s} {row['env_steps_per_s']:9.0f} env steps/s"
                for row in rows if row["task"] == env_id], sep="\n")
    return rows


def bench_training(steps: int) -> list[dict]:
    from labkit.data import load_dataset
    from labkit.policies import BCPolicy, fit
    from labkit.policies.train import RandomBatches, quiet_lightning, window_tensors

    quiet_lightning()
    ds = load_dataset(HERE.parent / "datasets" / "pusht")
    rows = []
    batch = 256

    # Plain PyTorch: the same policy object, its loss, the same in-memory batches, no Lightning.
    policy = BCPolicy.from_dataset(ds)
    tensors = window_tensors(policy, ds)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    batches = iter(RandomBatches(tensors, batch, steps + 10))

    def plain_step():
        b = next(batches)
        loss = policy.loss(policy.normalize_obs(b["obs"]), policy.normalizer.normalize("action", b["action"]),
                           b["action_is_pad"])
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(10):
        plain_step()
    start = time.perf_counter()
    for _ in range(steps):
        plain_step()
    plain = steps / (time.perf_counter() - start)
    rows.append({"path": "plain PyTorch loop", "steps_per_s": plain})

    # labkit's path: Lightning Trainer over in-memory random batches (progress bar off while timing).
    policy = BCPolicy.from_dataset(ds)
    fit(policy, ds, steps=10, progress=False)
    start = time.perf_counter()
    fit(policy, ds, steps=steps, progress=False)
    rows.append({"path": "labkit.policies.fit (Lightning)", "steps_per_s": steps / (time.perf_counter() - start)})

    # A default Trainer with a DataLoader over a TensorDataset: what a first attempt usually looks like.
    import lightning as L
    from torch.utils.data import DataLoader, Dataset

    class Windows(Dataset):
        def __len__(self):
            return len(tensors["action"])

        def __getitem__(self, i):
            return {"obs": {k: v[i] for k, v in tensors["obs"].items()}, "action": tensors["action"][i],
                    "action_is_pad": tensors["action_is_pad"][i]}

    policy = BCPolicy.from_dataset(ds)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    start = time.perf_counter()
    trainer.fit(policy, DataLoader(Windows(), batch_size=batch, shuffle=True))
    rows.append({"path": "default Trainer + DataLoader", "steps_per_s": steps / (time.perf_counter() - start)})
    for r in rows:
        r["fraction_of_plain"] = r["steps_per_s"] / plain
        print(f"{r['path']:34s} {r['steps_per_s']:7.1f} steps/s  ({r['fraction_of_plain']:.2f} of plain)")
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="shorter timings (for a smoke run)")
    a = p.parse_args()
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch": torch.__version__, "mujoco": mujoco.__version__, "torch_threads": torch.get_num_threads()}
    print(machine)
    results = {"machine": machine, "envs": bench_envs(0.5 if a.quick else 3.0),
               "bc_training": bench_training(50 if a.quick else 500)}
    if not a.quick:
        (HERE / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
