"""Evaluation: roll a policy out over seeded episodes and report success with its uncertainty.

Every number a notebook or the README reports comes from `evaluate`, with the episode count beside
it. Episode i starts from `reset(seed=seed + i)`, so two policies evaluated with the same seed meet
the same initial states. `rollout` is the one engine under evaluate and every other caller that rolls
a policy out (path plots, world-model and RL data collection). Envs are stepped in lockstep in one
process and the policy is called once per step on the whole batch: on 2 cores that beats worker
processes for MuJoCo state envs.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

from labkit.data.shipped import EVAL_SEED


def machine() -> str:
    """A short description of this machine: CPU model, cores, OS."""
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()}"


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% for z=1.96); sound at 0% and 100% too."""
    if n <= 0:
        raise ValueError(f"need at least one trial, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n], got {successes} of {n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class EvalResult:
    """Outcome of `evaluate`: per-episode arrays plus the headline numbers."""

    env_id: str
    episodes: int
    success: np.ndarray  # bool per episode
    returns: np.ndarray
    lengths: np.ndarray
    final_info: list[dict] = field(repr=False)
    videos: list[np.ndarray] = field(default_factory=list, repr=False)
    seconds: float = 0.0

    @property
    def success_rate(self) -> float:
        return float(self.success.mean())

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(int(self.success.sum()), self.episodes)

    def mean_info(self, key: str) -> float:
        """Mean over episodes of a per-episode info value (e.g. final `coverage`, ever-`collision`)."""
        vals = [float(i[key]) for i in self.final_info if key in i]
        if not vals:
            raise KeyError(f"no episode reported {key!r}; keys seen: {sorted(self.final_info[0])}")
        return float(np.mean(vals))

    def summary(self) -> str:
        lo, hi = self.interval
        return (f"{self.env_id}: success {self.success_rate:.0%} (95% CI {lo:.0%}-{hi:.0%}) over "
                f"{self.episodes} episodes, mean length {self.lengths.mean():.0f}, {self.seconds:.0f} s")

    def __str__(self) -> str:
        return self.summary()


KEEP = ("obs", "actions", "rewards", "infos")  # what `rollout` can keep of every step


@dataclass
class Episode:
    """One rolled-out episode: its seed and outcome, and the per-step records `rollout` was asked to keep."""

    seed: int
    success: bool  # the last step's info["is_success"]
    ret: float  # the sum of rewards
    length: int  # env steps taken
    terminated: bool  # ended by the task (success or failure), not by its time limit
    info: dict = field(repr=False)  # the last step's info
    obs: dict[str, np.ndarray] | None = field(default=None, repr=False)  # {env key: [T+1, ...]}, reset obs first
    actions: np.ndarray | None = field(default=None, repr=False)  # [T, A]
    rewards: np.ndarray | None = field(default=None, repr=False)  # [T]
    infos: list[dict] | None = field(default=None, repr=False)  # every step's info
    frames: np.ndarray | None = field(default=None, repr=False)  # [T+1, H, W, 3], for the filmed episodes


def _is_batched_policy(policy) -> bool:
    # The runtime contract (labkit policies and the RL wrappers): batched select_action + reset().
    # Plain callables and scripted experts run one env at a time.
    return hasattr(policy, "select_action") and hasattr(policy, "reset")


def rollout(policy, env_id: str, seeds, env_kwargs: dict | None = None, num_envs: int = 10, keep=(),
            videos: int = 0, render_size: int = 256, progress: bool | str = False) -> list[Episode]:
    """Roll `policy` out for one episode per seed (`reset(seed=s)`) and return the episodes in seed order.

    The one rollout engine: evaluation, path plots, data collection for world models and RL all call it.
    `policy` is a runtime policy (`reset()` + batched `select_action`, stepped over `num_envs` envs in
    lockstep), the string `"expert"` (the task's scripted expert, one per env, reset with the episode's
    seed) or a plain callable `obs -> action` with an optional `reset(seed=...)` (one env at a time).
    `keep` names the per-step records to keep (KEEP); `videos` films the first that many episodes.

    A policy is rolled out with the env interface it was trained with (wrappers hand on their base's):
    asking for another one is a ValueError (see `labkit.policies.base.rollout_kwargs`). Torch's RNG is
    forked and seeded with the first seed, so the same call gives the same episodes and leaves the
    caller's random stream untouched.
    """
    import torch

    import labkit.envs  # noqa: F401  (registers the tasks)
    from labkit.policies.base import rollout_kwargs

    seeds = [int(s) for s in seeds]
    unknown = set(keep) - set(KEEP)
    if unknown:
        raise ValueError(f"rollout can keep {KEEP}, not {sorted(unknown)}")
    if not seeds:
        raise ValueError("rollout needs at least one seed")
    env_kwargs = rollout_kwargs(policy, env_id, env_kwargs or {})
    batched = _is_batched_policy(policy)
    num_envs = max(1, min(num_envs if batched or policy == "expert" else 1, len(seeds)))
    envs = [gym.make(env_id, render_mode="rgb_array" if videos else None, **env_kwargs) for _ in range(num_envs)]
    if videos:
        for e in envs:
            e.unwrapped.render_size = render_size
    experts = [labkit.envs.expert(e) for e in envs] if isinstance(policy, str) and policy == "expert" else None
    out: list[Episode] = []
    bar = tqdm(total=len(seeds), desc=progress if isinstance(progress, str) else f"rollout {env_id}",
               disable=not progress, leave=False)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seeds[0])
            for first in range(0, len(seeds), num_envs):
                batch = seeds[first:first + num_envs]
                out += _run_batch(policy, envs, experts, batch, batched, set(keep), videos - first)
                bar.update(len(batch))
                bar.set_postfix(success=f"{np.mean([e.success for e in out]):.0%}")
    finally:
        bar.close()
        for e in envs:
            e.close()
    return out


