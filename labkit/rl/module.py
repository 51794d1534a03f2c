"""RL finetuning as a LightningModule, so that `labkit fit --config configs/rl/<name>.yaml` runs DSRL,
ResFiT, EXPO, DPPO and RECAP through LightningCLI with the policies' logs, checkpoints and resume.

    training step   one step of the method's own loop: DSRL, ResFiT, EXPO one agent step (a chunk or
                    an env step) and then `utd` gradient updates; DPPO one PPO iteration; RECAP one
                    round (collect, fit the value, label, retrain the policy)
    epoch           `eval_every` training steps; a validation pass after each (and one before the first
                    step) runs `eval_episodes` seeded episodes of the current policy and logs
                    `eval/success` and `eval/return`
    checkpoint      the method's networks (registered here as submodules) and optimisers (handed to
                    Lightning), plus its replay buffer, counters and generator, so `--ckpt_path` resumes;
                    `last.ckpt` and `best.ckpt` (highest eval/success)

The method's code runs unchanged (`agent.step()` / `iterate()` is what `agent.train()` loops over), so
a run here and one in a notebook are the same algorithm. RL runs in one CPU process: the agent steps its own
environments, and the networks are small.

    labkit fit --config configs/flow_peg.yaml         # the base policy first
    labkit fit --config configs/rl/dsrl_peg.yaml
    labkit eval runs/dsrl_peg/version_0/checkpoints/best.ckpt labkit/PegInsert-v0
"""

from __future__ import annotations

import math
from collections import deque
from importlib import import_module
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn

# `method` in a config -> the class that implements it, and whether it takes a demo dataset.
METHODS = {
    "dsrl": ("labkit.rl.dsrl:DSRL", False),
    "residual": ("labkit.rl.residual:ResidualRL", True),
    "expo": ("labkit.rl.expo:EXPO", True),
    "dppo": ("labkit.rl.dppo:DPPO", False),
    "recap": ("labkit.rl.recap:RECAP", True),
}


ONE_PROCESS = ("RL methods train in one CPU process (the agent steps its own environments): "
               "use --trainer.accelerator cpu --trainer.devices 1")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder (`runs/flow_peg`, or one of its `version_k`): the newest
    version's `checkpoints/last.ckpt`."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / "checkpoints" / "last.ckpt").is_file():
        return path / "checkpoints" / "last.ckpt"
    versions = sorted((p for p in path.glob("version_*") if p.name[8:].isdigit() and
                       (p / "checkpoints" / "last.ckpt").is_file()), key=lambda p: int(p.name[8:]))
    if versions:
        return versions[-1] / "checkpoints" / "last.ckpt"
    raise FileNotFoundError(f"no policy checkpoint at {path} (a .ckpt file, or a run folder with "
                            "version_*/checkpoints/last.ckpt: train the base first, e.g. "
                            "`labkit fit --config configs/flow_peg.yaml`)")


