"""Learned reward models that judge one frame: a success classifier and a progress regressor.

    head="success"   P(success | frame), trained with binary cross-entropy on the `success` labels
    head="progress"  progress in [0, 1] (a sigmoid output), trained with squared error on `progress`
    obs="state"      an MLP on the normalised state (the target is part of the state)
    obs="pixels"     a small conv encoder on the camera frame, plus state[target_dims] (the "instruction":
                     which target to judge against), then an MLP

The state normaliser is a buffer, so a checkpoint (`save` / `load_reward`) alone rebuilds the model.
Training goes through Lightning (`fit_reward`) on in-memory random batches, as labkit.policies.fit does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from labkit.data import Normalizer
from labkit.nn import mlp
from labkit.training import RandomBatches, log_loss, train_module
from labkit.vision import ConvEncoder

STATE = "observation.state"


@dataclass
class RewardConfig:
    """What the reward model sees and predicts, its size and its optimiser."""

    head: str = "success"  # "success" (classifier) or "progress" (regressor)
    obs: str = "state"  # "state" or "pixels"
    target_dims: tuple[int, ...] = ()  # pixels: the state dims given beside the image (the target)
    hidden: int = 256
    layers: int = 2
    image_dim: int = 64  # conv feature size (pixels)
    lr: float = 1e-3
    weight_decay: float = 1e-4

    def __post_init__(self):
        self.target_dims = tuple(int(d) for d in self.target_dims)
        if self.head not in ("success", "progress"):
            raise ValueError(f"head must be 'success' or 'progress', got {self.head!r}")
        if self.obs not in ("state", "pixels"):
            raise ValueError(f"obs must be 'state' or 'pixels', got {self.obs!r}")
        if self.hidden < 1 or self.layers < 0 or self.lr <= 0:
            raise ValueError(f"need hidden >= 1, layers >= 0, lr > 0; got {self.hidden}, {self.layers}, {self.lr}")


class RewardModel(L.LightningModule):
    """A per-frame reward model: `predict(obs)` gives P(success) or progress in [0, 1]."""

    def __init__(self, config: RewardConfig | dict, state_dim: int):
        super().__init__()
        self.config = RewardConfig(**config) if isinstance(config, dict) else config
        c = self.config
        if any(not 0 <= d < state_dim for d in c.target_dims):
            raise ValueError(f"target_dims {c.target_dims} out of range for a {state_dim}-D state")
        self.state_dim = int(state_dim)
        self.normalizer = Normalizer({STATE: (state_dim,)}, {STATE: "mean_std"})
        self.encoder = ConvEncoder(c.image_dim) if c.obs == "pixels" else None
        inp = c.image_dim + len(c.target_dims) if c.obs == "pixels" else state_dim
        self.head = mlp(inp, 1, c.hidden, c.layers)
        # Added to the logits at prediction: undoes the prior shift of balanced training (see fit_reward).
        self.register_buffer("logit_offset", torch.zeros(()))
        self.loss_history: list[float] = []
        # A hand-written loss of one batch, `fn(model, batch) -> loss`, set by `fit_reward(training_step=fn)`
        # for the length of one fit: a lesson trains the reward model with the student's code.
        self.batch_loss_fn = None

    @classmethod
    def from_examples(cls, examples: dict[str, np.ndarray], **config) -> RewardModel:
        """A model whose state normaliser comes from the example set it will train on."""
        states = np.asarray(examples["state"], np.float32)
        model = cls(RewardConfig(**config), states.shape[1])
        with torch.no_grad():
            stats = model.normalizer.stats[STATE.replace(".", "__")]
            stats.mean.copy_(torch.as_tensor(states.mean(0)))
            stats.std.copy_(torch.as_tensor(states.std(0)))
        return model

    # ---- the network --------------------------------------------------------------------------------
    def logits(self, state: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """Raw outputs [B] (before the sigmoid) for physical states [B, D] and, for pixels, images [B, H, W, 3]."""
        if state.ndim != 2 or state.shape[1] != self.state_dim:
            raise ValueError(f"expected states [B, {self.state_dim}], got {tuple(state.shape)}")
        s = self.normalizer.normalize(STATE, state.float())
        if self.encoder is None:
            return self.head(s).squeeze(-1)
        if pixels is None:
            raise ValueError("this reward model reads pixels: pass obs with a 'pixels' entry (env obs_mode='pixels')")
        feat = torch.cat([self.encoder(pixels), s[:, list(self.config.target_dims)]], dim=-1)
        return self.head(feat).squeeze(-1)

    def batch_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss of one batch {"state" [B, D], "success" [B], "progress" [B] (, "pixels")}: binary
        cross-entropy on the logits (success head) or squared error of sigmoid(logits) (progress head)."""
        out = self.logits(batch["state"], batch.get("pixels"))
        if self.config.head == "success":
            return F.binary_cross_entropy_with_logits(out, batch["success"])
        return F.mse_loss(torch.sigmoid(out), batch["progress"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.batch_loss_fn(self, batch) if self.batch_loss_fn is not None else self.batch_loss(batch)
        self.loss_history.append(loss.item())
        log_loss(self, loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)

    # ---- use --------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, obs: dict, batch_size: int = 2048) -> np.ndarray:
        """P(success) (or progress) for env observations or an example set: a dict with `state` [D] or
        [B, D] (and `pixels` [H, W, 3] or [B, H, W, 3] for a pixel model). Returns [B], or a 0-d array."""
        if "state" not in obs:
            raise KeyError(f"obs needs a 'state' entry; it has {sorted(obs)}")
        state = torch.as_tensor(np.asarray(obs["state"], np.float32))
        single = state.ndim == 1
        pixels = obs.get("pixels") if self.encoder is not None else None
        if single:
            state = state[None]
            pixels = None if pixels is None else np.asarray(pixels)[None]
        was_training = self.training
        self.eval()
        out = []
        for i in range(0, len(state), batch_size):
            pix = None if pixels is None else torch.as_tensor(np.asarray(pixels[i:i + batch_size]))
            logits = self.logits(state[i:i + batch_size].to(self.device), None if pix is None else pix.to(self.device))
            out.append(torch.sigmoid(logits + self.logit_offset).cpu())
        self.train(was_training)
        p = torch.cat(out).numpy() if out else np.zeros(0, np.float32)
        return p[0] if single else p

    def save(self, path: str | Path) -> Path:
        """A checkpoint holding the weights, the normaliser and the config: `load_reward(path)` rebuilds it."""
        path = Path(path)
        torch.save({"config": dataclasses.asdict(self.config), "state_dim": self.state_dim,
                    "state_dict": self.state_dict()}, path)
        return path


def load_reward(path: str | Path, map_location: str = "cpu") -> RewardModel:
    """Rebuild a `RewardModel` saved with `save`."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    missing = {"config", "state_dim", "state_dict"} - set(ckpt)
    if missing:
        raise ValueError(f"{path} is not a labkit reward checkpoint (it lacks {sorted(missing)})")
    model = RewardModel(ckpt["config"], ckpt["state_dim"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


# ---- training ----------------------------------------------------------------------------------------


def fit_module(module: L.LightningModule, tensors: dict | RandomBatches, steps: int, batch_size: int = 256, seed: int = 0,
               progress: bool = True, **trainer_kwargs) -> L.LightningModule:
    """Train `module` for `steps` gradient steps on random batches of in-memory `tensors` (Lightning), or on
    prepared batches (a RandomBatches such as BalancedBatches)."""
    batches = tensors if isinstance(tensors, RandomBatches) else RandomBatches(tensors, batch_size, steps, seed)
    return train_module(module, batches, steps, seed, progress, **trainer_kwargs)


class BalancedBatches(RandomBatches):
    """Random batches in which a fixed fraction of the rows are positives (`success` == 1): rare successes
    are then seen every step instead of once in many batches."""

    def __init__(self, tensors: dict, batch_size: int, steps: int, seed: int = 0, positive_fraction: float = 0.5):
        super().__init__(tensors, batch_size, steps, seed)
        pos = tensors["success"] > 0.5
        self.pos, self.neg = torch.nonzero(pos).squeeze(1), torch.nonzero(~pos).squeeze(1)
        if len(self.pos) == 0 or len(self.neg) == 0:
            raise ValueError("balanced batches need positives and negatives in the example set")
        self.n_pos = max(1, round(positive_fraction * batch_size))

    def __iter__(self):
        for _ in range(self.steps):
            idx = torch.cat([self.pos[torch.randint(0, len(self.pos), (self.n_pos,), generator=self.gen)],
                             self.neg[torch.randint(0, len(self.neg), (self.batch_size - self.n_pos,),
                                                    generator=self.gen)]])
            yield {k: v[idx] for k, v in self.tensors.items()}


def fit_reward(model: RewardModel, examples: dict[str, np.ndarray], steps: int = 1000, batch_size: int = 256,
               seed: int = 0, progress: bool = True, positive_fraction: float | None = None,
               training_step: Callable | None = None, **trainer_kwargs) -> RewardModel:
    """Train a reward model on an example set (labkit.rewards.augment) and return it in eval mode.

    `positive_fraction` (success head only): draw that fraction of every batch from the successes. The
    classifier then learns the odds of the balanced batches; its output is shifted back to the example
    set's own prior (logit - log(q / (1 - q)) + log(pi / (1 - pi)), exact under label shift), so that its
    probabilities stay comparable.
    `training_step(model, batch) -> loss` (what a lesson hands in) replaces `RewardModel.batch_loss` for
    this fit; Lightning still does the backward pass and the optimiser step."""
    if training_step is not None and not callable(training_step):
        raise TypeError(f"training_step must be a function (model, batch) -> loss, got {type(training_step).__name__}")
    model.batch_loss_fn = training_step
    try:
        return _fit_reward(model, examples, steps, batch_size, seed, progress, positive_fraction, **trainer_kwargs)
    finally:
        model.batch_loss_fn = None


def _fit_reward(model: RewardModel, examples: dict[str, np.ndarray], steps: int, batch_size: int, seed: int,
                progress: bool, positive_fraction: float | None, **trainer_kwargs) -> RewardModel:
    keys = ["state", "success", "progress"] + (["pixels"] if model.encoder is not None else [])
    missing = [k for k in keys if k not in examples]
    if missing:
        raise KeyError(f"the example set lacks {missing} (a pixel model needs trajectories replayed with pixels)")
    tensors = {k: torch.as_tensor(np.asarray(examples[k])) for k in keys}
    if positive_fraction is None:
        return fit_module(model, tensors, steps, batch_size, seed, progress, **trainer_kwargs)
    if model.config.head != "success" or not 0 < positive_fraction < 1:
        raise ValueError(f"positive_fraction needs the success head and a value in (0, 1), got "
                         f"{model.config.head!r}, {positive_fraction}")
    batches = BalancedBatches(tensors, batch_size, steps, seed, positive_fraction)
    prior = float(tensors["success"].mean())
    model = fit_module(model, batches, steps, batch_size, seed, progress, **trainer_kwargs)
    with torch.no_grad():
        model.logit_offset.fill_(math.log(prior / (1 - prior)) - math.log(positive_fraction / (1 - positive_fraction)))
    return model
