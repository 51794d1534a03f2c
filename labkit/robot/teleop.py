"""Teleoperation: keys, notebook sliders, or a leader arm produce one command per control step.

Each teleop is a plain callable `obs -> action`, so `ControlLoop(robot, teleop).run(steps)` drives a
robot with it (through the SafetyLayer, as everything does) and `record_episodes` records it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from labkit.robot.base import RobotSpec

# Key pairs (+, -) for joints 0..5, then the keys that hold, home and e-stop.
DEFAULT_KEYS = ("qa", "ws", "ed", "rf", "tg", "yh")


class KeyboardTeleop:
    """Key presses nudge one joint each: `press("q")` moves joint 0 up by `step`, `press("a")` down.

    In position mode the keys move a target that starts at the robot's present pose (`start`, required;
    `for_robot(robot)` reads it); in velocity or delta mode a press sets that joint's command for the
    next step only. `press(" ")` (space) calls `on_estop`; `press("0")` returns the target to `home`
    (default: the start pose). `listen()` reads a real keyboard (pynput).
    """

    def __init__(self, spec: RobotSpec, start: Any = None, step: Any = None, keys: tuple[str, ...] = DEFAULT_KEYS,
                 on_estop: Callable[[], None] | None = None, home: Any = None):
        self.spec = spec
        rng = spec.high - spec.low
        self.step = np.broadcast_to(np.asarray(step if step is not None else 0.02 * rng, np.float64), (spec.dim,)).copy()
        self.keymap: dict[str, tuple[int, float]] = {}
        for j, pair in enumerate(keys[: spec.dim]):
            if len(pair) != 2:
                raise ValueError(f"each key entry must be two characters (+, -), got {pair!r}")
            self.keymap[pair[0]], self.keymap[pair[1]] = (j, +1.0), (j, -1.0)
        if spec.action_mode == "position" and start is None:
            # a made-up start pose would be a jump on the first step: start where the robot is
            raise ValueError("a position-mode KeyboardTeleop needs start= the present pose "
                             "(KeyboardTeleop.for_robot(robot) reads it)")
        start = np.zeros(spec.dim) if start is None else np.asarray(start, np.float64)
        self.home = np.asarray(home if home is not None else start, np.float64).copy()
        self.target = np.array(start, dtype=np.float64)
        self.on_estop = on_estop
        self._listener = None

    @classmethod
    def for_robot(cls, robot: Any, **kwargs) -> KeyboardTeleop:
        """A keyboard teleop that starts (and homes) at the robot's present pose."""
        return cls(robot.spec, start=robot.hold_action(), **kwargs)

    def press(self, key: str) -> None:
        """Apply one key press (unknown keys are ignored)."""
        if key == " ":
            if self.on_estop is not None:
                self.on_estop()
            return
        if key == "0":
            self.target = self.home.copy()
            return
        if key in self.keymap:
            j, sign = self.keymap[key]
            self.target[j] = np.clip(self.target[j] + sign * self.step[j], self.spec.low[j], self.spec.high[j])

    def __call__(self, obs: Any = None) -> np.ndarray:
        out = self.target.copy()
        if self.spec.action_mode != "position":
            self.target = np.zeros(self.spec.dim)  # a velocity/delta command lasts one step
        return out

    def listen(self) -> None:
        """Feed real key presses from the keyboard (needs `pip install pynput` and a display)."""
        try:
            from pynput import keyboard
        except ImportError as e:
            raise ImportError("keyboard listening needs pynput: `pip install pynput`; or call press(key) yourself") from e

        def on_press(key):
            ch = " " if key == keyboard.Key.space else getattr(key, "char", None)
            if ch:
                self.press(ch)

        self._listener = keyboard.Listener(on_press=on_press)
        self._listener.start()

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.stop()
            self._listener = None


