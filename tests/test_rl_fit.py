"""`labkit fit --config configs/rl/*.yaml`: every RL method through LightningCLI. Each YAML builds and
trains (its own fields, with budgets shrunk), evaluates before training and after every `eval_every`
steps, writes last.ckpt and best.ckpt that `labkit eval` rolls out, and resumes with its replay buffer,
counters and optimiser states."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_flow

from labkit.cli import main as cli
from labkit.data import DATASETS, load_dataset
from labkit.fitting import load_agent

pytestmark = pytest.mark.slow  # LightningCLI runs (still in make test; skipped by make test-fast)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "rl").glob("*.yaml"))
QUIET = ["--trainer.enable_progress_bar", "false"]
# Each method's config, shrunk: tiny warm-up, batches and rollouts, so a run takes seconds.
SMALL = {"dsrl": {"warmup_steps": 8, "batch_size": 16, "utd": 1},
         "residual": {"warmup_steps": 8, "batch_size": 16, "utd": 1},
         "expo": {"warmup_steps": 8, "batch_size": 16, "utd": 1},
         "rlt": {"warmup_steps": 8, "batch_size": 16, "utd": 1, "token_steps": 5, "actor_init_steps": 5,
                 "critic_warmup": 2},
         "qam": {"warmup_steps": 8, "batch_size": 16, "utd": 1, "ensemble": 2, "critic_warmup": 0},
         "ogpo": {"warmup_steps": 8, "batch_size": 16, "utd": 1, "critic_warmup": 0, "actor_batch": 4, "group": 2,
                  "actor_every": 1},
         "tql": {"warmup_steps": 8, "batch_size": 16, "utd": 1, "d_model": 16, "layers": 1, "heads": 2},
         "dppo": {"num_envs": 2, "n_steps": 3, "minibatch_size": 6, "epochs": 1},
         "recap": {"rollouts": 2, "interventions": 1, "value_steps": 5, "policy_steps": 5, "batch_size": 32,
                   "num_envs": 2}}


@pytest.fixture(scope="session")
def peg_base(tmp_path_factory):
    """A tiny flow policy on 5 successful PegInsert demos, saved where a config can name it."""
    data = load_dataset(DATASETS / "peg")
    demos = data.select(np.flatnonzero(np.asarray(data.episodes["success"], bool))[:5].tolist())
    return tiny_flow(demos, steps=30, batch_size=32).save(tmp_path_factory.mktemp("base") / "flow.ckpt")


def _small_config(path: Path, base: Path, where: Path, steps: int = 4, **model) -> Path:
    """The YAML with its policy replaced by `base` and its budgets shrunk (its other fields kept)."""
    spec = yaml.safe_load(path.read_text())
    m = spec["model"]
    if m["method"] != "recap":  # RECAP's config starts from the data alone
        m["policy"] = str(base)
    m.update(eval_every=2, eval_episodes=2, config={**(m.get("config") or {}), **SMALL[m["method"]]})
    m.update(model)
    spec["trainer"]["max_steps"] = steps
    out = where / path.name
    out.write_text(yaml.safe_dump(spec))
    return out


def _fit(config: Path, *extra: str) -> None:
    cli(["fit", "--config", str(config), *QUIET, *extra])


def _evals(run: Path) -> list[dict]:
    return [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("eval/success")]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_rl_config_trains_evaluates_and_checkpoints(config, peg_base, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _fit(_small_config(config, peg_base, tmp_path))
    name = yaml.safe_load(config.read_text())["name"]
    run = tmp_path / "runs" / name / "version_0"
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4  # agent steps, not optimiser steps
    assert last["hyper_parameters"]["policy"] in (str(peg_base), None)
    state = last["rl_training_state"]
    assert state["env_steps"] > 0
    assert (run / "checkpoints" / "best.ckpt").is_file()
    evals = _evals(run)
    if "recap" in name:  # built from data: no policy to evaluate before the first round
        assert len(evals) == 2
    else:  # before, after 2, after 4
        assert [float(r["eval/env_steps"]) for r in evals][0] == 0.0 and len(evals) == 3
    assert capsys.readouterr().out.count("success") == len(evals)  # each evaluation is printed
    assert list(run.glob("events.out.tfevents.*")), "no TensorBoard log"

    agent = load_agent(run / "checkpoints" / "last.ckpt")
    assert agent.env_steps == state["env_steps"]
    cli(["eval", str(run / "checkpoints" / "last.ckpt"), "labkit/PegInsert-v0", "--episodes", "2"])
    assert "success" in capsys.readouterr().out


def test_resume_continues_buffer_counters_and_optimisers(peg_base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Updates from the third env step on (the first 3-step return is stored after 3 steps).
    config = _small_config(next(c for c in CONFIGS if c.stem == "residual_peg"), peg_base, tmp_path,
                           config={**SMALL["residual"], "warmup_steps": 2})
    _fit(config)
    first = tmp_path / "runs" / "residual_peg" / "version_0" / "checkpoints" / "last.ckpt"
    a = torch.load(first, weights_only=True)
    _fit(config, "--trainer.max_steps", "8", "--ckpt_path", str(first))
    second = tmp_path / "runs" / "residual_peg" / "version_1"
    b = torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)
    sa, sb = a["rl_training_state"], b["rl_training_state"]
    assert b["global_step"] == 8
    assert sb["env_steps"] == sa["env_steps"] + 4  # one env step per agent step
    assert sb["buffer"]["size"] > sa["buffer"]["size"]
    torch.testing.assert_close(sb["buffer"]["data"]["reward"][: sa["buffer"]["size"]], sa["buffer"]["data"]["reward"])
    assert sb["updates"] == sa["updates"] + 4  # utd 1, past warm-up: the update count carried on
    steps = lambda ckpt: max(int(s["step"]) for o in ckpt["optimizer_states"] for s in o["state"].values())  # noqa: E731
    assert steps(b) == steps(a) + 4  # Adam's moments were restored, not restarted
    assert min(int(r["step"]) for r in csv.DictReader((second / "metrics.csv").open())) >= 4
    assert len(_evals(second)) == 2  # no second "before" evaluation on resume


@pytest.mark.parametrize("change, error", [
    ({"method": "sac"}, "unknown method 'sac'; choose from dppo, dsrl, expo, ogpo, qam, recap, residual, rlt, tql"),
    ({"demos": "peg"}, "dsrl learns from its own rollouts only"),
    ({"policy": "runs/no_such_base"}, "labkit fit --config configs/flow_peg.yaml"),
])
def test_bad_configs_are_named(change, error, peg_base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _small_config(next(c for c in CONFIGS if c.stem == "dsrl_peg"), peg_base, tmp_path, **change)
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        _fit(config)


@pytest.mark.parametrize("flags, error", [
    (["--trainer.max_steps", "5"], r"max_steps \(5\) must be a multiple of model.eval_every \(2\)"),
    (["--trainer.devices", "2"], "one CPU process"),
])
def test_bad_trainer_settings_are_named(flags, error, peg_base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _small_config(next(c for c in CONFIGS if c.stem == "dsrl_peg"), peg_base, tmp_path)
    with pytest.raises(ValueError, match=error):
        _fit(config, *flags)


def test_recap_resumes_its_rounds_episodes_and_networks(peg_base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _small_config(next(c for c in CONFIGS if c.stem == "recap_peg"), peg_base, tmp_path, steps=2)
    _fit(config)
    first = tmp_path / "runs" / "recap_peg" / "version_0" / "checkpoints" / "last.ckpt"
    a = torch.load(first, weights_only=True)["rl_training_state"]
    resumed = load_agent(first)
    assert resumed.round == a["round"] == 2 and len(resumed.episodes) == len(a["episodes"])
    torch.testing.assert_close(resumed.value.state_dict(), a["value"])
    assert isinstance(resumed.episodes[-1]["action"], np.ndarray)
    _fit(config, "--trainer.max_steps", "4", "--ckpt_path", str(first))
    b = torch.load(tmp_path / "runs" / "recap_peg" / "version_1" / "checkpoints" / "last.ckpt",
                   weights_only=True)["rl_training_state"]
    assert b["round"] == 4 and len(b["episodes"]) > len(a["episodes"])
    assert [e["round"] for e in b["episodes"][: len(a["episodes"])]] == [e["round"] for e in a["episodes"]]


def test_evaluation_is_seeded_and_leaves_training_randomness_alone(peg_base, tmp_path, monkeypatch):
    # DPPO samples its chains from torch's global generator: evaluating more often must not change the run.
    monkeypatch.chdir(tmp_path)
    config = _small_config(next(c for c in CONFIGS if c.stem == "dppo_peg"), peg_base, tmp_path)
    _fit(config)
    _fit(config, "--model.eval_every", "1")
    runs = [tmp_path / "runs" / "dppo_peg" / f"version_{i}" / "checkpoints" / "last.ckpt" for i in (0, 1)]
    a, b = (torch.load(r, weights_only=True) for r in runs)
    assert a["rl_training_state"] == b["rl_training_state"]
    for k, v in a["state_dict"].items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(b["state_dict"][k], v, msg=k)
    evals = [_evals(r.parents[1]) for r in runs]
    assert evals[0][0]["eval/success"] == evals[1][0]["eval/success"]  # the base, before training


def test_rl_checkpoints_embed_their_base_policy(peg_base, tmp_path, monkeypatch):
    # Moving or deleting the base policy's file does not break an RL run's checkpoint.
    import shutil

    monkeypatch.chdir(tmp_path)
    base = Path(shutil.copy(peg_base, tmp_path / "base.ckpt"))
    _fit(_small_config(next(c for c in CONFIGS if c.stem == "dsrl_peg"), base, tmp_path))
    last = tmp_path / "runs" / "dsrl_peg" / "version_0" / "checkpoints" / "last.ckpt"
    obs = {"state": np.linspace(-0.1, 0.1, 24, dtype=np.float32).reshape(3, 8)}
    before = load_agent(last).eval_policy()
    before.reset()
    want = before.select_action(obs)
    base.unlink()
    after = load_agent(last).eval_policy()
    after.reset()
    np.testing.assert_array_equal(after.select_action(obs), want)


# ---- an RL checkpoint's or config's env id: only registered labkit tasks reach gym.make (Hardening) ---
def test_rl_module_refuses_an_env_id_that_is_not_a_labkit_task(peg_base, monkeypatch):
    import gymnasium as gym

    from labkit.fitting import RLModule

    monkeypatch.setattr(gym, "make", lambda *a, **k: pytest.fail("gym.make was reached"))
    for env_id in ("os:system", "CartPole-v1", "labkit/NoSuchTask-v0", 5):
        with pytest.raises(ValueError, match="env_id must be a registered labkit task"):
            RLModule("dsrl", env_id, policy=str(peg_base))


def test_rl_config_env_id_and_fields_are_named(peg_base, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["labkit"])
    dsrl = next(c for c in CONFIGS if c.stem == "dsrl_peg")
    for change, error in [({"env_id": "os:system"}, "model.env_id: env_id must be a registered labkit task"),
                          ({"config": {"utd": "x"}}, "model.config.utd must be an integer, got 'x'")]:
        with pytest.raises(SystemExit) as exit_:
            _fit(_small_config(dsrl, peg_base, tmp_path, **change))
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("labkit fit: error: ") and error in err[-1], err


def test_rl_checkpoint_with_a_foreign_env_id_is_refused(peg_base, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _fit(_small_config(next(c for c in CONFIGS if c.stem == "dsrl_peg"), peg_base, tmp_path, steps=2))
    ckpt = torch.load(tmp_path / "runs" / "dsrl_peg" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["env_id"] = "os:system"
    torch.save(ckpt, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="env_id must be a registered labkit task"):
        load_agent(tmp_path / "evil.ckpt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli(["eval", str(tmp_path / "evil.ckpt"), "labkit/PegInsert-v0", "--episodes", "1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "env_id must be a registered labkit task" in err[0], err
