"""World-model-based policy improvement, VLAW's loop (Guo et al. 2026) in miniature, on states:

    repeat for each round:
      1. roll the current policy out in the real task: successes AND failures
      2. refine the world model on demos + every real rollout so far (it learns what failure looks like)
      3. imagine many rollouts of the policy from real start states; the model's success head labels them
      4. finetune the policy by flow matching on demos + real successes + imagined successes
         (success filtering = VLAW's reward weighting with w in {0, 1}; `weights` gives exp(R / beta))
    and record the real success of every round.

Episodes are plain dicts {"state": [T(+1), D], "action": [T, A], "success", "failure"}; real ones come
from `collect_episodes`, demos from `episodes_from_dataset`, imagined ones from `imagine`.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch

from labkit.data.dataset import EpisodeDataset
from labkit.eval import evaluate, rollout
from labkit.policies.train import fit
from labkit.world_models.dynamics import transitions_from_episodes
from labkit.world_models.imagined import imagine, start_states


def episodes_from_dataset(dataset: EpisodeDataset, max_steps: int | None = None) -> list[dict]:
    """A dataset's episodes as dicts. A dataset stores no state after the last action, so "state" has T
    rows; failure = ended before `max_steps` without success (a crash), when `max_steps` is given."""
    ok = np.asarray(dataset.episodes.get("success", np.ones(dataset.num_episodes)), bool)
    out = []
    for i in range(dataset.num_episodes):
        ep = dataset.episode(i)
        T = len(ep["action"])
        out.append({"state": ep["observation.state"].astype(np.float32), "action": ep["action"].astype(np.float32),
                    "success": bool(ok[i]), "failure": bool(not ok[i] and max_steps is not None and T < max_steps)})
    return out


def collect_episodes(policy, env_id: str, episodes: int, seed: int = 0, num_envs: int = 10,
                     env_kwargs: dict | None = None) -> list[dict]:
    """Real rollouts of a labkit policy (`labkit.eval.rollout`), every state kept, failures included:
    {"state": [T+1, D], "action": [T, A], "success", "failure" (info["collision"])}."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    eps = rollout(policy, env_id, range(seed, seed + episodes), env_kwargs, num_envs, keep=("obs", "actions"))
    return [{"state": e.obs["state"].astype(np.float32), "action": e.actions, "success": e.success,
             "failure": bool(e.info.get("collision", False))} for e in eps]


def dataset_from_episodes(episodes: list[dict], like: EpisodeDataset) -> EpisodeDataset:
    """An in-memory EpisodeDataset (state + action) that `labkit.policies.fit` trains on; `like` lends
    fps, feature metadata and its normalisation stats. Only the T states that have an action are kept."""
    if not episodes:
        raise ValueError("no episodes to build a dataset from (did success filtering keep none?)")
    return EpisodeDataset.from_episodes(
        [{"observation.state": np.asarray(e["state"][: len(e["action"])], np.float32),
          "action": np.asarray(e["action"], np.float32)} for e in episodes],
        success=[bool(e.get("success")) for e in episodes], stats=like.stats, like=like)


def weights(episodes: list[dict], mode: str = "filter", beta: float = 1.0) -> np.ndarray:
    """Per-episode training weights from outcomes R in {0, 1} (or "p_success" when `mode="soft"`):
    "filter": 1[success] (VLAW's success filtering); "exp": exp((R - 1) / beta) (reward weighting, AWR-style,
    1 for a success); "soft": exp((max_t p_success_t - 1) / beta), from the model's success probabilities."""
    if mode == "filter":
        return np.array([float(e["success"]) for e in episodes])
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if mode == "exp":
        r = np.array([float(e["success"]) for e in episodes])
    elif mode == "soft":
        r = np.array([float(np.max(e["p_success"])) if len(e.get("p_success", [])) else 0.0 for e in episodes])
    else:
        raise ValueError(f"mode must be 'filter', 'exp' or 'soft', got {mode!r}")
    return np.exp((r - 1.0) / beta)


