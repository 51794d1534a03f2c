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

A config is checked before anything is built: a YAML that does not parse, a section that is not a mapping,
a field of the wrong type (the policy's or the RL method's config fields included), `data.batch_size` or
`data.steps_per_epoch` below 1, or `trainer.max_steps` unset or below 1 is a `ConfigError` (a ValueError)
naming the file or the field; `labkit fit` prints it as one line and exits with status 2.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import types
import typing
import warnings
from argparse import ArgumentError
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


class ConfigError(ValueError):
    """A `labkit fit` config that cannot run, named by its file or field, found before anything is built."""


def one_line(message) -> str:
    """`message` on one line (parser messages span several)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def check_count(value, field: str, error: type[Exception] = ValueError) -> int:
    """`value` if it is an integer >= 1, else `error` naming `field`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise error(f"{field} must be an integer >= 1, got {value!r}")
    return value


def _matches(value, hint) -> bool:
    """Whether `value` (as read from YAML) fits the type hint `hint`; a hint this does not know passes."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is typing.Literal:
        return value in args
    if hint in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        if origin is tuple and args:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args, strict=True))
        return all(_matches(v, args[0]) for v in value) if args else True
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return True


def _describe(hint) -> str:
    names = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
             type(None): "null"}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s" if args else "a list"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def check_config_fields(values, config_class, where: str) -> None:
    """A ConfigError naming `where.<field>` when `values` (a YAML mapping meant for the dataclass
    `config_class`) is not a mapping, names an unknown field, or gives a field a value of the wrong type
    (a float must be finite). Ranges stay the config class's own checks."""
    if values is None:
        return
    if dataclasses.is_dataclass(values):
        values = dataclasses.asdict(values)
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of {config_class.__name__} fields, got {values!r}")
    fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(map(str, values)) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown {config_class.__name__} fields {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(config_class)
    for name, value in values.items():
        if not _matches(value, hints[name]):
            raise ConfigError(f"{where}.{name} must be {_describe(hints[name])}, got {value!r}")


def read_config(path: str | Path) -> dict:
    """A `labkit fit` YAML as a dict; a ConfigError naming the file when it is missing, does not parse, or
    is not a mapping of sections (`data` and `trainer` must be mappings)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no config file {path}")
    try:
        spec = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a YAML config (not text)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path} is not valid YAML: {one_line(getattr(e, 'problem', None) or e)}{at}") from None
    if not spec:
        raise ConfigError(f"{path} is empty: it needs `model:` and `trainer:` sections (see configs/*.yaml)")
    if not isinstance(spec, dict):
        raise ConfigError(f"{path} must be a YAML mapping of sections (name, model, data, trainer), "
                          f"got {type(spec).__name__} {one_line(spec)[:80]!r}")
    for section in ("data", "trainer"):
        if spec.get(section) is not None and not isinstance(spec[section], dict):
            raise ConfigError(f"{path}: `{section}` must be a mapping of its fields, got {spec[section]!r}")
    return spec


def _section(config, key):
    """config[key] for a jsonargparse Namespace or a dict (None when absent)."""
    try:
        return config[key]
    except (KeyError, TypeError):
        return None


class EpisodeData(L.LightningDataModule):
    """A labkit episode dataset (a shipped name such as `detour`, or a path) as random training windows."""

    def __init__(self, dataset: str = "detour", successes_only: bool = False, episodes: int | None = None,
                 batch_size: int = 256, steps_per_epoch: int = 1000, seed: int = 0, env: dict | None = None):
        super().__init__()
        check_count(batch_size, "batch_size")
        check_count(steps_per_epoch, "steps_per_epoch")
        if episodes is not None:
            check_count(episodes, "episodes")
        data = open_dataset(dataset)
        # The env it was recorded in (the policy is evaluated there): `env` when given, else the dataset's;
        # refused, before anything is trained, when neither says (policies.base.MissingInterfaceError).
        self.env = dataset_env(data, env)
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


class RunsCLI(LightningCLI):
    """LightningCLI with labkit's run folders: runs/<name>/version_<k>/ for logs and checkpoints."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--name", default="run", help="the run's folder under runs/")

    def before_instantiate_classes(self) -> None:
        # Loggers and checkpoints live under runs/<name>/version_<k>/ unless the YAML sets its own.
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config["trainer"]
        name = config["name"]
        # Lightning's default (-1) trains forever, and 0 ends at once writing nothing: a run has a budget.
        steps = trainer.get("max_steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"trainer.max_steps must be set to the number of training steps, an integer >= 1 "
                              f"(`max_steps: 2000` under `trainer:`, or --trainer.max_steps 2000), got {steps!r}")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"name must be the run's folder name under runs/, got {name!r}")
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

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else self.config
        data = _section(config, "data")
        for field in ("batch_size", "steps_per_epoch"):
            check_count(_section(data, field), f"data.{field}", ConfigError)
        if _section(data, "episodes") is not None:
            check_count(_section(data, "episodes"), "data.episodes", ConfigError)
        model = _section(config, "model")
        cls = _policy_class(_section(model, "class_path"))
        if cls is not None:
            values = _section(_section(model, "init_args"), "config")
            check_config_fields(values, cls.config_class, "model.init_args.config")
            if isinstance(values, dict):
                try:  # the config class's own checks (ranges), here rather than inside the parser's message
                    cls.config_class(**values)
                except (ValueError, TypeError) as e:
                    raise ConfigError(f"model.init_args.config: {one_line(e)}") from None


