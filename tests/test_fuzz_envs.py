"""Fuzzed env options (issue "Hardening" item 5): random option dicts, NaN/inf/negative/huge/wrong types
mixed with valid values. Every dict either builds a task whose reset and 5 steps give finite
observations, or raises ValueError/TypeError naming one of the options that was drawn wild. Seeded;
a few seconds."""

from __future__ import annotations

import math
import time
from fractions import Fraction

import numpy as np
import pytest

import labkit
from labkit.sim2real import RobotEnv

N_PER_TASK = 300
N_TWIN = 80
TASK_IDS = ["labkit/Detour-v0", "labkit/PushT-v0", "labkit/PegInsert-v0", "labkit/ArmPickCube-v0"]
NAN, INF = float("nan"), float("inf")

# The documented allowed values (labkit/envs/base.py PHYSICS_RANGE etc.): the fuzz's valid draws.
PHYS = (0.05, 20.0)
RANGES = {"friction": PHYS, "mass": PHYS, "damping": PHYS, "cube_size": (0.02, 0.045), "cube_mass": (1e-3, 0.3),
          "actuator_gain": (0.1, 10.0)}
DETOUR_MASS = (0.25, 20.0)

WILD_NUMBERS = [NAN, INF, -INF, -1.0, 0.0, -0.0, 1e300, -1e300, 1e-300, 5e-324, 10**400, -(10**400), True, False,
                None, "1.0", "nan", "", b"1", [1.0], (1.0, 2.0, 3.0), (2.0, 1.0), (NAN, 1.0), (1.0, INF), (0.0, 1.0),
                (-1.0, 1.0), (), [NAN], np.array([1.0, 2.0]), np.float32(NAN), np.float64(INF), np.int64(-3),
                np.bool_(True), complex(1, 1), Fraction(1, 3), {}, object(), float("1e308") * 10]
WILD_STRINGS = [None, "", "STATE", "pixel", "rgb", "human", 0, 1, True, NAN, ["state"], ("sparse",),
                np.array(["state"]), b"state", "world ", "Absolute"]


def wild_number(rng):
    if rng.random() < 0.4:  # a random magnitude, sign and type
        v = float(10.0 ** rng.uniform(-320, 308)) * rng.choice([-1.0, 1.0])
        return [v, int(min(abs(v), 1e18)) * int(np.sign(v)), (v, abs(v)), [abs(v), v]][rng.integers(4)]
    return WILD_NUMBERS[rng.integers(len(WILD_NUMBERS))]


def valid_scale(rng, lo, hi):
    a, b = sorted(rng.uniform(lo, hi, 2))
    return [float(a), (float(a), float(b)), [float(a), float(b)], np.float64(a), float(lo), float(hi)][rng.integers(6)]


def valid_value(rng, env_id, key):
    if key in RANGES:
        lo, hi = DETOUR_MASS if (key == "mass" and "Detour" in env_id) else RANGES[key]
        return valid_scale(rng, lo, hi)
    if key == "obs_noise":
        return float(rng.choice([0.0, 1.0, rng.uniform(0, 1)]))
    if key == "image_size":
        return int(rng.choice([16, 32, 640, rng.integers(16, 641)]))
    if key == "latency":
        lo = int(rng.integers(0, 101))
        return [lo, (lo, int(rng.integers(lo, 101)))][rng.integers(2)]
    if key == "terminate_on_success":
        return bool(rng.integers(2))
    choices = {"obs_mode": ["state"], "reward_type": ["sparse", "dense"], "render_mode": [None, "rgb_array"],
               "frame": ["world", "block"], "actions": ["absolute", "relative"]}[key]
    return choices[rng.integers(len(choices))]


def options_of(env_id):
    keys = ["friction", "mass", "damping", "obs_noise", "image_size", "terminate_on_success", "obs_mode",
            "reward_type", "render_mode"]
    if "PushT" in env_id:
        keys += ["frame", "actions"]
    if "Arm" in env_id:
        keys += ["cube_size", "cube_mass", "actuator_gain", "latency"]
    return keys


STRING_KEYS = {"obs_mode", "reward_type", "render_mode", "frame", "actions"}


