"""Evaluation: roll a policy out over seeded episodes and report success with its uncertainty.

Every number a notebook or the README reports comes from `evaluate`, with the episode count beside
it. Episode i starts from `reset(seed=seed + i)`, so two policies evaluated with the same seed meet
the same initial states. Envs are stepped in lockstep in one process and the policy is called once
per step on the whole batch: on 2 cores that beats worker processes for MuJoCo state envs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm


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


def _is_batched_policy(policy) -> bool:
    # The runtime contract (labkit policies and RL wrappers such as a per-step residual): batched
    # select_action + reset(). Plain callables and scripted experts run one env at a time.
    return hasattr(policy, "select_action") and hasattr(policy, "reset")


def evaluate(policy, env_id: str, episodes: int = 50, seed: int = 0, env_kwargs: dict | None = None,
             num_envs: int = 10, videos: int = 0, render_size: int = 256, progress: bool = True) -> EvalResult:
    """Roll out `policy` for `episodes` seeded episodes of `env_id` and collect the outcome.

    `policy` is a labkit `Policy` (called on a batch of envs at once), the string `"expert"` (the
    task's scripted expert, one per env), or any callable `obs -> action` with an optional
    `reset(seed=...)` (run one env at a time). `videos` records the first that many episodes.
    Episodes end on success, on failure (e.g. a collision) or at the task's time limit.
    """
    import labkit.envs  # noqa: F401  (registers the tasks)
    from labkit.policies.base import rollout_kwargs

    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    env_kwargs = rollout_kwargs(policy, env_id, env_kwargs or {})
    batched = _is_batched_policy(policy)
    if not batched and policy != "expert":
        num_envs = 1
    num_envs = max(1, min(num_envs, episodes))
    envs = [gym.make(env_id, render_mode="rgb_array" if videos else None, **env_kwargs) for _ in range(num_envs)]
    if videos:
        for e in envs:
            e.unwrapped.render_size = render_size
    experts = [labkit.envs.expert(e) for e in envs] if policy == "expert" else None

    success, returns, lengths, infos, clips = [], [], [], [], []
    start = time.perf_counter()
    bar = tqdm(total=episodes, desc=f"eval {env_id}", disable=not progress, leave=False)
    for first in range(0, episodes, num_envs):
        n = min(num_envs, episodes - first)
        obs = [envs[j].reset(seed=seed + first + j)[0] for j in range(n)]
        if batched:
            policy.reset()
        elif experts is not None:
            for j in range(n):
                experts[j].reset(seed=seed + first + j)
        elif hasattr(policy, "reset"):
            policy.reset(seed=seed + first)
        done = np.zeros(n, bool)
        ret, length = np.zeros(n), np.zeros(n, int)
        last = [dict() for _ in range(n)]
        frames = [[envs[j].render()] if first + j < videos else None for j in range(n)]
        while not done.all():
            if batched:
                batch = {k: np.stack([o[k] for o in obs]) for k in obs[0]}
                actions = policy.select_action(batch)
            elif experts is not None:
                actions = [experts[j](obs[j]) if not done[j] else None for j in range(n)]
            else:
                actions = [policy(obs[0])]
            for j in np.flatnonzero(~done):
                obs[j], r, term, trunc, info = envs[j].step(actions[j])
                ret[j] += r
                length[j] += 1
                last[j] = info
                done[j] = term or trunc
                if frames[j] is not None:
                    frames[j].append(envs[j].render())
        for j in range(n):
            success.append(bool(last[j].get("is_success", False)))
            returns.append(ret[j])
            lengths.append(length[j])
            infos.append(last[j])
            if frames[j] is not None:
                clips.append(np.stack(frames[j]))
        bar.update(n)
        bar.set_postfix(success=f"{np.mean(success):.0%}")
    bar.close()
    for e in envs:
        e.close()
    return EvalResult(env_id, episodes, np.array(success), np.array(returns), np.array(lengths), infos, clips,
                      time.perf_counter() - start)


def rollout_states(policy, env_id: str, episodes: int, seed: int = 0, key: str = "state",
                   env_kwargs: dict | None = None) -> list[np.ndarray]:
    """The observation `key` at every step of `episodes` seeded rollouts of a labkit `Policy`, one
    array [T+1, ...] per episode (the reset observation first): for plotting paths, which
    `evaluate` does not keep."""
    import labkit.envs  # noqa: F401  (registers the tasks)
    from labkit.policies.base import rollout_kwargs

    env = gym.make(env_id, **rollout_kwargs(policy, env_id, env_kwargs or {}))
    out = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        policy.reset()
        states, done = [obs[key]], False
        while not done:
            obs, _, term, trunc, _ = env.step(policy.select_action(obs))
            states.append(obs[key])
            done = term or trunc
        out.append(np.stack(states))
    env.close()
    return out


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
