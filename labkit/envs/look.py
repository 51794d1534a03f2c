"""How a task looks to its cameras: lighting, colours, camera pose and sensor noise.

Physics options change what happens; these change only the pixels. Each is sampled at every reset
from its own random stream (seeded from the reset seed), so a task with a shifted look runs exactly
the same episode as the nominal one, and its state observations are unchanged:

    lighting      multiplier on every light's ambient and diffuse colour: a number or a (low, high) range
    tint          RGB multipliers on every surface colour: (r, g, b) fixed (a camera's white balance),
                  or a (low, high) range sampled per channel
    color_jitter  each surface's RGB moves by U(-j, j) (0-1 units): repainted objects and table
    camera_shift  each camera moves by U(-s, s) metres along each axis (a camera not mounted exactly)
    camera_tilt   and turns by up to this angle (radians) about a random axis
    image_noise   std of Gaussian noise added to every pixel observation (0-255 units)

`RANDOM_LOOK` is the domain randomisation the shipped pretrained encoders were trained under
(`labkit.vision.pretrain`); `REAL_LOOK` is the "real" camera of the pixel sim-to-real lesson: fixed
shifts of colour and light, a camera bumped by up to a centimetre, and sensor noise.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import mujoco
import numpy as np

from labkit.envs.checks import check_number, check_scale

RANDOM_LOOK = {"lighting": (0.6, 1.2), "tint": (0.85, 1.15), "color_jitter": 0.12, "camera_shift": 0.01,
               "camera_tilt": 0.04, "image_noise": 3.0}
REAL_LOOK = {"lighting": 0.7, "tint": (1.15, 0.95, 0.8), "camera_shift": 0.01, "camera_tilt": 0.03,
             "image_noise": 4.0}


@dataclass
class Look:
    lighting: float | tuple[float, float] = 1.0
    tint: tuple[float, ...] | float = 1.0
    color_jitter: float = 0.0
    camera_shift: float = 0.0
    camera_tilt: float = 0.0
    image_noise: float = 0.0

    def __post_init__(self):
        check_scale("lighting", self.lighting, 0.0, 5.0)
        tint = tuple(self.tint) if isinstance(self.tint, tuple | list) else (self.tint,)
        if len(tint) == 3:
            for i, v in enumerate(tint):
                check_number(f"tint[{i}]", v, 0.0, 5.0)
        else:
            check_scale("tint (a number, a (low, high) range or (r, g, b))", self.tint, 0.0, 5.0)
        check_number("color_jitter", self.color_jitter, 0.0, 1.0)
        check_number("camera_shift", self.camera_shift, 0.0, 0.2)
        check_number("camera_tilt", self.camera_tilt, 0.0, 0.5)
        check_number("image_noise", self.image_noise, 0.0, 100.0)

    @property
    def nominal(self) -> bool:
        return all(getattr(self, f.name) == f.default for f in fields(self))

    def remember(self, model: mujoco.MjModel) -> dict:
        """The nominal values this look changes (taken once, when the task is built)."""
        return {"rgba": model.geom_rgba.copy(), "cam_pos": model.cam_pos.copy(), "cam_quat": model.cam_quat.copy(),
                "light": (model.light_ambient.copy(), model.light_diffuse.copy()),
                "head": (model.vis.headlight.ambient.copy(), model.vis.headlight.diffuse.copy())}

    def apply(self, model: mujoco.MjModel, nominal: dict, rng: np.random.Generator) -> None:
        """Set this episode's lighting, colours and camera poses from the nominal ones."""
        light = _sample(self.lighting, rng)
        model.light_ambient[:] = nominal["light"][0] * light
        model.light_diffuse[:] = nominal["light"][1] * light
        model.vis.headlight.ambient[:] = nominal["head"][0] * light
        model.vis.headlight.diffuse[:] = nominal["head"][1] * light
        tint = self.tint if isinstance(self.tint, tuple | list) and len(self.tint) == 3 else \
            [_sample(self.tint, rng) for _ in range(3)]
        rgb = nominal["rgba"][:, :3] * np.asarray(tint)
        if self.color_jitter:
            rgb = rgb + rng.uniform(-self.color_jitter, self.color_jitter, rgb.shape)
        model.geom_rgba[:, :3] = np.clip(rgb, 0.0, 1.0)
        n = model.ncam
        model.cam_pos[:] = nominal["cam_pos"] + rng.uniform(-self.camera_shift, self.camera_shift, (n, 3))
        for i in range(n):
            axis = rng.normal(size=3)
            turn = np.zeros(4)
            mujoco.mju_axisAngle2Quat(turn, axis / np.linalg.norm(axis), rng.uniform(-1, 1) * self.camera_tilt)
            mujoco.mju_mulQuat(model.cam_quat[i], turn, nominal["cam_quat"][i])

    def noisy(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if not self.image_noise:
            return image
        return np.clip(image + rng.normal(0, self.image_noise, image.shape), 0, 255).astype(np.uint8)


def _sample(value, rng: np.random.Generator) -> float:
    if isinstance(value, tuple | list):
        return float(rng.uniform(*value))
    return float(value)
