"""AsyncVLA-style deployment: a slow remote chunk policy plus a small, fast local adapter.

The remote policy (a big model on a server) answers late, so the chunk action the robot runs at step t
was planned from the observation of step t - age. The adapter runs on the robot every step: it sees
the *latest* observation, the stale chunk action and its age, and outputs a correction
(action = stale action + residual). It is trained on demonstrations, with the remote policy's own
chunks computed from earlier frames as the stale guidance (AsyncVLA, Hu et al., 2025).

`AsyncChunkPolicy` is a plain `obs -> action` callable (so it runs in `ControlLoop` behind the
`SafetyLayer`); its network delay is counted in control steps (simulated, reproducible), and
`SlowSource` adds a real one in seconds around any chunk source (e.g. a `PolicyClient`).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import numpy as np
import torch

from labkit.robot.control import as_chunk_source


class SlowSource:
    """A chunk source whose every answer takes `delay_s` seconds longer (a slow network or a big model)."""

    def __init__(self, source: Any, delay_s: float):
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s}")
        self.source, self.delay_s = as_chunk_source(source) or source, float(delay_s)
        for name in ("obs_horizon", "horizon", "n_action_steps"):
            setattr(self, name, getattr(self.source, name))

    def predict_chunk(self, history: Any) -> np.ndarray:
        time.sleep(self.delay_s)
        return self.source.predict_chunk(history)


def stale_guidance(chunks: np.ndarray, episode: np.ndarray, age: int) -> tuple[np.ndarray, np.ndarray]:
    """For every frame t, the action `chunks[t - age, age]` (the chunk planned `age` frames earlier,
    at its step for t) and a mask of the frames where t - age lies in the same episode."""
    chunks, episode = np.asarray(chunks), np.asarray(episode)
    if not 0 <= age < chunks.shape[1]:
        raise ValueError(f"age must lie in [0, {chunks.shape[1]}) (the chunk horizon), got {age}")
    src = np.arange(len(chunks)) - age
    ok = src >= 0
    ok[ok] = episode[src[ok]] == episode[ok]
    out = chunks[np.clip(src, 0, None), age]
    return out, ok


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """Weights W [D + 1, A] (the last row a bias) minimising |[x, 1] W - y|^2 + lam |W|^2."""
    X = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    return torch.linalg.solve(X.T @ X + lam * torch.eye(X.shape[1], dtype=x.dtype), X.T @ y)


class LocalAdapter:
    """A linear correction per chunk age: residual = [innovation, 1] @ W[age], in normalised units.

    The innovation is what the robot saw change since the chunk was planned (normalised state now
    minus then); the residual is added to the stale action and clipped to +-`max_correction`
    (physical units) so a bad fit can only nudge. Linear on purpose: it cannot extrapolate wildly
    off the demonstrations (an MLP adapter did, and drove the arm into the table)."""

    def __init__(self, weights: torch.Tensor, norm: Any, max_correction: float | None = 0.1,
                 key: str = "observation.state", dims: Any = None):
        self.W, self.norm, self.key = weights.float(), norm, key
        self.max_correction = max_correction
        self.dims = None if dims is None else list(dims)  # which state entries the innovation uses

    @property
    def max_age(self) -> int:
        return len(self.W) - 1

    @torch.no_grad()
    def residual(self, innovation: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
        """Normalised residuals [B, A] for normalised innovations [B, D] at ages [B] (clamped to max_age)."""
        W = self.W[age.clamp(max=self.max_age)]  # [B, D + 1, A]
        x = torch.cat([innovation, torch.ones(len(innovation), 1)], 1)
        return torch.einsum("bd,bda->ba", x, W)

    @torch.no_grad()
    def correct(self, action: np.ndarray, now: dict, then: dict, age: int) -> np.ndarray:
        """The stale `action` corrected with what changed between observation `then` and `now`."""
        n = lambda o: self.norm.normalize(self.key, torch.as_tensor(np.asarray(o["state"])).float()[None])  # noqa: E731
        g = self.norm.normalize("action", torch.as_tensor(action).float()[None])
        innovation = n(now) - n(then)
        if self.dims is not None:
            innovation = innovation[:, self.dims]
        a = self.norm.unnormalize("action", g + self.residual(innovation, torch.tensor([age])))[0].numpy()
        fix = a - action
        if self.max_correction is not None:
            fix = np.clip(fix, -self.max_correction, self.max_correction)
        return np.asarray(action, np.float64) + fix


def fit_adapter(policy: Any, dataset: Any, max_age: int, lam: float = 10.0, holdout: float = 0.1,
                max_correction: float | None = 0.1, dims: Any = None, solve: Any = None
                ) -> tuple[LocalAdapter, dict[str, np.ndarray]]:
    """Fit a LocalAdapter for `policy` (a labkit policy observing `observation.state`) on `dataset`.

    The remote chunks are the policy's predictions at every frame; for each age 0..max_age, each
    pair is (state at t minus state at t - age) -> (demonstrated action at t minus the chunk planned at
    t - age, at its step for t), solved by ridge regression. The last `holdout` share of episodes is
    kept out; returns the adapter and, per age, the held-out mean squared error (normalised actions)
    of the stale action and of the corrected one. `dims`: the state entries the innovation uses (all).
    `solve(x, y, lam) -> W` (what a lesson hands in, `ridge`'s signature) replaces labkit's `ridge`."""
    key = "observation.state"
    horizon = int(policy.config.horizon)
    if key not in policy.config.obs_keys:
        raise ValueError(f"the adapter reads {key!r}; the policy observes {policy.config.obs_keys}")
    if not 0 <= max_age < horizon:
        raise ValueError(f"max_age must lie in [0, {horizon}) (the policy's horizon), got {max_age}")
    w = dataset.windows(policy.config.obs_horizon, horizon, policy.config.obs_keys)
    norm = policy.normalizer
    with torch.no_grad():
        chunks = torch.cat([policy.predict_action_chunk({k: torch.as_tensor(v[i:i + 1024]) for k, v in w["obs"].items()})
                            for i in range(0, len(w["action"]), 1024)]).cpu().numpy()
    episode = np.asarray(dataset.frames["episode_index"])
    cut = np.quantile(np.unique(episode), 1 - holdout) if holdout > 0 else np.inf
    state = norm.normalize(key, torch.as_tensor(dataset.frames[key]).float()).double()
    target = norm.normalize("action", torch.as_tensor(dataset.frames["action"]).float()).double()
    weights, report = [], {"age": np.arange(max_age + 1), "mse_stale": [], "mse_adapted": []}
    for age in range(max_age + 1):
        g, ok = stale_guidance(chunks, episode, age)
        idx = np.flatnonzero(ok)
        x = state[idx] - state[idx - age]
        if dims is not None:
            x = x[:, list(dims)]
        y = target[idx] - norm.normalize("action", torch.as_tensor(g[idx]).float()).double()
        train, test = torch.as_tensor(episode[idx] < cut), torch.as_tensor(episode[idx] >= cut)
        W = torch.as_tensor((solve or ridge)(x[train], y[train], lam), dtype=x.dtype)
        weights.append(W)
        if test.any():
            pred = torch.cat([x[test], torch.ones(int(test.sum()), 1, dtype=x.dtype)], 1) @ W
            report["mse_stale"].append(float((y[test] ** 2).mean()))
            report["mse_adapted"].append(float(((y[test] - pred) ** 2).mean()))
    report = {k: np.asarray(v) for k, v in report.items()}
    return LocalAdapter(torch.stack(weights), norm, max_correction, dims=dims), report


class AsyncChunkPolicy:
    """`obs -> action` every control step, from a remote chunk source that answers `delay` steps late.

    A chunk is requested every `execute_steps` steps from the observation history of that step; it
    replaces the running chunk when it arrives. At step t the action is the running chunk's entry for
    t (age = t minus its observation's step; past the chunk's end its last action). With `adapter`,
    the adapter corrects that action with the latest observation.
    """

    def __init__(self, source: Any, delay: int, execute_steps: int | None = None, adapter: LocalAdapter | None = None):
        self.source = as_chunk_source(source) or source
        if not hasattr(self.source, "predict_chunk"):
            raise TypeError(f"source must be a labkit policy or have predict_chunk(history); got {type(source).__name__}")
        if delay < 0:
            raise ValueError(f"delay must be >= 0 steps, got {delay}")
        self.delay, self.adapter = int(delay), adapter
        self.execute_steps = int(execute_steps or self.source.n_action_steps)
        if self.execute_steps < 1:
            raise ValueError(f"execute_steps must be >= 1, got {self.execute_steps}")
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        self.t = 0
        self.history: deque = deque(maxlen=int(self.source.obs_horizon))
        self.running: tuple[int, np.ndarray, dict] | None = None  # (obs step, chunk, its observation)
        self.pending: list[tuple[int, int, np.ndarray, dict]] = []  # (arrival step, obs step, chunk, obs)

    def __call__(self, obs: dict) -> np.ndarray:
        t = self.t
        self.history.append(obs)
        if t % self.execute_steps == 0:  # computed now, delivered `delay` steps later (the first at once)
            chunk = np.asarray(self.source.predict_chunk(list(self.history)), dtype=np.float64)
            self.pending.append((t if self.running is None else t + self.delay, t, chunk, obs))
        while self.pending and self.pending[0][0] <= t:
            self.running = self.pending.pop(0)[1:]
        start, chunk, then = self.running
        age = min(t - start, len(chunk) - 1)
        action = chunk[age]
        if self.adapter is not None:
            action = self.adapter.correct(action, obs, then, age)
        self.t += 1
        return action
