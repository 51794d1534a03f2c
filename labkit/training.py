"""Training helpers every layer shares (policies, RL, reward and world models): in-memory random
batches, one quiet Lightning entry point, cheap loss logging, and a plain minibatch loop.

On 2 CPU cores a default Trainer with a DataLoader ran small MLPs at about half the rate of a plain
PyTorch loop. The time went to the DataLoader (collation, worker hand-off), not to Lightning's loop:
the windows are held as in-memory tensors and batches are index-sampled from them, no workers.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar


def global_rank() -> int:
    """This process's rank under torch.distributed (Lightning DDP), 0 when not distributed."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class RandomBatches:
    """An iterable of `steps` random minibatches drawn (with replacement) from in-memory tensors.

    Under DDP every process draws its own batches (the seed is offset by the rank when iteration
    starts): with one shared seed all ranks would train on identical batches, wasting all but one."""

    def __init__(self, tensors: dict, batch_size: int, steps: int, seed: int = 0):
        self.tensors, self.batch_size, self.steps = tensors, batch_size, steps
        lengths = set(_lengths(tensors))
        if len(lengths) != 1:
            raise ValueError(f"tensors must all have the same length, got {sorted(lengths)}")
        self.n = lengths.pop()
        if self.n == 0:
            raise ValueError("no examples to train on")
        self.seed, self.rank = seed, 0
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.steps

    # A resumed run (Lightning checkpoint) continues the random stream instead of replaying it.
    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state(), "rank": self.rank}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])
        self.rank = state["rank"]

    def __iter__(self) -> Iterator[dict]:
        rank = global_rank()
        if rank != self.rank:  # known only once the DDP processes exist: here, not in __init__
            self.rank = rank
            self.gen.manual_seed(self.seed + 7919 * rank)
        for _ in range(self.steps):
            idx = torch.randint(0, self.n, (self.batch_size,), generator=self.gen)
            yield _index(self.tensors, idx)


def _lengths(tree):
    """The first-dimension length of every tensor in a (nested) dict."""
    for v in tree.values():
        yield from (_lengths(v) if isinstance(v, dict) else [len(v)])


def _index(tree, idx):
    return {k: _index(v, idx) for k, v in tree.items()} if isinstance(tree, dict) else tree[idx]


class NonFiniteLossError(FloatingPointError):
    """Training stopped because a loss was NaN or infinite: one more update would fill the weights with
    NaN, and the run would go on to write a checkpoint that predicts only NaN."""


def check_finite_loss(loss: torch.Tensor | float, step: int, what: str = "training loss", lr: float | None = None) -> None:
    """Raise `NonFiniteLossError` naming `what`, the step and the likely causes when `loss` is NaN or
    infinite. One isfinite check (on a device tensor: one host sync) per call."""
    finite = math.isfinite(loss) if isinstance(loss, (int, float)) else bool(torch.isfinite(loss).all())
    if not finite:
        value = loss if isinstance(loss, (int, float)) else loss.detach().float().cpu().flatten()[0].item()
        at_lr = f" (lr={lr:g})" if lr is not None else ""
        raise NonFiniteLossError(
            f"{what} is {value} at step {step} (counting from 0): training stopped before the weights turned to "
            f"NaN. Likely causes: non-finite data (NaN or inf in the observations, actions or targets; check "
            f"them with np.isfinite) or a too-high learning rate{at_lr}.")


def log_loss(module: L.LightningModule, loss: torch.Tensor) -> None:
    """Log the training loss (and show it on the progress bar) on the steps the trainer's loggers
    write, every `log_every_n_steps`. Each `self.log` call cost ~1.1 ms on CPU (Lightning moves its
    result store to the device every time; cProfile): ~7% of a small flow policy's training step."""
    trainer = module._trainer
    if trainer is not None and (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) == 0:
        module.log("train/loss", loss, prog_bar=True)


