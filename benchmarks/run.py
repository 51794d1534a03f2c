"""Speed measurements for labkit on this machine; writes benchmarks/results.json.

    python benchmarks/run.py [--quick] [--only envs [--state-only] [--tasks labkit/PushT-v0 ...]]

1. Env steps/s for each task against raw `mujoco.mj_step` on the same model, single env and
   vectorised (gymnasium SyncVectorEnv and AsyncVectorEnv with the spawn context), state and pixels.
   Raw and the single state env are measured in alternation, for a fraction of raw that holds up
   while other jobs share the machine.
2. BC training steps/s through labkit's Lightning path (`labkit.policies.fit`) against a plain
   PyTorch loop on the same model, batch and in-memory data, and a default Lightning Trainer fed
   by a torch DataLoader (the slow path labkit avoids).
3. Each policy and backbone (BC, diffusion and flow with the MLP and the 1-D U-Net): training steps/s,
   peak memory growth while training, and milliseconds per chunk for 1, 5, 10 and 20 sampling steps.
"""

from __future__ import annotations

# isort: off
import labkit  # noqa: F401  (first: picks the headless GL backend before mujoco is imported)
# isort: on

import argparse
import itertools
import json
import os
import platform
import time
from pathlib import Path

import gymnasium as gym
import mujoco
import torch

HERE = Path(__file__).resolve().parent
TASKS = ["labkit/Detour-v0", "labkit/PushT-v0", "labkit/PegInsert-v0"]


def _rate(fn, seconds: float) -> float:
    """Calls per second of fn over about `seconds` (after one warm-up call)."""
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - start)


def median_ms(fn, calls: int) -> float:
    """Median milliseconds of `calls` calls of fn (after one warm-up call)."""
    fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def _random_actions(space, n: int = 1000):
    """An endless cycle of n random actions, drawn beforehand: gymnasium's `Box.sample` costs ~15 us,
    a sixth of a PushT step, and it is the benchmark's cost, not the env's."""
    space.seed(0)
    return itertools.cycle([space.sample() for _ in range(n)])


