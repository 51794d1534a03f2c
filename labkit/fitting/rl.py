"""RL finetuning as a LightningModule, so that `labkit fit --config configs/rl/<name>.yaml` runs any
registered RL method (DSRL, ResFiT, EXPO, DPPO, RECAP, ...) through LightningCLI with the policies'
logs, checkpoints and resume.

    training step   one `agent.step()` (the agent contract, `labkit.rl.agent`): DSRL, ResFiT, EXPO one
                    agent step (a chunk or an env step) and then `utd` gradient updates; DPPO one PPO
                    iteration; RECAP one round (collect, fit the value, label, retrain the policy)
    epoch           `eval_every` training steps; a validation pass after each (and one before the first
                    step) runs `eval_episodes` seeded episodes of the current policy and logs
                    `eval/success` and `eval/return`
    checkpoint      the method's networks (registered here as submodules) and optimisers (handed to
                    Lightning), plus its replay buffer, counters and generator, so `--ckpt_path` resumes,
                    and the base policy itself, so the checkpoint alone rebuilds the agent;
                    `last.ckpt` and `best.ckpt` (highest eval/success)

The method's code runs unchanged (`agent.step()` is what `labkit.rl.train` loops over), so a run here
and one in a notebook are the same algorithm. RL runs in one CPU process: the agent steps its own
environments, and the networks are small.

    labkit fit --config configs/flow_peg.yaml         # the base policy first
    labkit fit --config configs/rl/dsrl_peg.yaml
    labkit eval runs/dsrl_peg/version_0/checkpoints/best.ckpt labkit/PegInsert-v0
"""

from __future__ import annotations

import inspect
import math
from collections import deque
from pathlib import Path

import lightning as L
import numpy as np
from torch import nn

from labkit.rl.agent import RL_EVAL_SEED, Agent
from labkit.training import read_checkpoint


def check_env_id(env_id) -> str:
    """`env_id` if it is a registered labkit task (`labkit/...` in gymnasium's registry), else a ValueError.
    A checkpoint's or a config's env id goes to `gym.make`, which imports whatever module an id names
    before a colon ("os:system"): only labkit's own tasks are made."""
    import gymnasium as gym

    import labkit.envs  # noqa: F401  (registers the tasks)

    known = sorted(k for k in gym.registry if k.startswith("labkit/"))
    if not isinstance(env_id, str) or env_id not in known:
        raise ValueError(f"env_id must be a registered labkit task ({', '.join(known)}), got {env_id!r}")
    return env_id


