"""The real SO-100/SO-101 arm through LeRobot's Feetech motor bus, its cameras, and fakes for tests.

LeRobot is an optional extra (it pins its own torch): it is imported only when `connect()` must build
a real bus or `opencv_camera` a real camera, never when this module is imported. The bus speaks
LeRobot's calibrated units (degrees for the five joints, 0-100 for the gripper); the robot speaks
labkit's (radians, gripper opening in metres, as the simulated classroom arm does), so a policy trained
in sim sends the same numbers to the real arm.

What the arm observes, and what a policy for it may read: `joints` (6-D float32, radians + gripper
metres, the twin's `joints`) and its cameras, named as the twin's: `cameras={"top": grab, "wrist": grab}`
gives `pixels` (the overhead camera) and `wrist` (the gripper camera), uint8 HxWx3 frames of the size
the policy was trained at (`opencv_camera(..., size=64)` crops and resizes explicitly). `state` and
`proprio` repeat the joints (older code reads them); they are NOT the twin's 26-D `state`, which holds
object poses no real sensor gives. `labkit.robot.check_policy_matches_robot` compares the two.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from labkit.robot.base import NotConnectedError, RobotSpec

SO101_MOTORS = {"shoulder_pan": 1, "shoulder_lift": 2, "elbow_flex": 3, "wrist_flex": 4, "wrist_roll": 5, "gripper": 6}
# Default joint limits in degrees (gripper 0-100): the ranges of the public SO-101 description, as the
# simulated arm (labkit/ArmPickCube-v0) uses them. Pass the ones of your calibration.
SO101_LIMITS_DEG = {"shoulder_pan": (-110.0, 110.0), "shoulder_lift": (-100.0, 100.0), "elbow_flex": (-96.8, 96.8),
                    "wrist_flex": (-95.0, 95.0), "wrist_roll": (-157.2, 162.8), "gripper": (0.0, 100.0)}
GRIP_MAX = 0.07  # the simulated arm's widest gripper opening (m): LeRobot's gripper 100 maps to it
MAIN_CAMERA = "top"  # the camera returned as `pixels` (labkit.data.keys.MAIN_CAMERA: the twin's overhead view)
SIDE_CAMERAS = ("wrist",)  # twin cameras that keep their name even when no `top` camera is plugged in
RESERVED = ("pixels", "state", "proprio", "joints")  # observation keys a camera name must not shadow


class FakeMotorBus:
    """A stand-in for LeRobot's `FeetechMotorsBus`: goal and present positions in calibrated units.

    `sync_write("Goal_Position", {name: value})` sets goals; every `sync_read("Present_Position")`
    first moves each present position toward its goal by at most `speed` units (with torque on),
    like a servo between two reads. Every write is kept in `writes`, for tests.
    """

    def __init__(self, motors: dict[str, int] | None = None, present: dict[str, float] | None = None,
                 speed: float = 5.0, noise: float = 0.0, seed: int = 0):
        self.motors = dict(motors or SO101_MOTORS)
        self.present = {m: float((present or {}).get(m, 0.0)) for m in self.motors}
        self.goal = dict(self.present)
        self.speed, self.noise = float(speed), float(noise)
        self.rng = np.random.default_rng(seed)
        self.is_connected, self.torque = False, False
        self.writes: list[dict[str, float]] = []

    def connect(self) -> None:
        self.is_connected = True

    def disconnect(self, disable_torque: bool = True) -> None:
        if disable_torque:
            self.torque = False
        self.is_connected = False

    def enable_torque(self, motors: Any = None) -> None:
        self.torque = True

    def disable_torque(self, motors: Any = None) -> None:
        self.torque = False

    def _check(self) -> None:
        if not self.is_connected:
            raise ConnectionError("FakeMotorBus is not connected")

    def sync_read(self, data_name: str, motors: Any = None) -> dict[str, float]:
        self._check()
        if data_name == "Present_Position":
            if self.torque:
                for m in self.motors:
                    self.present[m] += float(np.clip(self.goal[m] - self.present[m], -self.speed, self.speed))
            noise = self.rng.normal(0, self.noise, len(self.motors)) if self.noise else np.zeros(len(self.motors))
            return {m: self.present[m] + float(n) for m, n in zip(self.motors, noise, strict=True)}
        if data_name == "Goal_Position":
            return dict(self.goal)
        raise KeyError(f"FakeMotorBus cannot read {data_name!r}")

    def sync_write(self, data_name: str, values: dict[str, float], motors: Any = None) -> None:
        self._check()
        if data_name != "Goal_Position":
            raise KeyError(f"FakeMotorBus cannot write {data_name!r}")
        unknown = set(values) - set(self.motors)
        if unknown:
            raise KeyError(f"unknown motors {sorted(unknown)}")
        self.goal.update({m: float(v) for m, v in values.items()})
        self.writes.append({m: float(v) for m, v in values.items()})


class FakeCamera:
    """A stand-in camera for tests and dry runs: each call returns a new seeded random HxWx3 uint8 frame
    (`size` x `size`), like a `cameras=` entry of `SO101Arm`. `calls` counts the frames taken."""

    def __init__(self, size: int = 64, seed: int = 0):
        if int(size) < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size, self.calls = int(size), 0
        self.rng = np.random.default_rng(seed)

    def __call__(self) -> np.ndarray:
        self.calls += 1
        return self.rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8)


def center_crop_resize(frame: Any, size: int) -> np.ndarray:
    """An HxWx3 uint8 frame -> its centred square (the short side), resized to `size` x `size`.

    The twin's cameras are square; a webcam's 640x480 is not. Cropping (not squashing) keeps the
    geometry a policy learnt in the twin; the resize averages each output pixel's block of input
    pixels (area interpolation: no aliasing when shrinking 480 -> 64). Anything other than HxWx3 uint8
    is a ValueError: a wrong frame is never coerced here."""
    img = np.asarray(frame)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB frame, got shape {img.shape} dtype {img.dtype}")
    h, w = img.shape[:2]
    s = min(h, w)
    sq = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s].astype(np.float32)
    edges = np.arange(int(size)) * s // int(size)  # first input row/column of each output pixel
    counts = np.maximum(np.diff(np.append(edges, s)), 1)  # pixels per block (>= 1 when enlarging)
    sums = np.add.reduceat(np.add.reduceat(sq, edges, axis=0), edges, axis=1)
    return np.clip(np.rint(sums / counts[:, None, None] / counts[None, :, None]), 0, 255).astype(np.uint8)


class CroppedCamera:
    """A LeRobot camera as a `cameras=` entry: each call reads its newest frame and returns it
    centre-cropped and resized to `size` (see `center_crop_resize`). `camera` is LeRobot's object."""

    def __init__(self, camera: Any, size: int):
        self.camera, self.size = camera, int(size)

    def __call__(self) -> np.ndarray:
        # async_read returns the newest frame from LeRobot's capture thread without waiting a whole
        # frame period (read() blocks until the next one, ~33 ms at 30 fps: most of a 20 Hz step).
        read = getattr(self.camera, "async_read", None) or self.camera.read
        return center_crop_resize(read(), self.size)

    def disconnect(self) -> None:
        self.camera.disconnect()


