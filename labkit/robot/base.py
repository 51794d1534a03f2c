"""The robot contract every backend follows (sim twin, real arm, fakes) and the spec that describes it.

A robot is anything with `connect()`, `observe() -> dict`, `act(action) -> sent action` and
`disconnect()`, plus a `spec` (joint names, limits, control rate) and `hold_action()`, the command that
keeps the robot where it is now (the present joint positions for a position-controlled arm, zeros for
velocity or relative commands): the safety layer's watchdog and e-stop send it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

ACTION_MODES = ("position", "velocity", "delta")


@dataclass
class RobotSpec:
    """What a robot accepts: one command dimension per joint, its limits, its control rate.

    `action_mode` says what a command means: "position" (absolute joint targets, SO-101 style),
    "velocity" (joint velocities) or "delta" (a relative move). `low`/`high` are the command limits
    (the joint limits in position mode).
    """

    joint_names: tuple[str, ...]
    low: np.ndarray
    high: np.ndarray
    fps: float
    action_mode: str = "position"
    name: str = "robot"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.joint_names = tuple(self.joint_names)
        self.low = np.asarray(self.low, dtype=np.float64).reshape(-1)
        self.high = np.asarray(self.high, dtype=np.float64).reshape(-1)
        n = len(self.joint_names)
        if self.low.shape != (n,) or self.high.shape != (n,):
            raise ValueError(f"low/high must have one entry per joint ({n}: {self.joint_names}); "
                             f"got shapes {self.low.shape}, {self.high.shape}")
        if not np.all(self.low <= self.high):
            raise ValueError(f"every low must be <= high; got low={self.low}, high={self.high}")
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.action_mode not in ACTION_MODES:
            raise ValueError(f"action_mode must be one of {ACTION_MODES}, got {self.action_mode!r}")

    @property
    def dim(self) -> int:
        return len(self.joint_names)

    @property
    def dt(self) -> float:
        return 1.0 / self.fps

    def check_shape(self, action: Any) -> np.ndarray:
        """`action` as a float64 vector of this robot's dimension; a wrong shape is a ValueError."""
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (self.dim,):
            raise ValueError(f"{self.name}: a command must have shape ({self.dim},) = one value per joint "
                             f"{self.joint_names}; got shape {a.shape}")
        return a


@runtime_checkable
class Robot(Protocol):
    """The robot contract: a sim twin and a real arm look the same to the control loop."""

    spec: RobotSpec

    def connect(self) -> None:
        """Open the connection (serial port, simulator); idempotent."""

    def observe(self) -> dict[str, np.ndarray]:
        """The latest observation, with the env keys (`state`, `proprio`, `pixels` where present)."""

    def act(self, action: np.ndarray) -> np.ndarray:
        """Send one command; returns the command actually sent."""

    def hold_action(self) -> np.ndarray:
        """The command that keeps the robot where it is now."""

    def disconnect(self) -> None:
        """Release the robot (idempotent)."""


class NotConnectedError(RuntimeError):
    """A robot was used before `connect()` or after `disconnect()`."""


class RealClock:
    """Wall-clock time for control loops: `perf_counter` and `time.sleep`. With `spin_s > 0` the last
    `spin_s` of every sleep busy-waits, which can trim wake-up jitter on an idle machine; on a loaded
    2-core machine it made jitter worse (p50 2.4-2.9 ms against 0.03 ms), so it is off by default."""

    def __init__(self, spin_s: float = 0.0):
        self.spin_s = float(spin_s)

    def now(self) -> float:
        import time

        return time.perf_counter()

    def sleep(self, seconds: float) -> None:
        import time

        end = time.perf_counter() + max(0.0, seconds)
        coarse = end - time.perf_counter() - self.spin_s
        if coarse > 0:
            time.sleep(coarse)
        while time.perf_counter() < end:
            pass


class FakeClock:
    """A clock that moves only when told: `sleep` and `advance` add to the time. For exact tests."""

    def __init__(self, start: float = 0.0):
        self.t = float(start)

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += max(0.0, float(seconds))

    def advance(self, seconds: float) -> None:
        self.t += float(seconds)


class FakeRobot:
    """A position-controlled robot with no physics, for tests and timing: each command moves the joints
    `follow` of the way there (1.0: at once). Every command received is kept in `received`."""

    def __init__(self, low, high, fps: float = 30, follow: float = 1.0, start=None):
        low = np.asarray(low, dtype=np.float64)
        self.spec = RobotSpec(tuple(f"j{i}" for i in range(len(low))), low, np.asarray(high, np.float64), fps=fps)
        self.follow = float(follow)
        self.q = np.zeros(len(low)) if start is None else np.asarray(start, dtype=np.float64).copy()
        self.received: list[np.ndarray] = []

    def connect(self) -> None:
        pass

    def disconnect(self) -> None:
        pass

    def observe(self) -> dict[str, np.ndarray]:
        return {"state": self.q.astype(np.float32)}

    def hold_action(self) -> np.ndarray:
        return self.q.copy()

    def act(self, action) -> np.ndarray:
        a = np.asarray(action, dtype=np.float64)
        self.received.append(a.copy())
        self.q = self.q + self.follow * (a - self.q)
        return a

