"""Memory for policies, after MEM (Multi-Scale Embodied Memory): a short-term memory of recent frames
and a long-term memory of past events written as words.

    short-term  the last W frames, each embedded by one shared encoder, attended over by a learned
                query (`ShortMemoryPolicy`, W = `obs_horizon`): cheap, but forgets what left the window
    long-term   an event log: a high-level part WRITES an event ("cue: cup 2", "door left: locked")
                when it happens; the policy READS the log as a fixed-size vector every step
                (`EventMemory`), so an event survives however long ago it happened

The event vector is one more observation, `observation.events`: `with_events` computes it on a
dataset's episodes for training, and `MemoryRuntime` keeps the log at run time and hands the vector to
the policy it wraps, so the policy and its runtime contract stay those of every labkit policy (a
checkpoint holds the policy; the write/read functions are code, given again to `MemoryRuntime`).
The baselines are `BCPolicy` with `obs_horizon=1` (no memory) and `obs_horizon=k` (a frame stack).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from labkit.data.dataset import EpisodeDataset, compute_stats
from labkit.nn import mlp
from labkit.policies.base import Policy, PolicyConfig
from labkit.policies.runtime import ChunkRuntime

EVENTS_KEY = "observation.events"  # the env-side name is "events" (labkit.data.keys.env_key)

# What the memory tasks' high-level parts may write: the vocabulary the log is read against.
CUPS_EVENTS = ("cue: cup 1", "cue: cup 2", "cue: cup 3")
DOORS_EVENTS = ("door left: locked", "door right: locked")


# ---- the long-term memory: write and read ------------------------------------------------------------
def write_cups(log: list[str], prev_state: np.ndarray | None, state: np.ndarray) -> list[str]:
    """Cups' high-level part: while the cue is shown (state[5:8] one-hot), write which cup hides the cube,
    once. Returns the log (a new list: logs are never edited in place)."""
    cue = np.asarray(state)[5:8]
    event = f"cue: cup {int(np.argmax(cue)) + 1}"
    return [*log, event] if cue.max() > 0.5 and event not in log else list(log)


def write_doors(log: list[str], prev_state: np.ndarray | None, state: np.ndarray) -> list[str]:
    """Doors' high-level part: the robot was moving (go flag 1) and is now held at the start again (0),
    so the door it went to was locked: write which one, from where it was a step before (its x)."""
    if prev_state is None or not (prev_state[4] > 0.5 and state[4] < 0.5):
        return list(log)
    return [*log, f"door {'left' if prev_state[0] < 0 else 'right'}: locked"]


def read_log(log: Sequence[str], vocab: Sequence[str]) -> np.ndarray:
    """The policy's read of the log: a multi-hot float32 vector over `vocab` (1 where the event was
    written, however long ago). An event outside the vocabulary is an error, never silently dropped."""
    out = np.zeros(len(vocab), np.float32)
    for event in log:
        if event not in vocab:
            raise ValueError(f"event {event!r} is not in the memory's vocabulary {list(vocab)}")
        out[list(vocab).index(event)] = 1.0
    return out


@dataclass
class EventMemory:
    """A long-term memory: `write(log, prev_state, state) -> log` and `read(log, vocab) -> vector`."""

    write: Callable
    vocab: tuple[str, ...]
    read: Callable = read_log

    def episode(self, states: np.ndarray) -> np.ndarray:
        """The event vector after each frame of one episode's states [T, D] -> [T, len(vocab)]."""
        log, prev, out = [], None, []
        for s in np.asarray(states):
            log = self.write(log, prev, s)
            out.append(np.asarray(self.read(log, self.vocab), np.float32))
            prev = s
        return np.stack(out)


def with_events(dataset: EpisodeDataset, memory: EventMemory, key: str = "observation.state") -> EpisodeDataset:
    """A copy of `dataset` with the `observation.events` column: what the memory's log read at each frame
    (written from the frames before it, never after). Episodes are replayed one by one."""
    if key not in dataset.frames:
        raise KeyError(f"with_events: the dataset has no {key!r}; it has {sorted(dataset.frames)}")
    events = np.concatenate([memory.episode(dataset.frames[key][a:b])
                             for a, b in zip(dataset.episode_from, dataset.episode_to, strict=True)])
    if events.shape != (len(dataset), len(memory.vocab)):
        raise ValueError(f"read() must return one value per vocabulary entry ({len(memory.vocab)}), "
                         f"got events of shape {events.shape[1:]}")
    frames = {**dataset.frames, EVENTS_KEY: events}
    info = copy.deepcopy(dataset.info)
    info["features"][EVENTS_KEY] = {"dtype": "float32", "shape": [len(memory.vocab)], "names": list(memory.vocab)}
    stats = {**copy.deepcopy(dataset.stats), **compute_stats({EVENTS_KEY: events, "episode_index":
                                                              dataset.frames["episode_index"]}, info["features"])}
    stats.pop("episode_index", None)
    return EpisodeDataset(frames, dataset.episode_from, dataset.episode_to, info, stats,
                          copy.deepcopy(dataset.episodes), dataset.tasks, dataset.root)


