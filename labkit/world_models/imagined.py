"""`ImaginedEnv`: a gymnasium env whose physics is a learned world model, so that any code that runs a
policy in the real task (`labkit.eval.evaluate` included) runs it in imagination unchanged.

    wm = StateWorldModel(6, 2).fit(transitions)
    evaluate(policy, "labkit/Imagined-v0", episodes=100, seed=EVAL_SEED,
             env_kwargs={"world_model": wm, "task": "labkit/Detour-v0"})

Episodes start from the real task's start states: `reset(seed=k)` resets a copy of the real task with
the same seed and reads its state, so imagined episode k and real episode k begin in the same place
(the "real start frames" of VLAW). Each step goes through one ensemble member (drawn per episode or
per step); the model's event heads (or a reward callable) decide success, failure and the reward;
the episode truncates at `horizon`.
"""

from __future__ import annotations

from collections.abc import Callable

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

ID = "labkit/Imagined-v0"


def start_states(task: str, n: int, seed: int = 0, task_kwargs: dict | None = None) -> np.ndarray:
    """The `state` observation after `reset(seed=seed + i)` of the real task, i < n: [n, D]."""
    import labkit.envs  # noqa: F401  (registers the tasks)

    env = gym.make(task, **(task_kwargs or {}))
    out = np.stack([env.reset(seed=seed + i)[0]["state"] for i in range(n)])
    env.close()
    return out


class ImaginedEnv(gym.Env):
    """The real task's observation/action spaces; dynamics, events and reward from a world model.

    world_model: anything with `predict(state [B, D], action [B, A], member=[B]) -> (next_state, p_events
                 [B, 2] = (success, failure))` and `config.ensemble` (a `StateWorldModel`).
    member:      "episode" (one ensemble member per episode, PETS's TS-inf) or "step" (a fresh one each step).
    reward_fn:   optional `(state, action, next_state, success, failure) -> reward`; default: sparse,
                 1.0 on success (the task's default). Any learned reward model fits here.
    sample_events: draw success/failure from the heads' probabilities instead of thresholding at 0.5.
    pessimistic: events from the whole ensemble (failure if any member says so, success only if all do),
                 as `imagine(pessimistic=True)`.
    info:        `is_success`, `collision` (the model's failure event), and the two probabilities.
    """

    metadata = {"render_modes": []}

    def __init__(self, world_model, task: str = "labkit/Detour-v0", horizon: int | None = None,
                 member: str = "episode", sample: bool = True, sample_events: bool = False,
                 reward_fn: Callable | None = None, task_kwargs: dict | None = None, render_mode: str | None = None,
                 pessimistic: bool = False):
        import labkit.envs  # noqa: F401

        if render_mode is not None:
            raise ValueError("ImaginedEnv does not render (it has no images); use render_mode=None")

        if member not in ("episode", "step"):
            raise ValueError(f"member must be 'episode' or 'step', got {member!r}")
        if not hasattr(world_model, "predict"):
            raise TypeError(f"world_model needs predict(state, action, member=...), got {type(world_model).__name__}")
        self.model, self.member_mode, self.sample = world_model, member, sample
        self.sample_events, self.reward_fn, self.pessimistic = sample_events, reward_fn, pessimistic
        self.real = gym.make(task, **(task_kwargs or {}))  # only for start states and spaces
        self.horizon = int(horizon or self.real.spec.max_episode_steps or 100)
        if self.horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {self.horizon}")
        real_space = self.real.observation_space
        keys = [k for k in ("state", "proprio") if k in real_space.spaces]  # low-dim keys only
        self.observation_space = spaces.Dict({k: real_space[k] for k in keys})
        self.action_space = self.real.action_space
        self.proprio_dim = real_space["proprio"].shape[0] if "proprio" in keys else 0
        self._state: np.ndarray | None = None

    def _obs(self) -> dict[str, np.ndarray]:
        s = self._state.astype(np.float32)
        obs = {"state": s}
        if self.proprio_dim:  # labkit tasks put the robot's own state (proprio) first in `state`
            obs["proprio"] = s[: self.proprio_dim].copy()
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        obs, info = self.real.reset(seed=seed, options=options)
        self._state = np.asarray(obs["state"], np.float64)
        self._member = int(self.np_random.integers(self.model.config.ensemble))
        self._t = 0
        return self._obs(), {"is_success": False, "collision": False}

    def step(self, action):
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        action = np.clip(np.asarray(action, np.float64), self.action_space.low, self.action_space.high)
        if action.shape != self.action_space.shape:
            raise ValueError(f"action must have shape {self.action_space.shape}, got {action.shape}")
        if self.member_mode == "step":
            self._member = int(self.np_random.integers(self.model.config.ensemble))
        gen = torch.Generator().manual_seed(int(self.np_random.integers(2**31)))
        nxt, p, p_all = self.model.predict(self._state[None], action[None], member=torch.tensor([self._member]),
                                           sample=self.sample, generator=gen, all_events=True)
        p = p[0].numpy()
        if self.pessimistic:
            p = np.array([p_all[:, 0, 0].min().item(), p_all[:, 0, 1].max().item()])
        u = self.np_random.random(2) if self.sample_events else np.full(2, 0.5)
        success, failure = bool(p[0] > u[0]), bool(p[1] > u[1]) and not bool(p[0] > u[0])
        prev, self._state = self._state, nxt[0].numpy().astype(np.float64)
        self._t += 1
        reward = float(success) if self.reward_fn is None else float(
            self.reward_fn(prev, action, self._state, success, failure))
        info = {"is_success": success, "collision": failure, "p_success": float(p[0]), "p_failure": float(p[1])}
        return self._obs(), reward, success or failure, self._t >= self.horizon, info

    def close(self):
        self.real.close()


