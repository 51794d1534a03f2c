"""A fixed-rate control loop that executes action chunks while the next one is being computed.

The loop ticks at the robot's rate on absolute deadlines (no drift), reads an observation, and sends
one action through the always-on `SafetyLayer`. A chunk policy is asked for its next chunk every
`execute_steps` steps, in a worker thread, while the current chunk keeps running. The chunk arrives
`d` steps after the observation it was computed from, so its first `d` actions are already stale;
`ChunkBlender` aligns every chunk by the step of its observation and combines overlapping chunks:

- "ensemble": ACT's temporal ensembling, a weighted mean of every chunk's action for this step,
  weights exp(-m * i) with i = 0 for the oldest chunk;
- "rtc": real-time chunk blending: the newest chunk takes over, ramping linearly from the previous
  one over `blend_steps` steps (no jump at the switch);
- "none": switch to the newest chunk at once (the baseline that shows the jumps).

Times come from an injectable clock (`FakeClock` in tests), and jitter is measured on every tick.
Before its first command the loop checks that the robot observes what the policy reads
(`check_policy_matches_robot`): a wrong camera or a simulator-only `state` is a named error, not motion.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from labkit.data.keys import env_key, is_image_feature
from labkit.policies.runtime import ObsHistory
from labkit.robot.base import RealClock
from labkit.robot.check import check_policy_matches_robot, policy_inputs
from labkit.robot.safety import SafetyConfig, SafetyLayer

BLEND_MODES = ("ensemble", "rtc", "none")


# ---- policies as chunk sources -------------------------------------------------------------------------
class PolicyRunner:
    """A labkit policy as a stateless chunk source: observation history -> action chunk [H, A].

    `predict_chunk(history)` takes a list of env observations (oldest first) or a dict of stacked
    arrays {env key: [obs_horizon, ...]}; the control loop and the policy server both use it.
    """

    def __init__(self, policy: Any):
        self.policy = policy.eval() if hasattr(policy, "eval") else policy
        cfg = policy.config
        self.keys = {env_key(k): k for k in cfg.obs_keys}  # env key -> dataset key
        self.obs_horizon, self.horizon = int(cfg.obs_horizon), int(cfg.horizon)
        self.n_action_steps = int(cfg.n_action_steps)
        self.action_dim = int(policy.action_dim)
        self.shapes = {e: [int(s) for s in policy.shapes[d]] for e, d in self.keys.items()}
        self.dtypes = {e: "uint8" if is_image_feature(d) else "float32" for e, d in self.keys.items()}

    def spec(self) -> dict[str, Any]:
        """What a client must send and what it gets back (the server's hello answer)."""
        return {"obs_keys": list(self.keys), "shapes": self.shapes, "dtypes": self.dtypes,
                "obs_horizon": self.obs_horizon, "horizon": self.horizon, "action_dim": self.action_dim,
                "n_action_steps": self.n_action_steps}

    def stack(self, history: list[dict] | dict) -> dict[str, np.ndarray]:
        """History as {env key: [obs_horizon, ...]}, padded at the start by repeating the oldest."""
        if isinstance(history, dict):
            return {k: np.asarray(history[k]) for k in self.keys}
        history = list(history)
        if not history:
            raise ValueError("predict_chunk needs at least one observation")
        missing = [k for k in self.keys if k not in history[-1]]
        if missing:
            raise KeyError(f"the policy needs observation {missing[0]!r}; got {sorted(history[-1])}")
        frames = [{k: np.asarray(h[k], dtype=self.dtypes[k]) for k in self.keys} for h in history]
        return ObsHistory.of(frames, self.obs_horizon).stacked(dim=0)

    def predict_chunk(self, history: list[dict] | dict) -> np.ndarray:
        import torch

        stacked = self.stack(history)
        batch = {self.keys[k]: torch.as_tensor(v)[None] for k, v in stacked.items()}
        with torch.no_grad():
            chunk = self.policy.predict_action_chunk(batch)
        return np.asarray(chunk[0].cpu().numpy(), dtype=np.float32)


def as_chunk_source(policy: Any) -> Any:
    """A labkit policy becomes a PolicyRunner; a chunk source (`predict_chunk`) is kept as it is."""
    if hasattr(policy, "predict_chunk"):
        return policy
    if hasattr(policy, "predict_action_chunk") and hasattr(policy, "config"):
        return PolicyRunner(policy)
    return None


# ---- blending ------------------------------------------------------------------------------------------
def temporal_ensemble(actions: np.ndarray, coeff: float) -> np.ndarray:
    """ACT's temporal ensembling: the mean of `actions` [n, A] (oldest chunk first) weighted exp(-coeff * i)."""
    w = np.exp(-coeff * np.arange(len(actions)))
    return (w[:, None] * actions).sum(0) / w.sum()


def rtc_blend(live: list[tuple[int, int, np.ndarray]], step: int, blend_steps: int) -> np.ndarray:
    """Real-time chunk blending: the action [A] for `step` from the chunks `live` that cover it, oldest
    first, each (obs_step, arrival_step, chunk [H, A]) with chunk[i] planned for step obs_step + i. The
    newest chunk's action, ramped in from the previous chunk's with weight (step - arrival + 1) / (blend_steps + 1)."""
    new = live[-1]
    a_new = new[2][step - new[0]]
    if len(live) == 1 or blend_steps == 0:
        return a_new
    old = live[-2]
    w = (step - new[1] + 1) / (blend_steps + 1)  # ramps 1/(B+1) ... 1 over B steps after arrival
    if w >= 1:
        return a_new
    return (1 - w) * old[2][step - old[0]] + w * a_new


class ChunkBlender:
    """Chunks on a timeline of control steps -> one action per step (see the module docstring).

    `rtc_fn` and `ensemble_fn` (what a lesson hands in, signatures of `rtc_blend` and `temporal_ensemble`)
    replace labkit's blends."""

    def __init__(self, mode: str = "rtc", blend_steps: int = 4, ensemble_coeff: float = 0.01,
                 rtc_fn: Callable | None = None, ensemble_fn: Callable | None = None):
        if mode not in BLEND_MODES:
            raise ValueError(f"mode must be one of {BLEND_MODES}, got {mode!r}")
        if blend_steps < 0:
            raise ValueError(f"blend_steps must be >= 0, got {blend_steps}")
        self.mode, self.blend_steps, self.coeff = mode, int(blend_steps), float(ensemble_coeff)
        self.rtc_fn, self.ensemble_fn = rtc_fn or rtc_blend, ensemble_fn or temporal_ensemble
        self.chunks: list[tuple[int, int, np.ndarray]] = []  # (obs step, arrival step, chunk [H, A])

    def add(self, chunk: np.ndarray, obs_step: int, arrival_step: int) -> None:
        """A chunk computed from the observation of `obs_step`, usable from `arrival_step` on."""
        chunk = np.asarray(chunk, dtype=np.float64)
        if chunk.ndim != 2:
            raise ValueError(f"a chunk must be [H, A], got shape {chunk.shape}")
        if arrival_step < obs_step:
            raise ValueError(f"a chunk cannot arrive (step {arrival_step}) before its observation ({obs_step})")
        self.chunks.append((int(obs_step), int(arrival_step), chunk))

    def covers(self, step: int) -> list[tuple[int, int, np.ndarray]]:
        return [c for c in self.chunks if c[0] <= step < c[0] + len(c[2]) and c[1] <= step]

    def action(self, step: int) -> np.ndarray | None:
        """The action for control step `step`, or None when no chunk covers it (starvation)."""
        self.chunks = [c for c in self.chunks if c[0] + len(c[2]) > step]  # forget finished chunks
        live = self.covers(step)
        if not live:
            return None
        if self.mode == "ensemble":
            return np.asarray(self.ensemble_fn(np.stack([c[2][step - c[0]] for c in live]), self.coeff), np.float64)
        if self.mode == "none":
            return live[-1][2][step - live[-1][0]]
        return np.asarray(self.rtc_fn(live, step, self.blend_steps), np.float64)


# ---- timing statistics ---------------------------------------------------------------------------------
@dataclass
class LoopStats:
    """Timing of one run: tick periods against the target, overruns, inference, starvation."""

    steps: int
    target_hz: float
    mean_hz: float
    jitter_std_ms: float  # std of (period - target period)
    jitter_p50_ms: float  # median |period - target|
    jitter_p99_ms: float
    jitter_max_ms: float
    overruns: int  # steps whose work ran past the next deadline
    starved: int  # steps that had to wait for a chunk
    chunks: int
    inference_p50_ms: float
    inference_p99_ms: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.steps} steps at {self.mean_hz:.2f} Hz (target {self.target_hz:g}): jitter std "
                f"{self.jitter_std_ms:.3f} ms, p50 {self.jitter_p50_ms:.3f} ms, p99 {self.jitter_p99_ms:.3f} ms, "
                f"max {self.jitter_max_ms:.3f} ms; {self.overruns} overruns, {self.starved} starved steps, "
                f"{self.chunks} chunks (inference p50 {self.inference_p50_ms:.1f} ms)")


