"""The notebook widgets work without a browser: frames become PNGs, the viewer follows its slider,
and the teleop panel steps the env with the sliders' action and records the episode."""

from __future__ import annotations

import numpy as np
import pytest

import labkit  # noqa: F401  (headless GL before mujoco)
from labkit.widgets import TaskViewer, TeleopPanel, png


def test_viewer_follows_its_slider():
    viewer = TaskViewer.from_rollout("labkit/Detour-v0", seed=0, max_steps=5)
    assert viewer.slider.max == 5 and viewer.image.value[:4] == b"\x89PNG"
    first = viewer.image.value
    viewer.slider.value = 5
    assert viewer.image.value != first and viewer.caption.value.startswith("t = 5")
    with pytest.raises(ValueError, match="at least one frame"):
        TaskViewer([])


def test_teleop_steps_with_the_sliders_and_records():
    panel = TeleopPanel("labkit/Detour-v0", seed=3)
    x0 = panel.obs["state"][0]
    panel.sliders[0].value = panel.sliders[0].max  # full speed to +x
    for _ in range(3):
        panel.step()
    assert len(panel.episode) == 3 and np.allclose(panel.episode[0]["action"], [0.5, 0.0])
    assert panel.obs["state"][0] > x0 + 0.05, "the robot should have moved right"
    with pytest.raises(ValueError, match="outside the action space"):
        panel.step([5.0, 0.0])
    panel.reset()
    assert panel.episode == [] and panel.obs["state"][0] == pytest.approx(x0)


def test_png_rejects_a_wrong_frame():
    with pytest.raises(ValueError, match="RGB uint8"):
        png(np.zeros((4, 4), np.float32))
