"""DAgger (Ross, Gordon & Bagnell 2011): imitation with an expert who answers questions.

Behavior cloning trains on the expert's states only. In closed loop the learner's small errors take
it to states the expert never visited, where it errs more, and the errors compound. DAgger rolls
the learner out, asks the expert what it would have done at every state the learner visited, adds
those labels to the data and retrains:

    D <- expert demonstrations;  pi_0 <- BC on D
    for i = 1..rounds:
        drive with pi_i = beta_i * expert + (1 - beta_i) * learner    (beta_i = beta ** i; 0: the learner alone)
        label every visited observation s with the expert's action pi*(s)
        D <- aggregate(D, visited)     (keep every label so far, add one per visited state)
        pi_i <- BC on D                (retrained from scratch: D's normalisation changes as it grows)

Every label is one question to the expert, demonstration frames included, so the honest baseline is
BC with as many labels (`first_labels`). The expert must answer from the observation alone (state
feedback): `check_labeller` tests that, and a task whose expert reads its own env's hidden state
(PushT's reads the block pose from the simulator) is refused with ExpertCannotLabel.
`distance_to_demos` measures compounding error: how far a policy's states stray from the demonstrations.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import gymnasium as gym
import numpy as np
import torch

import labkit.envs
from labkit.data.dataset import EpisodeDataset
from labkit.data.keys import env_key, is_image_feature
from labkit.eval import evaluate, rollout
from labkit.policies.train import fit

COLLECT_SEED = 5000  # DAgger's rollouts: seeds disjoint from the demos' (0 and up) and evaluation's (1000 and up)


class ExpertCannotLabel(ValueError):
    """An expert whose action depends on more than the observation it is given, so it cannot label
    the observations of an episode it did not drive itself."""


def check_labeller(make_expert: Callable, env_id: str, env_kwargs: dict | None = None, seed: int = 0) -> None:
    """Raise ExpertCannotLabel unless the expert's answer depends on the observation alone, not on the
    env it was built with: two experts built on envs in different states must give the same action for
    the same observation (and the same seed)."""
    envs = [gym.make(env_id, **(env_kwargs or {})) for _ in range(2)]
    try:
        obs = [e.reset(seed=seed + k)[0] for k, e in enumerate(envs)]
        experts = [make_expert(e) for e in envs]
        for x in experts:
            if not (callable(x) and hasattr(x, "reset")):
                raise ExpertCannotLabel(f"the expert must be a callable obs -> action with reset(seed), got {x!r}")
            x.reset(seed=seed)
        a, b = (np.asarray(x(obs[1]), float) for x in experts)
    finally:
        for e in envs:
            e.close()
    if a.shape != envs[1].action_space.shape or not np.allclose(a, b, atol=1e-6):
        raise ExpertCannotLabel(
            f"the expert of {env_id} does not answer from the observation alone: two copies asked about the "
            f"same observation answered {np.round(a, 4)} and {np.round(b, 4)} (it reads its own env's state, "
            "e.g. PushT's expert reads the block pose from the simulator). DAgger needs a state-feedback "
            "expert (Detour's, PegInsert's, the arm's) or your own via expert=")


def _low_dim_keys(policy) -> tuple[str, ...]:
    keys = tuple(policy.config.obs_keys)
    if any(is_image_feature(k) for k in keys):
        raise ValueError(f"dagger here trains state policies; {keys} include a camera")
    return keys


def _trim(dataset: EpisodeDataset, keys, lengths=None) -> EpisodeDataset:
    """The dataset with only `keys` + action (the frames a BC policy trains on), episodes optionally cut
    to `lengths` frames."""
    eps = []
    for i in range(dataset.num_episodes):
        ep = dataset.episode(i)
        n = len(ep["action"]) if lengths is None else int(lengths[i])
        eps.append({k: np.asarray(ep[k][:n], np.float32) for k in (*keys, "action")})
    return EpisodeDataset.from_episodes(eps, like=dataset)


def first_labels(demos: EpisodeDataset, labels: int, keys=("observation.state",)) -> EpisodeDataset:
    """The first `labels` frames of `demos`, whole episodes in order and the last one cut short: BC's
    dataset with exactly as many expert labels as a DAgger dataset of that size."""
    if not 1 <= labels <= len(demos):
        raise ValueError(f"asked for {labels} labels; the demos have {len(demos)} frames (get more demos)")
    ends = np.cumsum(demos.lengths)
    k = int(np.searchsorted(ends, labels)) + 1  # episodes needed
    lengths = demos.lengths[:k].copy()
    lengths[-1] -= int(ends[k - 1] - labels)
    return _trim(demos.select(range(k)), keys, lengths)


def expert_demos(env_id: str, episodes: int, seed: int = 0, expert: Callable | None = None,
                 like: EpisodeDataset | None = None, env_kwargs: dict | None = None) -> EpisodeDataset:
    """`episodes` demonstrations of `expert` (a factory env -> expert; default the task's), from seeds
    seed, seed+1, ..., as an in-memory dataset of observation.state and action."""
    make = expert or labkit.envs.expert
    env = gym.make(env_id, **(env_kwargs or {}))
    driver = make(env)
    eps = rollout(driver, env_id, range(seed, seed + episodes), env_kwargs, keep=("obs", "actions"))
    fps = None if like is not None else env.metadata["render_fps"]
    env.close()
    return EpisodeDataset.from_episodes(
        [{"observation.state": e.obs["state"][:-1].astype(np.float32), "action": e.actions} for e in eps],
        fps=fps, success=[e.success for e in eps], like=like)


class MixedControl:
    """Who drives a DAgger rollout: each step the expert with probability `beta`, else the learner.
    The expert is asked at every step either way: its answers are the labels (`self.labels[seed]`)."""

    def __init__(self, policy, expert, beta: float = 0.0):
        self.policy, self.expert, self.beta = policy, expert, float(beta)
        self.labels: dict[int, list[np.ndarray]] = {}

    def reset(self, seed: int | None = None):
        self.policy.reset()
        self.expert.reset(seed=seed)
        self.rng = np.random.default_rng([int(seed or 0), 1])
        self.labels[seed] = self.current = []

    def __call__(self, obs) -> np.ndarray:
        label = np.asarray(self.expert(obs), np.float32)
        self.current.append(label)
        action = self.policy.select_action(obs)  # asked even when it does not drive: it keeps its history
        return label if self.beta > 0 and self.rng.random() < self.beta else action


def collect(policy, expert, env_id: str, seeds, beta: float = 0.0, env_kwargs: dict | None = None,
            keys=("observation.state",)) -> list[dict]:
    """Roll out `policy` (mixed with `expert` by `beta`) once per seed; one dict per episode with the
    visited observations {key: [T, ...]} (the T states an action was taken in), the executed "action"
    [T, A], the expert's "expert_action" [T, A] at each of those states, and "success"."""
    driver = MixedControl(policy, expert, beta)
    out = []
    for e in rollout(driver, env_id, seeds, env_kwargs, keep=("obs", "actions")):
        labels = np.stack(driver.labels[e.seed])
        visited = {k: e.obs[env_key(k)][:-1].astype(np.float32) for k in keys}  # the last state has no action
        out.append({**visited, "action": e.actions, "expert_action": labels, "success": e.success})
    return out


def aggregate(dataset: EpisodeDataset, visited: list[dict]) -> EpisodeDataset:
    """DAgger's data step: every earlier episode as it is, plus each visited episode with the EXPERT's
    actions as labels (not the actions that were executed)."""
    old = [dataset.episode(i) for i in range(dataset.num_episodes)]
    keys = [k for k in old[0] if k not in ("episode_index", "frame_index", "index")]
    new = [{k: (v["expert_action"] if k == "action" else v[k]) for k in keys} for v in visited]
    return EpisodeDataset.from_episodes(old + new, like=dataset)


def dagger(make_policy: Callable, demos: EpisodeDataset, env_id: str, rounds: int = 4, episodes: int = 10,
           steps: int = 1000, beta: float = 0.0, expert: Callable | None = None,
           aggregate: Callable = aggregate, seed: int = 0, collect_seed: int = COLLECT_SEED,
           eval_episodes: int = 0, env_kwargs: dict | None = None, fit_kwargs: dict | None = None,
           progress: bool = False):
    """Run DAgger from BC on `demos`; return (final policy, history, final dataset).

    `make_policy(dataset)` builds an untrained policy (e.g. `lambda d: BCPolicy.from_dataset(d, horizon=1,
    n_action_steps=1)`), trained `steps` steps on the data of each round (`fit_kwargs` go to `fit`, e.g. a
    lesson's `training_step=`). Each round rolls out `episodes` episodes (seeds from `collect_seed +
    1000 * round`) with the expert driving with probability `beta ** round`. `expert` is a factory
    env -> expert (default the task's scripted expert). `aggregate(dataset, visited)` builds the next
    dataset (`collect` documents `visited`); it must add exactly one frame per visited state.
    History: one dict per round (round 0 = BC on the demos) with "labels" (the dataset's frames: every
    expert label so far), "new_labels", "beta", "rollout_success" (of the round's mixed rollouts),
    "minutes", and with `eval_episodes` "success" and "interval" (`labkit.eval.evaluate`).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1 (round 0 is plain BC), got {rounds}")
    if episodes < 1 or steps < 1:
        raise ValueError(f"episodes and steps must be >= 1, got {episodes}, {steps}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta is a probability, got {beta}")
    if not callable(aggregate):
        raise TypeError(f"aggregate must be a function (dataset, visited) -> dataset, got {type(aggregate).__name__}")
    make_expert = expert or labkit.envs.expert
    check_labeller(make_expert, env_id, env_kwargs)
    keys = _low_dim_keys(make_policy(demos))
    dataset = _trim(demos, keys)
    env = gym.make(env_id, **(env_kwargs or {}))
    teacher = make_expert(env)
    fit_kwargs = {"progress": progress, **(fit_kwargs or {})}

    def train(data):
        torch.manual_seed(seed)  # the same initial weights every round: rounds differ by their data only
        return fit(make_policy(data), data, steps=steps, seed=seed, **fit_kwargs)

    def evaluated(policy) -> dict:
        if not eval_episodes:
            return {}
        r = evaluate(policy, env_id, episodes=eval_episodes, env_kwargs=env_kwargs, progress=False)
        return {"success": r.success_rate, "interval": r.interval}

    start = time.perf_counter()
    policy = train(dataset)
    history = [{"round": 0, "labels": len(dataset), "new_labels": len(dataset), "beta": 1.0,
                "rollout_success": float("nan"), **evaluated(policy), "minutes": (time.perf_counter() - start) / 60}]
    for r in range(1, rounds + 1):
        start = time.perf_counter()
        b = beta ** r if beta > 0 else 0.0
        seeds = range(collect_seed + 1000 * r, collect_seed + 1000 * r + episodes)
        visited = collect(policy, teacher, env_id, seeds, b, env_kwargs, keys)
        grown = aggregate(dataset, visited)
        added = sum(len(v["action"]) for v in visited)
        if not isinstance(grown, EpisodeDataset) or len(grown) != len(dataset) + added:
            got = len(grown) if isinstance(grown, EpisodeDataset) else type(grown).__name__
            raise ValueError(f"aggregate returned {got} frames; expected {len(dataset)} earlier + {added} visited = "
                             f"{len(dataset) + added}: DAgger keeps every label and adds one per visited state")
        dataset = grown
        policy = train(dataset)
        history.append({"round": r, "labels": len(dataset), "new_labels": added, "beta": b,
                        "rollout_success": float(np.mean([v["success"] for v in visited])),
                        **evaluated(policy), "minutes": (time.perf_counter() - start) / 60})
    env.close()
    return policy, history, dataset


def equal_labels(make_policy: Callable, demos: EpisodeDataset, env_id: str, start_demos: int = 2, rounds: int = 3,
                 episodes: int = 2, steps: int = 1000, expert: Callable | None = None, aggregate: Callable = aggregate,
                 seed: int = 0, eval_episodes: int = 100, env_kwargs: dict | None = None,
                 fit_kwargs: dict | None = None) -> dict:
    """DAgger against BC at equal expert labels: DAgger from the first `start_demos` of `demos`, then BC on
    as many labels, all from `demos` in order (`first_labels`), same learner, steps and initial weights;
    both evaluated on `eval_episodes` episodes from EVAL_SEED. Returns {"DAgger": policy, "BC": policy,
    "results": {"DAgger": EvalResult, "BC": EvalResult}, "labels", "bc_labels", "bc_demos", "history", "verdict"}."""
    from labkit.data.shipped import EVAL_SEED

    policy, history, data = dagger(make_policy, demos.select(range(start_demos)), env_id, rounds=rounds,
                                   episodes=episodes, steps=steps, expert=expert, aggregate=aggregate, seed=seed,
                                   env_kwargs=env_kwargs, fit_kwargs=fit_kwargs)
    torch.manual_seed(seed)  # the same initial weights as DAgger's policies
    bc_data = first_labels(demos, len(data), keys=_low_dim_keys(policy))
    bc = fit(make_policy(bc_data), bc_data, steps=steps, seed=seed, progress=False, **(fit_kwargs or {}))
    results = {name: evaluate(p, env_id, episodes=eval_episodes, seed=EVAL_SEED, env_kwargs=env_kwargs, progress=False)
               for name, p in (("DAgger", policy), ("BC", bc))}
    (d_lo, d_hi), (b_lo, b_hi) = results["DAgger"].interval, results["BC"].interval
    verdict = "DAgger ahead" if d_lo > b_hi else "BC ahead" if b_lo > d_hi else "no clear winner: the intervals overlap"
    return {"DAgger": policy, "BC": bc, "results": results, "labels": len(data), "bc_labels": len(bc_data),
            "bc_demos": bc_data.num_episodes, "history": history, "verdict": verdict}


def distance_to_demos(paths: list[np.ndarray], demo_points: np.ndarray, steps: int | None = None) -> np.ndarray:
    """Compounding error, step by step: for each time t the distance from a policy's state to the
    NEAREST demonstration state (any demo, any time), averaged over episodes. `paths` are [T_i, d]
    arrays (e.g. positions along each rollout), `demo_points` [N, d] (every demo frame's position).
    An episode that ended early (success or a crash) keeps its last state, as the world would."""
    demo_points = np.asarray(demo_points, float)
    if not paths or demo_points.ndim != 2 or len(demo_points) == 0:
        raise ValueError("need at least one path and a non-empty [N, d] array of demonstration states")
    steps = steps or max(len(p) for p in paths)
    out = np.zeros(steps)
    for p in paths:
        p = np.asarray(p, float)
        if p.ndim != 2 or p.shape[1] != demo_points.shape[1]:
            raise ValueError(f"a path has shape {p.shape}; expected [T, {demo_points.shape[1]}] like the demo states")
        p = np.concatenate([p[:steps], np.repeat(p[-1:], max(0, steps - len(p)), 0)])
        d2 = ((p[:, None, :] - demo_points[None]) ** 2).sum(-1)
        out += np.sqrt(d2.min(1))
    return out / len(paths)


def main(argv=None) -> None:
    """Lesson 01's comparison over training seeds: `python -m labkit.policies.dagger --learner flow --seeds 0 1 2`.
    Seed s records its 40 demonstrations of PursuitExpert from seed 100 * s (seed 0: the lesson's) and trains
    with seed s; one line per seed."""
    import argparse

    from labkit.envs.detour import PursuitExpert
    from labkit.policies import BCPolicy, FlowPolicy

    p = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    p.add_argument("--learner", choices=("flow", "mse"), default="flow")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=1000)
    a = p.parse_args(argv)
    cls = FlowPolicy if a.learner == "flow" else BCPolicy
    for s in a.seeds:
        start = time.process_time()
        demos = expert_demos("labkit/Detour-v0", 40, seed=100 * s, expert=PursuitExpert)
        run = equal_labels(lambda d: cls.from_dataset(d, horizon=1, n_action_steps=1), demos, "labkit/Detour-v0",
                           steps=a.steps, expert=PursuitExpert, seed=s)
        d, b = run["results"]["DAgger"], run["results"]["BC"]
        print(f"{a.learner} seed {s}: {run['labels']} labels (BC {run['bc_demos']} demos) | DAgger {d.success_rate:.0%} "
              f"({d.interval[0]:.0%}-{d.interval[1]:.0%}) | BC {b.success_rate:.0%} ({b.interval[0]:.0%}-{b.interval[1]:.0%})"
              f" | {run['verdict']} | {(time.process_time() - start) / 60:.1f} CPU-min", flush=True)


if __name__ == "__main__":
    main()
