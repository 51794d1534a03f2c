"""`labkit ...` command line: the main demo, dataset generation, training and evaluation.

    labkit demo                     train + evaluate a PushT policy from the shipped dataset
    labkit datasets                 regenerate the shipped datasets with the scripted experts
    labkit fit --config YAML        a policy (configs/) or an RL method (configs/rl/) through LightningCLI
    labkit eval CKPT ENV_ID         success with a Wilson interval (a policy's or an RL run's checkpoint)
    labkit minari export DATA ID    a labkit dataset (name or folder) as a Minari dataset (state only)
    labkit minari import ID FOLDER  a local Minari dataset as a labkit dataset folder

A config or checkpoint that cannot be used is one line on stderr (`labkit fit: error: ...`) and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from labkit.data.shipped import DATASETS, EVAL_SEED, ROOT, SHIPPED


def make_datasets(names=None, overwrite: bool = True) -> None:
    """Record the shipped datasets with the scripted experts and write each one's card."""
    import gymnasium as gym

    import labkit
    from labkit.data import load_dataset, record

    for name in names or SHIPPED:
        env_id, kwargs, episodes, seed = SHIPPED[name]
        start = time.perf_counter()
        env = gym.make(env_id, **kwargs)
        root = record(env, labkit.envs.expert(env), DATASETS / name, episodes=episodes, seed=seed,
                      env_kwargs=kwargs, task=env_id, overwrite=overwrite)
        minutes = (time.perf_counter() - start) / 60
        ds = load_dataset(root)
        _write_card(root, name, env_id, kwargs, episodes, seed, ds, minutes)
        print(f"{name}: {ds.num_episodes} episodes, {len(ds)} frames, expert success {ds.success_rate:.1%}, "
              f"{minutes:.1f} min")


def _write_card(root: Path, name, env_id, kwargs, episodes, seed, ds, minutes) -> None:
    size_kb = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 1024
    lengths = ds.episode_to - ds.episode_from
    features = ", ".join(f"`{k}` {list(v.shape[1:])}" for k, v in ds.frames.items()
                         if k.startswith(("observation", "action")))
    (root / "CARD.md").write_text(f"""# Dataset card: `{name}`

- Task: `{env_id}` with env kwargs `{json.dumps(kwargs)}`
- Made by: `labkit datasets` (`labkit.cli.make_datasets`): the task's scripted expert
  (`labkit.envs.expert`), recorded with `labkit.data.record`.
- Seeds: episode i uses `env.reset(seed={seed} + i)` and `expert.reset(seed={seed} + i)`, i = 0..{episodes - 1}.
  Lessons evaluate on seeds {EVAL_SEED} and up, disjoint from these.
- Size: {ds.num_episodes} episodes, {len(ds)} frames (episode length {lengths.min()}-{lengths.max()}, mean
  {lengths.mean():.0f}), {size_kb:.0f} KiB on disk, {ds.info.get('fps')} frames/s.
- Features: {features}.
- Expert success in these episodes: {ds.success_rate:.1%} ({int(round(ds.success_rate * ds.num_episodes))}
  of {ds.num_episodes}). Failed episodes are kept (`meta/episodes` has a `success` column to filter on).
- Recording took {minutes:.1f} minutes on a 2-core CPU.
- Layout: LeRobotDataset v3.0 (Parquet frames, JSON/Parquet metadata, stats; MP4 for cameras).
""")


