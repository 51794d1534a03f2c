"""ipywidgets for the notebooks: a task viewer (play an episode back frame by frame) and a teleop
panel (drive a task by hand with sliders). Both work in JupyterLab and VS Code; in a papermill run
they render as plain text and cost nothing.

    TaskViewer.from_rollout("labkit/Detour-v0", policy="expert")   # scrub through an expert episode
    panel = TeleopPanel("labkit/Detour-v0"); panel                   # drive it yourself
    panel.episode                                                    # what you did, step by step
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import gymnasium as gym
import ipywidgets as widgets
import numpy as np


def png(frame: np.ndarray) -> bytes:
    """An RGB uint8 frame [H, W, 3] as PNG bytes (what ipywidgets.Image shows)."""
    from PIL import Image

    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 frame [H, W, 3], got {frame.dtype} {frame.shape}")
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


class TaskViewer(widgets.VBox):
    """Play back frames: a Play button and a frame slider above the image, and an optional caption per frame."""

    def __init__(self, frames: Sequence[np.ndarray], fps: int = 10, captions: Sequence[str] | None = None):
        if len(frames) == 0:
            raise ValueError("TaskViewer needs at least one frame")
        if captions is not None and len(captions) != len(frames):
            raise ValueError(f"{len(captions)} captions for {len(frames)} frames")
        self._png = [png(f) for f in frames]
        self._captions = list(captions) if captions is not None else None
        self.image = widgets.Image(value=self._png[0], format="png")
        self.slider = widgets.IntSlider(0, 0, len(frames) - 1, description="frame")
        self.play = widgets.Play(value=0, min=0, max=len(frames) - 1, interval=int(1000 / fps))
        widgets.jslink((self.play, "value"), (self.slider, "value"))
        self.caption = widgets.Label(self._captions[0] if self._captions else "")
        self.slider.observe(self._show, names="value")
        super().__init__([widgets.HBox([self.play, self.slider]), self.image, self.caption])
        self.add_class("labkit-task-viewer")

    def _show(self, change) -> None:
        self.image.value = self._png[change["new"]]
        if self._captions:
            self.caption.value = self._captions[change["new"]]

    @classmethod
    def from_rollout(cls, env_id: str, policy="expert", seed: int = 0, max_steps: int | None = None,
                     **env_kwargs) -> TaskViewer:
        """Roll out `policy` ("expert" or any labkit policy) for one seeded episode and view it."""
        import labkit.envs

        env = gym.make(env_id, render_mode="rgb_array", **env_kwargs)
        obs, _ = env.reset(seed=seed)
        act = labkit.envs.expert(env) if policy == "expert" else policy
        act.reset(**({"seed": seed} if policy == "expert" else {}))
        frames, captions, done, t = [env.render()], ["t = 0"], False, 0
        while not done and (max_steps is None or t < max_steps):
            a = act(obs) if policy == "expert" else act.select_action(obs)
            obs, reward, term, trunc, info = env.step(a)
            t += 1
            done = term or trunc
            frames.append(env.render())
            captions.append(f"t = {t}  reward = {reward:.2f}  success = {info['is_success']}")
        env.close()
        return cls(frames, fps=env.metadata.get("render_fps", 10), captions=captions)


class TeleopPanel(widgets.VBox):
    """Drive a task by hand: one slider per action dimension (in the action space's units and bounds),
    Step and Reset buttons, the camera view, and the last reward. Every step is kept in `episode`."""

    def __init__(self, env_id: str, seed: int = 0, **env_kwargs):
        self.env = gym.make(env_id, render_mode="rgb_array", **env_kwargs)
        space = self.env.action_space
        if not isinstance(space, gym.spaces.Box):
            raise ValueError(f"TeleopPanel needs a Box action space, {env_id} has {space}")
        self.seed = seed
        self.sliders = [widgets.FloatSlider(0.0 if lo <= 0 <= hi else float(lo), min=float(lo), max=float(hi),
                                            step=float(hi - lo) / 100, description=f"a[{i}]", readout_format=".3f")
                        for i, (lo, hi) in enumerate(zip(space.low, space.high, strict=True))]
        self.step_button = widgets.Button(description="Step", button_style="primary")
        self.reset_button = widgets.Button(description="Reset")
        self.status = widgets.Label()
        self.image = widgets.Image(format="png")
        self.step_button.on_click(lambda _: self.step())
        self.reset_button.on_click(lambda _: self.reset())
        controls = widgets.VBox([*self.sliders, widgets.HBox([self.step_button, self.reset_button]), self.status])
        super().__init__([widgets.HBox([self.image, controls])])
        self.add_class("labkit-teleop")
        self.reset()

    @property
    def action(self) -> np.ndarray:
        return np.array([s.value for s in self.sliders], dtype=self.env.action_space.dtype)

    def reset(self) -> None:
        self.obs, _ = self.env.reset(seed=self.seed)
        self.episode: list[dict] = []
        self.done = False
        self.image.value = png(self.env.render())
        self.status.value = f"seed {self.seed}: set the sliders, then Step"

    def step(self, action=None) -> None:
        """One env step with `action` (default: the sliders'); ignored once the episode has ended."""
        if self.done:
            self.status.value = "episode over: press Reset"
            return
        a = self.action if action is None else np.asarray(action, dtype=self.env.action_space.dtype)
        if not self.env.action_space.contains(a):
            raise ValueError(f"action {a} is outside the action space {self.env.action_space}")
        obs, reward, term, trunc, info = self.env.step(a)
        self.episode.append({"obs": self.obs, "action": a, "reward": float(reward), "info": info})
        self.obs, self.done = obs, bool(term or trunc)
        self.image.value = png(self.env.render())
        end = "  (episode over)" if self.done else ""
        self.status.value = (f"step {len(self.episode)}  reward {reward:.2f}  "
                             f"success {info['is_success']}{end}")
