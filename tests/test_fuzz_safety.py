"""Fuzzed command streams through the SafetyLayer (issue "Hardening" item 6): 20,000 commands, wild,
huge, NaN/inf and plausible, with random pauses (some long enough to trip the watchdog), e-stops and
resets, on a fake clock. No command that reaches the robot is outside the joint limits, and none moves
more than the velocity bound allows in one control period or more than max_delta from the present
position. Seeded; a few seconds."""

from __future__ import annotations

import time

import numpy as np
import pytest

from labkit.robot import FakeClock, FakeRobot, SafetyConfig, SafetyLayer

LOW = np.array([-1.9, -1.7, -1.7, -1.6, -2.7, 0.0])
HIGH = np.array([1.9, 1.7, 1.7, 1.6, 2.8, 0.07])
START = np.array([0.0, -0.4, 0.7, 1.2, 0.0, 0.04])
N_COMMANDS = 5_000  # per configuration; 4 configurations: 20,000 commands
TOL = 1e-9


def command(rng, q):
    kind = rng.integers(0, 6)
    n = len(q)
    if kind == 0:
        return rng.uniform(-3, 3, n) * (HIGH - LOW) + LOW
    if kind == 1:
        return rng.choice([-1e300, -1e9, 1e9, 1e300, np.finfo(np.float64).max], n) * rng.uniform(0.5, 1, n)
    if kind == 2:
        c = q + rng.normal(0, 0.05, n)
        c[rng.integers(0, n, rng.integers(1, n + 1))] = rng.choice([np.nan, np.inf, -np.inf])
        return c
    if kind == 3:
        return q + rng.normal(0, 0.5, n)
    if kind == 4:  # the far end of a joint: the pause bypass moved one joint across its range
        c = q.copy()
        j = rng.integers(0, n)
        c[j] = rng.choice([LOW[j], HIGH[j]])
        return c
    return q + rng.normal(0, 0.01, n)


CONFIGS = {
    "velocity_only": dict(max_velocity=1.0),  # the configuration of the bypass
    "velocity_per_joint": dict(max_velocity=[2.0, 1.0, 1.0, 1.5, 3.0, 0.1]),
    "velocity_and_delta": dict(max_velocity=2.0, max_delta=0.05),
    "delta_only": dict(max_delta=0.15),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fuzzed_stream_with_pauses_never_exceeds_the_bounds(name):
    rng = np.random.default_rng(list(CONFIGS).index(name))
    cfg = SafetyConfig(watchdog_s=0.5, **CONFIGS[name])
    clock = FakeClock()
    arm = FakeRobot(LOW, HIGH, fps=30, follow=0.6 if "per_joint" in name else 1.0, start=START)
    safe = SafetyLayer(arm, cfg, clock=clock)
    safe.connect()
    dt = arm.spec.dt
    vmax = None if cfg.max_velocity is None else np.broadcast_to(np.asarray(cfg.max_velocity, float), LOW.shape)
    checked = {"sent": 0, "pauses": 0, "watchdog": 0, "estop": 0, "reset": 0, "holds": 0}
    ref = None  # the last command the robot received (what the velocity bound is measured from)
    t0 = time.perf_counter()
    for _ in range(N_COMMANDS):
        u = rng.random()
        if u < 0.03:  # a pause: 0.1 s to 10 s of silence, the watchdog polled during it or not
            clock.advance(rng.uniform(0.1, 10.0))
            checked["pauses"] += 1
            if rng.random() < 0.5:
                n = len(arm.received)
                if safe.poll():
                    checked["watchdog"] += 1
                    assert len(arm.received) == n + 1
                    ref = arm.received[-1].copy()
        else:
            clock.advance(rng.choice([0.0, rng.uniform(0, 2 * dt), dt]))
        if u > 0.998:
            safe.estop("fuzz")
            checked["estop"] += 1
            if arm.received:
                ref = arm.received[-1].copy()
            clock.advance(rng.uniform(0, 1.0))
            safe.release_estop()
        elif 0.996 < u <= 0.998:
            safe.reset()
            checked["reset"] += 1
            ref = None  # after a reset the bound is measured from where the robot is
        present = arm.q.copy()
        raw = command(rng, present)
        n = len(arm.received)
        safe.act(raw)
        assert len(arm.received) == n + 1
        sent = arm.received[-1]
        checked["sent"] += 1
        assert np.all(np.isfinite(sent)), f"non-finite command reached the robot: {sent}"
        assert np.all(sent >= LOW - TOL) and np.all(sent <= HIGH + TOL), f"outside the joint limits: {sent}"
        hold = np.clip(present, LOW, HIGH)
        if np.array_equal(sent, hold):  # holding where it is: always allowed
            checked["holds"] += 1
        else:
            base = hold if ref is None else ref
            if vmax is not None:
                moved = np.abs(sent - base)
                assert np.all(moved <= vmax * dt + TOL), (
                    f"{name}: moved {moved.max():.4f} in one command (bound {vmax.max() * dt:.4f} per period)")
            if cfg.max_delta is not None:
                assert np.all(np.abs(sent - present) <= cfg.max_delta + TOL), f"{name}: step beyond max_delta"
        ref = sent.copy()
    elapsed = time.perf_counter() - t0
    print(f"{name}: {checked}, {elapsed:.2f} s")
    assert checked["pauses"] > 50 and checked["watchdog"] > 20 and checked["holds"] > 100
    s = safe.summary()
    assert s["commands"] == N_COMMANDS and s["nonfinite"] > 200
