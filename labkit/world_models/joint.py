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
A sampled value is one draw from p(V | s, a): the argmax of N such draws picks lucky draws as much as good
actions. `inpainted_values` instead asks the model for E[V | s, a] of each candidate, as Cosmos Policy
queries its planning model with the action given: the action columns are held on their known path
x_t = (1 - t) z + t a while the rest is integrated (replacement inpainting), and k draws are averaged.
Compare `labkit.world_models.planning`: a separate world model and value function score a policy's samples.
"""

from __future__ import annotations

from collections.abc import Callable

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


def hold_known(x: torch.Tensor, z: torch.Tensor, known: torch.Tensor, t: float, action_dim: int) -> torch.Tensor:
    """x [..., H, W] at flow time t with its first `action_dim` columns put where the flow from noise z
    [..., H, action_dim] carries the given values `known` at time t: (1 - t) z + t known (a new tensor)."""
    x = x.clone()
    x[..., :action_dim] = (1 - t) * z + t * known
    return x


@torch.no_grad()
def inpainted_values(policy, obs_norm: dict[str, torch.Tensor], chunks: torch.Tensor, action_dim: int, k: int = 8,
                     steps: int | None = None, hold_fn: Callable = hold_known) -> torch.Tensor:
    """E[V | s, a] of candidate chunks [B, N, H, W] (normalised rows; their first `action_dim` columns are the
    actions), [B, N]: the future and value columns integrated by Euler with the action columns held on
    their known path (`hold_fn`: a lesson's own `hold_known`), k noise draws averaged, the value read after
    the executed steps."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    B, N, H, W = chunks.shape
    net, steps = policy.net(None), steps or policy.config.steps
    feat = net["encoder"]({key: v.repeat_interleave(N * k, dim=0) for key, v in obs_norm.items()})
    known = chunks[..., :action_dim].repeat_interleave(k, dim=1).flatten(0, 1)  # [B*N*k, H, A]
    x = torch.randn(B * N * k, H, W, device=chunks.device)
    z = x[..., :action_dim].clone()
    dt = 1.0 / steps
    for i in range(steps):
        t = i * dt
        x = hold_fn(x, z, known, t, action_dim)  # the given part, where the flow would carry it at time t
        x = x + net["denoiser"](x, torch.full((len(x),), t, device=x.device), feat) * dt
    rows = policy.normalizer.unnormalize("action", x)
    return rows[:, policy.config.n_action_steps - 1, -1].view(B, N, k).mean(-1)


def _check_joint(model, action_dim: int, name: str) -> None:
    if not hasattr(model, "sample"):
        raise TypeError(f"JointPlanner needs a generative {name} with sample(), got {type(model).__name__}")
    width, state_dim = model.action_dim, model.shapes["observation.state"][0]
    if width != action_dim + state_dim + 1:
        raise ValueError(f"the {name}'s rows have {width} numbers; a joint model of {action_dim} actions and "
                         f"{state_dim} states has {action_dim + state_dim + 1} (train it on joint_dataset)")


class JointPlanner(ChunkRuntime):
    """Act with a flow policy trained on `joint_dataset`: `n` sampled chunks, the actions of the one whose
    predicted value after the executed steps is highest (n = 1: the first sample). `action_dim` is the
    env's action size (the first columns of each row); `env` the env interface it runs in.

    `planning`: a second joint model that scores the candidates by its inpainted E[V | s, a], as Cosmos
    Policy deploys two checkpoints: the one trained on demonstrations acts, the one trained further on
    policy rollouts (which have failures, so its values mean something) predicts futures and values."""

    def __init__(self, policy, action_dim: int, n: int = 16, env: dict | None = None, value: str = "sampled",
                 k: int = 8, planning=None, hold_fn: Callable = hold_known):
        _check_joint(policy, action_dim, "policy")
        if planning is not None:
            _check_joint(planning, action_dim, "planning model")
            value = "inpainted"
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if value not in ("sampled", "inpainted"):
            raise ValueError(f"value must be 'sampled' (each sample's own draw) or 'inpainted' (E[V | s, a] over k "
                             f"draws), got {value!r}")
        self.policy, self.action_dim, self.n, self.value, self.k = policy, int(action_dim), int(n), value, int(k)
        self.planning = planning if planning is not None else policy
        self.hold_fn = hold_fn
        self.env = env or {}
        self.last_values: torch.Tensor | None = None
        self.reset()

    @property
    def data_env(self) -> dict:
        return self.env

    @torch.no_grad()
    def predict_action_chunk(self, history: dict[str, torch.Tensor]) -> torch.Tensor:
        obs = self.policy.normalize_obs({k: torch.as_tensor(v).float() for k, v in history.items()})
        chunks = sample_chunks(self.policy, obs, self.n)  # [B, n, H, W], normalised
        rows = self.policy.normalizer.unnormalize("action", chunks)
        if self.value == "inpainted" and self.n > 1:
            pm = self.planning  # its own normalisation (the same as the policy's when it is the policy)
            values = inpainted_values(pm, pm.normalize_obs({k: torch.as_tensor(v).float() for k, v in history.items()}),
                                      pm.normalizer.normalize("action", rows), self.action_dim, self.k,
                                      hold_fn=self.hold_fn)
        else:
            values = rows[:, :, self.policy.config.n_action_steps - 1, -1]
        self.last_values = values
        best = rows[torch.arange(len(rows)), values.argmax(1)]
        return best[..., : self.action_dim]