def _raw_and_single(env_id: str, seconds: float, rounds: int = 5) -> tuple[float, float, float]:
    """Physics steps/s of bare `mj_step`, env steps/s of one state env, and the fraction of raw the
    env reaches, measured in alternation (`rounds` pairs of `seconds` each) so that both see the same
    machine load: medians over the rounds, the fraction the median of each round's own ratio (on a
    shared machine another job can halve both rates for a while; a round's ratio survives that).

    Raw calls `mj_step(model, data, nstep=frame_skip)` on the env's own model and data, as the env
    itself does, so the fraction is what the env adds on top of the physics."""
    env = gym.make(env_id, obs_mode="state")
    env.reset(seed=0)
    model, data, skip = env.unwrapped.model, env.unwrapped.data, env.unwrapped.frame_skip
    act = _random_actions(env.action_space)

    def step():
        if env.step(next(act))[2]:
            env.reset()

    raws, singles = [], []
    for _ in range(rounds):
        raws.append(_rate(lambda: mujoco.mj_step(model, data, nstep=skip), seconds) * skip)
        env.reset(seed=0)  # the raw loop moved the physics under the env
        singles.append(_rate(step, seconds))
    env.close()
    fractions = [s * skip / r for s, r in zip(singles, raws, strict=True)]
    return (sorted(raws)[rounds // 2], sorted(singles)[rounds // 2], sorted(fractions)[rounds // 2])


def bench_envs(seconds: float, tasks=None, state_only: bool = False) -> list[dict]:
    rows = []
    for env_id in tasks or TASKS:
        skip = gym.make(env_id).unwrapped.frame_skip
        raw, single, fraction = _raw_and_single(env_id, seconds / 2)
        rows.append({"task": env_id, "mode": "raw mj_step", "physics_steps_per_s": raw,
                     "env_steps_per_s": raw / skip})
        rows.append({"task": env_id, "mode": "single env, state", "env_steps_per_s": single,
                     "physics_steps_per_s": single * skip, "fraction_of_raw": fraction})

        for obs_mode in ("state",) if state_only else ("state", "pixels"):
            if obs_mode == "pixels":  # (the single state env was measured above, paired with raw)
                env = gym.make(env_id, obs_mode=obs_mode)
                env.reset(seed=0)
                act = _random_actions(env.action_space)

                def step(env=env, act=act):
                    if env.step(next(act))[2]:
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
                act = _random_actions(venv.action_space, 250)
                r = _rate(lambda venv=venv, act=act: venv.step(next(act)), seconds) * n
                venv.close()
                rows.append({"task": env_id, "mode": f"{kind} x{n}, {obs_mode}", "env_steps_per_s": r,
                             "physics_steps_per_s": r * skip, "fraction_of_raw": r * skip / raw})
        print(*[f"{row['task']:20s} {row['mode']:26s} {row['env_steps_per_s']:9.0f} env steps/s"
                + (f"  {row['fraction_of_raw']:.2f} of raw" if "fraction_of_raw" in row else "")
                for row in rows if row["task"] == env_id], sep="\n")
    return rows


def bench_training(steps: int) -> list[dict]:
    from labkit.data import load_dataset
    from labkit.policies import BCPolicy, fit
    from labkit.policies.train import window_tensors
    from labkit.training import RandomBatches, quiet_lightning

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


def bench_policies(steps: int = 100, calls: int = 30) -> list[dict]:
    """Per policy and backbone on the PushT state windows (batch 256): training steps/s through `fit`,
    peak resident memory growth while training, and the latency of one chunk (batch 1) for 1, 5, 10
    and 20 sampling steps (BC has no steps: one forward pass)."""
    import resource

    from labkit.data import load_dataset
    from labkit.policies import BCPolicy, DiffusionPolicy, FlowPolicy, fit

    ds = load_dataset(HERE.parent / "datasets" / "pusht")
    one = {"observation.state": torch.as_tensor(ds.windows(2, 16)["obs"]["observation.state"][:1])}
    rows = []
    for name, cls, cfg in [("BC", BCPolicy, {}), ("diffusion", DiffusionPolicy, {"backbone": "mlp"}),
                           ("flow", FlowPolicy, {"backbone": "mlp"}),
                           ("flow", FlowPolicy, {"backbone": "mlp", "activation": "silu"}),
                           ("diffusion", DiffusionPolicy, {"backbone": "unet"}),
                           ("flow", FlowPolicy, {"backbone": "unet"})]:
        policy = cls.from_dataset(ds, **cfg)
        params = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        n = steps if cfg.get("backbone") != "unet" else max(10, steps // 10)
        fit(policy, ds, steps=5, progress=False)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        fit(policy, ds, steps=n, progress=False)
        row = {"policy": name, "backbone": cfg.get("backbone", "mlp"), "activation": cfg.get("activation", "mish"),
               "params": params,
               "train_steps_per_s": n / (time.perf_counter() - start),
               "peak_rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}
        for k in ([1] if name == "BC" else [1, 5, 10, 20]):
            if name != "BC":
                policy.config.steps = k
            row[f"ms_per_chunk_k{k}"] = median_ms(lambda p=policy, o=one: p.predict_action_chunk(o), calls)
        rows.append(row)
        lat = ", ".join(f"K={k}: {v:.1f}" for k, v in ((c[14:], v) for c, v in row.items() if c.startswith("ms_per")))
        print(f"{name:9s} {row['backbone']:4s} {row['activation']:4s} {params / 1e6:5.2f}M params  {row['train_steps_per_s']:6.1f} steps/s  "
              f"ms/chunk {lat}  peak RSS +{row['peak_rss_growth_mb']:.0f} MB")
    return rows


def bench_rl(env_steps: int = 1000) -> list[dict]:
    """Per RL method on PegInsert-v0 (state): environment steps and gradient updates per second of
    `train` after warm-up, with the lesson 04/05 settings. (DSRL-NA is left out: with 10 distillation
    steps per update, each denoising a batch of 256 chunks, a run did not finish within ~20 minutes.) Bases are trained for 200 steps only:
    speed does not depend on how good they are. Evaluation is off (eval_episodes=0)."""
    import copy

    from labkit.data import load_dataset
    from labkit.policies import BCPolicy, FlowPolicy, fit
    from labkit.rl import DPPO, DSRL, EXPO, DPPOConfig, DSRLConfig, EXPOConfig, ResidualConfig, ResidualRL

    env = "labkit/PegInsert-v0"
    data = load_dataset(HERE.parent / "datasets" / "peg")
    chunking = dict(horizon=8, n_action_steps=4, obs_horizon=2)
    bc = fit(BCPolicy.from_dataset(data, **chunking), data, steps=200, progress=False)
    flow = fit(FlowPolicy.from_dataset(data, **chunking, steps=10), data, steps=200, progress=False)
    agents = {
        "ResFiT (residual TD3), UTD 2": lambda: ResidualRL(bc, env, ResidualConfig(warmup_steps=200, critic_warmup=100),
                                                           demos=data),
        "DSRL-SAC, UTD 4 per chunk": lambda: DSRL(copy.deepcopy(flow), env, DSRLConfig(utd=4, warmup_steps=200)),
        "EXPO N=M=4, batch 128, UTD 2": lambda: EXPO(copy.deepcopy(flow), env, EXPOConfig(
            n_samples=4, n_edits=4, batch_size=128, warmup_steps=200, critic_warmup=50), demos=data),
    }
    rows = []
    for name, make in agents.items():
        agent = make()
        agent.train(400, eval_episodes=0, progress=False)  # past the warm-up
        steps, updates, start = agent.env_steps, agent.updates, time.perf_counter()
        agent.train(env_steps, eval_episodes=0, progress=False)
        sec = time.perf_counter() - start
        rows.append({"method": name, "env_steps_per_s": (agent.env_steps - steps) / sec,
                     "updates_per_s": (agent.updates - updates) / sec})
    agent = DPPO(copy.deepcopy(flow), env, DPPOConfig(n_steps=15, clip_eps=0.05, clip_eps_base=0.01))
    start = time.perf_counter()
    hist = agent.train(iterations=max(1, env_steps // 480), progress=False)
    sec = time.perf_counter() - start
    rows.append({"method": "DPPO, 8 envs x 15 chunks, 5 epochs", "env_steps_per_s": agent.env_steps / sec,
                 "updates_per_s": sum(h.get("updates", 0) for h in hist) / sec})
    for r in rows:
        print(f"{r['method']:38s} {r['env_steps_per_s']:7.1f} env steps/s  {r['updates_per_s']:7.1f} updates/s")
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="shorter timings (for a smoke run); writes nothing")
    p.add_argument("--only", choices=["envs", "training", "policies", "rl"], action="append",
                   help="run only these parts and update them in results.json (repeatable)")
    p.add_argument("--tasks", nargs="+", choices=TASKS, help="envs part: only these tasks")
    p.add_argument("--state-only", action="store_true",
                   help="envs part: raw, single and vectorised state envs only (no pixels)")
    a = p.parse_args()
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch": torch.__version__, "mujoco": mujoco.__version__, "torch_threads": torch.get_num_threads()}
    print(machine)
    parts = {"envs": lambda: bench_envs(0.5 if a.quick else 2.0, a.tasks, a.state_only),
             "bc_training": lambda: bench_training(50 if a.quick else 500),
             "policies": lambda: bench_policies(20 if a.quick else 200),
             "rl": lambda: bench_rl(200 if a.quick else 1000)}
    only = {"training": "bc_training"}
    chosen = [only.get(o, o) for o in a.only] if a.only else list(parts)
    path = HERE / "results.json"
    results = json.loads(path.read_text()) if path.exists() and a.only else {}
    results["machine"] = machine
    results.update({name: parts[name]() for name in chosen})
    if not a.quick:
        path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
