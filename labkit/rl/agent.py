"""The one agent contract every RL method implements, and the one driver that runs any of them.

    agent.step()                 one unit of the method's training: an off-policy agent step (one chunk
                                 or env step, then `utd` updates), a PPO iteration, a RECAP round.
                                 Returns its metrics (numbers) and, under "ended", the (return, success)
                                 of every training episode that ended in it
    agent.counters()             running totals (env_steps, updates, episodes, iteration, round, ...)
    agent.eval_policy()          the current policy as a runtime policy `labkit.eval.rollout` runs
    agent.training_state() / load_training_state(state)
                                 everything a resumed run needs beyond the networks and optimisers

`train(agent, ...)` (also `agent.train(...)`) is the loop in Python; `labkit.fitting.RLModule` runs
the same `step()` under Lightning, so a run in a notebook and one through `labkit fit` are the same
algorithm. Each method registers itself by its `method` name (the `model.method` of configs/rl/*.yaml).
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
from tqdm.auto import tqdm

RL_EVAL_SEED = 10_000  # training-time evaluations: disjoint from the recording seeds and from EVAL_SEED's lessons


class Agent(ABC):
    """An RL method finetuning a policy. Subclasses set `method` (their registration name), `env_id`,
    `env_kwargs` and `env_steps`, and implement the abstract methods below."""

    registry: ClassVar[dict[str, type[Agent]]] = {}
    method: ClassVar[str | None] = None  # e.g. "dsrl"; None for a shared base class
    takes_demos: ClassVar[bool] = False  # whether `labkit fit` passes it a demo dataset
    name: ClassVar[str] = "agent"  # the progress bar's label

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("method"):
            Agent.registry[cls.method] = cls

    @classmethod
    def from_config(cls, policy, env_id: str, config: dict | None, demos=None, env_kwargs: dict | None = None) -> Agent:
        """Build the agent from `labkit fit`'s fields: a base policy (or None), the task, its config, demos."""
        if policy is None:
            raise ValueError(f"{cls.method} finetunes a trained policy: set `policy` (a checkpoint or a run folder)")
        extra = {"demos": demos} if cls.takes_demos else {}
        return cls(policy, env_id, config, env_kwargs=env_kwargs, **extra)

    # ---- the contract -------------------------------------------------------------------------------
    @abstractmethod
    def step(self) -> dict:
        """One unit of training; returns its metrics and "ended": [(return, success), ...]."""

    @abstractmethod
    def counters(self) -> dict:
        """Running totals, at least {"env_steps": ...}."""

    @abstractmethod
    def eval_policy(self):
        """The current policy, as something `labkit.eval.evaluate` runs."""

    @abstractmethod
    def training_state(self) -> dict:
        """What a resumed run needs beyond the networks and optimisers (buffers, counters, generators)."""

    @abstractmethod
    def load_training_state(self, state: dict) -> None:
        """Continue from `training_state()`."""

    def default_budget(self) -> int | None:
        """The agent steps `train()` runs when given no budget (RECAP: config.rounds); None: a budget is needed."""
        return None

    # ---- what every method's constructor shares ------------------------------------------------------
    def configure(self, config, config_class: type, env_id: str, env_kwargs: dict | None = None):
        """Set `config` (a `config_class`, a dict of its fields, or None for its defaults), `env_id` and
        `env_kwargs` on the agent, with labkit's tasks registered; returns the config."""
        import labkit.envs  # noqa: F401, PLC0415  (registers the tasks)

        config = config_class(**config) if isinstance(config, dict) else (config or config_class())
        self.config, self.env_id, self.env_kwargs = config, env_id, dict(env_kwargs or {})
        return config

    def seed_torch(self, seed: int):
        """Seed torch's global RNG (the networks' initial weights) and keep `self.gen`, the agent's own
        generator for its sampling."""
        import torch  # noqa: PLC0415

        torch.manual_seed(seed)
        self.gen = torch.Generator().manual_seed(seed)
        return self.gen

    @staticmethod
    def require_demos(config, demos) -> None:
        """Refuse an offline share of every batch without demonstrations to fill it."""
        if config.offline_ratio > 0 and demos is None:
            raise ValueError("offline_ratio > 0 mixes demonstrations into every batch: pass demos=<EpisodeDataset>, "
                             "or set offline_ratio=0 to learn from online data only")

    def networks(self) -> dict:
        """The networks (and their optimisers: `optimizers()`) that a Lightning checkpoint holds; an agent
        that rebuilds its networks as it trains (RECAP) returns {} and keeps them in its training state."""
        from torch import nn

        return {k: v for k, v in vars(self).items() if isinstance(v, nn.Module)}

    def optimizers(self) -> list:
        import torch

        return [v for v in vars(self).values() if isinstance(v, torch.optim.Optimizer)]

    # ---- shared ---------------------------------------------------------------------------------------
    def evaluate(self, episodes: int = 50, seed: int = RL_EVAL_SEED, progress: bool = False):
        """Success rate (with its Wilson interval) of `eval_policy()` over seeded episodes."""
        from labkit.eval import evaluate

        return evaluate(self.eval_policy(), self.env_id, episodes, seed, env_kwargs=self.env_kwargs,
                        progress=progress)

    def train(self, env_steps: int | None = None, *, steps: int | None = None, eval_every: int | None = None,
              eval_episodes: int = 20, eval_seed: int = RL_EVAL_SEED, log_every: int | None = None,
              progress: bool = True) -> list[dict]:
        """`labkit.rl.train(self, ...)`: see there."""
        return train(self, env_steps, steps=steps, eval_every=eval_every, eval_episodes=eval_episodes,
                     eval_seed=eval_seed, log_every=log_every, progress=progress)