class MemoryRuntime(ChunkRuntime):
    """Runs a policy trained on `observation.events` with its long-term memory: each step the high-level
    part writes to each env's log from the new observation, and the read vector joins the observation
    (`obs["events"]`) before the wrapped policy's history and action queue see it."""

    def __init__(self, policy: Policy, memory: EventMemory):
        if EVENTS_KEY not in policy.config.obs_keys:
            raise ValueError(f"MemoryRuntime needs a policy that reads {EVENTS_KEY!r}; this one reads "
                             f"{policy.config.obs_keys} (train it on with_events(dataset, memory))")
        self.policy, self.memory = policy, memory
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.policy.reset()
        self.logs: list[list[str]] | None = None
        self.prev: np.ndarray | None = None

    def predict_action_chunk(self, history):
        return self.policy.predict_action_chunk(history)

    @torch.no_grad()
    def select_action(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        state = np.asarray(obs["state"])
        single = state.ndim == 1
        states = state[None] if single else state
        if self.logs is None:
            self.logs = [[] for _ in states]
        prevs = [None] * len(states) if self.prev is None else list(self.prev)
        self.logs = [self.memory.write(log, p, s) for log, p, s in zip(self.logs, prevs, states, strict=True)]
        self.prev = states.copy()
        events = np.stack([self.memory.read(log, self.memory.vocab) for log in self.logs]).astype(np.float32)
        self.policy.eval()
        return super().select_action({**obs, "events": events[0] if single else events})


# ---- the short-term memory: attention over a window of per-frame embeddings ---------------------------
@dataclass
class ShortMemoryConfig(PolicyConfig):
    """obs_horizon is the memory window W. Keys in `latest_keys` (the event vector) are read from the
    newest frame only: they are already a memory."""

    obs_horizon: int = 8
    horizon: int = 8
    n_action_steps: int = 4
    embed_dim: int = 64
    hidden: int = 256
    layers: int = 3
    pool: str = "attention"  # or "mean"
    latest_keys: tuple[str, ...] = (EVENTS_KEY,)

    def __post_init__(self):
        super().__post_init__()
        self.latest_keys = tuple(self.latest_keys)
        if self.pool not in ("attention", "mean"):
            raise ValueError(f"pool must be 'attention' or 'mean', got {self.pool!r}")
        if min(self.embed_dim, self.hidden, self.layers) < 1:
            raise ValueError(f"embed_dim, hidden and layers must be >= 1, got {self.embed_dim}, {self.hidden}, {self.layers}")


class ShortMemoryPolicy(Policy):
    """Per-frame embeddings of the last W frames, pooled by attention (a learned query, with a learned
    embedding of each frame's age), plus the newest long-term memory vector -> an action chunk (MSE)."""

    config_class = ShortMemoryConfig

    def __init__(self, config, shapes, stats, env=None):
        super().__init__(config, shapes, stats, env)
        c = self.config
        self.frame_keys = [k for k in c.obs_keys if k not in c.latest_keys]
        self.latest = [k for k in c.obs_keys if k in c.latest_keys]
        if not self.frame_keys:
            raise ValueError(f"ShortMemoryPolicy needs a per-frame observation besides {list(c.latest_keys)}")
        frame_dim = sum(self.shapes[k][0] for k in self.frame_keys)
        self.embed = mlp(frame_dim, c.embed_dim, c.embed_dim, 2)  # narrow: it runs on every frame of the window
        self.age = nn.Parameter(torch.zeros(c.obs_horizon, c.embed_dim))
        self.query = nn.Parameter(torch.randn(c.embed_dim) / c.embed_dim ** 0.5)
        self.head = mlp(2 * c.embed_dim + sum(self.shapes[k][0] for k in self.latest), c.horizon * self.action_dim,
                        c.hidden, c.layers)

    def read_window(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The short-term memory: (pooled window [B, E], attention weights over the frames [B, W])."""
        e = self.embed(torch.cat([obs[k] for k in self.frame_keys], -1)) + self.age  # [B, W, E]
        if self.config.pool == "mean":
            w = torch.full(e.shape[:2], 1.0 / e.shape[1], device=e.device)
        else:
            w = torch.softmax(e @ self.query / e.shape[-1] ** 0.5, dim=1)
        return (w[..., None] * e).sum(1), w

    def predict_normalized(self, obs):
        pooled, _ = self.read_window(obs)
        newest = [obs[k][:, -1] for k in self.frame_keys]  # the current frame, as every policy sees it
        x = torch.cat([pooled, self.embed(torch.cat(newest, -1)), *[obs[k][:, -1] for k in self.latest]], -1)
        return self.head(x).view(-1, self.config.horizon, self.action_dim)

    def loss(self, obs, action, is_pad):
        err = (self.predict_normalized(obs) - action).pow(2).mean(-1)
        keep = (~is_pad).float()
        return (err * keep).sum() / keep.sum().clamp(min=1.0)


class _Timed:
    """`policy` with the wall time of its `select_action` calls summed (everything else handed on)."""

    def __init__(self, policy):
        self.policy, self.spent, self.calls = policy, 0.0, 0

    def __getattr__(self, name):  # data_env, config, ...: the wrapped policy's
        return getattr(self.policy, name)

    def reset(self) -> None:
        self.policy.reset()

    def select_action(self, obs):
        start = time.perf_counter()
        action = self.policy.select_action(obs)
        self.spent, self.calls = self.spent + time.perf_counter() - start, self.calls + 1
        return action


def step_ms(policy, env_id: str, steps: int = 200, seed: int = 1000) -> float:
    """Inference cost: mean wall milliseconds of one `select_action` on one env's observations (chunk
    predictions amortised over the actions executed from each), over whole episodes of at least `steps`
    steps in all, rolled out one env at a time by labkit's rollout engine."""
    from labkit.eval import rollout

    timed = _Timed(policy)
    while timed.calls < steps:
        rollout(timed, env_id, [seed], num_envs=1)
        seed += 1
    return 1000.0 * timed.spent / timed.calls


__all__ = ["CUPS_EVENTS", "DOORS_EVENTS", "EVENTS_KEY", "EventMemory", "MemoryRuntime", "ShortMemoryConfig",
           "ShortMemoryPolicy", "read_log", "step_ms", "with_events", "write_cups", "write_doors"]
