"""`labkit fit --config`: every YAML in configs/ builds and trains through LightningCLI, logs to CSV and
TensorBoard, writes a checkpoint that `load_policy` reads, and resumes from it."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from labkit import load_policy
from labkit.cli import main

pytestmark = pytest.mark.slow  # LightningCLI runs (still in make test; skipped by make test-fast)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
QUIET = ["--trainer.enable_progress_bar", "false"]


def _fit(config: Path, steps: int, *extra: str) -> None:
    main(["fit", "--config", str(config), "--trainer.max_steps", str(steps), *QUIET, *extra])


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_trains(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Small data and a short PostBC ensemble keep this quick; the config's classes and fields are what is
    # tested. (The policy config is one dict: change its fields in a YAML, not as single flags.)
    if "postbc" in config.stem:
        config = tmp_path / config.name
        config.write_text(CONFIGS[[c.name for c in CONFIGS].index(config.name)].read_text()
                          .replace("ensemble_steps: 1000", "ensemble_steps: 5"))
    _fit(config, 3, "--data.episodes", "5", "--data.batch_size", "16")
    run = next((tmp_path / "runs").glob("*/version_0"))
    policy = load_policy(run / "checkpoints" / "last.ckpt")
    assert type(policy).__name__ in config.read_text()
    assert policy.data_env["env_id"].startswith("labkit/"), "the checkpoint must know the env it was trained for"


def test_logs_checkpoint_and_resume(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = next(c for c in CONFIGS if c.stem == "flow_detour")
    _fit(config, 30, "--trainer.log_every_n_steps", "5")
    first = tmp_path / "runs" / "flow_detour" / "version_0"
    assert list(first.glob("events.out.tfevents.*")), "no TensorBoard log"
    rows = list(csv.DictReader((first / "metrics.csv").open()))
    assert len(rows) >= 5 and all(float(r["train/loss"]) > 0 for r in rows)
    ckpt = first / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 30
    chunk = load_policy(ckpt).predict_action_chunk({"observation.state": torch.zeros(1, 2, 6)})
    assert chunk.shape == (1, 16, 2)

    _fit(config, 50, "--trainer.log_every_n_steps", "5", "--ckpt_path", str(ckpt))  # resume: 20 more steps
    second = tmp_path / "runs" / "flow_detour" / "version_1"  # a new version: the first run's logs stay
    assert torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 50
    steps = [int(r["step"]) for r in csv.DictReader((second / "metrics.csv").open())]
    assert steps and min(steps) >= 30, steps
    assert (first / "metrics.csv").exists() and len(list(csv.DictReader((first / "metrics.csv").open()))) == len(rows)


def test_bad_dataset_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="neither a folder nor a shipped dataset"):
        _fit(CONFIGS[0], 1, "--data.dataset", "no_such_data")


# ---- configs that cannot run are named before anything is built (Hardening 7) -----------------------
TINY = {"name": "tiny",
        "model": {"class_path": "labkit.policies.FlowPolicy",
                  "init_args": {"config": {"horizon": 8, "n_action_steps": 4, "steps": 2, "hidden": 32, "layers": 1}}},
        "data": {"dataset": "detour", "batch_size": 8, "episodes": 3, "steps_per_epoch": 2},
        "trainer": {"max_steps": 2, "enable_progress_bar": False}}


def _tiny(tmp_path: Path, section: str | None = None, **fields) -> Path:
    import copy

    import yaml

    spec = copy.deepcopy(TINY)
    target = spec["model"]["init_args"]["config"] if section == "config" else spec[section] if section else spec
    for k, v in fields.items():
        if v is None:
            target.pop(k)
        else:
            target[k] = v
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("section, fields, error", [
    ("data", {"batch_size": 0}, "data.batch_size must be an integer >= 1, got 0"),
    ("data", {"batch_size": -4}, "data.batch_size must be an integer >= 1, got -4"),
    ("data", {"steps_per_epoch": 0}, "data.steps_per_epoch must be an integer >= 1, got 0"),
    ("trainer", {"max_steps": -1}, "trainer.max_steps must be set to the number of training steps"),
    ("trainer", {"max_steps": 0}, "trainer.max_steps must be set .* got 0"),
    ("trainer", {"max_steps": None}, "trainer.max_steps must be set .* got -1"),  # Lightning's default: forever
    ("config", {"hidden": "32x"}, "model.init_args.config.hidden must be an integer, got '32x'"),
    ("config", {"lr": "fast"}, "model.init_args.config.lr must be a finite number, got 'fast'"),
    ("config", {"noise_scale": -1.0}, "model.init_args.config: noise_scale must be > 0"),
])
def test_bad_fit_configs_are_one_line_errors(section, fields, error, tmp_path, monkeypatch, capsys):
    import re

    from labkit.fitting import main as fit_main
    from labkit.fitting.cli import ConfigError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["labkit"])  # (LightningCLI warns about pytest's own arguments)
    config = _tiny(tmp_path, section, **fields)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("labkit fit: error: ") and re.search(error, err[0]), err
    assert not (tmp_path / "runs").exists(), "nothing is written for a config that cannot run"
    with pytest.raises(ConfigError, match=error):  # in Python: a ValueError naming the field
        fit_main(["fit", "--config", str(config)])
    assert issubclass(ConfigError, ValueError)


def test_a_yaml_that_does_not_parse_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["labkit"])
    config = tmp_path / "broken.yaml"
    config.write_text("name: x\nmodel: [unclosed\n")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{config} is not valid YAML" in err[0] and "line 3" in err[0], err


def test_episode_data_checks_its_fields():
    from labkit.fitting import EpisodeData

    for field in ("batch_size", "steps_per_epoch", "episodes"):
        with pytest.raises(ValueError, match=f"{field} must be an integer >= 1, got 0"):
            EpisodeData("detour", **{field: 0})


def test_fit_errors_from_the_command_line_are_one_line(tmp_path, monkeypatch, capsys):
    # Errors found while building (an unknown dataset) are one line too when run as `labkit fit`
    # (main() reads sys.argv); from Python (main(args)) they are raised, as test_bad_dataset_is_named checks.
    monkeypatch.chdir(tmp_path)
    config = _tiny(tmp_path, "data", dataset="no_such_data")
    monkeypatch.setattr("sys.argv", ["labkit", "fit", "--config", str(config)])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("labkit fit: error: ") and "neither a folder nor a shipped dataset" in err[-1], err


def test_tiny_config_still_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(_tiny(tmp_path))])
    assert torch.load(tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt",
                      weights_only=True)["global_step"] == 2


# ---- `labkit eval` on a file that is not a checkpoint (Hardening 8) ----------------------------------
def _not_checkpoints(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.ckpt"
    torch.save({"hyper_parameters": {}, "state_dict": {"w": torch.zeros(1000)}}, good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    listed = tmp_path / "list.ckpt"
    torch.save([1, 2, 3], listed)
    return {"missing": tmp_path / "nothing.ckpt", "truncated": truncated, "text": text, "a list": listed,
            "no policy class": good}


@pytest.mark.parametrize("kind", ["missing", "truncated", "text", "a list", "no policy class"])
def test_eval_of_a_bad_checkpoint_is_one_line(kind, tmp_path, capsys):
    path = _not_checkpoints(tmp_path)[kind]
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(path), "labkit/Detour-v0", "--episodes", "1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("labkit eval: error: ") and str(path) in err[0], err


def test_eval_refuses_an_env_id_that_is_not_a_labkit_task(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(tmp_path / "any.ckpt"), "os:system"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "env_id must be a registered labkit task" in err[0], err