def demo(steps: int = 5000, episodes: int = 100, out: Path = ROOT / "runs" / "demo") -> None:
    """The main job: lesson 02's PushT flow recipe (`configs/flow_pusht.yaml`) on its shipped dataset,
    for a shorter budget, evaluated and filmed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import yaml

    from labkit.data import load_dataset
    from labkit.eval import evaluate
    from labkit.policies import FlowPolicy, fit
    from labkit.viz import learning_curve, save_video

    recipe = yaml.safe_load((ROOT / "configs" / "flow_pusht.yaml").read_text())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ds = load_dataset(DATASETS / recipe["data"]["dataset"], env_id="labkit/PushT-v0")
    print(f"dataset: {ds.num_episodes} expert episodes, {len(ds)} frames, env {ds.info['labkit']['env_kwargs']}")
    policy = FlowPolicy.from_dataset(ds, **recipe["model"]["init_args"]["config"])
    fit(policy, ds, steps=steps, batch_size=recipe["data"]["batch_size"])
    train_min = (time.perf_counter() - start) / 60
    policy.save(out / "policy.ckpt")
    res = evaluate(policy, "labkit/PushT-v0", episodes=episodes, seed=EVAL_SEED, videos=3)
    save_video(res.videos[0], out / "rollout.mp4")
    fig, ax = plt.subplots(figsize=(5, 3))
    learning_curve(policy.losses(), ax, label="train loss")
    ax.set_yscale("log")
    ax.set_title("flow on PushT")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    lo, hi = res.interval
    total = (time.perf_counter() - start) / 60
    print(f"\nflow (chunk {policy.config.horizon}/{policy.config.n_action_steps}, {steps} steps) on labkit/PushT-v0: "
          f"success {res.success_rate:.0%} (95% CI {lo:.0%}-{hi:.0%}) over {res.episodes} episodes, "
          f"mean final coverage {res.mean_info('coverage'):.2f}")
    print(f"training {train_min:.1f} min, total {total:.1f} min; wrote {out}/rollout.mp4, loss.png, policy.ckpt")


def _fail(command: str, error) -> None:
    """A named error as one line on stderr, and exit status 2 (as for a bad argument)."""
    from labkit.fitting.cli import one_line

    print(f"labkit {command}: error: {one_line(error)}", file=sys.stderr)
    raise SystemExit(2)


def _load_for_eval(path: str):
    """The policy `labkit eval` rolls out: a policy checkpoint's, or an RL run's finetuned one. A missing,
    truncated or foreign file, or one that does not rebuild, is a ValueError or FileNotFoundError naming it."""
    from labkit.fitting.rl import agent_from_checkpoint
    from labkit.policies import policy_from_checkpoint
    from labkit.training import read_checkpoint

    ckpt = read_checkpoint(path)  # named errors, before anything else reads the file
    try:
        if "rl_training_state" in ckpt:  # an RL run's (labkit fit --config configs/rl/...)
            return agent_from_checkpoint(ckpt, path).eval_policy()
        return policy_from_checkpoint(ckpt, path)
    except (KeyError, TypeError, AttributeError, RuntimeError) as e:  # hyper_parameters or weights that don't fit
        raise ValueError(f"cannot rebuild a policy from {path}: {type(e).__name__}: {e}") from e


def main(argv=None) -> int:
    if (sys.argv[1:] if argv is None else list(argv))[:1] == ["fit"]:
        # LightningCLI parses its own arguments (--config, --trainer.*, --model.*); from the command
        # line it reads sys.argv itself.
        from labkit.fitting import main as fit_main
        from labkit.fitting.cli import ConfigError

        try:
            fit_main(None if argv is None else list(argv))
        except ConfigError as e:  # the config itself (a file, a field): found before anything was built
            _fail("fit", e)
        except (ValueError, FileNotFoundError, FloatingPointError) as e:
            # Named errors while building or training: one line from the command line; raised in Python.
            if argv is not None:
                raise
            _fail("fit", e)
        return 0
    p = argparse.ArgumentParser(prog="labkit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fit", help="train a policy or an RL method from a YAML config (configs/, configs/rl/) "
                               "through LightningCLI (labkit fit --help)")
    d = sub.add_parser("demo", help="train and evaluate a PushT policy from the shipped dataset")
    d.add_argument("--steps", type=int, default=5000)
    d.add_argument("--episodes", type=int, default=100)
    g = sub.add_parser("datasets", help="regenerate the shipped datasets")
    g.add_argument("names", nargs="*", help=f"any of {', '.join(SHIPPED)} (default: all)")
    e = sub.add_parser("eval", help="evaluate a checkpoint")
    e.add_argument("checkpoint")
    e.add_argument("env_id")
    e.add_argument("--episodes", type=int, default=100)
    e.add_argument("--seed", type=int, default=EVAL_SEED)
    r = sub.add_parser("grade", help="run a student notebook and score each exercise (Gradescope results.json)")
    r.add_argument("notebook")
    r.add_argument("--solution", help="its solution notebook (default: ../solutions/<same name>)")
    r.add_argument("--out", help="write Gradescope's results.json here")
    r.add_argument("--full", action="store_true", help="run with FAST=False (default: FAST=True)")
    r.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    m = sub.add_parser("minari", help="export to / import from Minari, the offline-RL format (pip install "
                                      "'labkit[minari]'; Minari's folder: $MINARI_DATASETS_PATH or ~/.minari/datasets)")
    mx = m.add_subparsers(dest="direction", required=True)
    x = mx.add_parser("export", help="a labkit dataset as a Minari dataset (state observations)")
    x.add_argument("dataset", help="a shipped dataset name or a dataset folder")
    x.add_argument("dataset_id", help="the Minari id, e.g. labkit/detour-v0")
    x.add_argument("--episodes", type=int, help="only the first N episodes")
    x.add_argument("--overwrite", action="store_true", help="replace a Minari dataset of that id")
    i = mx.add_parser("import", help="a local Minari dataset as a labkit dataset folder")
    i.add_argument("dataset_id")
    i.add_argument("out", help="the labkit dataset folder to write")
    i.add_argument("--fps", type=float, help="control rate (default: the env's render_fps)")
    i.add_argument("--overwrite", action="store_true", help="replace a non-empty folder")
    a = p.parse_args(argv)

    if a.cmd == "demo":
        demo(a.steps, a.episodes)
    elif a.cmd == "datasets":
        unknown = set(a.names) - set(SHIPPED)
        if unknown:
            p.error(f"unknown dataset(s) {sorted(unknown)}; choose from {', '.join(SHIPPED)}")
        make_datasets(a.names or None)
    elif a.cmd == "grade":
        from labkit.teach.grade import main as grade_main

        try:
            return grade_main(a.notebook, a.solution, a.out, a.full, a.timeout)
        except (FileNotFoundError, ValueError) as err:
            p.error(str(err))
    elif a.cmd == "minari":
        from labkit.data.minari import from_minari, to_minari

        try:
            if a.direction == "export":
                ds = to_minari(a.dataset, a.dataset_id, episodes=a.episodes, overwrite=a.overwrite)
                print(f"wrote Minari dataset {a.dataset_id}: {ds.total_episodes} episodes, {ds.total_steps} steps "
                      f"at {ds.storage.data_path.parent}")
            else:
                print(f"wrote labkit dataset {from_minari(a.dataset_id, a.out, fps=a.fps, overwrite=a.overwrite)}")
        except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
            _fail("minari", err)
    elif a.cmd == "eval":
        from labkit.eval import evaluate
        from labkit.fitting.rl import check_env_id

        try:
            check_env_id(a.env_id)
            policy = _load_for_eval(a.checkpoint)
            result = evaluate(policy, a.env_id, episodes=a.episodes, seed=a.seed)
        except (ValueError, FileNotFoundError) as e:
            _fail("eval", e)
        print(result.summary())
        for key in ("max_coverage", "coverage"):  # Diffusion Policy's metric, and the final coverage
            if all(key in i for i in result.final_info):
                print(f"mean {key.replace('_', ' ')}: {result.mean_info(key):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