def opencv_camera(index_or_path: int | str, size: int = 64, fps: int | None = 30, width: int | None = None,
                  height: int | None = None) -> CroppedCamera:
    """A USB camera (an OpenCV index such as 0, or a path such as /dev/video2) through LeRobot's
    `OpenCVCamera`, connected, as a callable giving `size` x `size` uint8 RGB frames.

    `width`/`height`: the capture resolution asked of the camera (None: its default). Every frame is
    centre-cropped to a square and resized to `size`, the image size the policy was trained at (the
    twin's `image_size`), explicitly: the policy itself never resizes. Find indices with
    `lerobot-find-cameras opencv`. Imports lerobot now, with a clear error when it is missing."""
    try:
        from lerobot.cameras.opencv import OpenCVCamera, OpenCVCameraConfig
    except ImportError as e:
        raise ImportError("opencv_camera needs LeRobot's cameras: `pip install lerobot` (best in its own environment: "
                          "it pins an older torch). For tests and dry runs use FakeCamera(size=64).") from e
    # color_mode is left at LeRobot's default, RGB (the order the twin renders and datasets store).
    camera = OpenCVCamera(OpenCVCameraConfig(index_or_path=index_or_path, fps=fps, width=width, height=height))
    camera.connect()
    return CroppedCamera(camera, size)