def random_options(rng, env_id):
    """A dict of 1-5 options, each drawn valid or wild; returns it and the set of wild keys."""
    keys = options_of(env_id)
    picked = rng.choice(keys, size=int(rng.integers(1, 6)), replace=False)
    opts, wild = {}, set()
    for key in picked:
        key = str(key)
        if rng.random() < 0.5:
            opts[key] = valid_value(rng, env_id, key)
        else:
            opts[key] = WILD_STRINGS[rng.integers(len(WILD_STRINGS))] if key in STRING_KEYS else wild_number(rng)
            wild.add(key)
    return opts, wild


def all_finite(obs):
    return all(np.all(np.isfinite(np.asarray(v, dtype=np.float64))) for v in obs.values())


def run_one(make, opts, wild, rng, steps=5):
    """Build with `opts`: either an error naming a wild option, or finite observations. Returns
    'built' or 'rejected'; fails the test on anything else."""
    try:
        env = make(**opts)
    except (ValueError, TypeError) as e:
        named = [k for k in opts if k in str(e)]
        assert named, f"{type(e).__name__} names no option of {opts!r}: {e}"
        assert wild & set(named), f"rejected valid options {opts!r}: {e}"
        return "rejected"
    try:
        obs, _ = env.reset(seed=int(rng.integers(1000)))
        assert all_finite(obs), f"non-finite reset observation with {opts!r}"
        for _ in range(steps):
            a = rng.uniform(env.action_space.low, env.action_space.high).astype(np.float32)
            obs, reward, *_ = env.step(a)
            assert all_finite(obs) and math.isfinite(reward), f"non-finite step with {opts!r}"
    finally:
        env.close()
    return "built"


@pytest.mark.parametrize("env_id", TASK_IDS)
def test_fuzzed_task_options_build_finite_or_name_the_option(env_id):
    rng = np.random.default_rng(TASK_IDS.index(env_id))
    cls = labkit.envs._load(labkit.envs.TASKS[env_id][0])  # not gym.make: it adds all kwargs to TypeErrors
    counts = {"built": 0, "rejected": 0}
    t0 = time.perf_counter()
    for _ in range(N_PER_TASK):
        opts, wild = random_options(rng, env_id)
        counts[run_one(cls, opts, wild, rng)] += 1
    print(f"{env_id}: {N_PER_TASK} option dicts, {counts}, {time.perf_counter() - t0:.2f} s")
    assert counts["built"] > N_PER_TASK / 10 and counts["rejected"] > N_PER_TASK / 4  # the fuzz tried both


TWIN_KEYS = ["gain", "offset", "latency_steps", "sensor_noise", "deadband", "obs_latency_steps", "friction", "mass"]
TWIN_VALID = {"gain": (0.1, 10.0), "offset": (-1.0, 1.0), "sensor_noise": (0.0, 1.0), "deadband": (0.0, 1.0),
              "friction": PHYS, "mass": PHYS}


def test_fuzzed_twin_options_build_finite_or_name_the_option():
    rng = np.random.default_rng(7)
    counts = {"built": 0, "rejected": 0}
    t0 = time.perf_counter()
    for _ in range(N_TWIN):
        picked = rng.choice(TWIN_KEYS, size=int(rng.integers(1, 4)), replace=False)
        opts, wild = {}, set()
        for key in map(str, picked):
            if rng.random() < 0.5:
                if key in ("latency_steps", "obs_latency_steps"):
                    opts[key] = int(rng.integers(0, 4))
                else:
                    lo, hi = TWIN_VALID[key]
                    v = valid_scale(rng, lo, hi)
                    # the twin samples only tuple ranges; sensor_noise takes a number
                    opts[key] = float(v[0]) if isinstance(v, list | tuple) and key == "sensor_noise" else v
                    per_action = isinstance(opts[key], list) or (key == "deadband" and isinstance(opts[key], tuple))
                    if per_action and key in ("gain", "offset", "deadband"):
                        opts[key] = [opts[key][0]] * 6  # a list (any deadband sequence) is one value per action
            else:
                opts[key] = wild_number(rng)
                wild.add(key)
        counts[run_one(lambda **kw: RobotEnv(real=True, **kw), opts, wild, rng)] += 1
    print(f"twin: {N_TWIN} option dicts, {counts}, {time.perf_counter() - t0:.2f} s")
    assert counts["built"] > N_TWIN / 10 and counts["rejected"] > N_TWIN / 4
