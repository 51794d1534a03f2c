"""Does this robot observe what this policy reads? One observation, every mismatch named, before any motion.

A policy trained in the twin reads env keys (`joints`, `pixels`, `wrist`, or `state`); a robot returns
its own. They must agree on every key the policy reads (present, same shape, float for vectors, HxWx3
uint8 for cameras), and, for a policy that reads cameras, every camera the robot has must be one the
policy knows: an unknown name is most likely a camera plugged in under the wrong name. A policy that
reads no camera ignores cameras (a rig may film a joints-only policy for the record).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from labkit.data.keys import MAIN_CAMERA, env_key, is_image_feature

PRIVILEGED_HINT = ("the policy reads `state`, the simulator's full state (it holds the cube's and the zone's poses, "
                   "which a real robot cannot observe); train it on what the robot observes: observation.joints "
                   "and the cameras (observation.images.top, observation.images.wrist)")


def policy_inputs(policy: Any) -> dict[str, tuple[tuple[int, ...], str]] | None:
    """{env key: (shape of one observation, "float32" or "uint8")} that `policy` reads, or None when it
    does not say: a labkit policy (config.obs_keys + shapes), a PolicyRunner or a connected PolicyClient
    (their `spec`: the server's hello answer)."""
    cfg, shapes = getattr(policy, "config", None), getattr(policy, "shapes", None)
    if hasattr(cfg, "obs_keys") and isinstance(shapes, dict):
        return {env_key(k): (tuple(int(s) for s in shapes[k]), "uint8" if is_image_feature(k) else "float32")
                for k in cfg.obs_keys}
    spec = getattr(policy, "spec", None)
    spec = spec() if callable(spec) else spec
    if isinstance(spec, dict) and "obs_keys" in spec:
        return {k: (tuple(int(s) for s in spec["shapes"][k]), str(spec["dtypes"][k])) for k in spec["obs_keys"]}
    return None


def _camera(key: str) -> str:
    return f"'pixels' (the {MAIN_CAMERA!r} camera)" if key == "pixels" else repr(key)


def _size(shape) -> str:
    return "x".join(map(str, shape))


def mismatches(needs: dict[str, tuple[tuple[int, ...], str]], obs: dict[str, Any]) -> list[str]:
    """Every way the observation `obs` differs from what a policy `needs` (see `policy_inputs`)."""
    out = []
    robot_cams = [k for k, v in obs.items() if k == "pixels" or np.ndim(v) >= 2]  # vectors are 1-D; frames are not
    for key, (shape, dtype) in needs.items():
        image = dtype == "uint8"
        if key not in obs:
            if image:
                out.append(f"camera {_camera(key)}: the policy reads it, the robot has no such camera "
                           f"(it has {', '.join(map(_camera, robot_cams)) or 'none'})")
            else:
                out.append(f"{key!r}: the policy reads {_size(shape)} values, the robot does not observe {key!r} "
                           f"(it observes {', '.join(sorted(obs))})" + (f"; {PRIVILEGED_HINT}" if key == "state" else ""))
            continue
        arr = np.asarray(obs[key])
        if image:
            if arr.dtype != np.uint8 or arr.shape != shape:
                chw = arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[1:] == shape[:2]
                fix = ("transpose it to HxWx3" if chw else "convert it to uint8 0-255" if arr.dtype.kind == "f" else
                       f"crop/resize the camera explicitly (opencv_camera(size={shape[0]}))" if arr.shape != shape
                       else "give uint8 0-255 frames")
                out.append(f"camera {_camera(key)}: gives {_size(arr.shape)} {arr.dtype} frames"
                           f"{' (channels first)' if chw else ''}, the policy was trained on {_size(shape)} uint8 "
                           f"(HxWx3 RGB): {fix}")
        elif arr.shape != shape:
            out.append(f"{key!r}: the robot gives {_size(arr.shape) or 'a scalar'} values, the policy reads "
                       f"{_size(shape)}" + (f"; {PRIVILEGED_HINT}" if key == "state" else ""))
        elif arr.dtype.kind != "f":
            out.append(f"{key!r}: the robot gives {arr.dtype} values, the policy reads floats")
    policy_cams = [k for k, (_, dtype) in needs.items() if dtype == "uint8"]
    if policy_cams:
        for key in robot_cams:
            if key not in needs:
                out.append(f"camera {_camera(key)}: the robot has it, the policy was not trained on it (it knows "
                           f"{', '.join(map(_camera, policy_cams))}); a camera plugged in under the wrong name?")
    return out


def check_policy_matches_robot(policy: Any, robot: Any, obs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read `robot.observe()` once (or use `obs`) and raise a ValueError listing every mismatch with what
    `policy` reads (missing keys, shapes, dtypes, unknown cameras). Returns the observation when they
    match. A policy that does not say what it reads (a plain callable): TypeError."""
    needs = policy_inputs(policy)
    if needs is None:
        raise TypeError(f"cannot tell what a {type(policy).__name__} reads: pass a labkit policy, a PolicyRunner "
                        "or a connected PolicyClient")
    obs = robot.observe() if obs is None else obs
    problems = mismatches(needs, obs)
    if problems:
        name = getattr(getattr(robot, "spec", None), "name", type(robot).__name__)
        raise ValueError(f"the policy does not match robot {name} ({len(problems)} mismatch"
                         f"{'es' if len(problems) > 1 else ''}; nothing was sent to the robot):\n  - "
                         + "\n  - ".join(problems))
    return obs
