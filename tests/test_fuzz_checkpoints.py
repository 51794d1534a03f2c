"""Fuzz the checkpoint surface: policy and world-model checkpoints, mutated on disk, either load or fail
with a named error (ValueError, FileNotFoundError, KeyError naming the field), never another exception,
never running code. Seeded and bounded (a few hundred files, a few seconds)."""

from __future__ import annotations

import copy
import pickle
import time

import numpy as np
import pytest
import torch

import labkit  # noqa: F401  (registers the tasks)
from labkit.policies import BCPolicy, load_policy
from labkit.world_models import StateWorldModel, load_world_model

NAMED = (ValueError, FileNotFoundError, KeyError, TypeError)  # errors whose messages name what is wrong


class Boom:  # a pickle that would run code if a loader ever unpickled it
    def __reduce__(self):
        return (pytest.fail, ("a checkpoint ran code",))


def _mutate(ckpt: dict, rng: np.random.Generator) -> dict:
    """One to three random edits of a checkpoint dict: types, missing keys, wrong shapes, class names."""
    ckpt = copy.deepcopy(ckpt)
    for _ in range(int(rng.integers(1, 4))):
        if not isinstance(ckpt, dict):
            break
        section = ckpt.get("hyper_parameters") if isinstance(ckpt.get("hyper_parameters"), dict) else ckpt
        keys = list(section) if isinstance(section, dict) and section else ["x"]
        key = keys[int(rng.integers(len(keys)))]
        kind = int(rng.integers(8))
        if kind == 0:
            section.pop(key, None)
        elif kind == 1:
            section[key] = [None, "x", -1, 1e300, float("nan"), {}, []][int(rng.integers(7))]
        elif kind == 2:  # a class name that is not a labkit policy
            section["policy_class"] = ["os.system", "", "Policy", "BCPolicy ", 5][int(rng.integers(5))]
        elif kind == 3 and isinstance(ckpt.get("state_dict"), dict) and ckpt["state_dict"]:
            name = list(ckpt["state_dict"])[int(rng.integers(len(ckpt["state_dict"])))]
            ckpt["state_dict"][name] = torch.zeros(int(rng.integers(1, 7)), 3)  # wrong shape
        elif kind == 4 and isinstance(ckpt.get("state_dict"), dict):
            ckpt["state_dict"].pop(next(iter(ckpt["state_dict"]), None), None)
        elif kind == 5 and isinstance(section.get("config"), dict):
            cfg = section["config"]
            field = list(cfg)[int(rng.integers(len(cfg)))]
            cfg[field] = [0, -3, "32x", None, 1e9, float("inf")][int(rng.integers(6))]
        elif kind == 6 and isinstance(section.get("shapes"), dict):
            section["shapes"] = {k: [int(rng.integers(-2, 3))] for k in section["shapes"]}
        else:
            ckpt = [ckpt, "text", 7, None][int(rng.integers(4))] if rng.random() < 0.3 else ckpt
    return ckpt


def _write(path, obj, rng: np.random.Generator) -> None:
    """Save `obj`, sometimes truncated or with random bytes instead."""
    torch.save(obj, path)
    r = rng.random()
    if r < 0.1:
        data = path.read_bytes()
        path.write_bytes(data[: int(rng.integers(0, max(1, len(data))))])
    elif r < 0.15:
        path.write_bytes(rng.integers(0, 256, int(rng.integers(0, 512)), dtype=np.uint8).tobytes())


@pytest.mark.parametrize("kind", ["policy", "world_model"])
def test_mutated_checkpoints_load_or_fail_with_a_named_error(kind, detour_ds, tmp_path):
    rng = np.random.default_rng(0)
    if kind == "policy":
        good = BCPolicy.from_dataset(detour_ds, horizon=4, n_action_steps=2, hidden=16, layers=1).save(tmp_path / "g.ckpt")
        load = load_policy
    else:
        good = StateWorldModel(6, 2, ensemble=2, hidden=8, layers=1).save(tmp_path / "g.pt")
        load = load_world_model
    base = torch.load(good, weights_only=True)
    outcomes = {"loaded": 0, "named": 0}
    start = time.perf_counter()
    for i in range(150):
        path = tmp_path / f"m{i}.ckpt"
        _write(path, _mutate(base, rng), rng)
        try:
            load(path)
            outcomes["loaded"] += 1
        except NAMED as e:
            assert str(e), f"case {i}: an error without a message"
            outcomes["named"] += 1
    # A pickle that would run code is refused, not executed (weights_only loading).
    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps({"hyper_parameters": Boom(), "state_dict": {}}))
    with pytest.raises(ValueError, match="cannot read"):
        load(tmp_path / "evil.ckpt")
    assert outcomes["named"] > 100 and time.perf_counter() - start < 60, outcomes
    assert load(good) is not None  # the unmutated checkpoint still loads