def quiet_lightning() -> None:
    """Silence Lightning's banners and tips so that notebooks stay readable."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # a frozen pretrained image encoder stays in eval mode on purpose (labkit.vision.PretrainedEncoder)
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")


def train_module(module: L.LightningModule, batches, steps: int, seed: int = 0, progress: bool = True,
                 accelerator: str = "auto", devices: int | str = 1, **trainer_kwargs) -> L.LightningModule:
    """Run `steps` of `module.training_step` on an iterable of batches (e.g. RandomBatches) through a
    quiet Lightning Trainer; return the module in eval mode. Shared by policies and reward models."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    quiet_lightning()
    L.seed_everything(seed, verbose=False)
    # At most ~50 bar refreshes: in a notebook each refresh is a widget message, and per-step
    # messages made a papermill run of a 300-step fit take 15x longer than the fit itself.
    callbacks = [TQDMProgressBar(refresh_rate=max(1, steps // 50))] if progress else []
    trainer = L.Trainer(
        max_steps=steps, max_epochs=-1, accelerator=accelerator, devices=devices, logger=False,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress,
        log_every_n_steps=max(1, min(50, steps // 10)), num_sanity_val_steps=0,
        callbacks=callbacks + list(trainer_kwargs.pop("callbacks", [])), **trainer_kwargs,
    )
    module.train()
    trainer.fit(module, train_dataloaders=batches)
    return module.eval()


def minibatch_fit(model, loss_fn, n: int | None = None, steps: int = 1000, batch_size: int | tuple[int, ...] = 256,
                  lr: float = 1e-3, seed: int = 0, *, optimizer: str | torch.optim.Optimizer = "adam",
                  weight_decay: float = 0.0, schedule: str | None = None, grad_clip: float | None = None,
                  weights: torch.Tensor | None = None, sample=None, generator: torch.Generator | None = None,
                  after_step=None):
    """The plain supervised loop of labkit's small auxiliary models (values, critics, verifiers, world
    models, PostBC's ensemble), where a Trainer would cost more than the model: `steps` updates of
    `loss_fn(idx)` on minibatch indices drawn with replacement. Returns the loss per step (np.ndarray).

    model: an nn.Module (trained in train mode, left in eval mode) or an iterable of parameters.
    loss_fn(idx): the minibatch's scalar loss, or (loss, extra) with `extra` handed to `after_step`.
    Indices: idx = torch.randint(0, n, batch_size) (batch_size may be a shape, e.g. (members, B)); or
        torch.multinomial(weights, batch_size, replacement=True) with per-example `weights`; or
        `sample(generator)` (anything loss_fn takes). They come from `generator` (pass one that loss_fn
        also draws from, or that must continue across calls), by default a new one seeded with `seed`.
    optimizer: "adam", "adamw" (with `weight_decay`), or an optimiser to continue (its own settings kept).
    schedule: None (constant lr) or "cosine" (CosineAnnealingLR to 0 over `steps`).
    grad_clip: clip the gradients' global norm to this before each update (none by default).
    after_step(step, loss, extra): called after each update (e.g. to clamp a parameter, or to log).
    """
    import numpy as np

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if sample is None and weights is None and not n:
        raise ValueError("need n >= 1 examples to draw from (or `weights`, or `sample`)")
    module = model if isinstance(model, torch.nn.Module) else None
    params = list(model.parameters() if module is not None else model)
    if isinstance(optimizer, torch.optim.Optimizer):
        opt = optimizer
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'adam', 'adamw' or a torch optimiser, got {optimizer!r}")
    if schedule not in (None, "cosine"):
        raise ValueError(f"schedule must be None or 'cosine', got {schedule!r}")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if schedule == "cosine" else None
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    shape = (batch_size,) if isinstance(batch_size, int) else tuple(batch_size)
    if sample is None:
        if weights is not None:
            def sample(g):
                return torch.multinomial(weights, batch_size, replacement=True, generator=g)
        else:
            def sample(g):
                return torch.randint(0, n, shape, generator=g)
    losses = np.zeros(steps)
    if module is not None:
        module.train()
    for step in range(steps):
        out = loss_fn(sample(gen))
        loss, extra = out if isinstance(out, tuple) else (out, None)
        losses[step] = loss.item()
        check_finite_loss(losses[step], step, "minibatch_fit's loss", opt.param_groups[0]["lr"])
        opt.zero_grad()
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        if sched is not None:
            sched.step()
        if after_step is not None:
            after_step(step, losses[step], extra)
    if module is not None:
        module.eval()
    return losses


def read_checkpoint(path, what: str = "checkpoint", map_location="cpu") -> dict:
    """A checkpoint file's contents, loaded with `weights_only=True` (tensors and plain containers, never
    arbitrary pickles); a missing, truncated or unsafe file is an error that names it."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, or an unsafe pickle
        raise ValueError(f"cannot read {what} {path}: {e}") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a labkit {what} (a {type(ckpt).__name__}, not a dict)")
    return ckpt
