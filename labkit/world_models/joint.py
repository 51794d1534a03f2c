"""Cosmos Policy in miniature: one generative model of [actions, future states, values] that acts directly
or plans best-of-N by its own predicted value.

Kim et al. (arXiv 2601.16163) fine-tune a video model to generate, in one diffusion sequence, the robot's
action chunk, the future observations and the value of the outcome; at test time they sample several
candidates and keep the one whose predicted value is best. Here, in state space, row k of a chunk that
starts at step t is

    y_{t+k} = [ a_{t+k},  s_{t+k+1} - s_{t+k},  V_{t+k+1} ]        V_j = gamma^(T - j) * success

(the action, where it leads, and the discounted outcome from there, labelled from each recorded episode's
result) and an ordinary labkit flow policy learns p(y_t .. y_{t+H-1} | s_{t-1}, s_t) as it would an
action chunk. `JointPlanner` samples N chunks and executes the actions of the one whose own value after
its executed steps (row n_action_steps - 1) is highest; N = 1 acts with the model as a plain policy.
Compare `labkit.world_models.planning`: a separate world model and value function score a policy's samples.
"""

from __future__ import annotations

import numpy as np
import torch

from labkit.rl.best_of_n import sample_chunks
from labkit.rl.loop import ChunkRuntime


def joint_dataset(episodes: list[dict], gamma: float = 0.97, fps: float = 10.0):
    """Episodes {"state": [T or T+1, D], "action": [T, A], "success"} (as `episodes_from_dataset` and
    `collect_episodes` give them) -> an EpisodeDataset whose "action" rows are [a, next state - state, V]
    ([T, A + D + 1]) and whose "observation.state" is the state. Where the state after the last action
    is not recorded (a dataset's episode), the last row's state change is 0."""
    from labkit.data.dataset import EpisodeDataset  # noqa: PLC0415 (acting needs no data layer)

    if not episodes:
        raise ValueError("no episodes given")
    out = []
    for i, e in enumerate(episodes):
        s, a = np.asarray(e["state"], np.float32), np.asarray(e["action"], np.float32)
        T = len(a)
        if len(s) not in (T, T + 1) or T < 1:
            raise ValueError(f"episode {i}: {len(s)} states for {T} actions (need T or T + 1 states, T >= 1)")
        nxt = s[1:] if len(s) == T + 1 else np.concatenate([s[1:], s[-1:]])
        value = float(e["success"]) * gamma ** (T - np.arange(1, T + 1, dtype=np.float32))
        out.append({"observation.state": s[:T], "action": np.concatenate([a, nxt - s[:T], value[:, None]], 1)})
    return EpisodeDataset.from_episodes(out, fps=fps)


class JointPlanner(ChunkRuntime):
    """Act with a flow policy trained on `joint_dataset`: `n` sampled chunks, the actions of the one whose
    predicted value after the executed steps is highest (n = 1: the first sample). `action_dim` is the
    env's action size (the first columns of each row); `env` the env interface it runs in."""

    def __init__(self, policy, action_dim: int, n: int = 16, env: dict | None = None):
        if not hasattr(policy, "sample"):
            raise TypeError(f"JointPlanner needs a generative policy with sample(), got {type(policy).__name__}")
        width = policy.action_dim
        state_dim = policy.shapes["observation.state"][0]
        if width != action_dim + state_dim + 1:
            raise ValueError(f"the policy's rows have {width} numbers; a joint model of {action_dim} actions and "
                             f"{state_dim} states has {action_dim + state_dim + 1} (train it on joint_dataset)")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.policy, self.action_dim, self.n = policy, int(action_dim), int(n)
        self.env = env or {}
        self.last_values: torch.Tensor | None = None
        self.reset()

    @property
    def data_env(self) -> dict:
        return self.env

    @torch.no_grad()
    def predict_action_chunk(self, history: dict[str, torch.Tensor]) -> torch.Tensor:
        obs = self.policy.normalize_obs({k: torch.as_tensor(v).float() for k, v in history.items()})
        rows = self.policy.normalizer.unnormalize("action", sample_chunks(self.policy, obs, self.n))  # [B, n, H, W]
        values = rows[:, :, self.policy.config.n_action_steps - 1, -1]
        self.last_values = values
        best = rows[torch.arange(len(rows)), values.argmax(1)]
        return best[..., : self.action_dim]
