"""Image preparation and augmentation, on a whole batch at once (never per image in Python).

Images travel as uint8 [..., H, W, 3] (what cameras and the datasets' frame cache hold: 4x smaller
than float) and become float [N, 3, H, W] in [0, 1] (channels-last in memory) only inside an encoder.
Images are square (every labkit camera is).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [0, 1], channels-last. Anything else: a ValueError."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images [N, H, W, 3] (channels last), got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images (0-255), got {images.dtype}")
    return images.permute(0, 3, 1, 2).float().div_(255.0).contiguous(memory_format=torch.channels_last)


def random_shift(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """DrQ's augmentation: pad each image by replicating its border, then crop back at a random
    offset of up to `pad` pixels (one offset per image). Teaches the encoder that a few pixels of
    camera shift do not change the scene. x: float [N, C, H, W] -> the same shape."""
    n, _, h, w = x.shape
    x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    # One sampling grid per image, shifted by a whole number of pixels: grid_sample then copies pixels.
    eps = 1.0 / (h + 2 * pad)
    base = torch.linspace(-1 + eps, 1 - eps, h + 2 * pad, device=x.device)[:h]
    grid = torch.stack(torch.meshgrid(base, base, indexing="xy"), -1)[None].expand(n, h, w, 2)
    shift = torch.randint(0, 2 * pad + 1, (n, 1, 1, 2), device=x.device) * (2.0 / (h + 2 * pad))
    return F.grid_sample(x, grid + shift, padding_mode="zeros", align_corners=False)


def color_jitter(x: torch.Tensor, brightness: float = 0.2, contrast: float = 0.2, hue: float = 0.05) -> torch.Tensor:
    """Random brightness, contrast and per-channel gain per image (a different camera, other light).
    x: float [N, 3, H, W] in [0, 1] -> the same shape, clipped to [0, 1]."""
    n = x.shape[0]
    u = lambda k, *shape: (torch.rand(n, *shape, device=x.device) * 2 - 1) * k  # noqa: E731
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (1 + u(contrast, 1, 1, 1)) + mean
    x = x * (1 + u(brightness, 1, 1, 1)) * (1 + u(hue, 3, 1, 1))
    return x.clamp(0.0, 1.0)


def augment(x: torch.Tensor, shift: bool = True, color: bool = False, shift_fn=None) -> torch.Tensor:
    """The training augmentation of labkit's encoders: random shift (pad = 1/16 of the side, 4 px at
    64 px, as DrQ's 4 px at 84), then colour jitter when `color`. `shift_fn(x, pad)` replaces
    `random_shift` (lesson 11 trains with the student's)."""
    if shift:
        x = (shift_fn or random_shift)(x, max(1, x.shape[-1] // 16))
    if color:
        x = color_jitter(x)
    return x