def resample(episodes: list[dict], w: np.ndarray, n: int | None = None, seed: int = 0) -> list[dict]:
    """Weighted flow matching by resampling: draw `n` episodes (default: as many as have weight > 0) with
    probability proportional to `w`. With 0/1 weights this is exactly success filtering."""
    w = np.asarray(w, float)
    if len(w) != len(episodes) or (w < 0).any():
        raise ValueError("need one non-negative weight per episode")
    if w.sum() <= 0:
        return []
    n = int(n or (w > 0).sum())
    idx = np.random.default_rng(seed).choice(len(episodes), size=n, p=w / w.sum())
    return [episodes[i] for i in idx]


@dataclass
class LoopConfig:
    rounds: int = 2
    real_episodes: int = 50  # real rollouts per round (the expensive resource)
    synthetic_episodes: int = 300  # imagined rollouts per round
    wm_steps: int = 1000  # world-model refinement steps per round
    policy_steps: int = 500  # flow-matching finetuning steps per round
    eval_episodes: int = 100
    use_synthetic: bool = True  # False: the real-only baseline (same real rollouts, no imagination)
    pessimistic: bool = True  # label imagined rollouts with the ensemble's doubt (see `imagine`)
    weighting: str = "filter"
    beta: float = 1.0
    horizon: int = 100
    seed: int = 0
    eval_seed: int = 1000
    collect_seed: int = 5000  # real rollouts / imagined starts use seeds disjoint from evaluation's


def improvement_loop(policy, world_model, demos: list[dict], like: EpisodeDataset, env_id: str,
                     config: LoopConfig | None = None, progress: bool = False) -> tuple[object, list[dict]]:
    """Run the loop on a copy of `policy` and a copy of `world_model`; returns (policy, history), one
    dict per round (round 0 = the starting policy): real success with its interval, imagined success,
    counts of real / synthetic episodes used, and minutes."""
    c = config or LoopConfig()
    policy, wm = copy.deepcopy(policy), copy.deepcopy(world_model)
    real: list[dict] = []
    torch.manual_seed(c.eval_seed)  # the same sampling noise at every evaluation: rounds differ by the policy only
    ev = evaluate(policy, env_id, episodes=c.eval_episodes, seed=c.eval_seed, progress=False)
    history = [{"round": 0, "success": ev.success_rate, "interval": ev.interval, "collision": ev.mean_info("collision"),
                "imagined_success": float("nan"), "real_used": 0, "synthetic_used": 0, "minutes": 0.0}]
    for r in range(1, c.rounds + 1):
        t0 = time.perf_counter()
        seed = c.collect_seed + 1000 * r
        real += collect_episodes(policy, env_id, c.real_episodes, seed=seed)
        wm.fit(transitions_from_episodes(demos + real), steps=c.wm_steps, seed=c.seed + r)
        train = demos + [e for e in real if e["success"]]
        imagined_rate = float("nan")
        syn: list[dict] = []
        if c.use_synthetic:
            starts = start_states(env_id, c.synthetic_episodes, seed=seed + 500)
            imagined = imagine(policy, wm, starts, horizon=c.horizon, seed=c.seed + r, pessimistic=c.pessimistic)
            imagined_rate = float(np.mean([e["success"] for e in imagined]))
            syn = resample(imagined, weights(imagined, c.weighting, c.beta), seed=c.seed + r)
            train = train + syn
        fit(policy, dataset_from_episodes(train, like), steps=c.policy_steps, seed=c.seed + r, progress=progress)
        torch.manual_seed(c.eval_seed)
        ev = evaluate(policy, env_id, episodes=c.eval_episodes, seed=c.eval_seed, progress=False)
        history.append({"round": r, "success": ev.success_rate, "interval": ev.interval,
                        "collision": ev.mean_info("collision"), "imagined_success": imagined_rate,
                        "real_used": len(real), "synthetic_used": len(syn),
                        "minutes": (time.perf_counter() - t0) / 60})
    return policy, history