# Where LeRobot keeps its SO arms, newest layout first (the package was reorganised in 2025-2026).
_LEROBOT_MODULES = {False: ("lerobot.robots.so_follower", "lerobot.robots.{variant}_follower"),
                    True: ("lerobot.teleoperators.so_leader", "lerobot.teleoperators.{variant}_leader")}


def make_lerobot_device(variant: str, leader: bool, port: str, robot_id: str | None = None) -> Any:
    """LeRobot's own SO-100/101 follower (or leader), connected: LeRobot runs its calibration (stored
    under its `id`) and motor configuration; labkit then talks to the device's motor bus `.bus`.
    Imports lerobot now, with a clear error when it is missing."""
    import importlib

    kind = "Leader" if leader else "Follower"
    cls_name = f"{variant.upper()}{kind}"
    for template in _LEROBOT_MODULES[leader]:
        try:
            module = importlib.import_module(template.format(variant=variant))
            cls, cfg_cls = getattr(module, cls_name), getattr(module, f"{cls_name}Config")
            break
        except (ImportError, AttributeError):
            continue
    else:
        raise ImportError(f"the real-arm backend needs LeRobot with Feetech support (no {cls_name} found): "
                          "`pip install 'lerobot[feetech]'`, best in its own environment (it pins an older torch). "
                          "For tests pass bus=FakeMotorBus().")
    device = cls(cfg_cls(port=port, id=robot_id or f"labkit_{variant}_{kind.lower()}"))
    device.connect()  # calibrates on first use (interactive), then configures the motors
    return device