@torch.no_grad()
def imagine(policy, world_model, starts: np.ndarray, horizon: int = 100, member: str = "episode",
            sample: bool = True, seed: int = 0, proprio_dim: int = 4, pessimistic: bool = False) -> list[dict]:
    """Batched imagined rollouts of a labkit policy from start states [B, D] (all episodes in lockstep):
    the fast path for synthetic data. Returns episodes {"state": [T+1, D], "action": [T, A],
    "success", "failure", "p_success": [T]}, as `transitions_from_episodes` and the improvement loop read them.

    pessimistic: label with the whole ensemble's doubt, not one member's view: a step is a failure when
    ANY member says so, a success only when ALL members agree (where the members disagree the model
    does not know, and a synthetic "success" there is the hallucination VLAW warns about)."""
    if member not in ("episode", "step"):
        raise ValueError(f"member must be 'episode' or 'step', got {member!r}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the policy's sampling noise
    B, E = len(starts), world_model.config.ensemble
    state = torch.as_tensor(np.asarray(starts), dtype=torch.float32)
    members = torch.randint(0, E, (B,), generator=gen)
    policy.reset()
    states, actions, probs = [state], [], []
    alive = torch.ones(B, dtype=torch.bool)
    length = torch.full((B,), horizon)
    success, failure = torch.zeros(B, dtype=torch.bool), torch.zeros(B, dtype=torch.bool)
    for t in range(horizon):
        obs = {"state": state.numpy(), "proprio": state[:, :proprio_dim].numpy()}
        a = torch.as_tensor(policy.select_action(obs)).float().reshape(B, -1)
        if member == "step":
            members = torch.randint(0, E, (B,), generator=gen)
        state, p, p_all = world_model.predict(state, a, member=members, sample=sample, generator=gen, all_events=True)
        is_s, is_f = (p_all[..., 0].min(0).values > 0.5, p_all[..., 1].max(0).values > 0.5) if pessimistic \
            else (p[:, 0] > 0.5, p[:, 1] > 0.5)
        f_now = is_f & alive
        s_now = is_s & ~is_f & alive
        success |= s_now
        failure |= f_now
        ended = s_now | f_now
        length[ended] = t + 1
        alive &= ~ended
        states.append(state)
        actions.append(a)
        probs.append(p[:, 0])
        if not alive.any():
            break
    S, A, P = torch.stack(states, 1), torch.stack(actions, 1), torch.stack(probs, 1)
    return [{"state": S[i, : length[i] + 1].numpy(), "action": A[i, : length[i]].numpy(),
             "p_success": P[i, : length[i]].numpy(), "success": bool(success[i]), "failure": bool(failure[i])}
            for i in range(B)]
