"""`labkit fit --config configs/<name>.yaml`: train any labkit policy through Lightning's LightningCLI.

The YAML names the policy class and its config, the dataset, and the Trainer (steps, devices,
strategy, precision); anything can be overridden on the command line (`--trainer.max_steps 500`).
Every run logs to TensorBoard and CSV under `runs/<name>/version_<k>/` and keeps `checkpoints/last.ckpt`
(plus one every `every_n_train_steps`), which `labkit eval` loads like any checkpoint and which
resumes training where it stopped:

    labkit fit --config configs/flow_detour.yaml
    labkit fit --config configs/flow_detour.yaml --ckpt_path runs/flow_detour/version_0/checkpoints/last.ckpt
    labkit fit --config configs/flow_detour.yaml --trainer.devices 2 --trainer.strategy ddp   # scale out

The policy needs the dataset's shapes and normalisation statistics to be built; they are read by the
data module and linked into the model's arguments when both are instantiated.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from labkit.policies.base import Policy
from labkit.policies.train import RandomBatches, quiet_lightning, window_tensors

RUNS = Path("runs")


class EpisodeData(L.LightningDataModule):
    """A labkit episode dataset (a shipped name such as `detour`, or a path) as random training windows."""

    def __init__(self, dataset: str = "detour", successes_only: bool = False, episodes: int | None = None,
                 batch_size: int = 256, steps_per_epoch: int = 1000, seed: int = 0):
        super().__init__()
        from labkit.cli import DATASETS
        from labkit.data import load_dataset

        path = Path(dataset)
        if not path.exists():
            path = DATASETS / dataset
        if not path.exists():
            shipped = sorted(p.name for p in DATASETS.iterdir() if p.is_dir())
            raise ValueError(f"dataset {dataset!r} is neither a folder nor a shipped dataset ({', '.join(shipped)})")
        data = load_dataset(path)
        if successes_only:
            data = data.select(np.flatnonzero(np.asarray(data.episodes["success"], bool)).tolist())
        if episodes is not None:
            if not 1 <= episodes <= data.num_episodes:
                raise ValueError(f"episodes must be in 1..{data.num_episodes}, got {episodes}")
            data = data.select(list(range(episodes)))
        self.data, self.batch_size, self.steps_per_epoch, self.seed = data, batch_size, steps_per_epoch, seed
        # What a policy's constructor needs, linked into the model's init args by LabkitCLI.
        self.shapes = {k: list(v.shape[1:]) for k, v in data.frames.items()
                       if k == "action" or k.startswith("observation.")}
        self.stats = data.stats

    def train_dataloader(self):
        policy = self.trainer.lightning_module
        tensors = policy.prepare_training(window_tensors(policy, self.data), self.data)
        return RandomBatches(tensors, self.batch_size, self.steps_per_epoch, self.seed)


class LabkitCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--name", default="run", help="the run's folder under runs/")
        parser.link_arguments("data.shapes", "model.init_args.shapes", apply_on="instantiate")
        parser.link_arguments("data.stats", "model.init_args.stats", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        # Loggers and checkpoints live under runs/<name>/version_<k>/ unless the YAML sets its own.
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config["trainer"]
        name = config["name"]
        if trainer.get("logger") in (None, True):
            # One version folder for both loggers (each would otherwise pick its own next free one).
            taken = [int(p.name.split("_")[1]) for p in (RUNS / name).glob("version_*") if p.name[8:].isdigit()]
            where = {"save_dir": str(RUNS), "name": name, "version": max(taken, default=-1) + 1}
            trainer["logger"] = [  # CSV first: it warns about a folder that TensorBoard already made
                {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": where},
                {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": where},
            ]

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would read the model's init args back from the checkpoint's hyperparameters;
        # a labkit policy stores its own (class, config, shapes, stats) for `load_policy`, and on resume
        # the YAML and the data give the same arguments. So resuming reads weights and state only.
        return


def main(args: list[str] | None = None) -> LabkitCLI:
    """Run LightningCLI with labkit's policies and data (`args` as on the command line, after `labkit`)."""
    quiet_lightning()
    return LabkitCLI(
        Policy, EpisodeData, subclass_mode_model=True, args=args, save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        trainer_defaults={
            "max_epochs": -1, "num_sanity_val_steps": 0, "enable_model_summary": False,
            "log_every_n_steps": 50,
            "callbacks": [ModelCheckpoint(save_last=True, every_n_train_steps=500, save_top_k=-1)],
        },
    )
