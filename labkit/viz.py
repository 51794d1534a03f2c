"""The plots and inline videos the notebooks use, written once.

Videos are H.264 MP4 through imageio-ffmpeg, whose wheel carries its own ffmpeg binary: no system
codec to install, which is the usual pain point of robot-learning installs.
"""

from __future__ import annotations

import base64
import tempfile
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np


def save_video(frames: np.ndarray | Sequence[np.ndarray], path: str | Path, fps: int = 10) -> Path:
    """Write uint8 frames [T, H, W, 3] to an H.264 MP4 that browsers play."""
    import imageio_ffmpeg

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(str(path), (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                         macro_block_size=1, output_params=["-crf", "23"], ffmpeg_log_level="error")
    writer.send(None)
    for f in frames:
        writer.send(np.ascontiguousarray(f))
    writer.close()
    return path


def show_video(frames: np.ndarray | Sequence[np.ndarray] | Sequence[Sequence[np.ndarray]], fps: int = 10,
               width: int = 320):
    """Inline video for Jupyter; a list of clips is tiled side by side (padded to equal length)."""
    from IPython.display import HTML

    clips = [np.asarray(frames)] if np.asarray(frames[0]).ndim == 3 else [np.asarray(c) for c in frames]
    t = max(len(c) for c in clips)
    clips = [np.concatenate([c, np.repeat(c[-1:], t - len(c), 0)]) for c in clips]
    tiled = np.concatenate(clips, axis=2)
    with tempfile.TemporaryDirectory() as d:
        data = save_video(tiled, Path(d) / "clip.mp4", fps).read_bytes()
    b64 = base64.b64encode(data).decode()
    return HTML(f'<video width="{width * len(clips)}" controls autoplay loop muted playsinline>'
                f'<source src="data:video/mp4;base64,{b64}" type="video/mp4"></video>')


def learning_curve(values, ax=None, label: str | None = None, smooth: int = 50, **kw):
    """Plot a per-step curve (e.g. training loss) with a moving average; returns the axes."""
    ax = ax or plt.gca()
    v = np.asarray(values, dtype=float)
    if smooth > 1 and len(v) > smooth:
        v = np.convolve(v, np.ones(smooth) / smooth, mode="valid")
    ax.plot(np.arange(len(v)) + (len(values) - len(v)), v, label=label, **kw)
    ax.set_xlabel("gradient step")
    return ax


def seed_curves(data, x: str, y: str, hue: str | None = None, ax=None):
    """Mean and 95% band over seeds of a long-format table (seaborn), e.g. success vs steps."""
    import seaborn as sns

    ax = ax or plt.gca()
    sns.lineplot(data=data, x=x, y=y, hue=hue, errorbar=("ci", 95), ax=ax)
    return ax


def success_bars(results: dict, ax=None, title: str | None = None):
    """Bar chart of success rates with their Wilson 95% intervals, from `labkit.eval.EvalResult`s."""
    ax = ax or plt.gca()
    names = list(results)
    rates = np.array([results[n].success_rate for n in names])
    lo = np.array([results[n].interval[0] for n in names])
    hi = np.array([results[n].interval[1] for n in names])
    # Clipped: at 0% or 100% the Wilson bound can round a hair past the rate, and matplotlib refuses
    # negative error bars.
    ax.bar(names, rates, yerr=[np.clip(rates - lo, 0, None), np.clip(hi - rates, 0, None)], capsize=4, color="tab:blue", alpha=0.8)
    for i, n in enumerate(names):
        ax.text(i, min(hi[i] + 0.03, 1.02), f"{rates[i]:.0%}\n(n={results[n].episodes})", ha="center", fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("success rate")
    if title:
        ax.set_title(title)
    return ax


def plot_paths(paths: Sequence[np.ndarray], ax=None, colors=None, arena: str | None = None, alpha: float = 0.6):
    """Plot xy paths [T, 2]; `arena="detour"` draws the Detour wall and goal underneath."""
    ax = ax or plt.gca()
    if arena == "detour":
        from labkit.envs.detour import GOAL_Y, WALL_HALF

        ax.add_patch(plt.Rectangle((-WALL_HALF[0], -WALL_HALF[1]), 2 * WALL_HALF[0], 2 * WALL_HALF[1], color="0.35"))
        ax.plot(0, GOAL_Y, "*", ms=14, color="tab:green")
        ax.set_xlim(-1, 1)
        ax.set_ylim(-1, 1)
    for i, p in enumerate(paths):
        p = np.asarray(p)
        ax.plot(p[:, 0], p[:, 1], color=None if colors is None else colors[i], alpha=alpha, lw=1)
    ax.set_aspect("equal")
    return ax
