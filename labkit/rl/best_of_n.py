"""Best-of-N with a critic: sample N action chunks from a generative policy, execute the one a critic
scores highest.

Test-time verification in its simplest form (as in V-GPS, CoVer, and EXPO's beta = 0 ablation): with a
critic Q ~ Q^pi of the base policy pi, picking the argmax over samples is one step of policy improvement
that never touches the policy's weights:

    C(s) = { a_i ~ pi(. | s) }_{i=1..N},      pi_BoN(s) = argmax_{c in C(s)} score(Q_1(s, c), ..., Q_E(s, c))

with score = the mean over the ensemble, the min, or the min over a random subset (EXPO's target rule).

The chunk-critic convention shared with EXPO: Q(x, a) with x = the policy's normalised observation
history, flattened (`labkit.rl.dsrl.actor_input`), and a = the *executed* part of the normalised chunk,
chunk[:, :n_action_steps] flattened (the rest of the chunk never reaches the env).
`fit_chunk_critic` fits such a critic by Monte-Carlo regression on chunk transitions of base-policy
rollouts (`collect_chunks`) or of an episode dataset (`dataset_chunks`):
    G_t = R_t + discount_t * G_{t+k},     L = sum_i mean (Q_i(x_t, a_t) - G_t)^2
where R_t is the chunk's summed reward over its k executed steps and discount_t = gamma**k (1 - terminated).
"""

from __future__ import annotations

import numpy as np
import torch

from labkit.data.keys import env_key
from labkit.rl.buffer import flatten_obs
from labkit.rl.critics import QEnsemble, min_of_random_subset
from labkit.rl.loop import ChunkRuntime, critic_action  # noqa: F401  (critic_action: the verifier's and lesson 08's import)
from labkit.rl.returns import chunk_discount
from labkit.training import minibatch_fit

# ---- the chunk-critic convention -------------------------------------------------------------------


def critic_obs(policy, obs_norm: dict[str, torch.Tensor]) -> torch.Tensor:
    """x [B, D]: a normalised observation history {key: [B, To, ...]} flattened in the policy's key order."""
    return flatten_obs(obs_norm, list(policy.config.obs_keys))


def sample_chunks(policy, obs_norm: dict[str, torch.Tensor], n: int, steps: int | None = None,
                  use_ema: bool | None = None) -> torch.Tensor:
    """n normalised chunks per observation, [B, n, H, A], drawn in one batched call (noise ~ N(0, I))."""
    if n < 1:
        raise ValueError(f"need at least one sample per observation, got n={n}")
    rep = {k: v.repeat_interleave(n, dim=0) for k, v in obs_norm.items()}
    chunks = policy.sample(rep, steps=steps, stochastic=False, use_ema=use_ema).actions
    return chunks.view(-1, n, *chunks.shape[1:])


