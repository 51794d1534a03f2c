"""`LearnedReward`: a gymnasium wrapper that replaces the task's reward with a learned reward model's.

    env = LearnedReward(gym.make("labkit/PegInsert-v0"), model, threshold=0.5)
    DPPO(policy, env_id, config, env_wrapper=lambda e: LearnedReward(e, model))   # RL on the learned reward

Honesty: an agent trained on a learned reward must not see the true success, so the wrapper switches
off the task's own termination on success (`MujocoTask.terminate_on_success = False`) and ends the
episode when the *model* judges success instead. The true outcome stays in `info` for evaluation:
`info["is_success"]` (and `info["true_success"]`) is the simulator's, `info["true_reward"]` the task's
reward; `info["learned_score"]` and `info["learned_success"]` are the model's.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np


class LearnedReward(gym.Wrapper):
    """reward = 1[model score >= threshold] (`reward="binary"`, a sparse success reward) or the score
    itself (`reward="score"`, e.g. a progress model's output); terminates on the model's success when
    `terminate` is true. The model is anything with `predict(obs) -> score` (labkit.rewards.RewardModel)."""

    def __init__(self, env: gym.Env, model, threshold: float = 0.5, reward: str = "binary",
                 terminate: bool = True):
        super().__init__(env)
        if reward not in ("binary", "score"):
            raise ValueError(f"reward must be 'binary' or 'score', got {reward!r}")
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        if not hasattr(model, "predict"):
            raise TypeError(f"model must have predict(obs) -> score, got {type(model).__name__}")
        task = env.unwrapped
        if not hasattr(task, "terminate_on_success"):
            raise TypeError(f"{type(task).__name__} has no terminate_on_success switch: the true success would "
                            "leak through early termination (use a labkit MujocoTask)")
        task.terminate_on_success = False  # only the model may end an episode on "success"
        self.model, self.threshold, self.reward_mode, self.terminate = model, float(threshold), reward, terminate

    def step(self, action):
        obs, true_reward, terminated, truncated, info = self.env.step(action)
        score = float(np.asarray(self.model.predict(obs)))
        success = score >= self.threshold
        reward = float(success) if self.reward_mode == "binary" else score
        info = {**info, "true_reward": float(true_reward), "true_success": bool(info.get("is_success", False)),
                "learned_score": score, "learned_success": bool(success)}
        return obs, reward, bool(terminated or (self.terminate and success)), truncated, info
