"""The shared MuJoCo task base: one place for the gymnasium contract every labkit task follows.

A task subclasses `MujocoTask`, gives its MJCF model and fills in `_reset_task`, `_state`, `_proprio`,
`_evaluate` and `_apply_action`. The base handles seeding, frame skipping, the `Dict` observation
(`state`, `proprio`, `pixels` when `obs_mode="pixels"`), sparse or dense rewards, physics options
for domain randomisation (friction, mass, damping, observation noise) and headless rendering.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium import spaces

# re-exported: tasks import the checks from here
from labkit.envs.checks import check_bool, check_choice, check_int, check_number, check_scale  # noqa: F401
from labkit.envs.look import Look

Scale = float | tuple[float, float]

# Allowed values of the physics options (multipliers on the nominal model) and of the observation noise:
# inside these every task stays finite and stable (probed at both ends, alone and combined); a task may
# narrow them (`MujocoTask.option_ranges`). Outside them MuJoCo goes unstable or returns NaN.
PHYSICS_RANGE = (0.05, 20.0)
OBS_NOISE_RANGE = (0.0, 1.0)
MIN_IMAGE_SIZE = 16


@dataclass
class Physics:
    """Multipliers on the nominal model, each a number or a (low, high) range sampled every reset."""

    friction: Scale = 1.0
    mass: Scale = 1.0
    damping: Scale = 1.0
    obs_noise: float = 0.0  # std of Gaussian noise added to `state` and `proprio`, in their units

    def sample(self, rng: np.random.Generator, name: str) -> float:
        value = getattr(self, name)
        if isinstance(value, tuple | list):
            lo, hi = value
            if not (0 < lo <= hi and math.isfinite(hi)):
                raise ValueError(f"{name} range must satisfy 0 < low <= high < inf, got {value}")
            return float(rng.uniform(lo, hi))
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive, finite multiplier, got {value}")
        return float(value)


class MujocoTask(gym.Env):
    """Base class of labkit tasks: a MuJoCo model behind the standard gymnasium contract."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}
    xml: str = ""
    frame_skip: int = 10
    camera: str = "top"
    state_dim: int = 0
    proprio_dim: int = 0
    # allowed values of the physics options; a task narrows them where its model needs it
    option_ranges: dict[str, tuple[float, float]] = {
        "friction": PHYSICS_RANGE, "mass": PHYSICS_RANGE, "damping": PHYSICS_RANGE, "obs_noise": OBS_NOISE_RANGE}

    def __init__(
        self,
        obs_mode: str = "state",
        reward_type: str = "sparse",
        render_mode: str | None = None,
        image_size: int = 96,
        friction: Scale = 1.0,
        mass: Scale = 1.0,
        damping: Scale = 1.0,
        obs_noise: float = 0.0,
        terminate_on_success: bool = True,
        look: dict | None = None,
    ):
        if type(obs_mode) is not str or obs_mode not in ("state", "pixels"):
            raise ValueError(f"obs_mode must be 'state' or 'pixels', got {obs_mode!r}")
        if type(reward_type) is not str or reward_type not in ("sparse", "dense"):
            raise ValueError(f"reward_type must be 'sparse' or 'dense', got {reward_type!r}")
        if render_mode is not None and (type(render_mode) is not str or render_mode != "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        # Validate every numeric option before any is used: NaN, inf, bools, strings and values outside
        # the ranges are errors that name the option (a NaN friction used to give NaN observations).
        for name, value in (("friction", friction), ("mass", mass), ("damping", damping)):
            check_scale(name, value, *self.option_ranges[name])
        check_number("obs_noise", obs_noise, *self.option_ranges["obs_noise"])
        check_bool("terminate_on_success", terminate_on_success)
        self.obs_mode, self.reward_type, self.render_mode = obs_mode, reward_type, render_mode
        # False: success no longer ends the episode (info["is_success"] still reports it), so an agent
        # trained on a learned reward cannot read the true success from early termination.
        self.terminate_on_success = bool(terminate_on_success)
        self.physics = Physics(friction, mass, damping, float(obs_noise))
        if look is not None and not isinstance(look, dict):
            raise TypeError(f"look must be a dict of Look options (labkit.envs.look), got {look!r}")
        try:
            self.look = Look(**(look or {}))
        except TypeError as e:  # an unknown option: name the ones there are
            raise ValueError(f"look: {e}; the options are lighting, tint, color_jitter, camera_shift, "
                             "camera_tilt, image_noise") from None
        self._look_rng = np.random.default_rng(0)

        self.model = mujoco.MjModel.from_xml_string(self.xml)
        self.data = mujoco.MjData(self.model)
        check_int("image_size", image_size, MIN_IMAGE_SIZE, self.max_image_size)
        self.image_size = int(image_size)
        self.render_size = 256  # side of `render()` frames (videos); `pixels` observations use image_size
        self._nominal = {
            "friction": self.model.geom_friction.copy(),
            "mass": self.model.body_mass.copy(),
            "inertia": self.model.body_inertia.copy(),
            "damping": self.model.dof_damping.copy(),
        }
        self._nominal_look = self.look.remember(self.model)
        self._renderers: dict[int, mujoco.Renderer] = {}

        obs_spaces = {
            "state": spaces.Box(-np.inf, np.inf, (self.state_dim,), np.float32),
            "proprio": spaces.Box(-np.inf, np.inf, (self.proprio_dim,), np.float32),
        }
        if obs_mode == "pixels":
            obs_spaces["pixels"] = spaces.Box(0, 255, (self.image_size, self.image_size, 3), np.uint8)
        self.observation_space = spaces.Dict(obs_spaces)
        self.action_space = self._action_space()
        self.metadata = {**self.metadata, "render_fps": round(1.0 / self.control_dt)}

    # ---- what a task provides -----------------------------------------------------------------
    def _action_space(self) -> spaces.Box:
        raise NotImplementedError

    def _reset_task(self, rng: np.random.Generator, options: dict | None) -> None:
        """Set qpos/qvel (and any task variables) for a new episode."""
        raise NotImplementedError

    def _apply_action(self, action: np.ndarray) -> None:
        raise NotImplementedError

    def _state(self) -> np.ndarray:
        raise NotImplementedError

    def _proprio(self) -> np.ndarray:
        raise NotImplementedError

    def _evaluate(self) -> tuple[bool, float, dict[str, Any]]:
        """Return (is_success, dense_reward, extra info) for the current physics state."""
        raise NotImplementedError

    def _failed(self) -> bool:
        """True when the episode ends in failure (e.g. a collision); most tasks never fail early."""
        return False

    # ---- the gymnasium contract ---------------------------------------------------------------
    @property
    def max_image_size(self) -> int:
        """The largest frame side the model's offscreen buffer can render."""
        g = self.model.vis.global_
        return int(min(g.offwidth, g.offheight))

    @property
    def render_size(self) -> int:
        """Side of `render()` frames (videos), an int in [16, max_image_size]; checked when set."""
        return self._render_size

    @render_size.setter
    def render_size(self, value: int) -> None:
        check_int("render_size", value, MIN_IMAGE_SIZE, self.max_image_size)
        self._render_size = int(value)

    @property
    def control_dt(self) -> float:
        return self.model.opt.timestep * self.frame_skip

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:  # the look has its own stream: a shifted look runs the very same episode
            self._look_rng = np.random.default_rng([int(seed), 7])
        if not self.look.nominal:
            self.look.apply(self.model, self._nominal_look, self._look_rng)
        self._randomise_physics()
        mujoco.mj_resetData(self.model, self.data)
        self._reset_task(self.np_random, options)
        mujoco.mj_forward(self.model, self.data)
        success, _, extra = self._evaluate()
        return self._obs(), {"is_success": bool(success), **extra}

    def step(self, action):
        # The hot path: every call below was chosen for low Python overhead (benchmarks/README.md),
        # and computes the same numbers as the plain version (np.clip == maximum then minimum).
        space = self.action_space
        action = np.asarray(action, dtype=np.float64)
        if action.shape != space.shape:
            raise ValueError(f"action must have shape {space.shape}, got {action.shape}")
        if not np.isfinite(action).all():
            raise ValueError(f"action contains NaN or inf: {action}")
        action = np.minimum(np.maximum(action, space.low), space.high)
        self._apply_action(action)
        mujoco.mj_step(self.model, self.data, nstep=self.frame_skip)
        success, dense, extra = self._evaluate()
        failed = self._failed()
        reward = float(dense) if self.reward_type == "dense" else float(success)
        info = {"is_success": bool(success), **extra}
        terminated = (success and self.terminate_on_success) or failed
        return self._obs(), reward, bool(terminated), False, info

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        return self._render(self.render_size)

    def close(self):
        for r in self._renderers.values():
            r.close()
        self._renderers.clear()

    # ---- helpers ------------------------------------------------------------------------------
    def _obs(self) -> dict[str, np.ndarray]:
        state, proprio = self._state(), self._proprio()
        if self.physics.obs_noise > 0:
            state = state + self.np_random.normal(0, self.physics.obs_noise, state.shape)
            proprio = proprio + self.np_random.normal(0, self.physics.obs_noise, proprio.shape)
        obs = {"state": state.astype(np.float32), "proprio": proprio.astype(np.float32)}
        if self.obs_mode == "pixels":
            obs["pixels"] = self._render(self.image_size)
        return obs

    def render_camera(self, camera: str, size: int) -> np.ndarray:
        """Camera `camera`'s image at `size` px now, as a pixel observation shows it (with the look's
        noise), whatever `obs_mode` is: for rendering only some frames of a state-mode rollout."""
        old, self.camera = self.camera, camera
        try:
            return self._render(size)
        finally:
            self.camera = old

    def _render(self, size: int) -> np.ndarray:
        if size not in self._renderers:
            try:
                self._renderers[size] = mujoco.Renderer(self.model, size, size)
            except mujoco.FatalError as e:
                raise RuntimeError(
                    f"MuJoCo could not create an OpenGL context ({e}). With no display, MuJoCo must be told to "
                    "render headless before it is imported: `import labkit` before `import mujoco`, or set "
                    "MUJOCO_GL=egl (or osmesa) in the environment."
                ) from e
        r = self._renderers[size]
        r.update_scene(self.data, camera=self.camera)
        return self.look.noisy(r.render().copy(), self._look_rng)

    def _randomise_physics(self) -> None:
        rng, nom, m = self.np_random, self._nominal, self.model
        m.geom_friction[:] = nom["friction"] * self.physics.sample(rng, "friction")
        k = self.physics.sample(rng, "mass")
        m.body_mass[:] = nom["mass"] * k
        m.body_inertia[:] = nom["inertia"] * k
        if k != getattr(self, "_const_mass", 1.0):
            # Derived constants (e.g. the inertia-based armature terms) follow the masses; stale ones
            # made contacts blow up on the arm task. Only when the scale changed: it costs a few ms.
            mujoco.mj_setConst(m, self.data)
            self._const_mass = k
        m.dof_damping[:] = nom["damping"] * self.physics.sample(rng, "damping")
