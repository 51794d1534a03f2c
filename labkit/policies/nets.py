"""Networks shared by every labkit policy: an MLP, a small conv image encoder and the observation
encoder that turns a normalised observation history into one feature vector.

GroupNorm, never BatchNorm: batch statistics break with EMA weights and with batch-size-1 inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(inp: int, out: int, hidden: int = 256, layers: int = 3, act: type[nn.Module] = nn.Mish,
        layer_norm: bool = False) -> nn.Sequential:
    """`layers` hidden layers of width `hidden`, then a linear head."""
    mods: list[nn.Module] = []
    d = inp
    for _ in range(layers):
        mods += [nn.Linear(d, hidden)] + ([nn.LayerNorm(hidden)] if layer_norm else []) + [act()]
        d = hidden
    mods.append(nn.Linear(d, out))
    return nn.Sequential(*mods)


def random_shift(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """DrQ-style augmentation: pad by replication and crop back at a random offset per image."""
    n, _, h, w = x.shape
    x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    eps = 1.0 / (h + 2 * pad)
    base = torch.linspace(-1 + eps, 1 - eps, h + 2 * pad, device=x.device)[:h]
    grid = torch.stack(torch.meshgrid(base, base, indexing="xy"), -1)[None].expand(n, h, w, 2)
    shift = torch.randint(0, 2 * pad + 1, (n, 1, 1, 2), device=x.device) * (2.0 / (h + 2 * pad))
    return F.grid_sample(x, grid + shift, padding_mode="zeros", align_corners=False)


class ConvEncoder(nn.Module):
    """A small conv net for 64-96 px images: uint8 HxWx3 in, a feature vector out."""

    def __init__(self, out_dim: int = 64, channels: int = 32, augment: bool = True):
        super().__init__()
        c = channels
        self.augment = augment
        self.net = nn.Sequential(
            nn.Conv2d(3, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.Mish(),
            nn.Conv2d(c, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.Mish(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * c), nn.Mish(),
            nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * c), nn.Mish(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, out_dim),
        )

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if img.ndim != 4 or img.shape[-1] != 3:
            raise ValueError(f"expected images [B, H, W, 3], got {tuple(img.shape)}")
        x = img.permute(0, 3, 1, 2).float() / 255.0
        if self.augment and self.training:
            x = random_shift(x)
        return self.net(x)


IMAGE_PREFIX = "observation.images."


class ObsEncoder(nn.Module):
    """Normalised observation history {key: [B, T, ...]} -> features [B, out_dim].

    Vector keys are flattened over time; each image key goes through a shared ConvEncoder per frame.
    """

    def __init__(self, shapes: dict[str, list[int]], obs_horizon: int, image_dim: int = 64):
        super().__init__()
        self.keys = sorted(shapes)
        self.image_keys = [k for k in self.keys if k.startswith(IMAGE_PREFIX)]
        self.vector_keys = [k for k in self.keys if k not in self.image_keys]
        self.obs_horizon = obs_horizon
        self.image = ConvEncoder(image_dim) if self.image_keys else None
        self.out_dim = obs_horizon * (
            sum(shapes[k][0] for k in self.vector_keys) + image_dim * len(self.image_keys)
        )

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        feats = []
        for k in self.vector_keys:
            feats.append(obs[k].flatten(1))
        for k in self.image_keys:
            x = obs[k]
            feats.append(self.image(x.flatten(0, 1)).view(x.shape[0], -1))
        return torch.cat(feats, dim=-1)
