"""The off-policy agent step every finetuning method shares, and the chunk-level env chunked methods share.

    OffPolicyAgent  one agent step = warm-up or policy interaction (a chunk, or an env step), then `utd`
                    gradient steps; the agent contract (`labkit.rl.agent`), so `train(agent, ...)` and
                    `labkit fit` run it. A method fills in `collect(random)`, `update()` and `eval_policy()`.
    PolicyChunkEnv  the task as a chunked policy sees it: observation = the policy's observation history,
                    action = a normalised action chunk, of which `n_action_steps` are executed.
(The runtime contract of wrappers around a base policy, ChunkRuntime, is `labkit.policies.runtime`'s.)

The loop is RLPD's: one agent step, then `utd` updates on replayed batches. Episode i of training starts
from `reset(seed=config.seed + i)`, so a run is reproducible; evaluation uses its own seeds
(`eval_seed + j`), so successive evaluations meet the same initial states.
"""

from __future__ import annotations

from abc import abstractmethod

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from labkit.data.keys import env_key
from labkit.policies.runtime import ChunkRuntime, ObsHistory  # noqa: F401  (ChunkRuntime: the methods' import)
from labkit.rl.agent import Agent
from labkit.rl.critics import QEnsemble, target_copy
from labkit.rl.returns import chunk_discount
from labkit.rl.wrappers import ChunkWrapper


def frozen(policy):
    """The policy in eval mode with gradients off: a base that RL steers or corrects but never trains."""
    policy.eval()
    policy.requires_grad_(False)
    return policy


def critic_action(chunk: torch.Tensor, execute: int) -> torch.Tensor:
    """The part of normalised chunks [..., H, A] that runs in the env, flattened: [..., execute * A]."""
    return chunk[..., :execute, :].flatten(-2)


class OffPolicyAgent(Agent):
    """The shared training loop. A subclass sets, in its `__init__`:
        self.config  with `warmup_steps`, `utd` and `seed`
        self.env_id, self.env_kwargs, self.buffer (the online replay buffer)
    and calls `self.start(env)`; `collect` advances `self.env_steps` and calls `self.advance(...)`;
    `update` appends its losses (a dict) to `self.log`.
    """

    def start(self, env: gym.Env) -> None:
        """Take `env` as the training env and begin the first episode (seeded by config.seed)."""
        self.env = env
        self.env_steps, self.updates, self.episodes = 0, 0, 0
        self.log: list[dict] = []  # one dict of losses per gradient step
        self._episode_seed = self.config.seed
        self._obs, _ = env.reset(seed=self._episode_seed)
        self._ep_return, self._ep_success = 0.0, False

    def advance(self, next_obs, terminated: bool, truncated: bool) -> bool:
        """Move to `next_obs`, or to the next seeded episode when this one ended; returns whether it ended."""
        done = bool(terminated or truncated)
        if done:
            self.episodes += 1
            self._episode_seed += 1
            next_obs, _ = self.env.reset(seed=self._episode_seed)
        self._obs = next_obs
        return done

    # ---- what a method provides ---------------------------------------------------------------
    @abstractmethod
    def collect(self, random: bool = False) -> dict:
        """One agent step in the env, stored in the buffer. `random`: warm-up behaviour (usually the
        base policy, perhaps with noise). Returns at least {"reward": env reward summed over the
        steps taken, "episode_done": bool, "is_success": bool}."""

    @abstractmethod
    def update(self) -> dict:
        """One gradient step (of every network the method trains); returns and logs its losses."""

    @abstractmethod
    def eval_policy(self):
        """The current policy as something `labkit.eval.evaluate` runs (a batched runtime policy)."""

    def act_chunk(self, chunk: torch.Tensor) -> dict:
        """Run one normalised chunk [1, H, A] in the chunk env (a PolicyChunkEnv), store the chunk-level
        transition (obs, executed action, reward, next_obs, discount; the chunk too if the buffer keeps
        one) in `self.buffer`, count its env steps and move on; returns the env's info with "reward" and "episode_done". For chunk methods
        with `self.execute` (executed steps) and `config.gamma`."""
        next_obs, reward, terminated, truncated, info = self.env.step(chunk[0].numpy())
        row = {"obs": {k: v[None] for k, v in self._obs.items()}, "action": critic_action(chunk, self.execute),
               "reward": [reward], "next_obs": {k: v[None] for k, v in next_obs.items()},
               "discount": chunk_discount(info["chunk_steps"], terminated, self.config.gamma).view(1)}
        if "chunk" in self.buffer.fields:  # the whole normalised chunk, for methods that imitate it
            row["chunk"] = chunk.flatten(1)
        self.buffer.add(row)
        self.env_steps += info["chunk_steps"]
        info.update(reward=reward, episode_done=self.advance(next_obs, terminated, truncated))
        return info

    def chunk_env_and_critic(self, policy, hidden, ensemble: int, lr: float):
        """What the chunk methods (EXPO, OGPO, QAM) build first: the chunk-level env of `policy`, and a
        LayerNorm Q ensemble on (observation, the executed part of a chunk) with its target and optimiser
        (`self.critic`, `self.critic_target`, `self.critic_opt`; `self.execute`, `self.chunk_dim` set).
        Returns (env, obs_shapes, obs_dim, d): d = the executed part's width."""
        env = PolicyChunkEnv(gym.make(self.env_id, **self.env_kwargs), policy)
        self.execute, self.chunk_dim = policy.config.n_action_steps, env.chunk_dim
        d = self.execute * policy.action_dim
        obs_shapes = {k: tuple(s.shape) for k, s in env.observation_space.spaces.items()}
        obs_dim = sum(int(np.prod(s)) for s in obs_shapes.values())
        self.critic = QEnsemble(obs_dim, d, hidden, ensemble=ensemble, layer_norm=True)
        self.critic_target = target_copy(self.critic)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=lr)
        return env, obs_shapes, obs_dim, d

    def warming_up(self) -> bool:
        """Whether to act with warm-up behaviour and skip updates."""
        return len(self.buffer) == 0 or self.env_steps < self.config.warmup_steps

    def stats(self) -> dict:
        """Extra numbers for the history row (e.g. a diagnostic counted while acting); reset after reading."""
        return {}

    # ---- the agent contract: one step, counters, and what a resumed run needs ---------------------------
    def step(self) -> dict:
        """One agent step: act (warm-up behaviour until `warmup_steps` env steps), then `utd` updates.
        Returns the step's env reward, whether it was warm-up, the mean of its updates' losses, the
        method's stats(), and "ended" [(return, success)] when an episode ended."""
        warm = self.warming_up()
        info = self.collect(random=warm)
        self._ep_return += float(info["reward"])
        self._ep_success = self._ep_success or bool(info.get("is_success", False))
        out = {"reward": float(info["reward"]), "warm": float(warm), "ended": []}
        if info["episode_done"]:
            out["ended"] = [(self._ep_return, self._ep_success)]
            self._ep_return, self._ep_success = 0.0, False
        since = len(self.log)
        if not warm:
            for _ in range(self.config.utd):
                self.update()
        logs = self.log[since:]
        out.update({k: float(np.mean([r[k] for r in logs if k in r])) for k in dict.fromkeys(k for r in logs for k in r)})
        out.update(self.stats())
        return out

    def counters(self) -> dict:
        return {"env_steps": self.env_steps, "updates": self.updates, "episodes": self.episodes}

    def training_state(self) -> dict:
        """Counters, the sampling generator and the online replay buffer (networks and optimisers are
        saved by whoever holds them, e.g. `labkit.rl.fit.RLFit`'s Lightning checkpoint)."""
        gen = getattr(self, "gen", None)
        return {"env_steps": self.env_steps, "updates": self.updates, "episodes": self.episodes,
                "episode_seed": self._episode_seed, "buffer": self.buffer.state_dict(),
                "generator": gen.get_state() if gen is not None else None}

    def load_training_state(self, state: dict) -> None:
        """Continue from `training_state()`. The episode that was running when it was saved cannot be
        continued (the env's internal state is not saved): the next seeded episode starts instead."""
        self.env_steps, self.updates, self.episodes = state["env_steps"], state["updates"], state["episodes"]
        self.buffer.load_state_dict(state["buffer"])
        if state.get("generator") is not None:
            self.gen.set_state(state["generator"])
        self._episode_seed = state["episode_seed"] + 1
        obs, _ = self.env.reset(seed=self._episode_seed)
        self.restart(obs)

    def restart(self, obs) -> None:
        """Begin again from `obs`, a fresh episode's first observation (a method with per-episode state
        of its own, such as pending n-step transitions, extends this)."""
        self._obs = obs
        self._ep_return, self._ep_success = 0.0, False


