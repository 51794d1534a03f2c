"""Real-robot stack measurements; writes benchmarks/robot_results.json.

    python benchmarks/robot.py [--quick]

1. Policy server round trips on localhost: a state BC policy (labkit's default MLP size) served by
   `PolicyServer` in its own process, driven by `PolicyClient`: round trips/s, p50/p99 latency, and
   the transport alone (ping).
2. Control-loop jitter at 30 Hz with the real clock: the bare loop on a trivial robot, and the whole
   stack (SimRobot twin + SafetyLayer + chunks from the policy server, real-time chunk blending).
3. SafetyLayer fuzz: random commands (wild, huge, NaN/inf, near the pose) against a 6-joint arm with
   joint, delta, velocity and workspace limits: how many were out of range, how many got through.
"""

from __future__ import annotations

# isort: off
import labkit  # noqa: F401  (first: picks the headless GL backend before mujoco is imported)
# isort: on

import argparse
import json
import multiprocessing as mp
import os
import platform
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def small_state_policy():
    from labkit.policies.bc import BCPolicy

    z = lambda n, v: [v] * n  # noqa: E731
    stats = {"observation.state": {"mean": z(6, 0.0), "std": z(6, 1.0), "min": z(6, -1.0), "max": z(6, 1.0)},
             "action": {"min": z(2, -0.5), "max": z(2, 0.5), "mean": z(2, 0.0), "std": z(2, 1.0)}}
    return BCPolicy({"obs_horizon": 2, "horizon": 16, "n_action_steps": 8}, {"observation.state": [6], "action": [2]},
                    stats).eval()


def _serve(port_queue, stop_event):
    import torch

    torch.set_num_threads(1)
    from labkit.robot.server import PolicyServer

    srv = PolicyServer(small_state_policy(), port=0).start()
    port_queue.put(srv.port)
    stop_event.wait()
    srv.stop()


def bench_server(seconds: float) -> dict:
    from labkit.robot.server import PolicyClient

    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_serve, args=(q, stop), daemon=True)
    proc.start()
    port = q.get(timeout=120)
    out = {}
    try:
        obs = [{"state": np.random.default_rng(0).normal(size=6).astype(np.float32)}] * 2
        with PolicyClient(f"ws://127.0.0.1:{port}", timeout=10) as client:
            for _ in range(20):  # warm-up
                client.predict_chunk(obs)
            client.latencies.clear()
            client.server_ms.clear()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                client.predict_chunk(obs)
                n += 1
            rate = n / (time.perf_counter() - t0)
            st = client.latency_stats()
            out["predict"] = {"round_trips_per_s": rate, **st, "server_inference_p50_ms": float(np.median(client.server_ms))}
            client.latencies.clear()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / 2:
                client.ping()
                n += 1
            out["ping"] = {"round_trips_per_s": n / (time.perf_counter() - t0), **client.latency_stats()}
    finally:
        stop.set()
        proc.join(10)
    return out


def NullRobot():  # noqa: N802
    """A 6-joint position robot that does nothing: isolates the loop's own timing."""
    from labkit.robot import FakeRobot

    return FakeRobot(-np.ones(6), np.ones(6), fps=30)


def bench_jitter(seconds: float) -> dict:
    from labkit.robot import ControlLoop, SafetyConfig, SimRobot
    from labkit.robot.server import PolicyClient

    steps = int(30 * seconds)
    out = {}
    loop = ControlLoop(NullRobot(), lambda obs: np.zeros(6), fps=30)
    out["bare loop, trivial robot"] = loop.run(steps).as_dict()

    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_serve, args=(q, stop), daemon=True)
    proc.start()
    port = q.get(timeout=120)
    try:
        robot = SimRobot("labkit/Detour-v0")
        robot.connect()
        with PolicyClient(f"ws://127.0.0.1:{port}", timeout=10) as client:
            loop = ControlLoop(robot, client, fps=30, mode="rtc", stop_on_done=False, safety=SafetyConfig(max_delta=0.2))
            out["SimRobot + safety + policy server (rtc)"] = loop.run(steps).as_dict()
    finally:
        stop.set()
        proc.join(10)
    return out