def _run_batch(policy, envs, experts, seeds, batched: bool, keep: set, film: int) -> list[Episode]:
    """One episode per seed, the envs stepped in lockstep (the policy called once per step on the batch)."""
    n = len(seeds)
    obs = [envs[j].reset(seed=s)[0] for j, s in enumerate(seeds)]
    if batched:
        policy.reset()
    elif experts is not None:
        for j, s in enumerate(seeds):
            experts[j].reset(seed=s)
    elif hasattr(policy, "reset"):
        policy.reset(seed=seeds[0])
    done, term_, ret, length = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n), np.zeros(n, int)
    last: list[dict] = [{} for _ in range(n)]
    seen = [[o] if "obs" in keep else None for o in obs]
    acts: list[list] = [[] for _ in range(n)]
    rews: list[list] = [[] for _ in range(n)]
    infos: list[list] = [[] for _ in range(n)]
    frames = [[envs[j].render()] if j < film else None for j in range(n)]
    while not done.all():
        if batched:
            actions = policy.select_action({k: np.stack([o[k] for o in obs]) for k in obs[0]})
        elif experts is not None:
            actions = [experts[j](obs[j]) if not done[j] else None for j in range(n)]
        else:
            actions = [policy(obs[0])]
        for j in np.flatnonzero(~done):
            obs[j], r, term, trunc, info = envs[j].step(actions[j])
            ret[j] += r
            length[j] += 1
            last[j] = info
            done[j], term_[j] = term or trunc, term
            if seen[j] is not None:
                seen[j].append(obs[j])
            if "actions" in keep:
                acts[j].append(np.asarray(actions[j], np.float32))
            if "rewards" in keep:
                rews[j].append(float(r))
            if "infos" in keep:
                infos[j].append(info)
            if frames[j] is not None:
                frames[j].append(envs[j].render())
    return [Episode(
        seed, bool(last[j].get("is_success", False)), float(ret[j]), int(length[j]), bool(term_[j]), last[j],
        obs={k: np.stack([o[k] for o in seen[j]]) for k in seen[j][0]} if seen[j] is not None else None,
        actions=np.stack(acts[j]) if "actions" in keep else None,
        rewards=np.asarray(rews[j]) if "rewards" in keep else None,
        infos=infos[j] if "infos" in keep else None,
        frames=np.stack(frames[j]) if frames[j] is not None else None,
    ) for j, seed in enumerate(seeds)]


def evaluate(policy, env_id: str, episodes: int = 50, seed: int = EVAL_SEED, env_kwargs: dict | None = None,
             num_envs: int = 10, videos: int = 0, render_size: int = 256, progress: bool = True) -> EvalResult:
    """Roll out `policy` for `episodes` seeded episodes of `env_id` and collect the outcome.

    Episode i starts from `reset(seed=seed + i)`; the default seeds are the evaluation seeds
    (EVAL_SEED and up), never the shipped datasets' recording seeds. Torch is seeded too (see
    `rollout`), so the same policy and seed give the same number twice. `policy` is anything `rollout`
    runs; `videos` records the first that many episodes. Episodes end on success, on failure (e.g. a
    collision) or at the task's time limit.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    start = time.perf_counter()
    eps = rollout(policy, env_id, range(seed, seed + episodes), env_kwargs, num_envs, videos=videos,
                  render_size=render_size, progress=f"eval {env_id}" if progress else False)
    return EvalResult(env_id, episodes, np.array([e.success for e in eps]), np.array([e.ret for e in eps]),
                      np.array([e.length for e in eps]), [e.info for e in eps],
                      [e.frames for e in eps if e.frames is not None], time.perf_counter() - start)


def rollout_states(policy, env_id: str, episodes: int, seed: int = EVAL_SEED, key: str = "state",
                   env_kwargs: dict | None = None) -> list[np.ndarray]:
    """The observation `key` at every step of `episodes` seeded rollouts, one array [T+1, ...] per
    episode (the reset observation first): for plotting paths, which `evaluate` does not keep."""
    eps = rollout(policy, env_id, range(seed, seed + episodes), env_kwargs, keep=("obs",))
    return [e.obs[key] for e in eps]


# --- Does a cheap evaluation rank policies like the real one? (PolaRiS / SIMPLER metrics) ---------

def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"need two equally long lists of at least 2 scores, got {a.size} and {b.size}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("scores must be finite (a NaN usually means an evaluation with 0 episodes)")
    return a, b


def pearson(real, proxy) -> float:
    """Pearson correlation between real and proxy scores of the same policies (nan if either is constant)."""
    a, b = _paired(real, proxy)
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), as Spearman's rho needs."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(real, proxy) -> float:
    """Spearman rank correlation: Pearson on the ranks, so only the ordering matters."""
    a, b = _paired(real, proxy)
    return pearson(_ranks(a), _ranks(b))


def mmrv(real, proxy) -> float:
    """Mean Maximum Rank Violation (SIMPLER, PolaRiS): for each policy, the largest real-score gap to a
    policy the proxy orders the other way round; averaged. 0 means no pair is inverted; a flipped pair
    of near-equal policies costs little, a flipped pair far apart costs a lot."""
    a, b = _paired(real, proxy)
    flipped = (b[:, None] < b[None, :]) != (a[:, None] < a[None, :])
    return float((np.abs(a[:, None] - a[None, :]) * flipped).max(axis=1).mean())
