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