def bench_fuzz(n: int) -> dict:
    from labkit.robot import FakeClock, FakeRobot, SafetyConfig, SafetyLayer

    low, high = np.array([-1.9, -1.7, -1.7, -1.6, -2.7, 0.0]), np.array([1.9, 1.7, 1.7, 1.6, 2.8, 0.07])
    ws = (np.array([0.02, -0.25, 0.01]), np.array([0.32, 0.25, 0.35]))

    def fk(q):
        a1, a2, a3 = q[1], q[1] + q[2], q[1] + q[2] + q[3]
        r = 0.03 + 0.116 * np.sin(a1) + 0.135 * np.sin(a2) + 0.1 * np.sin(a3)
        return np.array([r * np.cos(q[0]), r * np.sin(q[0]), 0.116 + 0.116 * np.cos(a1) + 0.135 * np.cos(a2) + 0.1 * np.cos(a3)])

    arm = FakeRobot(low, high, fps=30, follow=0.6, start=[0.0, -0.4, 0.7, 1.2, 0.0, 0.04])
    rng, clock = np.random.default_rng(0), FakeClock()
    safe = SafetyLayer(arm, SafetyConfig(max_delta=0.15, max_velocity=2.0, workspace=ws), fk=fk, clock=clock)
    safe.connect()
    inside = lambda x: bool(np.all(np.isfinite(x)) and np.all(x >= ws[0]) and np.all(x <= ws[1]))  # noqa: E731
    bad = leaked = 0
    t0 = time.perf_counter()
    for _ in range(n):
        clock.advance(rng.uniform(0, 0.06))
        q = arm.q.copy()
        kind = rng.integers(0, 5)
        raw = [rng.uniform(-3, 3, 6) * (high - low) + low, rng.choice([-1e9, 1e9, 1e300], 6), q + rng.normal(0, 0.5, 6),
               q + rng.normal(0, 0.02, 6), q + rng.normal(0, 0.05, 6)][kind]
        if kind == 4:
            raw[rng.integers(0, 6)] = rng.choice([np.nan, np.inf, -np.inf])
        is_bad = (not np.all(np.isfinite(raw)) or np.any(raw < low) or np.any(raw > high)
                  or np.any(np.abs(raw - q) > 0.15) or not inside(fk(raw)))
        safe.act(raw)
        s = arm.received[-1]
        hold = np.allclose(s, np.clip(q, low, high))
        ok = (np.all(np.isfinite(s)) and np.all(s >= low) and np.all(s <= high)
              and (hold or (np.all(np.abs(s - q) <= 0.15 + 1e-9) and inside(fk(s)))))
        bad += is_bad
        leaked += is_bad and not ok
    return {"commands": n, "out_of_range": int(bad), "reached_robot_unsafe": int(leaked),
            "stop_rate": 1.0 - leaked / max(bad, 1), "us_per_command": (time.perf_counter() - t0) / n * 1e6,
            "interventions": safe.summary()}


def _clean(x):
    """NaN (e.g. no inference in a run) -> null, so the results file is strict JSON."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, float) and x != x:
        return None
    return x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short runs (a smoke test of this script)")
    args = p.parse_args()
    secs = 2.0 if args.quick else 10.0
    results = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    results["server"] = bench_server(secs)
    results["jitter_30hz"] = bench_jitter(secs * 1.5)
    results["safety_fuzz"] = bench_fuzz(2000 if args.quick else 10000)
    (HERE / "robot_results.json").write_text(json.dumps(_clean(results), indent=2, allow_nan=False))

    s = results["server"]
    print("\nPolicy server on localhost (state BC policy, MLP 256x3, obs_horizon 2, horizon 16; server in its own process)")
    print("| Request | Round trips/s | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|")
    for name in ("predict", "ping"):
        r = s[name]
        print(f"| {name} | {r['round_trips_per_s']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.2f} |")
    print(f"(server-side inference p50 {s['predict']['server_inference_p50_ms']:.2f} ms)")
    print("\nControl loop at 30 Hz, real clock (jitter = tick period - 33.33 ms)")
    print("| Setup | Steps | Mean Hz | Jitter std ms | p50 ms | p99 ms | max ms | Overruns | Starved |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results["jitter_30hz"].items():
        print(f"| {name} | {r['steps']} | {r['mean_hz']:.3f} | {r['jitter_std_ms']:.3f} | {r['jitter_p50_ms']:.3f} | "
              f"{r['jitter_p99_ms']:.3f} | {r['jitter_max_ms']:.3f} | {r['overruns']} | {r['starved']} |")
    f = results["safety_fuzz"]
    print(f"\nSafety fuzz: {f['commands']} commands, {f['out_of_range']} out of range, {f['reached_robot_unsafe']} reached "
          f"the robot unsafe: stop rate {f['stop_rate']:.1%} ({f['us_per_command']:.0f} us per command)")


if __name__ == "__main__":
    main()
