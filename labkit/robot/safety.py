"""`SafetyLayer`: the always-on guard between any command source and any robot backend.

Every command passes, in order: a finite check (NaN/inf -> hold position), joint limits (clamp),
a velocity limit on the command stream (clamp), a per-step delta clamp, workspace bounds through
forward kinematics (scaled back toward the last safe command), and a final verification that falls
back to holding position. A watchdog holds position when commands stop for longer than a timeout,
and a latched e-stop refuses every command until released. Every intervention is logged, in memory
and (with `log_path`) appended to a JSON-lines file flushed per record, so a crash loses none.

Bad input, by design: a command of the wrong *shape* is a programming error and raises ValueError;
a command with the right shape but bad *values* (NaN, inf, out of range, too fast, outside the
workspace) is clamped or replaced by a hold, and logged; it never raises and never reaches the robot.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from labkit.robot.base import RealClock, Robot, RobotSpec

Limit = float | np.ndarray | list | None


@dataclass
class SafetyConfig:
    """The limits; any left None is off (the joint limits default to the robot's spec).

    `max_delta`: largest change per command, per joint, relative to the present position (position
    mode; LeRobot's `max_relative_target`) or to the previous command (velocity/delta modes).
    `max_velocity`: largest rate of change of the command stream, units/s, timed with the clock; the time
    between two commands counts for at most one control period (`spec.dt`), so a pause banks no motion.
    `workspace`: ((xmin, ymin, zmin), (xmax, ymax, zmax)) for `fk(command)`, the end-effector position.
    `watchdog_s`: hold position when no command came for this long (seconds).
    """

    low: Limit = None
    high: Limit = None
    max_delta: Limit = None
    max_velocity: Limit = None
    workspace: tuple[Any, Any] | None = None
    watchdog_s: float | None = 0.5


@dataclass
class Intervention:
    """One thing the safety layer did: when, what kind, the command it got and the one it sent."""

    t: float
    kind: str
    command: list[float] | None
    sent: list[float] | None
    detail: str = ""


class SafetyLayer:
    """Wraps a robot and follows the same contract: use it wherever a robot is expected.

    `fk`: joints -> end-effector xyz, needed for `workspace`. `clock`: `now()`/`sleep()` (a FakeClock
    in tests). `log_path`: JSON-lines file that receives every intervention as it happens.
    """

    def __init__(self, robot: Robot, config: SafetyConfig | None = None, *, fk: Callable | None = None,
                 clock: Any = None, log_path: str | Path | None = None):
        if isinstance(robot, SafetyLayer):
            raise ValueError("this robot is already wrapped in a SafetyLayer; wrap the bare robot once")
        self.robot, self.clock, self.fk = robot, clock or RealClock(), fk
        self.config = config or SafetyConfig()
        spec: RobotSpec = robot.spec
        self.spec = spec
        c = self.config
        self.low = self._vec(c.low, spec.low, "low")
        self.high = self._vec(c.high, spec.high, "high")
        if np.any(self.low > self.high):
            raise ValueError(f"safety limits need low <= high; got {self.low}, {self.high}")
        self.max_delta = None if c.max_delta is None else self._vec(c.max_delta, None, "max_delta")
        self.max_velocity = None if c.max_velocity is None else self._vec(c.max_velocity, None, "max_velocity")
        for name, v in (("max_delta", self.max_delta), ("max_velocity", self.max_velocity)):
            if v is not None and np.any(v < 0):
                raise ValueError(f"{name} must be >= 0, got {v}")
        self.workspace = None
        if c.workspace is not None:
            if fk is None:
                raise ValueError("workspace bounds need forward kinematics: pass fk=callable(joints) -> xyz")
            lo, hi = (np.asarray(b, dtype=np.float64) for b in c.workspace)
            if lo.shape != hi.shape or np.any(lo > hi):
                raise ValueError(f"workspace must be (low_xyz, high_xyz) with low <= high; got {c.workspace}")
            self.workspace = (lo, hi)
        if c.watchdog_s is not None and not (c.watchdog_s > 0 and np.isfinite(c.watchdog_s)):
            raise ValueError(f"watchdog_s must be positive and finite, or None, got {c.watchdog_s}")
        self.interventions: list[Intervention] = []
        self.counts = {"commands": 0, "modified": 0, "holds": 0}
        self.log_path = Path(log_path) if log_path else None
        self._log_file = None
        self._lock = threading.RLock()
        self._last_cmd: np.ndarray | None = None  # the last command sent
        self._last_t: float | None = None  # when the last command came (for watchdog and velocity)
        self.estopped = False
        self.watchdog_tripped = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _vec(self, value: Limit, default: np.ndarray | None, name: str) -> np.ndarray:
        if value is None:
            return np.array(default, dtype=np.float64)
        v = np.broadcast_to(np.asarray(value, dtype=np.float64), (self.spec.dim,)).copy()
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{name} must be finite, got {v}")
        return v

    # ---- the robot contract --------------------------------------------------------------------------
    def connect(self) -> None:
        self.robot.connect()
        self._last_t = self.clock.now()  # the watchdog counts from the connection
        self._last_cmd = None
        if self.log_path and self._log_file is None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115

    def reset(self, *args, **kwargs):
        """Reset the backend (a new episode) and forget the last command: the next command is limited
        relative to where the robot now is, not to where the previous episode left the stream."""
        with self._lock:
            out = self.robot.reset(*args, **kwargs) if hasattr(self.robot, "reset") else None
            self._last_cmd, self._last_t = None, self.clock.now()
            return out

    def observe(self) -> dict[str, np.ndarray]:
        with self._lock:
            return self.robot.observe()

    def hold_action(self) -> np.ndarray:
        """The robot's hold command, clipped into the joint limits (a hold is always allowed)."""
        return np.clip(np.asarray(self.robot.hold_action(), dtype=np.float64), self.low, self.high)

    def disconnect(self) -> None:
        self.stop_watchdog()
        self.robot.disconnect()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def act(self, action: Any) -> np.ndarray:
        """Make `action` safe, send it, return what was sent (see the module docstring for the rules)."""
        raw = self.spec.check_shape(action)  # a wrong shape raises: it is a bug in the caller
        with self._lock:
            now = self.clock.now()
            self.counts["commands"] += 1
            if self.estopped:
                self._log(now, "estop_refused", raw, None, "e-stop is latched; call release_estop()")
                self._last_t = now
                return self._estop_hold
            self.watchdog_tripped = False
            cmd, kinds = self.make_safe(raw, now)
            sent = np.asarray(self.robot.act(cmd), dtype=np.float64)
            if kinds:
                self.counts["modified"] += 1
                for kind, detail in kinds:
                    self._log(now, kind, raw, cmd, detail)
            self._last_cmd, self._last_t = cmd, now
            return sent

    # ---- the rules ---------------------------------------------------------------------------------
    def make_safe(self, raw: np.ndarray, now: float) -> tuple[np.ndarray, list[tuple[str, str]]]:
        """The command that will be sent for `raw` at time `now`, and the interventions it took."""
        kinds: list[tuple[str, str]] = []
        hold = self.hold_action()
        if not np.all(np.isfinite(raw)):
            self.counts["holds"] += 1
            return hold, [("nonfinite", "NaN/inf in the command: holding position")]
        cmd = np.clip(raw, self.low, self.high)
        if not np.array_equal(cmd, raw):
            kinds.append(("joint_limit", f"joints {np.flatnonzero(cmd != raw).tolist()} clamped to limits"))
        prev = self._last_cmd if self._last_cmd is not None else hold
        if self.max_velocity is not None:
            step = self.max_velocity * self._velocity_dt(now)
            new = np.clip(cmd, prev - step, prev + step)
            if not np.array_equal(new, cmd):
                kinds.append(("velocity", f"rate limited to {self.max_velocity.tolist()} per s"))
            cmd = new
        if self.max_delta is not None:
            ref = hold if self.spec.action_mode == "position" else prev
            new = np.clip(cmd, ref - self.max_delta, ref + self.max_delta)
            if not np.array_equal(new, cmd):
                kinds.append(("delta", f"step clamped to {self.max_delta.tolist()}"))
            cmd = new
        cmd = np.clip(cmd, self.low, self.high)
        if self.workspace is not None and not self._in_workspace(cmd):
            anchor = prev if self._in_workspace(prev) else hold
            cmd = self._scale_into_workspace(anchor, cmd) if self._in_workspace(anchor) else hold
            kinds.append(("workspace", "end effector would leave the workspace: scaled back"))
        if not self.verify(cmd, now, hold):
            kinds.append(("verify_hold", "no safe scaled command: holding position"))
            cmd = hold
        if any(k in ("verify_hold",) for k, _ in kinds) or cmd is hold:
            self.counts["holds"] += 1
        return cmd, kinds

    def verify(self, cmd: np.ndarray, now: float, hold: np.ndarray | None = None, tol: float = 1e-9) -> bool:
        """True when `cmd` satisfies every limit (the final check before anything is sent)."""
        hold = self.hold_action() if hold is None else hold
        if not np.all(np.isfinite(cmd)) or np.any(cmd < self.low - tol) or np.any(cmd > self.high + tol):
            return False
        prev = self._last_cmd if self._last_cmd is not None else hold
        if self.max_velocity is not None:
            if np.any(np.abs(cmd - prev) > self.max_velocity * self._velocity_dt(now) + tol):
                return False
        if self.max_delta is not None:
            ref = hold if self.spec.action_mode == "position" else prev
            if np.any(np.abs(cmd - ref) > self.max_delta + tol):
                return False
        return self.workspace is None or self._in_workspace(cmd)

    def _velocity_dt(self, now: float) -> float:
        """The time the velocity limit may use for the next step: the time since the last command, but
        never more than one control period (`spec.dt`). A pause (silence, a watchdog trip, an e-stop
        release) must not bank time: after 5 s of silence an uncapped bound let one command jump a joint
        5 s x max_velocity. With no previous command (connect, reset, watchdog hold) it is one period."""
        if self._last_cmd is None or self._last_t is None:
            return self.spec.dt
        return min(max(0.0, now - self._last_t), self.spec.dt)

    def _in_workspace(self, joints: np.ndarray) -> bool:
        xyz = np.asarray(self.fk(joints), dtype=np.float64)
        lo, hi = self.workspace
        return bool(np.all(np.isfinite(xyz)) and np.all(xyz >= lo) and np.all(xyz <= hi))

    def _scale_into_workspace(self, inside: np.ndarray, outside: np.ndarray, iters: int = 20) -> np.ndarray:
        """The point furthest along inside -> outside still in the workspace (bisection)."""
        lo, hi = 0.0, 1.0
        for _ in range(iters):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self._in_workspace(inside + mid * (outside - inside)) else (lo, mid)
        return inside + lo * (outside - inside)

    # ---- watchdog and e-stop ------------------------------------------------------------------------
    def poll(self) -> bool:
        """Check the watchdog now: holds position (once per silence) when no command came for
        `watchdog_s`. Returns True when it tripped on this call. The control loop calls it every tick;
        `start_watchdog()` calls it from a background thread."""
        timeout = self.config.watchdog_s
        with self._lock:
            now = self.clock.now()
            if timeout is None or self._last_t is None or self.watchdog_tripped or self.estopped:
                return False
            if now - self._last_t <= timeout:
                return False
            hold = self.hold_action()
            self.robot.act(hold)
            self._last_cmd = hold
            self.watchdog_tripped = True
            self.counts["holds"] += 1
            self._log(now, "watchdog", None, hold, f"no command for {now - self._last_t:.3f} s > {timeout} s")
            return True

    def start_watchdog(self, period: float = 0.02) -> None:
        """Run `poll()` every `period` seconds in a daemon thread (for teleop and notebooks)."""
        if self._thread is not None:
            return
        self._stop.clear()

        def run():
            while not self._stop.wait(period):
                self.poll()

        self._thread = threading.Thread(target=run, name="labkit-watchdog", daemon=True)
        self._thread.start()

    def stop_watchdog(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=2.0)
            self._thread = None

    def estop(self, reason: str = "e-stop") -> None:
        """Latch the e-stop: hold position now and refuse every command until `release_estop()`."""
        with self._lock:
            now = self.clock.now()
            hold = self.hold_action()
            self._estop_hold = hold
            if not self.estopped:
                self.robot.act(hold)
                self._last_cmd = hold
            self.estopped = True
            on_estop = getattr(self.robot, "on_estop", None)
            if callable(on_estop):
                on_estop()  # a real arm may also cut torque
            self._log(now, "estop", None, hold, reason)

    def release_estop(self) -> None:
        with self._lock:
            self.estopped = False
            self._last_t = self.clock.now()
            self._log(self._last_t, "estop_release", None, None, "")

    # ---- logging --------------------------------------------------------------------------------------
    def _log(self, t: float, kind: str, command: np.ndarray | None, sent: np.ndarray | None, detail: str) -> None:
        rec = Intervention(float(t), kind, None if command is None else np.asarray(command).tolist(),
                           None if sent is None else np.asarray(sent).tolist(), detail)
        self.interventions.append(rec)
        if self._log_file is not None:
            # one line per record, flushed now: a crash loses none (NaN is written as Python's json reads it)
            self._log_file.write(json.dumps(rec.__dict__, default=str) + "\n")
            self._log_file.flush()

    def summary(self) -> dict[str, int]:
        """Counts of commands, modified commands, holds, and interventions by kind."""
        kinds: dict[str, int] = {}
        for rec in self.interventions:
            kinds[rec.kind] = kinds.get(rec.kind, 0) + 1
        return {**self.counts, **kinds}

    def __getattr__(self, name: str):  # pass through backend extras (reset, last_info, ...)
        if name.startswith("_") or name == "robot":
            raise AttributeError(name)
        return getattr(self.robot, name)