class SO101Arm:
    """An SO-100/SO-101 arm (follower, or a leader read for teleop) behind the robot contract.

    `bus`: a motor bus (FakeMotorBus in tests); None connects LeRobot's own SO arm on `port` at
    `connect()` (its calibration is stored under `robot_id`) and uses that device's bus.
    Commands and observations are radians for the joints and the gripper opening in metres (0 to
    `gripper_max`), as in the simulated arm; `units="native"` keeps LeRobot's degrees and 0-100.
    `cameras`: name -> callable returning an HxWx3 uint8 frame (`opencv_camera`, `FakeCamera`), named as
    the twin's: the camera named "top" (else the first one not named "wrist") is observed as `pixels`,
    the others under their own names (`wrist`). The names select what the policy reads, so a camera
    plugged in under the wrong name is caught by `check_policy_matches_robot`, not silently swapped.
    Frames are passed on as the camera gives them (never cast or resized here), so a wrong one is named
    by the check instead of becoming garbage.
    `leader=True` never enables torque and refuses commands.
    """

    def __init__(self, bus: Any = None, *, port: str | None = None, robot_id: str | None = None,
                 variant: str = "so101", fps: float = 30.0, limits_deg: dict[str, tuple[float, float]] | None = None,
                 units: str = "radians", cameras: dict[str, Any] | None = None, leader: bool = False,
                 estop_disables_torque: bool = False, gripper_max: float = GRIP_MAX):
        if variant not in ("so100", "so101"):
            raise ValueError(f"variant must be 'so100' or 'so101', got {variant!r}")
        if units not in ("radians", "native"):
            raise ValueError(f"units must be 'radians' or 'native', got {units!r}")
        if bus is None and port is None:
            raise ValueError("pass bus=... (a motor bus) or port='/dev/ttyACM0' (a real arm through LeRobot)")
        self.bus, self.port, self.robot_id, self.device = bus, port, robot_id, None
        self.variant, self.units, self.cameras, self.leader = variant, units, dict(cameras or {}), leader
        bad = [n for n in self.cameras if n in RESERVED or not callable(self.cameras[n])]
        if bad:
            raise ValueError(f"camera {bad[0]!r}: cameras are name -> callable returning a frame, and a camera may not "
                             f"be named {', '.join(RESERVED)} (observation keys); name the overhead camera "
                             f"{MAIN_CAMERA!r} and the gripper camera 'wrist', as in the twin")
        main = MAIN_CAMERA if MAIN_CAMERA in self.cameras else next(
            (n for n in self.cameras if n not in SIDE_CAMERAS), None)
        self.camera_keys = {n: "pixels" if n == main else n for n in self.cameras}  # camera name -> observation key
        self.estop_disables_torque, self.gripper_max = estop_disables_torque, float(gripper_max)
        self.names = list(getattr(bus, "motors", None) or SO101_MOTORS)
        lim = {**SO101_LIMITS_DEG, **(limits_deg or {})}
        low = self._to_robot(np.array([lim[n][0] for n in self.names], np.float64))
        high = self._to_robot(np.array([lim[n][1] for n in self.names], np.float64))
        self.spec = RobotSpec(tuple(self.names), low, high, fps, "position", name=f"{variant}_{'leader' if leader else 'follower'}")
        self.connected = False

    # ---- unit conversion ---------------------------------------------------------------------------
    def _to_robot(self, native: np.ndarray) -> np.ndarray:
        return native if self.units == "native" else self._to_twin(native)

    def _to_twin(self, native: np.ndarray) -> np.ndarray:
        """LeRobot's degrees and 0-100 -> the twin's radians and gripper metres (whatever `units` says)."""
        out = np.deg2rad(native)
        for i, n in enumerate(self.names):
            if n == "gripper":
                out[i] = native[i] / 100.0 * self.gripper_max
        return out

    def _to_native(self, robot: np.ndarray) -> np.ndarray:
        if self.units == "native":
            return robot
        out = np.rad2deg(robot)
        for i, n in enumerate(self.names):
            if n == "gripper":
                out[i] = robot[i] / self.gripper_max * 100.0
        return out

    # ---- the robot contract --------------------------------------------------------------------------
    def connect(self) -> None:
        if self.connected:
            return
        if self.bus is None:
            self.device = make_lerobot_device(self.variant, self.leader, self.port, self.robot_id)
            self.bus = self.device.bus
        else:
            self.bus.connect()
        if hasattr(self.bus, "disable_torque" if self.leader else "enable_torque"):
            self.bus.disable_torque() if self.leader else self.bus.enable_torque()
        self.connected = True

    def _read_native(self) -> np.ndarray:
        if not self.connected:
            raise NotConnectedError(f"{self.spec.name}: call connect() first")
        values = self.bus.sync_read("Present_Position")
        return np.array([values[n] for n in self.names], np.float64)

    def read_joints(self) -> np.ndarray:
        """Present joint positions in robot units."""
        return self._to_robot(self._read_native())

    def observe(self) -> dict[str, np.ndarray]:
        """`joints` (twin units: radians, gripper metres, even with units="native": a feature keeps one
        meaning), `state`/`proprio` (robot units, for older code) and the cameras (see the class doc)."""
        native = self._read_native()
        q = self._to_robot(native).astype(np.float32)
        obs = {"joints": self._to_twin(native).astype(np.float32), "state": q, "proprio": q.copy()}
        for name, grab in self.cameras.items():
            obs[self.camera_keys[name]] = np.asarray(grab())
        return obs

    def act(self, action: Any) -> np.ndarray:
        """Write goal positions. Wrong shape or NaN: ValueError (the SafetyLayer in front filters values)."""
        if not self.connected:
            raise NotConnectedError(f"{self.spec.name}: call connect() first")
        if self.leader:
            raise RuntimeError("a leader arm is read, never commanded")
        cmd = self.spec.check_shape(action)
        if not np.all(np.isfinite(cmd)):
            raise ValueError(f"{self.spec.name}: command has NaN/inf: {cmd}")
        native = self._to_native(cmd)
        self.bus.sync_write("Goal_Position", {n: float(v) for n, v in zip(self.names, native, strict=True)})
        return cmd

    def hold_action(self) -> np.ndarray:
        return self.read_joints()

    def on_estop(self) -> None:
        """Called by the SafetyLayer's e-stop after it commanded a hold; optionally cuts torque
        (off by default: an SO-101 with torque off falls under gravity)."""
        if self.estop_disables_torque and hasattr(self.bus, "disable_torque"):
            self.bus.disable_torque()

    def disconnect(self) -> None:
        if self.connected:
            if self.device is not None:
                self.device.disconnect()  # LeRobot's own shutdown (torque off on a follower)
                self.device, self.bus = None, None
            else:
                self.bus.disconnect(disable_torque=not self.leader)
            self.connected = False

    def __enter__(self) -> SO101Arm:
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.disconnect()


