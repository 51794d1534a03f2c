"""The one map between env observation keys and dataset feature names (LeRobot's naming).

    state   <-> observation.state          proprio <-> observation.proprio
    pixels  <-> observation.images.top     wrist (an HxWx3 uint8 image) <-> observation.images.wrist
    pixels  <-  observation.image          (LeRobot's single-camera name, as in lerobot/pusht: read only)
"""

from __future__ import annotations

from typing import Any

import numpy as np

MAIN_CAMERA = "top"  # the camera an env's `pixels` observation is stored as
SINGLE_CAMERA = "observation.image"  # LeRobot's name for a dataset's only camera (lerobot/pusht, lerobot/xarm_*)


def is_image(value: Any) -> bool:
    """Whether an observation value is an HxWx3 uint8 image (stored as a camera stream)."""
    arr = np.asarray(value) if value is not None else None
    return arr is not None and arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[-1] == 3


def is_image_feature(feature: str) -> bool:
    """Whether a dataset feature name is a camera stream (`observation.images.<camera>`, or LeRobot's
    single `observation.image`)."""
    return feature.startswith("observation.images.") or feature == SINGLE_CAMERA


def feature_key(obs_key: str, value: Any = None, camera: str = MAIN_CAMERA) -> str:
    """The dataset feature an env observation is stored under: `pixels` -> `observation.images.top`,
    another HxWx3 uint8 image `wrist` -> `observation.images.wrist`, `state` -> `observation.state`.
    A name that already is a feature is returned unchanged."""
    if obs_key.startswith("observation."):
        return obs_key
    if obs_key == "pixels":
        return f"observation.images.{camera}"
    return f"observation.images.{obs_key}" if is_image(value) else f"observation.{obs_key}"


def env_key(feature: str, camera: str = MAIN_CAMERA) -> str:
    """The env observation a dataset feature comes from (the inverse of `feature_key`); a name that is
    not a feature (already an env key, or a label such as `advantage.indicator`) is returned unchanged."""
    if feature in (f"observation.images.{camera}", SINGLE_CAMERA):  # a lone camera is the env's `pixels`
        return "pixels"
    for prefix in ("observation.images.", "observation."):
        if feature.startswith(prefix):
            return feature[len(prefix):]
    return feature
