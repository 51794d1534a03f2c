"""A preference reward: Bradley-Terry on pairs of trajectories (Christiano et al. 2017's reward model).

A per-state reward r_theta(s) scores a trajectory by its sum, R(tau) = sum_t r_theta(s_t), and the
probability that tau_a is preferred to tau_b is sigma(R(tau_a) - R(tau_b)). Given a label p (1: a
preferred, 0: b preferred, 1/2: a tie) the loss is the cross-entropy

    L = -[p log sigma(R_a - R_b) + (1 - p) log sigma(R_b - R_a)]

Here the labels come from the true return (the simulator's dense reward), standing in for a person
comparing two videos. Only differences of R are learned: the reward is defined up to a constant.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from labkit.data import Normalizer
from labkit.nn import mlp
from labkit.rewards.augment import Trajectory
from labkit.rewards.classifier import STATE, fit_module
from labkit.training import log_loss


def bradley_terry_loss(return_a: torch.Tensor, return_b: torch.Tensor, prefer_a: torch.Tensor) -> torch.Tensor:
    """Mean Bradley-Terry cross-entropy for predicted returns [B] and labels prefer_a [B] in [0, 1]."""
    if return_a.shape != return_b.shape or return_a.shape != prefer_a.shape:
        raise ValueError(f"returns and labels must share a shape, got {tuple(return_a.shape)}, "
                         f"{tuple(return_b.shape)}, {tuple(prefer_a.shape)}")
    return F.binary_cross_entropy_with_logits(return_a - return_b, prefer_a.float())


def pad_trajectories(trajs: Sequence[Trajectory]) -> tuple[torch.Tensor, torch.Tensor]:
    """States padded to the longest trajectory [N, T, D], and the mask of real states [N, T]."""
    if not trajs:
        raise ValueError("no trajectories")
    T, D = max(len(t) for t in trajs), trajs[0].states.shape[1]
    states, mask = torch.zeros(len(trajs), T, D), torch.zeros(len(trajs), T, dtype=torch.bool)
    for i, tr in enumerate(trajs):
        states[i, : len(tr)] = torch.as_tensor(tr.states)
        mask[i, : len(tr)] = True
    return states, mask


class PreferenceReward(L.LightningModule):
    """r_theta(s): an MLP on the normalised state; a trajectory's score is the sum over its states."""

    def __init__(self, state_dim: int, hidden: int = 128, layers: int = 2, lr: float = 1e-3):
        super().__init__()
        self.state_dim, self.lr = int(state_dim), lr
        self.normalizer = Normalizer({STATE: (state_dim,)}, {STATE: "mean_std"})
        self.net = mlp(state_dim, 1, hidden, layers)
        self.loss_history: list[float] = []
        self.loss_fn = bradley_terry_loss  # (return_a, return_b, prefer_a) -> loss; fit_preference(loss_fn=) swaps it

    @classmethod
    def from_trajectories(cls, trajs: Sequence[Trajectory], **kwargs) -> PreferenceReward:
        model = cls(trajs[0].states.shape[1], **kwargs)
        states = np.concatenate([t.states for t in trajs])
        with torch.no_grad():
            s = model.normalizer.stats[STATE.replace(".", "__")]
            s.mean.copy_(torch.as_tensor(states.mean(0)))
            s.std.copy_(torch.as_tensor(states.std(0)))
        return model

    def reward(self, states: torch.Tensor) -> torch.Tensor:
        """Per-state reward [...] for physical states [..., D]."""
        if states.shape[-1] != self.state_dim:
            raise ValueError(f"expected states [..., {self.state_dim}], got {tuple(states.shape)}")
        return self.net(self.normalizer.normalize(STATE, states.float())).squeeze(-1)

    def trajectory_return(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """R(tau) = sum of r over the real (mask) states: [N, T, D], [N, T] -> [N]."""
        return (self.reward(states) * mask).sum(-1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ra = self.trajectory_return(batch["states_a"], batch["mask_a"])
        rb = self.trajectory_return(batch["states_b"], batch["mask_b"])
        loss = self.loss_fn(ra, rb, batch["prefer_a"])
        self.loss_history.append(loss.item())
        log_loss(self, loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    @torch.no_grad()
    def score(self, trajs: Sequence[Trajectory]) -> np.ndarray:
        """Predicted return of each trajectory [N]."""
        self.eval()
        states, mask = pad_trajectories(trajs)
        return self.trajectory_return(states, mask).numpy()


def preference_pairs(trajs: Sequence[Trajectory], pairs: int, seed: int = 0, tie_margin: float = 0.0,
                     key=lambda t: t.true_return) -> dict[str, torch.Tensor]:
    """`pairs` random pairs (a, b) of distinct trajectories labelled by `key` (default: the true return):
    prefer_a = 1 if key(a) > key(b) + tie_margin, 0 if below by the margin, 1/2 otherwise."""
    if len(trajs) < 2:
        raise ValueError(f"need at least 2 trajectories to compare, got {len(trajs)}")
    rng = np.random.default_rng(seed)
    a = rng.integers(0, len(trajs), pairs)
    b = (a + rng.integers(1, len(trajs), pairs)) % len(trajs)  # never a trajectory against itself
    value = np.array([key(t) for t in trajs])
    diff = value[a] - value[b]
    prefer = np.where(diff > tie_margin, 1.0, np.where(diff < -tie_margin, 0.0, 0.5))
    states, mask = pad_trajectories(trajs)
    return {"states_a": states[a], "mask_a": mask[a], "states_b": states[b], "mask_b": mask[b],
            "prefer_a": torch.as_tensor(prefer, dtype=torch.float32)}


def fit_preference(model: PreferenceReward, trajs: Sequence[Trajectory], steps: int = 500, pairs: int = 4000,
                   batch_size: int = 64, seed: int = 0, progress: bool = True, loss_fn: Callable | None = None,
                   **trainer_kwargs) -> PreferenceReward:
    """Train on `pairs` labelled pairs of `trajs` (drawn once), `steps` minibatches of `batch_size` pairs.
    `loss_fn(return_a, return_b, prefer_a) -> loss` (what a lesson hands in) replaces `bradley_terry_loss`
    for this fit."""
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be a function (return_a, return_b, prefer_a) -> loss, got {type(loss_fn).__name__}")
    model.loss_fn = loss_fn or bradley_terry_loss
    try:
        return fit_module(model, preference_pairs(trajs, pairs, seed), steps, batch_size, seed, progress,
                          **trainer_kwargs)
    finally:
        model.loss_fn = bradley_terry_loss