def _policy_class(class_path) -> type[Policy] | None:
    """The Policy subclass a class path names (None when it names none: the parser reports that)."""
    if not isinstance(class_path, str):
        return None
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name) if module else Policy.registry.get(name)
    except (ImportError, AttributeError, ValueError):
        return None
    return cls if isinstance(cls, type) and issubclass(cls, Policy) else None


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
        self._check_model(config["model"])

    @staticmethod
    def _check_model(model) -> None:
        import labkit.rl  # noqa: F401  (every method registers itself on import)
        from labkit.fitting.rl import check_env_id, config_class
        from labkit.rl.agent import Agent

        try:
            check_env_id(_section(model, "env_id"))
        except ValueError as e:
            raise ConfigError(f"model.env_id: {e}") from None
        method = _section(model, "method")
        cls = Agent.registry.get(method) if isinstance(method, str) else None
        fields = config_class(cls) if cls is not None else None
        if fields is not None:  # an unknown method is RLModule's error, which lists the known ones
            check_config_fields(_section(model, "config"), fields, "model.config")


def _is_rl(args: list[str]) -> bool:
    """Whether the command line (or a --config it names) trains an RL method (`model.method` is set)."""
    configs = [v for f, v in zip(args, args[1:], strict=False) if f in ("--config", "-c")]
    configs += [a.split("=", 1)[1] for a in args if a.startswith(("--config=", "-c="))]
    for path in configs:
        config = read_config(path)  # a ConfigError when missing, not YAML or not a mapping
        if isinstance(config.get("model"), dict) and "method" in config["model"]:
            return True
    return any(a.startswith("--model.method") for a in args)


def main(args: list[str] | None = None) -> RunsCLI:
    """Run LightningCLI with labkit's policies and data, or with an RL method (`args` as on the command
    line, after `labkit`). A config that cannot run is a ConfigError (a ValueError) naming the file or
    field, raised before anything is built; errors while building (an unknown dataset or method) are
    ValueErrors too."""
    try:
        return _main(args)
    except ArgumentError as e:  # the parser's own checks (an unknown key, a field's type): one line
        raise ConfigError(one_line(e)) from None


# Parser errors are raised (and turned into ConfigErrors) rather than printed with the whole usage text.
_RAISE = {"exit_on_error": False, "fit": {"exit_on_error": False}}


def _main(args: list[str] | None) -> RunsCLI:
    import sys

    quiet_lightning()
    if _is_rl(sys.argv[1:] if args is None else args):
        from labkit.fitting.rl import RLModule

        # The frozen base policy is in eval mode on purpose.
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
        return RLCLI(
            RLModule, args=args, save_config_kwargs={"overwrite": True}, seed_everything_default=0,
            parser_kwargs=_RAISE,
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
        seed_everything_default=0, parser_kwargs=_RAISE,
        trainer_defaults={
            "max_epochs": -1, "num_sanity_val_steps": 0, "enable_model_summary": False,
            "log_every_n_steps": 50,
            "callbacks": [ModelCheckpoint(save_last=True, every_n_train_steps=500, save_top_k=-1)],
        },
    )
