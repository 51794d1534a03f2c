"""labkit: a notebook-first workbench for modern robot learning.

Importing labkit registers its gymnasium tasks (``labkit/Detour-v0``, ``labkit/PushT-v0``) and picks a
headless MuJoCo GL backend when none is set, so rendering works on a machine with no display.
"""

import os

# MuJoCo chooses its GL backend at import time; with no display the default (GLFW) fails.
# EGL with Mesa renders on a CPU-only machine; respect an explicit choice (osmesa, glfw).
if "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
    os.environ["MUJOCO_GL"] = "egl"
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"] if "MUJOCO_GL" in os.environ else "egl")

from labkit import envs  # noqa: E402,F401  (registers the tasks)

__version__ = "0.1.0"


def load_policy(path, map_location="cpu"):
    """Rebuild a policy (weights, normaliser, config) from its checkpoint alone; see labkit.policies."""
    from labkit.policies import load_policy as _load

    return _load(path, map_location=map_location)


__all__ = ["envs", "load_policy", "__version__"]