class PolicyChunkEnv(ChunkWrapper):
    """The task seen through a chunked labkit policy: action = a normalised action chunk.

    Observation: the policy's observation history {dataset key: [obs_horizon, ...]} in physical units
    (the first frame repeated at reset, as `Policy.select_action` does). Action: a chunk [horizon * A]
    (flattened, in the policy's normalised action space) of which the first `n_action_steps` are
    unnormalised and executed as `ChunkWrapper` executes a chunk. info adds `chunk` (the normalised
    chunk [H, A]) to ChunkWrapper's `is_success`, `chunk_steps`, `chunk_rewards` and `actions`.
    """

    def __init__(self, env: gym.Env, policy):
        c = policy.config
        super().__init__(env, c.horizon, c.n_action_steps)
        self.policy = policy  # only its config and normaliser are used here
        self.obs_keys = list(c.obs_keys)
        self.chunk_dim = c.horizon * policy.action_dim
        self.action_space = spaces.Box(-1.0, 1.0, (self.chunk_dim,), np.float32)
        self.observation_space = spaces.Dict({
            k: spaces.Box(-np.inf, np.inf, (c.obs_horizon, *policy.shapes[k]), np.float32) for k in self.obs_keys})
        self._history = ObsHistory(c.obs_horizon)

    def env_actions(self, action) -> np.ndarray:
        """The normalised chunk, unnormalised to physical actions [horizon, A]."""
        chunk = torch.as_tensor(np.asarray(action, np.float32)).reshape(-1)
        if chunk.numel() != self.chunk_dim:
            raise ValueError(f"a chunk must have {self.chunk_dim} numbers (horizon * action_dim), got {chunk.numel()}")
        self._normalised = chunk.view(self.horizon, -1)
        return self.policy.normalizer.unnormalize("action", self._normalised).cpu().numpy().astype(np.float32)

    def observed(self, obs: dict) -> None:
        missing = [env_key(k) for k in self.obs_keys if env_key(k) not in obs]
        if missing:
            raise KeyError(f"the policy needs env observations {missing}; the env gives {sorted(obs)}")
        self._history.push({k: np.asarray(obs[env_key(k)], np.float32) for k in self.obs_keys})

    def chunk_observation(self, obs: dict) -> dict[str, np.ndarray]:
        return self._history.stacked(dim=0)

    def history(self) -> dict[str, torch.Tensor]:
        """The current observation history as a batch of one {key: [1, obs_horizon, ...]}."""
        return {k: torch.as_tensor(v)[None] for k, v in self._history.stacked(dim=0).items()}

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._history.reset()
        self.observed(obs)
        return self.chunk_observation(obs), info

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, reward, terminated, truncated, {**info, "chunk": self._normalised.cpu().numpy()}