class LeaderArm:
    """A leader arm's joint readings mapped onto the follower: `follower = offset + scale * (leader - zero)`.

    `read`: a callable returning the leader's joints (e.g. `SO101Arm(bus, leader=True).read_joints`).
    `calibrate(follower_pose)` sets `zero` to the leader's present reading and `offset` to
    `follower_pose`, so that the two arms agree now; `scale` flips or scales joints (e.g. -1 for a
    mirrored joint). The result is clipped to the follower's limits when a `spec` is given.
    """

    def __init__(self, read: Callable[[], Any], scale: Any = 1.0, zero: Any = 0.0, offset: Any = 0.0,
                 spec: RobotSpec | None = None):
        self.read, self.spec = read, spec
        first = np.asarray(read(), dtype=np.float64)
        n = first.shape[0]
        self.scale = np.broadcast_to(np.asarray(scale, np.float64), (n,)).copy()
        self.zero = np.broadcast_to(np.asarray(zero, np.float64), (n,)).copy()
        self.offset = np.broadcast_to(np.asarray(offset, np.float64), (n,)).copy()
        if spec is not None and spec.dim != n:
            raise ValueError(f"the leader has {n} joints but the follower {spec.dim}; map them before (read=...)")

    def calibrate(self, follower_pose: Any) -> None:
        self.zero = np.asarray(self.read(), dtype=np.float64)
        self.offset = np.asarray(follower_pose, dtype=np.float64).reshape(self.zero.shape)

    def __call__(self, obs: Any = None) -> np.ndarray:
        cmd = self.offset + self.scale * (np.asarray(self.read(), dtype=np.float64) - self.zero)
        return np.clip(cmd, self.spec.low, self.spec.high) if self.spec is not None else cmd


class SliderTeleop:
    """A notebook panel: one ipywidgets slider per joint, a hold button and an E-STOP button.

    `panel` is the widget to display. The sliders are read as the command every step; `start()` runs
    a ControlLoop in a background thread (the kernel must stay free to move the sliders), `stop()`
    ends it. The e-stop latches the SafetyLayer until `release` is pressed.
    """

    def __init__(self, robot: Any, clock: Any = None, loop_kwargs: dict | None = None, max_delta: float = 0.05):
        import ipywidgets as w

        from labkit.robot.control import ControlLoop
        from labkit.robot.safety import SafetyConfig, SafetyLayer

        # A slider can jump anywhere in the joint range at once: on a bare robot, limit each step's
        # change (`max_delta`, in the action's units per step: 0.05 rad is ~3 degrees) unless the caller
        # brought its own SafetyLayer.
        self.robot = robot if isinstance(robot, SafetyLayer) else SafetyLayer(
            robot, SafetyConfig(max_delta=max_delta), clock=clock)
        spec = self.robot.spec
        if spec.action_mode != "position":
            start = np.zeros(spec.dim)
        else:
            start = self.robot.hold_action()
        self.sliders = [w.FloatSlider(value=float(v), min=float(lo), max=float(hi), step=float(hi - lo) / 200,
                                      description=name, continuous_update=True, readout_format=".3f")
                        for name, v, lo, hi in zip(spec.joint_names, start, spec.low, spec.high, strict=True)]
        self.hold_button = w.Button(description="hold here")
        self.estop_button = w.Button(description="E-STOP", button_style="danger")
        self.release_button = w.Button(description="release")
        self.status = w.Label("stopped")
        self.hold_button.on_click(lambda _: self.hold())
        self.estop_button.on_click(lambda _: self.estop())
        self.release_button.on_click(lambda _: self.robot.release_estop())
        self.panel = w.VBox([*self.sliders, w.HBox([self.hold_button, self.estop_button, self.release_button]),
                             self.status])
        self.loop = ControlLoop(self.robot, self, clock=self.robot.clock, **(loop_kwargs or {}))
        self._thread: threading.Thread | None = None

    def __call__(self, obs: Any = None) -> np.ndarray:
        return np.array([s.value for s in self.sliders], dtype=np.float64)

    def hold(self) -> None:
        """Move the sliders to where the robot is now."""
        if self.robot.spec.action_mode == "position":
            for s, v in zip(self.sliders, self.robot.hold_action(), strict=True):
                s.value = float(v)

    def estop(self) -> None:
        self.robot.estop("E-STOP button")
        self.status.value = "E-STOP latched: press release, then start again"

    def start(self, steps: int = 10**9) -> None:
        if self._thread is not None and self._thread.is_alive():
            return

        def run():
            self.status.value = "running"
            stats = self.loop.run(steps)
            self.status.value = f"stopped: {stats.summary()}"

        self._thread = threading.Thread(target=run, name="labkit-teleop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.loop.stop()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