def config_class(agent_cls) -> type | None:
    """The config dataclass an Agent class takes (`DSRLConfig` for DSRL, ...), read from its `config`
    annotation; None when it names none."""
    import dataclasses
    import typing

    try:
        hint = typing.get_type_hints(agent_cls.__init__).get("config")
    except Exception:  # an annotation that does not resolve: no check
        return None
    for t in (*typing.get_args(hint), hint):
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            return t
    return None


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

    method      a registered method: dsrl | residual | expo | dppo | recap (`labkit.rl.Agent.registry`)
    policy      the base policy: a checkpoint, or a run folder (its newest last.ckpt); RECAP may start
                from `demos` alone (policy: null). `load_agent` passes the copy embedded in an RL
                checkpoint instead (a policy checkpoint's contents)
    env_id      the task to train and evaluate on
    config      the method's config fields (DSRLConfig, ResidualConfig, EXPOConfig, DPPOConfig, RECAPConfig)
    demos       a shipped dataset name or a folder. residual and expo: mixed into every batch (with none,
                set `offline_ratio: 0` in config); recap: its offline data
    """

    def __init__(self, method: str, env_id: str, policy: str | dict | None = None, config: dict | None = None,
                 demos: str | None = None, env_kwargs: dict | None = None, eval_every: int = 100,
                 eval_episodes: int = 20, eval_seed: int = RL_EVAL_SEED):
        super().__init__()
        import labkit.rl  # noqa: F401  (every method registers itself on import)
        from labkit.data.shipped import open_dataset
        from labkit.policies import load_policy, policy_from_checkpoint

        if not isinstance(method, str) or method not in Agent.registry:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(sorted(Agent.registry))}")
        check_env_id(env_id)
        if eval_every < 1 or eval_episodes < 0:
            raise ValueError(f"need eval_every >= 1 and eval_episodes >= 0, got {eval_every}, {eval_episodes}")
        cls = Agent.registry[method]
        if demos is not None and not cls.takes_demos:
            raise ValueError(f"{method} learns from its own rollouts only: remove `demos`")
        self.save_hyperparameters(ignore=["policy"] if isinstance(policy, dict) else None)
        self.base = None
        if isinstance(policy, dict):  # the base embedded in an RL checkpoint
            self.base = policy_from_checkpoint(policy, "the RL checkpoint's embedded base policy")
        elif policy is not None:
            checkpoint = resolve_checkpoint(policy)
            self.hparams.policy = str(checkpoint)  # the exact file, so a resumed run finds the same base
            self.base = load_policy(checkpoint)
        self.automatic_optimization = False  # each method steps its own optimisers
        data = open_dataset(demos) if demos is not None else None
        self.agent = cls.from_config(self.base, env_id, config, demos=data, env_kwargs=env_kwargs)
        # The agent's networks as submodules and its optimisers as Lightning's: both land in checkpoints.
        self.nets = nn.ModuleDict(self.agent.networks())
        self._returns: deque = deque(maxlen=20)  # the last episodes' training return and success
        self._successes: deque = deque(maxlen=20)

    # ---- Lightning's hooks ------------------------------------------------------------------------
    def configure_optimizers(self):
        return self.agent.optimizers()

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
        info = self.agent.step()
        for ret, success in info.pop("ended", ()):
            self._returns.append(float(ret))
            self._successes.append(float(success))
        metrics = {k: float(v) for k, v in {**info, **self.agent.counters()}.items()
                   if isinstance(v, (int, float, np.number)) and not math.isnan(float(v))}
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

        h = self.hparams
        # evaluate seeds torch on a forked RNG: every evaluation of a policy draws the same sampling noise,
        # and training draws the same numbers however often it is evaluated.
        result = self.agent.evaluate(h.eval_episodes, h.eval_seed)
        lo, hi = result.interval
        log({"eval/success": result.success_rate, "eval/return": float(result.returns.mean()),
             "eval/env_steps": float(self.agent.env_steps)})
        if not self.trainer.sanity_checking:
            print(f"[{h.method}] {self.agent.env_steps} env steps: success {result.success_rate:.0%} "
                  f"({lo:.0%}-{hi:.0%}) over {result.episodes} episodes")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rl_training_state"] = self.agent.training_state()
        if self.base is not None:  # the checkpoint alone rebuilds the agent, wherever the base file went
            checkpoint["base_policy"] = self.base.checkpoint()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Called before the weights and optimiser states are loaded into the same objects.
        self.agent.load_training_state(checkpoint["rl_training_state"])


def load_agent(path: str | Path):
    """The trained agent of an RL run's checkpoint (a file or a run folder), rebuilt from the checkpoint
    alone: its embedded base policy, networks and training state. `load_agent(ckpt).eval_policy()` is what
    `labkit eval` rolls out. (A checkpoint written before bases were embedded reads the base's file.)"""
    path = resolve_checkpoint(path)
    return agent_from_checkpoint(read_checkpoint(path), str(path))


def agent_from_checkpoint(ckpt: dict, source: str = "the checkpoint"):
    """`load_agent` on a checkpoint's contents (as `read_checkpoint` returns them). Its method must be a
    registered one and its env id a registered labkit task; a checkpoint that lacks what the agent is
    rebuilt from is a ValueError naming `source`."""
    if not isinstance(ckpt, dict) or "rl_training_state" not in ckpt:
        raise ValueError(f"{source} is not an RL run's checkpoint (labkit fit --config configs/rl/...)")
    hp = ckpt.get("hyper_parameters")
    if not isinstance(hp, dict) or not {"method", "env_id"} <= set(hp) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{source} is an incomplete RL checkpoint (its hyper_parameters need method and "
                         "env_id, and it needs a state_dict)")
    try:
        check_env_id(hp["env_id"])
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    # Only RLModule's own arguments (LightningCLI also stores its `_instantiator`).
    names = inspect.signature(RLModule.__init__).parameters
    hparams = {k: v for k, v in hp.items() if k in names}
    if "base_policy" in ckpt:
        hparams["policy"] = ckpt["base_policy"]
    module = RLModule(**hparams)
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"])
    return module.agent


def is_rl_checkpoint(path: str | Path) -> bool:
    """Whether a checkpoint was written by an RLModule (rather than by a policy). A missing, truncated or
    unsafe file is `read_checkpoint`'s named error (FileNotFoundError, ValueError)."""
    return "rl_training_state" in read_checkpoint(path)