def score_candidates(critic, x: torch.Tensor, candidates: torch.Tensor, reduce: str | int = "mean",
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Scores [B, N] of candidate actions [B, N, d] at observations x [B, D].

    reduce: "mean" or "min" over the ensemble, or an int k: the min over k members drawn at random
    (one draw for the whole batch, as REDQ/EXPO do)."""
    B, N = candidates.shape[:2]
    q = critic(x.repeat_interleave(N, dim=0), candidates.flatten(0, 1))  # [E, B*N]
    if reduce == "mean":
        s = q.mean(0)
    elif reduce == "min":
        s = q.min(0).values
    elif isinstance(reduce, int) and not isinstance(reduce, bool):
        s = min_of_random_subset(q, reduce, generator)[0]
    else:
        raise ValueError(f"reduce must be 'mean', 'min' or an int subset size, got {reduce!r}")
    return s.view(B, N)


def best_of(critic, x: torch.Tensor, candidates: torch.Tensor, reduce: str | int = "mean",
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The highest-scoring candidate per observation: (best [B, d], index [B], scores [B, N]).
    Ties go to the lowest index (torch.argmax), so with identical candidates the first one wins."""
    scores = score_candidates(critic, x, candidates, reduce, generator)
    idx = scores.argmax(1)
    return candidates[torch.arange(len(idx)), idx], idx, scores


# ---- the runtime policy --------------------------------------------------------------------------------


class BestOfN(ChunkRuntime):
    """Any generative policy + a chunk critic: each chunk is the best of `n` samples.

        bon = BestOfN(flow_policy, critic, n=8)
        labkit.eval.evaluate(bon, "labkit/Detour-v0", episodes=50)

    `critic(x, a)` -> [E, B] follows the module's convention (see `critic_obs`, `critic_action`).
    After each call `last_index` and `last_scores` hold the choice and the scores, for inspection.
    """

    def __init__(self, policy, critic, n: int = 8, reduce: str | int = "mean", steps: int | None = None,
                 seed: int = 0):
        if not hasattr(policy, "sample"):
            raise TypeError(f"BestOfN needs a generative policy with sample(obs, ...), got {type(policy).__name__}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.policy, self.critic, self.n, self.reduce, self.steps = policy, critic, int(n), reduce, steps
        self.gen = torch.Generator().manual_seed(seed)
        self.last_index: torch.Tensor | None = None
        self.last_scores: torch.Tensor | None = None
        self.reset()

    @torch.no_grad()
    def predict_action_chunk(self, history: dict[str, torch.Tensor]) -> torch.Tensor:
        """Observation history {key: [B, To, ...]} -> the best of n chunks [B, H, A], physical units."""
        obs = self.policy.normalize_obs({k: torch.as_tensor(v).float() for k, v in history.items()})
        chunks = sample_chunks(self.policy, obs, self.n, self.steps)
        cand = critic_action(chunks, self.policy.config.n_action_steps)
        _, idx, scores = best_of(self.critic, critic_obs(self.policy, obs), cand, self.reduce, self.gen)
        self.last_index, self.last_scores = idx, scores
        return self.policy.normalizer.unnormalize("action", chunks[torch.arange(len(idx)), idx])


# ---- chunk transitions and a Monte-Carlo chunk critic ----------------------------------------------------


def _mc_returns(reward: torch.Tensor, discount: torch.Tensor, nxt: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """G_t = R_t + discount_t * G_next(t), with G = R at an episode's last chunk; `nxt` > t, so one reverse pass."""
    r, d, n, e = (v.numpy() for v in (reward, discount, nxt, ends))
    g = np.zeros(len(r), np.float32)
    for t in range(len(r) - 1, -1, -1):
        g[t] = r[t] + (0.0 if e[t] else d[t] * g[n[t]])
    return torch.as_tensor(g)


def dataset_chunks(dataset, policy, gamma: float = 0.99, max_episode_steps: int | None = None) -> dict:
    """Chunk-level transitions from every frame t of an episode dataset, in `policy`'s convention:
    {"obs": {key: [N, To, ...]} (physical), "action": [N, execute*A], "chunk": [N, H*A] (normalised),
    "reward", "next_obs", "discount", "return" (Monte-Carlo, to the episode's end)}.

    A chunk from t runs k = min(execute, steps left) steps: reward = the sum of their rewards, next_obs =
    the history at t + k, discount = gamma**k, or 0 at an episode's end that is not a time-limit
    truncation (`max_episode_steps`); at such an end next_obs is the last frame's history."""
    c = policy.config
    if "next.reward" not in dataset.frames:
        raise KeyError("the dataset has no 'next.reward': record it with labkit.data.record")
    w = dataset.windows(obs_horizon=c.obs_horizon, horizon=c.horizon, keys=c.obs_keys)
    N, E = len(dataset), c.n_action_steps
    episode = np.repeat(np.arange(dataset.num_episodes), dataset.lengths)
    end = dataset.episode_to[episode]  # one past each frame's episode's last frame
    t = np.arange(N)
    k = np.minimum(E, end - t)
    rewards = dataset.frames["next.reward"].astype(np.float32)
    csum = np.concatenate([[0.0], np.cumsum(rewards)])
    reward = torch.as_tensor(csum[t + k] - csum[t], dtype=torch.float32)
    ends = torch.as_tensor(t + k >= end)
    full = torch.as_tensor(dataset.lengths[episode] >= (max_episode_steps or np.inf))
    nxt = torch.as_tensor(np.minimum(t + k, end - 1))
    discount = chunk_discount(torch.as_tensor(k), ends & ~full, gamma)
    obs = {key: torch.as_tensor(v).float() for key, v in w["obs"].items()}
    chunk = policy.normalizer.normalize("action", torch.as_tensor(w["action"]).float())
    return {"obs": obs, "action": critic_action(chunk, E), "chunk": chunk.flatten(1), "reward": reward,
            "next_obs": {key: v[nxt] for key, v in obs.items()}, "discount": discount,
            "return": _mc_returns(reward, discount, nxt, ends)}


class _SampledChunks(ChunkRuntime):
    """`policy` with a fresh noise sample per chunk, remembering every normalised chunk it predicts
    ([B, H, A] per call; calls come every n_action_steps env steps, the envs in lockstep)."""

    def __init__(self, policy):
        self.policy, self.chunks = policy, []

    def reset(self) -> None:
        super().reset()
        self.chunks.append([])  # one list of calls per batch of episodes

    def predict_action_chunk(self, history):
        chunk = sample_chunks(self.policy, self.policy.normalize_obs(history), 1)[:, 0]
        self.chunks[-1].append(chunk)
        return self.policy.normalizer.unnormalize("action", chunk)


def _history_at(obs: dict[str, np.ndarray], t: int, horizon: int) -> dict[str, torch.Tensor]:
    """The observation history at step t of one episode's observations {key: [T+1, ...]}, as a batch of one
    (the first observation repeated before the episode's start, as the runtime does)."""
    rows = np.maximum(np.arange(t - horizon + 1, t + 1), 0)
    return {k: torch.as_tensor(v[rows], dtype=torch.float32)[None] for k, v in obs.items()}


@torch.no_grad()
def collect_chunks(policy, env_id: str, episodes: int, seed: int = 0, gamma: float = 0.99,
                   env_kwargs: dict | None = None, num_envs: int = 10) -> dict:
    """Roll out `policy` (a fresh noise sample per chunk) for seeded episodes through `labkit.eval.rollout`
    and return its chunk transitions with Monte-Carlo returns: {"obs", "action", "chunk", "reward",
    "next_obs", "discount", "return", "success" (per episode)}; a time-limit truncation is treated like
    an end (G = R there)."""
    from labkit.eval import rollout

    c = policy.config
    E, To = c.n_action_steps, c.obs_horizon
    runtime = _SampledChunks(policy)
    eps = rollout(runtime, env_id, range(seed, seed + episodes), env_kwargs, num_envs, keep=("obs", "rewards"))
    rows = []
    for i, e in enumerate(eps):
        calls = runtime.chunks[i // num_envs]
        obs = {k: e.obs[env_key(k)] for k in c.obs_keys}
        for n, start in enumerate(range(0, e.length, E)):
            k = min(E, e.length - start)
            last = start + k >= e.length
            rows.append((_history_at(obs, start, To), calls[n][i % num_envs][None], float(e.rewards[start:start + k].sum()),
                         _history_at(obs, start + k, To), chunk_discount(k, last and e.terminated, gamma), last))
    obs = {k: torch.cat([r[0][k] for r in rows]) for k in rows[0][0]}
    chunk = torch.cat([r[1] for r in rows])
    reward = torch.tensor([r[2] for r in rows], dtype=torch.float32)
    discount = torch.stack([torch.as_tensor(r[4]) for r in rows])
    ends = torch.tensor([r[5] for r in rows])
    nxt = torch.arange(len(rows)) + 1
    return {"obs": obs, "action": critic_action(chunk, E), "chunk": chunk.flatten(1), "reward": reward,
            "next_obs": {k: torch.cat([r[3][k] for r in rows]) for k in obs}, "discount": discount,
            "return": _mc_returns(reward, discount, nxt, ends), "success": np.array([e.success for e in eps])}


def fit_chunk_critic(policy, data: dict, steps: int = 2000, hidden: tuple[int, ...] = (256, 256),
                     ensemble: int = 2, lr: float = 3e-4, batch_size: int = 256, seed: int = 0
                     ) -> tuple[QEnsemble, list[float]]:
    """A LayerNorm Q ensemble regressed onto the Monte-Carlo returns of chunk transitions `data`
    (from `collect_chunks` or `dataset_chunks`): Q ~ Q^pi of the policy that made them.
    Returns (critic, loss per step)."""
    if "return" not in data:
        raise KeyError("data needs Monte-Carlo returns under 'return' (see collect_chunks / dataset_chunks)")
    torch.manual_seed(seed)
    x = critic_obs(policy, policy.normalize_obs(data["obs"]))
    a, g = data["action"], data["return"]
    critic = QEnsemble(x.shape[1], a.shape[1], hidden, ensemble=ensemble, layer_norm=True)
    losses = minibatch_fit(critic, lambda idx: (critic(x[idx], a[idx]) - g[idx]).pow(2).mean(1).sum(), len(g),
                           steps, batch_size, lr, seed)
    return critic, losses.tolist()