def train(agent: Agent, env_steps: int | None = None, *, steps: int | None = None, eval_every: int | None = None,
          eval_episodes: int = 20, eval_seed: int = RL_EVAL_SEED, log_every: int | None = None,
          progress: bool = True) -> list[dict]:
    """Run `agent.step()` until `env_steps` more env steps (or `steps` more agent steps) have run.

    `eval_every` and `log_every` count in the budget's unit (env steps, or agent steps). With
    `eval_every`, the current policy is evaluated (`eval_episodes` episodes from `eval_seed`) before the
    first step, whenever another `eval_every` units have run, and at the end. Returns
    the history: one row per evaluation (or per `log_every` units, or per step when neither is given)
    with the counters, the mean of each step metric since the previous row, the training episodes that
    ended since then (`train_return`, `train_success`, NaN if none; for agents that report them),
    `success` and `eval_return` where evaluated, and `seconds`.
    """
    if env_steps is None and steps is None:
        steps = agent.default_budget()
    if (env_steps is None) == (steps is None):
        raise ValueError("give exactly one budget: env_steps=... or steps=... (agent steps)")
    budget = env_steps if env_steps is not None else steps
    if budget < 1:
        raise ValueError(f"the budget must be >= 1, got {budget}")
    for name, every in (("eval_every", eval_every), ("log_every", log_every)):
        if every is not None and every < 1:
            raise ValueError(f"{name} must be >= 1 (or None), got {every}")
    if eval_every is not None and eval_episodes < 1:
        raise ValueError(f"eval_every needs eval_episodes >= 1, got {eval_episodes}")
    start_env, done_steps = agent.counters()["env_steps"], 0

    def used() -> int:
        return agent.counters()["env_steps"] - start_env if env_steps is not None else done_steps

    history: list[dict] = []
    pending: list[dict] = []
    ended: list[tuple[float, bool]] = []
    reports_episodes = False  # whether the agent's steps say which training episodes ended (RECAP's don't)
    t0 = time.perf_counter()

    def record(evaluate: bool) -> None:
        nonlocal t0
        keys = dict.fromkeys(k for r in pending for k in r)  # union, in first-seen order
        row = {**agent.counters(),
               **{k: float(np.nanmean([r[k] for r in pending if k in r])) for k in keys if k not in agent.counters()}}
        if reports_episodes:
            row.update(train_return=float(np.mean([r for r, _ in ended])) if ended else math.nan,
                       train_success=float(np.mean([s for _, s in ended])) if ended else math.nan)
        if evaluate:
            result = agent.evaluate(eval_episodes, eval_seed)
            row.update(success=result.success_rate, eval_return=float(result.returns.mean()))
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        pending.clear()
        ended.clear()
        t0 = time.perf_counter()

    if eval_every is not None:
        record(evaluate=True)  # the starting policy, for comparison
    next_eval = eval_every
    next_log = log_every if log_every is not None else (None if eval_every is not None else 1)
    bar = tqdm(total=budget, desc=agent.name, disable=not progress)
    while used() < budget:
        before = used()
        info = agent.step()
        done_steps += 1
        if "ended" in info:
            reports_episodes = True
            ended.extend(info.pop("ended"))
        pending.append({k: float(v) for k, v in info.items() if isinstance(v, (int, float, np.number))})
        bar.update(min(used(), budget) - min(before, budget))
        last = used() >= budget
        evaluate = eval_every is not None and (used() >= next_eval or last)
        if evaluate or last or (next_log is not None and used() >= next_log):
            record(evaluate)
            bar.set_postfix({k: f"{history[-1][k]:.3g}" for k in ("success", "train_success") if k in history[-1]})
        while next_eval is not None and used() >= next_eval:
            next_eval += eval_every
        while next_log is not None and used() >= next_log:
            next_log += log_every if log_every is not None else 1
    bar.close()
    return history


__all__ = ["Agent", "RL_EVAL_SEED", "train"]
