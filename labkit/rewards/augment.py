"""Reward-model training data: replayed episodes, and RoboReward's two negative augmentations.

RoboReward (Lee et al., 2026) trains a reward model on success-heavy robot data, so it manufactures
negatives from successes (arXiv 2601.00675, section 11 of the algorithm notes):

    temporal clipping         cut a successful episode at fraction f of its length: its last frame shows
                              only partial progress, so it is labelled success 0, progress f (a near-miss).
    counterfactual relabel    pair a successful episode with a *different* target (another episode's hole,
                              goal, ...): it succeeded at something else, so it failed this one (success 0,
                              progress 0). Which state dims hold the target is a per-task parameter.

A reward model here judges one frame: the last frame of a (possibly clipped) episode, as RoboReward's
rubric judges the final state. An example set is a dict of arrays, one row per example:
    state [N, D] float32, success [N] float32 (0/1), progress [N] float32 in [0, 1],
    episode [N] int64 (the source episode, for splits), kind [N] int64 (index into KINDS),
    and pixels [N, H, W, 3] uint8 when the trajectories carry images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

KINDS = ("real", "clip", "counterfactual")

# Where each task keeps its target in `state`: Detour's goal (x, y), PegInsert's hole centre (x, y).
TARGET_DIMS: dict[str, tuple[int, ...]] = {"labkit/Detour-v0": (4, 5), "labkit/PegInsert-v0": (6, 7)}


@dataclass
class Trajectory:
    """One episode as a reward model sees it: every state, the reset one first.

    states [T+1, D], success [T+1] (info["is_success"] at each state), distance [T+1] (the env's dense
    reward negated: distance to the goal), pixels [T+1, H, W, 3] or None. `episode` and `seed` say where
    it came from.
    """

    states: np.ndarray
    success: np.ndarray
    distance: np.ndarray
    episode: int
    seed: int
    pixels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.states)

    @property
    def succeeded(self) -> bool:
        return bool(self.success.any())

    @property
    def true_return(self) -> float:
        """The dense return: minus the summed distance over the steps taken (the reset state excluded)."""
        return float(-self.distance[1:].sum())

    @property
    def true_progress(self) -> np.ndarray:
        """1 - distance / initial distance, clipped to [0, 1]: how far along each state is, from the simulator."""
        return np.clip(1.0 - self.distance / max(float(self.distance[0]), 1e-9), 0.0, 1.0)


def replay_episodes(dataset, env_id: str, episodes: Sequence[int] | None = None, pixels: bool = False,
                    image_size: int = 64, atol: float = 1e-3) -> list[Trajectory]:
    """Replay recorded episodes in the simulator (reset with the episode's seed, then its actions) to
    recover what the dataset does not store: the state *after* the last action (where a success shows),
    the distance to the goal, and (pixels=True) camera frames. Raises ValueError if a replay drifts more
    than `atol` from the recorded states (the episode was recorded with other env settings)."""
    import labkit.envs  # noqa: F401  (registers the tasks)

    if "seed" not in dataset.episodes:
        raise ValueError("the dataset has no per-episode `seed` column: its episodes cannot be replayed")
    idx = range(dataset.num_episodes) if episodes is None else episodes
    env = gym.make(env_id, reward_type="dense", obs_mode="pixels" if pixels else "state", image_size=image_size,
                   terminate_on_success=False)
    out = []
    for i in idx:
        ep = dataset.episode(int(i))
        seed = int(dataset.episodes["seed"][i])
        obs, info = env.reset(seed=seed)
        states, success, dist = [obs["state"]], [info["is_success"]], [-float(env.unwrapped._evaluate()[1])]
        frames = [obs["pixels"]] if pixels else None
        for a in ep["action"]:
            obs, r, _, _, info = env.step(a)
            states.append(obs["state"])
            success.append(info["is_success"])
            dist.append(-r)
            if pixels:
                frames.append(obs["pixels"])
        states = np.stack(states).astype(np.float32)
        drift = float(np.abs(states[:-1] - ep["observation.state"]).max())
        if drift > atol:
            raise ValueError(f"episode {i} (seed {seed}) replays {drift:.2g} away from its recorded states: "
                             f"was it recorded with other env settings than gym.make({env_id!r})?")
        out.append(Trajectory(states, np.asarray(success, bool), np.asarray(dist, np.float32), int(i), seed,
                              np.stack(frames) if pixels else None))
    env.close()
    return out


# ---- example sets ----------------------------------------------------------------------------------


def make_examples(states: np.ndarray, success, progress, episode, kind: str,
                  pixels: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """An example set from arrays (labels broadcast to the number of states)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    states = np.asarray(states, np.float32)
    n = len(states)
    ex = {"state": states,
          "success": np.broadcast_to(np.asarray(success, np.float32), (n,)).copy(),
          "progress": np.broadcast_to(np.asarray(progress, np.float32), (n,)).copy(),
          "episode": np.broadcast_to(np.asarray(episode, np.int64), (n,)).copy(),
          "kind": np.full(n, KINDS.index(kind), np.int64)}
    if pixels is not None:
        ex["pixels"] = np.asarray(pixels, np.uint8)
    return ex


def concat(*sets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One example set from several (they must all have pixels, or none)."""
    sets = [s for s in sets if len(s["state"])]
    if not sets:
        raise ValueError("nothing to concatenate: every example set is empty")
    keys = set(sets[0])
    if any(set(s) != keys for s in sets):
        raise ValueError("example sets differ in their keys (some have pixels, some not)")
    return {k: np.concatenate([s[k] for s in sets]) for k in sets[0]}


def _pix(traj: Trajectory, t) -> np.ndarray | None:
    return None if traj.pixels is None else traj.pixels[t]


def real_examples(trajs: Sequence[Trajectory]) -> dict[str, np.ndarray]:
    """Every state of every episode with its true label: success = the simulator's is_success; progress =
    t / T along a successful episode (T its first success), 0 throughout a failed one (RoboReward's
    "no success" score)."""
    sets = []
    for tr in trajs:
        t = np.arange(len(tr))
        if tr.succeeded:
            first = int(np.argmax(tr.success))
            progress = np.minimum(t / max(first, 1), 1.0)
        else:
            progress = np.zeros(len(tr))
        sets.append(make_examples(tr.states, tr.success, progress, tr.episode, "real", tr.pixels))
    return concat(*sets)


def temporal_clips(trajs: Sequence[Trajectory], fractions: Sequence[float] | None = (0.25, 0.5, 0.75, 0.9)
                   ) -> dict[str, np.ndarray]:
    """Near-misses from successes: the successful episode cut at round(f * T) (T = its first success
    frame) for each fraction f in (0, 1), labelled success 0 and progress t / T. `fractions=None` cuts at
    every frame before T. Failed episodes give no clips."""
    if fractions is not None and not all(0 < f < 1 for f in fractions):
        raise ValueError(f"clip fractions must lie in (0, 1), got {fractions}")
    sets = []
    for tr in trajs:
        if not tr.succeeded:
            continue
        first = int(np.argmax(tr.success))
        cut = np.arange(first) if fractions is None else \
            np.unique(np.clip(np.round(np.asarray(fractions) * first).astype(int), 0, first - 1))
        if len(cut):
            sets.append(make_examples(tr.states[cut], 0.0, cut / max(first, 1), tr.episode, "clip", _pix(tr, cut)))
    return concat(*sets) if sets else _empty(trajs)


def counterfactuals(trajs: Sequence[Trajectory], target_dims: Sequence[int] | str, per_episode: int = 4,
                    min_distance: float = 0.01, seed: int = 0, last: int = 1) -> dict[str, np.ndarray]:
    """Successes relabelled against a different target: the last `last` states of each successful episode,
    with state[target_dims] replaced by the target of another episode at least `min_distance` away
    (`per_episode` draws). Labelled success 0, progress 0: it succeeded at something else. The image (if
    any) is unchanged; a pixel model reads the target from state[target_dims]. `target_dims` may be a
    task id, looked up in TARGET_DIMS."""
    dims = list(target_dims_for(target_dims))
    if per_episode < 1 or last < 1:
        raise ValueError(f"per_episode and last must be >= 1, got {per_episode}, {last}")
    rng = np.random.default_rng(seed)
    targets = np.stack([tr.states[0, dims] for tr in trajs])
    sets = []
    for tr in trajs:
        if not tr.succeeded:
            continue
        first = int(np.argmax(tr.success))
        own = tr.states[first, dims]
        far = np.flatnonzero(np.linalg.norm(targets - own, axis=1) >= min_distance)
        if len(far) == 0:
            continue
        rows = np.arange(max(0, first - last + 1), first + 1)
        for j in rng.choice(far, per_episode, replace=len(far) < per_episode):
            states = tr.states[rows].copy()
            states[:, dims] = targets[j]
            sets.append(make_examples(states, 0.0, 0.0, tr.episode, "counterfactual", _pix(tr, rows)))
    return concat(*sets) if sets else _empty(trajs)


def target_dims_for(target_dims: Sequence[int] | str) -> tuple[int, ...]:
    """The state dims that hold the target: given directly, or the default of a task id."""
    if isinstance(target_dims, str):
        if target_dims not in TARGET_DIMS:
            raise ValueError(f"no default target dims for {target_dims!r}; known: {sorted(TARGET_DIMS)}. "
                             f"Pass the state indices of the target instead.")
        return TARGET_DIMS[target_dims]
    dims = tuple(int(d) for d in target_dims)
    if not dims:
        raise ValueError("target_dims is empty: say which state dims hold the target")
    return dims


def _empty(trajs: Sequence[Trajectory]) -> dict[str, np.ndarray]:
    d = trajs[0].states.shape[1] if trajs else 0
    ex = make_examples(np.zeros((0, d), np.float32), 0.0, 0.0, 0, "real")
    if trajs and trajs[0].pixels is not None:
        ex["pixels"] = np.zeros((0, *trajs[0].pixels.shape[1:]), np.uint8)
    return ex


def split_episodes(trajs: Sequence[Trajectory], test_fraction: float = 0.3, seed: int = 0
                   ) -> tuple[list[Trajectory], list[Trajectory]]:
    """Train / held-out split by episode, stratified by success, so both sides see both outcomes."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test = set()
    for outcome in (True, False):
        idx = [i for i, tr in enumerate(trajs) if tr.succeeded == outcome]
        rng.shuffle(idx)
        test.update(idx[: round(test_fraction * len(idx))])
    return [t for i, t in enumerate(trajs) if i not in test], [t for i, t in enumerate(trajs) if i in test]
