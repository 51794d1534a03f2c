"""Interventions: an expert taking over a failing rollout (RECAP's corrections, HG-DAgger's takeovers).

In simulation the env is deterministic given its seed, so a failed episode can be re-lived: `Takeover`
is a policy that replays the failure's first k actions from the same seed (reaching the same states)
and then hands control to the task's scripted expert, which finishes the episode. If the expert
succeeds, `corrected_episode` keeps the failure's first k frames followed by the expert's, the expert's
flagged as interventions (RECAP labels those frames positive whatever their advantage).

    takeover = Takeover(labkit.envs.expert(env), failed["action"], steps=len(failed["action"]) - 10, expert_seed=7)
    episode = labkit.eval.rollout(takeover, env_id, [failed["seed"]], keep=("obs", "actions"))[0]
"""

from __future__ import annotations

import numpy as np

INTERVENTION = "intervention"  # per-frame dataset column (bool): an expert's correcting action


class Takeover:
    """A plain policy `obs -> action` for one env: the first `steps` actions of `prefix` [T, A] replayed
    as they are, then `expert`'s, the expert being reset (with `expert_seed`, else the episode's seed)
    at the moment it takes over. `reset(seed=...)` starts the replay again."""

    def __init__(self, expert, prefix, steps: int | None = None, expert_seed: int | None = None):
        self.expert, self.prefix = expert, np.asarray(prefix)
        self.steps = len(self.prefix) if steps is None else int(steps)
        if not 0 <= self.steps <= len(self.prefix):
            raise ValueError(f"steps must be in [0, {len(self.prefix)}] (the prefix's length), got {steps}")
        self.expert_seed = expert_seed
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        self.t = 0
        self._seed = self.expert_seed if self.expert_seed is not None else seed

    @property
    def expert_acting(self) -> bool:
        """Whether the expert has taken over (the last action was the expert's)."""
        return self.t > self.steps

    def __call__(self, obs) -> np.ndarray:
        if self.t < self.steps:
            action = self.prefix[self.t]
        else:
            if self.t == self.steps:
                self.expert.reset(seed=self._seed)
            action = np.asarray(self.expert(obs), np.float32)
        self.t += 1
        return action


def corrected_episode(failed: dict, steps: int, expert_obs: dict[str, np.ndarray], expert_actions,
                      success: bool = True, **fields) -> dict:
    """The failed episode's first `steps` frames, then the expert's: an episode dict {"obs": {key: [T, ...]},
    "action": [T, A], "success", "intervention": [T] bool (True on the expert's frames), **fields}.
    `failed` is such a dict; `expert_obs` {key: [T - steps, ...]} has its observation keys."""
    expert_actions = np.asarray(expert_actions)
    return {"obs": {key: np.concatenate([v[:steps], expert_obs[key]]) for key, v in failed["obs"].items()},
            "action": np.concatenate([failed["action"][:steps], expert_actions]), "success": success,
            INTERVENTION: np.r_[np.zeros(steps, bool), np.ones(len(expert_actions), bool)], **fields}
