"""Planning with a world model and a value function, Cosmos Policy's test-time idea (Kim et al. 2026):
propose action chunks, predict where each leads, execute the one whose predicted outcome is best.

    score(s, a_1..a_k) = E_members[ sum_t gamma^t P(alive before t) p_success_t
                                   + gamma^k P(alive after k) V(s_k) ]
where P(alive) multiplies (1 - p_success - p_failure) of the steps so far: a chunk the model predicts
to crash scores 0 from the crash on, a chunk it predicts to succeed scores 1.

    BestOfNPlanner  N chunks sampled from a generative policy; execute the argmax (Cosmos Policy's best-of-N).
    CEMPlanner      the cross-entropy method over the executed chunk, started from the policy's samples:
                    keep the top `elites`, refit a Gaussian to them, resample, repeat.
Both follow labkit's runtime contract (`reset`, batched `select_action`), so `labkit.eval.evaluate` runs them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from labkit.nn import mlp
from labkit.rl.best_of_n import sample_chunks
from labkit.rl.loop import ChunkRuntime
from labkit.training import minibatch_fit


class ValueFunction(nn.Module):
    """V(s): the discounted probability of eventually succeeding from s, regressed on episode outcomes:
    target(s_t) = gamma^(T - t) * success (t = T is the state after the last action, when known)."""

    def __init__(self, state_dim: int, hidden: int = 128, layers: int = 2):
        super().__init__()
        self.net = mlp(state_dim, 1, hidden, layers)
        self.register_buffer("mean", torch.zeros(state_dim))
        self.register_buffer("std", torch.ones(state_dim))

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net((state - self.mean) / self.std)).squeeze(-1)

    def fit(self, episodes: list[dict], gamma: float = 0.97, steps: int = 1000, lr: float = 1e-3,
            batch_size: int = 256, seed: int = 0) -> ValueFunction:
        xs, ys = [], []
        for e in episodes:
            s = np.asarray(e["state"], np.float32)
            T = len(e["action"])
            xs.append(s)
            ys.append(float(e["success"]) * gamma ** (T - np.arange(len(s))))
        x, y = torch.as_tensor(np.concatenate(xs)), torch.as_tensor(np.concatenate(ys), dtype=torch.float32)
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp(min=1e-3))
        torch.manual_seed(seed)
        minibatch_fit(self, lambda idx: nn.functional.binary_cross_entropy(self(x[idx]).clamp(1e-6, 1 - 1e-6), y[idx]),
                      len(x), steps, batch_size, lr, seed)
        return self


@torch.no_grad()
def score_chunks(world_model, value, state: torch.Tensor, chunks: torch.Tensor, gamma: float = 0.97) -> torch.Tensor:
    """Expected discounted success of candidate chunks: state [B, D], chunks [B, N, k, A] (physical,
    the executed part) -> scores [B, N], averaged over the ensemble's members (their means, no sampling)."""
    B, N, k, _ = chunks.shape
    E = world_model.config.ensemble
    s = state.float().repeat_interleave(N, 0).unsqueeze(0).expand(E, -1, -1)  # [E, B*N, D]: every member, every candidate
    acts = chunks.flatten(0, 1).unsqueeze(0).expand(E, -1, -1, -1)  # [E, B*N, k, A]
    alive = torch.ones(E, B * N)
    score = torch.zeros(E, B * N)
    for t in range(k):
        s, p = world_model.predict_members(s, acts[:, :, t])
        score += alive * p[..., 0] * gamma ** t
        alive = alive * (1 - p[..., 0] - p[..., 1]).clamp(min=0)
    if value is not None:
        score += alive * gamma ** k * value(s)
    return score.view(E, B, N).mean(0)


class BestOfNPlanner(ChunkRuntime):
    """Sample `n` chunks from a generative labkit policy, score each by world-model rollout + value, run the best."""

    def __init__(self, policy, world_model, value=None, n: int = 16, gamma: float = 0.97):
        if not hasattr(policy, "sample"):
            raise TypeError(f"BestOfNPlanner needs a generative policy with sample(), got {type(policy).__name__}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.policy, self.wm, self.value, self.n, self.gamma = policy, world_model, value, int(n), gamma
        self.last_scores: torch.Tensor | None = None
        self.reset()

    def candidates(self, history: dict[str, torch.Tensor]) -> torch.Tensor:
        """n physical chunks per observation from the policy: [B, n, H, A]."""
        obs = self.policy.normalize_obs({k: torch.as_tensor(v).float() for k, v in history.items()})
        return self.policy.normalizer.unnormalize("action", sample_chunks(self.policy, obs, self.n))

    @torch.no_grad()
    def predict_action_chunk(self, history: dict[str, torch.Tensor]) -> torch.Tensor:
        chunks = self.candidates(history)
        k = self.policy.config.n_action_steps
        state = torch.as_tensor(history["observation.state"])[:, -1]
        scores = score_chunks(self.wm, self.value, state, chunks[:, :, :k], self.gamma)
        self.last_scores = scores
        return chunks[torch.arange(len(chunks)), scores.argmax(1)]


class CEMPlanner(BestOfNPlanner):
    """The cross-entropy method over the executed chunk, seeded with the policy's samples (so it starts
    inside one mode or another, never at their average): `iterations` rounds of `n` Gaussian samples
    around the current `elites` best, whose mean and std are refitted each round."""

    def __init__(self, policy, world_model, value=None, n: int = 32, iterations: int = 3, elites: int = 4,
                 gamma: float = 0.97, min_std: float = 0.02, seed: int = 0):
        super().__init__(policy, world_model, value, n, gamma)
        if not 1 <= elites <= n:
            raise ValueError(f"need 1 <= elites <= n, got elites={elites}, n={n}")
        self.iterations, self.elites, self.min_std = int(iterations), int(elites), min_std
        self.gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def predict_action_chunk(self, history: dict[str, torch.Tensor]) -> torch.Tensor:
        k = self.policy.config.n_action_steps
        chunks = self.candidates(history)  # [B, n, H, A]
        state = torch.as_tensor(history["observation.state"])[:, -1]
        lo = torch.as_tensor(self.policy.stats["action"]["min"]).float()
        hi = torch.as_tensor(self.policy.stats["action"]["max"]).float()
        cand = chunks[:, :, :k]
        rows = torch.arange(len(cand))[:, None]
        for it in range(self.iterations + 1):
            scores = score_chunks(self.wm, self.value, state, cand, self.gamma)
            top = scores.topk(self.elites, dim=1).indices
            elite = cand[rows, top]  # [B, elites, k, A]
            if it == self.iterations:
                break
            mean, std = elite.mean(1, keepdim=True), elite.std(1, keepdim=True).clamp(min=self.min_std)
            noise = torch.randn((len(cand), self.n, *cand.shape[2:]), generator=self.gen)
            cand = torch.maximum(torch.minimum(mean + std * noise, hi), lo)
            cand[:, : self.elites] = elite  # keep the elites (never lose the best so far)
        self.last_scores = scores
        best = elite[:, 0]
        return torch.cat([best, chunks[:, 0, k:]], 1)  # the unexecuted tail is never run