def timing_stats(ticks: list[float], dt: float, overruns: int, starved: int, inference: list[float]) -> LoopStats:
    """LoopStats from tick start times (seconds), the overrun count and inference durations."""
    periods = np.diff(np.asarray(ticks, dtype=np.float64))
    err = (periods - dt) * 1e3
    q = lambda x, p: float(np.percentile(x, p)) if len(x) else math.nan  # noqa: E731
    inf_ms = np.asarray(inference) * 1e3
    return LoopStats(
        steps=len(ticks), target_hz=1.0 / dt, mean_hz=float(1.0 / periods.mean()) if len(periods) else math.nan,
        jitter_std_ms=float(err.std()) if len(err) else math.nan, jitter_p50_ms=q(np.abs(err), 50),
        jitter_p99_ms=q(np.abs(err), 99), jitter_max_ms=float(np.abs(err).max()) if len(err) else math.nan,
        overruns=int(overruns), starved=starved, chunks=len(inference),
        inference_p50_ms=q(inf_ms, 50), inference_p99_ms=q(inf_ms, 99))


# ---- the loop ------------------------------------------------------------------------------------------
class ControlLoop:
    """Run `policy` on `robot` at a fixed rate; every command goes through a SafetyLayer.

    `policy`: a labkit policy or a chunk source (`predict_chunk(history) -> [H, A]`, e.g. a
    PolicyClient), or a plain callable `obs -> action` (teleop, replay) called every step.
    `execute_steps`: steps between chunk requests (default: the policy's n_action_steps, or H // 2).
    `inference_delay`: None = use a chunk as soon as it is ready (real time); an int d = wait for it
    exactly d steps after the request, which makes runs reproducible. `threaded=False` computes the
    chunk at request time in the loop's thread (for fake-clock tests), still delivered d steps later.
    `on_step(step, obs, sent_action)` is called after every command (recording).
    `check`: before the first command of the first run, read one observation and raise a ValueError if
    it does not match what the policy reads (`check_policy_matches_robot`; skipped for a plain callable
    or a source that does not say what it reads).
    `rtc_fn`, `ensemble_fn`: the blends the loop runs with (what a lesson hands in; see ChunkBlender).
    """

    def __init__(self, robot: Any, policy: Any, *, fps: float | None = None, clock: Any = None,
                 mode: str = "rtc", execute_steps: int | None = None, blend_steps: int = 4,
                 ensemble_coeff: float = 0.01, inference_delay: int | None = None, threaded: bool = True,
                 safety: SafetyConfig | None = None, on_step: Callable | None = None, stop_on_done: bool = True,
                 result_timeout: float = 10.0, check: bool = True, rtc_fn: Callable | None = None,
                 ensemble_fn: Callable | None = None):
        self.clock = clock or (robot.clock if isinstance(robot, SafetyLayer) else RealClock())
        if isinstance(robot, SafetyLayer):
            self.robot = robot
        else:
            self.robot = SafetyLayer(robot, safety, clock=self.clock)  # always on
        self.fps = float(fps or self.robot.spec.fps)
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        self.source = as_chunk_source(policy)
        if self.source is None and not callable(policy):
            raise TypeError(f"policy must be a labkit policy, have predict_chunk(history), or be callable obs -> "
                            f"action; got {type(policy).__name__}")
        self.step_fn = None if self.source is not None else policy
        self.obs_horizon = int(getattr(self.source, "obs_horizon", 1))
        horizon = getattr(self.source, "horizon", None)
        default = getattr(self.source, "n_action_steps", None) or (horizon // 2 if horizon else 1)
        self.execute_steps = int(execute_steps or default)
        self.inference_delay = inference_delay
        if self.execute_steps < 1 or (inference_delay is not None and inference_delay < 0):
            raise ValueError("execute_steps must be >= 1 and inference_delay >= 0")
        if horizon and self.execute_steps + (inference_delay or 0) > horizon:
            raise ValueError(f"execute_steps + inference_delay ({self.execute_steps} + {inference_delay or 0}) must "
                             f"not exceed the chunk horizon {horizon}, or the robot runs out of actions")
        self.blender = ChunkBlender(mode, blend_steps, ensemble_coeff, rtc_fn, ensemble_fn)
        self.threaded, self.on_step, self.stop_on_done = threaded, on_step, stop_on_done
        self.result_timeout = float(result_timeout)
        self.stats: LoopStats | None = None
        self._stop_requested = False
        self._check = check and self.source is not None and policy_inputs(self.source) is not None

    def stop(self) -> None:
        """Ask a running loop (e.g. in a teleop thread) to end after its current step."""
        self._stop_requested = True

    def run(self, steps: int, reset: bool = True) -> LoopStats:
        """Run `steps` control steps (fewer on e-stop or when the robot reports `done`); returns timing."""
        dt = 1.0 / self.fps
        robot, clock = self.robot, self.clock
        if self._check:  # outside the try below: a mismatch sends nothing, not even a hold
            check_policy_matches_robot(self.source, robot)
            self._check = False
        if reset and self.source is not None and hasattr(self.source, "reset"):
            self.source.reset()
        self.blender.chunks = []
        self._stop_requested = False
        history = ObsHistory(self.obs_horizon)
        pool = ThreadPoolExecutor(1, thread_name_prefix="labkit-infer") if self.threaded else None
        pending: dict | None = None
        last_request: int | None = None
        ticks, inference = [], []
        starved = overruns = 0
        start = clock.now()
        deadline = start
        try:
            for k in range(steps):
                now = clock.now()
                if now < deadline:
                    clock.sleep(deadline - now)
                tick = clock.now()
                ticks.append(tick)
                robot.poll()  # the watchdog
                if robot.estopped or self._stop_requested:
                    break
                obs = robot.observe()
                history.push(obs)
                if self.step_fn is not None:
                    action = self.step_fn(obs)
                else:
                    if pending is not None and self._ready(pending, k):
                        self._collect(pending, k, inference)
                        pending = None
                    if pending is None and (last_request is None or k - last_request >= self.execute_steps):
                        pending = self._request(pool, history.frames(), k)
                        last_request = k
                        if not self.blender.chunks or self.inference_delay == 0:
                            self._collect(pending, k, inference)  # the first chunk (nothing to run yet), or synchronous
                            pending = None
                    action = self.blender.action(k)
                    if action is None and pending is not None:  # ran out of actions: wait for the chunk
                        starved += 1
                        self._collect(pending, k, inference)
                        pending = None
                        action = self.blender.action(k)
                    if action is None:
                        starved += 1
                        action = robot.hold_action()
                sent = robot.act(np.asarray(action, dtype=np.float64))
                if self.on_step is not None:
                    self.on_step(k, obs, sent)
                if self.stop_on_done and getattr(robot, "done", False):
                    break
                deadline += dt
                behind = clock.now() - deadline
                overruns += behind > 0
                if behind > dt:  # more than a period behind: skip, do not burst to catch up
                    deadline = clock.now()
        except BaseException:
            # The policy source failed (server gone, a bug, Ctrl-C): leave the robot holding where it is,
            # not executing its last command, before the error propagates.
            robot.act(robot.hold_action())
            raise
        finally:
            if pool is not None:  # let an in-flight request finish, so the source is free for the next run
                pool.shutdown(wait=True, cancel_futures=True)
        self.stats = timing_stats(ticks, dt, overruns, starved, inference)
        return self.stats

    # ---- inference plumbing ---------------------------------------------------------------------------
    def _request(self, pool: ThreadPoolExecutor | None, history: list[dict], step: int) -> dict:
        def work():  # timed on the loop's clock, so a FakeClock test sees the compute time it simulates
            t0 = self.clock.now()
            chunk = np.asarray(self.source.predict_chunk(history), dtype=np.float64)
            return chunk, self.clock.now() - t0

        if pool is None:
            fut: Future = Future()
            try:
                fut.set_result(work())
            except Exception as e:  # noqa: BLE001  (re-raised when collected)
                fut.set_exception(e)
        else:
            fut = pool.submit(work)
        return {"future": fut, "step": step}

    def _ready(self, pending: dict, step: int) -> bool:
        if self.inference_delay is None:
            return pending["future"].done()
        return step >= pending["step"] + self.inference_delay

    def _collect(self, pending: dict, step: int, inference: list[float]) -> None:
        chunk, seconds = pending["future"].result(timeout=self.result_timeout)
        if chunk.ndim != 2 or chunk.shape[1] != self.robot.spec.dim:
            raise ValueError(f"the policy returned a chunk of shape {chunk.shape}; the robot needs [H, {self.robot.spec.dim}]")
        self.blender.add(chunk, pending["step"], step)
        inference.append(seconds)
