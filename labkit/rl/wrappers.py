"""A chunk-level gymnasium wrapper: one agent step = one action chunk executed open-loop.

Chunked RL (DSRL, DPPO, Q-chunking) treats the whole chunk [H, A] as one action, so the critic and
the replay buffer see chunk-level transitions (obs, chunk, summed reward, obs after the chunk).
The wrapper runs the first `execute` actions of the chunk (as Diffusion Policy runs 8 of 16) and stops
early when the episode ends mid-chunk, reporting how many env steps ran so that the bootstrap
discount is gamma**steps (see labkit.rl.returns.chunk_discount).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class ChunkWrapper(gym.Wrapper):
    """Action = a flattened chunk of `horizon` env actions (Box of shape [horizon * A]).

    step() returns (last obs, reward over the executed steps, terminated, truncated, info), with
    info = the last env step's info plus `is_success` (true if any executed step succeeded),
    `chunk_steps` (env steps executed, <= execute), `chunk_rewards` (their rewards, for a
    discounted-within-chunk return) and `actions` (the executed actions). `reward="max"` reports the max instead of the sum (sparse tasks).
    """

    def __init__(self, env: gym.Env, horizon: int, execute: int | None = None, reward: str = "sum"):
        super().__init__(env)
        if not isinstance(env.action_space, spaces.Box):
            raise TypeError(f"ChunkWrapper needs a Box action space, got {env.action_space}")
        execute = horizon if execute is None else execute
        if not 1 <= execute <= horizon:
            raise ValueError(f"need 1 <= execute <= horizon, got execute={execute}, horizon={horizon}")
        if reward not in ("sum", "max"):
            raise ValueError(f"reward must be 'sum' or 'max', got {reward!r}")
        self.horizon, self.execute, self.reward_mode = int(horizon), int(execute), reward
        self.step_shape = env.action_space.shape
        box = env.action_space
        self.action_space = spaces.Box(np.tile(box.low.ravel(), horizon), np.tile(box.high.ravel(), horizon),
                                       dtype=box.dtype)

    def chunk(self, action) -> np.ndarray:
        """The action as [horizon, *env action shape]; accepts it flat or already shaped."""
        a = np.asarray(action)
        expected = (self.horizon, *self.step_shape)
        if a.size != int(np.prod(expected)):
            raise ValueError(f"a chunk action must have {self.action_space.shape[0]} numbers "
                             f"(flattened {expected}), got shape {a.shape}")
        return a.reshape(expected)

    # Hooks for a wrapper that watches every executed step (PolicyChunkEnv keeps an observation history).
    def observed(self, obs) -> None:
        """Called with the observation after every executed env step."""

    def chunk_observation(self, obs):
        """The agent's observation after the chunk (default: the last env observation)."""
        return obs

    def env_actions(self, action) -> np.ndarray:
        """The env actions [horizon, ...] a chunk action stands for (a subclass may decode it)."""
        return self.chunk(action)

    def step(self, action):
        chunk = self.env_actions(action)
        rewards, executed, success = [], [], False
        obs, terminated, truncated, info = None, False, False, {}
        for a in chunk[: self.execute]:
            obs, r, terminated, truncated, info = self.env.step(a)
            self.observed(obs)
            rewards.append(float(r))
            executed.append(a)
            success = success or bool(info.get("is_success", False))
            if terminated or truncated:  # never step past an episode's end
                break
        total = float(np.max(rewards)) if self.reward_mode == "max" else float(np.sum(rewards))
        info = {**info, "is_success": success, "chunk_steps": len(rewards), "chunk_rewards": np.array(rewards),
                "actions": np.stack(executed)}
        return self.chunk_observation(obs), total, terminated, truncated, info
