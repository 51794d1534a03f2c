"""The one chunk runtime: an observation history and an action queue, written once.

A chunked policy predicts H actions from the last `obs_horizon` observations and executes
`n_action_steps` of them before it predicts again (Diffusion Policy's n_obs_steps / horizon /
n_action_steps). Every caller that turns `predict_action_chunk` into `select_action` uses these
pieces: `Policy` itself, the RL wrappers that steer or correct a base policy (DSRL, ResFiT, DPPO,
best-of-N), the chunk-level RL env (`labkit.rl.PolicyChunkEnv`) and the robot control loop.

    ObsHistory    the last `horizon` observations; the first one of an episode fills it, as the
                  training windows pad an episode's start
    ChunkRuntime  `reset()` and `select_action(obs)` on top of `predict_action_chunk(history)`,
                  for a policy (`base_policy` is itself) or a wrapper around one (`self.policy`)
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import torch


class ObsHistory:
    """The last `horizon` observations (dicts of arrays or tensors), oldest first. The first push after
    `reset()` fills every slot with that observation, as training windows repeat an episode's first frame."""

    def __init__(self, horizon: int):
        if horizon < 1:
            raise ValueError(f"an observation history needs horizon >= 1, got {horizon}")
        self.horizon = int(horizon)
        self._frames: deque = deque(maxlen=self.horizon)

    def reset(self) -> None:
        self._frames.clear()

    def push(self, frame: dict[str, Any]) -> None:
        if not self._frames:
            self._frames.extend([frame] * self.horizon)
        else:
            self._frames.append(frame)

    def __len__(self) -> int:
        return len(self._frames)

    def frames(self) -> list[dict[str, Any]]:
        """The observations, oldest first (always `horizon` of them once anything was pushed)."""
        return list(self._frames)

    def stacked(self, dim: int = 0) -> dict[str, Any]:
        """{key: the observations stacked along `dim`}: dim 0 for one env's [To, ...] arrays, dim 1 for a
        batch of tensors [B, ...] -> [B, To, ...] (what `predict_action_chunk` reads)."""
        if not self._frames:
            raise ValueError("the observation history is empty: push an observation first")
        out = {}
        for k, v in self._frames[0].items():
            items = [f[k] for f in self._frames]
            out[k] = torch.stack(items, dim) if isinstance(v, torch.Tensor) else np.stack(items, axis=dim)
        return out

    @classmethod
    def of(cls, frames: list[dict[str, Any]], horizon: int) -> ObsHistory:
        """A history holding the last `horizon` of `frames` (the oldest repeated when there are fewer)."""
        if not frames:
            raise ValueError("need at least one observation")
        history = cls(horizon)
        for f in list(frames)[-horizon:]:
            history.push(f)
        while len(history) < horizon:  # fewer frames than slots: pad at the start with the oldest
            history._frames.appendleft(history._frames[0])
        return history


class ChunkRuntime:
    """The runtime contract (`reset`, `select_action`) on top of `predict_action_chunk(history) -> [B, H, A]`
    in physical units. A labkit `Policy` is one; an RL wrapper sets `self.policy` to the base policy it
    steers, whose config (obs keys, horizons), observation parsing and env interface it hands on."""

    policy: Any = None  # a wrapper's base policy

    @property
    def base_policy(self):
        """The labkit Policy whose observations, chunking and env interface this runtime uses."""
        return self.policy

    @property
    def data_env(self) -> dict:
        """The env interface the base policy was trained with (see `labkit.policies.base.rollout_kwargs`)."""
        return getattr(self.base_policy, "data_env", None) or {}

    def predict_action_chunk(self, history: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the observation history and the queued actions (call at every episode start)."""
        self._history = ObsHistory(self.base_policy.config.obs_horizon)
        self._queue: torch.Tensor | None = None

    @torch.no_grad()
    def select_action(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """One env observation (or a batch) -> the next action [A] (or [B, A]). A new chunk is predicted
        when the queue is empty; the first call after `reset()` fills the history with its observation."""
        base = self.base_policy
        frame, single = base.observation_frame(obs)
        self._history.push(frame)
        if self._queue is None or self._queue.shape[1] == 0:
            self._queue = self.predict_action_chunk(self._history.stacked(dim=1))[:, : base.config.n_action_steps]
        action, self._queue = self._queue[:, 0], self._queue[:, 1:]
        action = action.cpu().numpy().astype(np.float32)
        return action[0] if single else action
