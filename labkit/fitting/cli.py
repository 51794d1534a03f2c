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

A config whose model names a `method` (configs/rl/*.yaml) runs an RL method instead, through
`labkit.fitting.RLModule` and no data module (the agent collects its own data):

    labkit fit --config configs/rl/dppo_peg.yaml
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from labkit.data.shipped import open_dataset
from labkit.policies.base import Policy, dataset_env
from labkit.policies.train import window_tensors
from labkit.training import RandomBatches, quiet_lightning

RUNS = Path("runs")


class EpisodeData(L.LightningDataModule):
    """A labkit episode dataset (a shipped name such as `detour`, or a path) as random training windows."""

    def __init__(self, dataset: str = "detour", successes_only: bool = False, episodes: int | None = None,
                 batch_size: int = 256, steps_per_epoch: int = 1000, seed: int = 0):
        super().__init__()
        data = open_dataset(dataset)
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
        self.env = dataset_env(data)  # the env it was recorded in: the policy is evaluated there

    def train_dataloader(self):
        policy = self.trainer.lightning_module
        tensors = policy.prepare_training(window_tensors(policy, self.data), self.data)
        return RandomBatches(tensors, self.batch_size, self.steps_per_epoch, self.seed)


class RunsCLI(LightningCLI):
    """LightningCLI with labkit's run folders: runs/<name>/version_<k>/ for logs and checkpoints."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--name", default="run", help="the run's folder under runs/")

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


class LabkitCLI(RunsCLI):
    """Policies: the data module's shapes and statistics are linked into the policy's arguments."""

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.link_arguments("data.shapes", "model.init_args.shapes", apply_on="instantiate")
        parser.link_arguments("data.stats", "model.init_args.stats", apply_on="instantiate")
        parser.link_arguments("data.env", "model.init_args.env", apply_on="instantiate")


class RLCLI(RunsCLI):
    """RL methods: one CPU process, checked before the Trainer exists (a Trainer for 2 devices would
    already have launched its second process when the module could object)."""

    def before_instantiate_classes(self) -> None:
        from labkit.fitting.rl import ONE_PROCESS

        super().before_instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else self.config
        t = config["trainer"]
        if t.get("accelerator") != "cpu" or str(t.get("devices")) not in ("1", "auto") or t.get("num_nodes", 1) != 1:
            raise ValueError(f"{ONE_PROCESS} (got accelerator {t.get('accelerator')!r}, devices {t.get('devices')!r}, "
                             f"num_nodes {t.get('num_nodes')!r})")


def _is_rl(args: list[str]) -> bool:
    """Whether the command line (or a --config it names) trains an RL method (`model.method` is set)."""
    import yaml

    configs = [v for f, v in zip(args, args[1:], strict=False) if f == "--config"]
    configs += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    for path in map(Path, configs):
        if path.is_file():
            config = yaml.safe_load(path.read_text()) or {}
            if isinstance(config.get("model"), dict) and "method" in config["model"]:
                return True
    return any(a.startswith("--model.method") for a in args)


def main(args: list[str] | None = None) -> RunsCLI:
    """Run LightningCLI with labkit's policies and data, or with an RL method (`args` as on the command
    line, after `labkit`)."""
    import sys

    quiet_lightning()
    if _is_rl(sys.argv[1:] if args is None else args):
        from labkit.fitting.rl import RLModule

        # The frozen base policy is in eval mode on purpose.
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
        return RLCLI(
            RLModule, args=args, save_config_kwargs={"overwrite": True}, seed_everything_default=0,
            trainer_defaults={
                "accelerator": "cpu", "devices": 1, "max_epochs": -1, "num_sanity_val_steps": 0,
                "enable_model_summary": False, "log_every_n_steps": 10,
                # last.ckpt after every evaluation (and at the end); best.ckpt: the highest eval/success.
                "callbacks": [ModelCheckpoint(filename="last", save_top_k=1),
                              ModelCheckpoint(filename="best", monitor="eval/success", mode="max", save_top_k=1)],
            },
        )
    return LabkitCLI(
        Policy, EpisodeData, subclass_mode_model=True, args=args, save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        trainer_defaults={
            "max_epochs": -1, "num_sanity_val_steps": 0, "enable_model_summary": False,
            "log_every_n_steps": 50,
            "callbacks": [ModelCheckpoint(save_last=True, every_n_train_steps=500, save_top_k=-1)],
        },
    )
