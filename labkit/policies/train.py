"""Training a labkit policy on an episode dataset: its windows as in-memory tensors, then
`labkit.training.train_module` (a quiet Lightning Trainer over random batches, no DataLoader workers)."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch

from labkit.data.keys import is_image_feature
from labkit.policies.base import Policy
from labkit.training import RandomBatches, train_module
from labkit.vision import ObsEncoder
from labkit.vision.frames import FrameTable


def window_tensors(policy: Policy, dataset) -> dict:
    """The dataset's training samples for `policy`: {"obs": {key: [N, To, ...]}, "action", "action_is_pad",
    "episode" (the episode each window comes from)}. Cameras stay one copy of their frames (a
    `FrameTable`, gathered per batch); with a frozen image encoder, one copy of their features."""
    c = policy.config
    missing = [k for k in c.obs_keys if k not in dataset.frames]
    if missing:
        raise ValueError(f"the dataset has no {missing}; it has {sorted(dataset.frames)}")
    obs_idx, act_idx, is_pad = dataset.window_indices(c.obs_horizon, c.horizon)
    encoder = next((m for m in policy.modules() if isinstance(m, ObsEncoder)), None)
    obs = {}
    for k in c.obs_keys:
        frames = torch.as_tensor(dataset.frames[k])
        if not is_image_feature(k):
            obs[k] = frames[torch.as_tensor(obs_idx)]
        elif encoder is not None and encoder.frozen(k):
            obs[k] = FrameTable(encoder.encoder(k).precompute(frames), obs_idx, variants=True)
        else:
            obs[k] = FrameTable(frames, obs_idx)
    return {
        "obs": obs,
        "action": torch.as_tensor(dataset.frames["action"][act_idx]).float(),
        "action_is_pad": torch.as_tensor(is_pad).bool(),
        "episode": torch.as_tensor(dataset.frames["episode_index"]).long(),
    }


def fit(policy: Policy, dataset, steps: int = 2000, batch_size: int = 256, seed: int = 0,
        progress: bool = True, accelerator: str = "auto", devices: int | str = 1,
        training_step: Callable | None = None, **trainer_kwargs) -> Policy:
    """Train `policy` on `dataset` for `steps` gradient steps and return it (in eval mode).

    `training_step(policy, batch) -> loss` replaces the method's loss of a batch (`Policy.batch_loss`)
    for this fit: Lightning still does the backward pass and the optimiser step, so a lesson trains with
    the student's code and a wrong answer shows in the result. Extra keyword arguments go to
    `lightning.Trainer` (e.g. `strategy="ddp"`, `precision="bf16-mixed"`).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if training_step is not None and not callable(training_step):
        raise TypeError(f"training_step must be a function (policy, batch) -> loss, got {type(training_step).__name__}")
    if training_step is not None and type(policy).training_step is not Policy.training_step:
        raise ValueError(f"{type(policy).__name__} has its own training step (not a loss of one batch); "
                         "training_step= applies to policies that use Policy.training_step")
    L.seed_everything(seed, verbose=False)
    batches = RandomBatches(policy.prepare_training(window_tensors(policy, dataset), dataset), batch_size, steps, seed)
    policy.batch_loss_fn = training_step
    try:
        return train_module(policy, batches, steps, seed, progress, accelerator, devices, **trainer_kwargs)
    finally:
        policy.batch_loss_fn = None
