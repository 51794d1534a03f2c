"""Training a labkit policy on an episode dataset: its windows as in-memory tensors, then
`labkit.training.train_module` (a quiet Lightning Trainer over random batches, no DataLoader workers)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import lightning as L
import torch

from labkit.training import RandomBatches, train_module

if TYPE_CHECKING:
    from labkit.policies.base import Policy


def window_tensors(policy: Policy, dataset) -> dict:
    """The dataset's training samples for `policy`: {"obs": {key: [N, To, ...]}, "action", "action_is_pad",
    "episode" (the episode each window comes from)}."""
    c = policy.config
    w = dataset.windows(obs_horizon=c.obs_horizon, horizon=c.horizon, keys=c.obs_keys)
    obs = w["obs"] if "obs" in w else {k: w[k] for k in c.obs_keys}
    return {
        "obs": {k: torch.as_tensor(obs[k]) for k in c.obs_keys},
        "action": torch.as_tensor(w["action"]).float(),
        "action_is_pad": torch.as_tensor(w["action_is_pad"]).bool(),
        "episode": torch.as_tensor(dataset.frames["episode_index"][w["index"]]).long(),
    }


def fit(policy: Policy, dataset, steps: int = 2000, batch_size: int = 256, seed: int = 0,
        progress: bool = True, accelerator: str = "auto", devices: int | str = 1, **trainer_kwargs) -> Policy:
    """Train `policy` on `dataset` for `steps` gradient steps and return it (in eval mode).

    Extra keyword arguments go to `lightning.Trainer` (e.g. `strategy="ddp"`, `precision="bf16-mixed"`).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    L.seed_everything(seed, verbose=False)
    batches = RandomBatches(policy.prepare_training(window_tensors(policy, dataset), dataset), batch_size, steps, seed)
    return train_module(policy, batches, steps, seed, progress, accelerator, devices, **trainer_kwargs)