class RLModule(L.LightningModule):
    """One RL method finetuning a trained labkit policy, as a LightningModule.

    method      dsrl | residual | expo | dppo | recap
    policy      the base policy: a checkpoint, or a run folder (its newest last.ckpt); RECAP may start
                from `demos` alone (policy: null)
    env_id      the task to train and evaluate on
    config      the method's config fields (DSRLConfig, ResidualConfig, EXPOConfig, DPPOConfig, RECAPConfig)
    demos       a shipped dataset name or a folder. residual and expo: mixed into every batch (with none,
                set `offline_ratio: 0` in config); recap: its offline data
    """

    def __init__(self, method: str, env_id: str, policy: str | None = None, config: dict | None = None,
                 demos: str | None = None, env_kwargs: dict | None = None, eval_every: int = 100,
                 eval_episodes: int = 20, eval_seed: int = 10_000):
        super().__init__()
        from labkit import load_policy

        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        if eval_every < 1 or eval_episodes < 0:
            raise ValueError(f"need eval_every >= 1 and eval_episodes >= 0, got {eval_every}, {eval_episodes}")
        target, takes_demos = METHODS[method]
        if demos is not None and not takes_demos:
            raise ValueError(f"{method} learns from its own rollouts only: remove `demos`")
        if policy is None and not (method == "recap" and demos is not None):
            raise ValueError(f"{method} finetunes a trained policy: set `policy` (a checkpoint or a run folder)")
        self.save_hyperparameters()
        base = None
        if policy is not None:
            checkpoint = resolve_checkpoint(policy)
            self.hparams.policy = str(checkpoint)  # the exact file, so a resumed or reloaded run finds the same base
            base = load_policy(checkpoint)
        self.automatic_optimization = False  # each method steps its own optimisers

        from labkit.data.shipped import open_dataset

        data = open_dataset(demos) if demos is not None else None
        module, name = target.split(":")
        cls = getattr(import_module(module), name)
        if method == "recap":  # from a trained flow policy (with prior data) or from the data alone
            self.agent = cls(base if base is not None else data, env_id, config,
                             dataset=data if base is not None else None, env_kwargs=env_kwargs)
        else:
            self.agent = cls(base, env_id, config, env_kwargs=env_kwargs, **({"demos": data} if takes_demos else {}))
        # The agent's networks as submodules and its optimisers as Lightning's: both land in checkpoints.
        # RECAP rebuilds its networks every round and carries them in its training state instead.
        self.nets = nn.ModuleDict({k: v for k, v in vars(self.agent).items()
                                   if isinstance(v, nn.Module) and method != "recap"})
        self._returns: deque = deque(maxlen=20)  # the last episodes' training return and success
        self._successes: deque = deque(maxlen=20)
        self._since = 0  # agent log entries already reported

    # ---- Lightning's hooks ------------------------------------------------------------------------
    def configure_optimizers(self):
        return [v for v in vars(self.agent).values() if isinstance(v, torch.optim.Optimizer)]

    def setup(self, stage: str) -> None:
        trainer, every = self.trainer, self.hparams.eval_every
        if trainer.num_devices != 1 or trainer.num_nodes != 1 or type(trainer.accelerator).__name__ != "CPUAccelerator":
            raise ValueError(ONE_PROCESS)
        if trainer.max_steps > 0 and trainer.max_steps % every:
            raise ValueError(f"trainer.max_steps ({trainer.max_steps}) must be a multiple of model.eval_every "
                             f"({every}), so that the run ends with an evaluation and a checkpoint")

    def on_train_start(self) -> None:
        # The method's starting policy, for comparison (RECAP built from data has none before its first round).
        if self.global_step == 0 and self.hparams.eval_episodes and getattr(self.agent, "trained", True):
            self._evaluate(lambda metrics: [lg.log_metrics(metrics, step=0) for lg in self.loggers])

    def train_dataloader(self):
        return range(self.hparams.eval_every)  # the batch is only a step counter: the agent makes its own data

    def val_dataloader(self):
        return range(1 if self.hparams.eval_episodes else 0)

    def training_step(self, batch, batch_idx):
        agent = self.agent
        if self.hparams.method == "dppo":
            row = agent.iterate()
            if not math.isnan(row["train_success"]):
                self._successes.append(row["train_success"])
                self._returns.append(row["train_return"])
            metrics = {k: v for k, v in row.items() if k not in ("iteration", "train_success", "train_return")}
        elif self.hparams.method == "recap":
            row = agent.step()
            metrics = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not math.isnan(v)}
        else:
            info = agent.step()
            if info["episode_done"]:
                self._returns.append(info["episode_return"])
                self._successes.append(float(info["episode_success"]))
            logs, self._since = agent.log[self._since:], len(agent.log)
            metrics = {k: float(np.mean([r[k] for r in logs if k in r])) for k in dict.fromkeys(k for r in logs for k in r)}
            metrics.update(env_steps=agent.env_steps, updates=agent.updates, episodes=agent.episodes)
        if self._returns:
            metrics.update(train_success=float(np.mean(self._successes)), train_return=float(np.mean(self._returns)))
        self.log_dict({f"train/{k}": float(v) for k, v in metrics.items()}, on_step=True, batch_size=1)
        # Lightning counts a manual-optimisation step per optimiser step, which the method makes itself
        # (none during warm-up, dozens per chunk after it). Count agent steps instead, so that max_steps,
        # checkpoint and log intervals mean agent steps.
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()

    def validation_step(self, batch, batch_idx):
        self._evaluate(lambda metrics: self.log_dict(metrics, batch_size=1))

    def _evaluate(self, log) -> None:
        """Seeded evaluation episodes of the current policy: logged with `log`, and printed."""
        from labkit.eval import evaluate

        h = self.hparams
        # evaluate seeds torch on a forked RNG: every evaluation of a policy draws the same sampling noise,
        # and training draws the same numbers however often it is evaluated.
        result = evaluate(self.agent.eval_policy(), h.env_id, h.eval_episodes, h.eval_seed,
                          env_kwargs=h.env_kwargs, progress=False)
        lo, hi = result.interval
        log({"eval/success": result.success_rate, "eval/return": float(result.returns.mean()),
             "eval/env_steps": float(self.agent.env_steps)})
        if not self.trainer.sanity_checking:
            print(f"[{h.method}] {self.agent.env_steps} env steps: success {result.success_rate:.0%} "
                  f"({lo:.0%}-{hi:.0%}) over {result.episodes} episodes")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rl_training_state"] = self.agent.training_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Called before the weights and optimiser states are loaded into the same objects.
        self.agent.load_training_state(checkpoint["rl_training_state"])
        self._since = len(getattr(self.agent, "log", ()))  # DPPO keeps no per-update log


def load_agent(path: str | Path):
    """The trained agent of an RL run's checkpoint (its base policy must still be where the run found it);
    `load_agent(ckpt).eval_policy()` is what `labkit eval` rolls out."""
    return RLModule.load_from_checkpoint(resolve_checkpoint(path), map_location="cpu").agent


def is_rl_checkpoint(path: str | Path) -> bool:
    """Whether a checkpoint was written by an RLModule (rather than by a policy)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return isinstance(ckpt, dict) and "rl_training_state" in ckpt
