"""A bounded fuzz of `labkit fit` configs: a few dozen mutations of a tiny policy config (wrong types,
negatives, zeros, missing sections, garbage text). Each either trains for its 1-2 steps or stops with a
named error (SystemExit with a non-zero code, or a ValueError) before training: never another exception
and never a hang (every mutation keeps a small step budget)."""

from __future__ import annotations

import copy
import random
import time

import pytest
import yaml

from labkit.cli import main

pytestmark = pytest.mark.slow  # LightningCLI runs (still in make test; skipped by make test-fast)

BASE = {
    "name": "fuzz",
    "model": {"class_path": "labkit.policies.FlowPolicy",
              "init_args": {"config": {"horizon": 8, "n_action_steps": 4, "obs_horizon": 2, "steps": 2,
                                       "hidden": 32, "layers": 1}}},
    "data": {"dataset": "detour", "batch_size": 8, "episodes": 3, "steps_per_epoch": 2},
    "trainer": {"max_steps": 2, "enable_progress_bar": False, "logger": False},
}
FIELDS = [("data", "batch_size"), ("data", "steps_per_epoch"), ("data", "episodes"), ("data", "seed"),
          ("data", "dataset"), ("data", "successes_only"), ("trainer", "max_steps"), ("name",),
          *[("model", "init_args", "config", k) for k in
            ("hidden", "layers", "lr", "horizon", "n_action_steps", "obs_horizon", "steps", "weight_decay",
             "warmup_steps", "noise_scale", "ema", "obs_keys", "cond")]]
VALUES = [0, -1, -4, "x", "32x", 1.5, None, [], {}, True, float("nan"), 3]
TEXTS = ["", "just words", "- a\n- b\n", "model: [unclosed\n", "{{{", "name: x\ntrainer: 5\n", "data: detour\n",
         "\t- :\n", "a: b: c\n"]


def _cases(n: int = 40, seed: int = 0):
    """(label, YAML text): `n` seeded single-field mutations, sections removed, and garbage texts."""
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        path, value = rng.choice(FIELDS), rng.choice(VALUES)
        spec = copy.deepcopy(BASE)
        node = spec
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        cases.append((f"{'.'.join(path)}={value!r}", yaml.safe_dump(spec)))
    for section in ("model", "data", "trainer", "name"):
        spec = copy.deepcopy(BASE)
        del spec[section]
        if section == "data":  # the default data (all of detour, 1000 steps an epoch) is fine for 2 steps
            continue
        cases.append((f"no {section}", yaml.safe_dump(spec)))
    cases += [(f"text {t!r}", t) for t in TEXTS]
    return cases


def test_fuzzed_configs_train_or_fail_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["labkit"])  # LightningCLI warns when pytest's own arguments are there too
    start, outcomes, wrong, log = time.perf_counter(), {"trained": 0, "named error": 0}, [], []
    for i, (label, text) in enumerate(_cases()):
        config = tmp_path / f"c{i}.yaml"
        config.write_text(text)
        capsys.readouterr()  # only this run's output below
        try:
            main(["fit", "--config", str(config)])
            outcomes["trained"] += 1
            log.append(f"trained: {label}")
        except SystemExit as e:
            err = capsys.readouterr().err.strip().splitlines()
            errors = [line for line in err if line.startswith("labkit fit: error: ")]
            if e.code in (0, None) or len(errors) != 1 or err[-1] != errors[0]:  # (warnings may come first)
                wrong.append(f"{label}: SystemExit({e.code}) with stderr {err}")
            outcomes["named error"] += 1
            log.append(f"exit {e.code}: {label}: {err[-1] if err else ''}")
        except ValueError as e:
            outcomes["named error"] += 1
            log.append(f"ValueError: {label}: {str(e).splitlines()[0]}")
        except Exception as e:  # noqa: BLE001  (what the fuzz looks for)
            wrong.append(f"{label}: {type(e).__name__}: {e}")
    seconds = time.perf_counter() - start
    with capsys.disabled():  # shown with -s
        print("\n".join([*log, f"fuzz: {outcomes} in {seconds:.1f} s"]))
    assert not wrong, "\n".join(wrong)
    assert outcomes["trained"] and outcomes["named error"]
    assert seconds < 60
