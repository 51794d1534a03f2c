"""Training helpers every layer shares (policies, RL, reward and world models): in-memory random
batches, one quiet Lightning entry point, cheap loss logging, and a plain minibatch loop.

On 2 CPU cores a default Trainer with a DataLoader ran small MLPs at about half the rate of a plain
PyTorch loop. The time went to the DataLoader (collation, worker hand-off), not to Lightning's loop:
the windows are held as in-memory tensors and batches are index-sampled from them, no workers.
"""

from __future__ import annotations

import logging
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
