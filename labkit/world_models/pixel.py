"""A small pixel world model for 64x64 frames: conv encoder -> spatial latent z (8 x 16 x 16),
action-conditioned latent dynamics z' = z + f(z, a) (convolutions), conv decoder back to pixels. The miniature of an action-conditioned video
model (VLAW's, Cosmos's), trainable in minutes on a CPU.

Loss over short windows x_0..x_k with actions a_0..a_{k-1} (open loop in latent space):
    z_0 = enc(x_0),  z_{t+1} = z_t + f(z_t, a_t)
    L = sum_t w * (dec(z_t) - x_t)^2   +   sum_t ||z_t - sg(enc(x_t))||^2
where w up-weights pixels that differ from the static background: the robot is a few pixels wide at
64x64, and a plain MSE is minimised by painting the background and leaving the robot out.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from labkit.training import minibatch_fit
from labkit.world_models.io import SavedWorldModel


def render_episodes(env_id: str, episodes: int, seed: int = 0, image_size: int = 64, noise: float = 0.15,
                    max_steps: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Frames [N, T+1, S, S, 3] uint8 and actions [N, T, A] of the task's scripted expert with extra
    action noise (so the data also holds off-path motion), cut to a common length T <= max_steps
    (an episode that ends earlier repeats its last frame with zero actions)."""
    import labkit.envs

    env = gym.make(env_id, obs_mode="pixels", image_size=image_size)
    expert = labkit.envs.expert(env)
    rng = np.random.default_rng(seed)
    frames = np.zeros((episodes, max_steps + 1, image_size, image_size, 3), np.uint8)
    actions = np.zeros((episodes, max_steps, env.action_space.shape[0]), np.float32)
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        expert.reset(seed=seed + i)
        frames[i, :] = obs["pixels"]
        for t in range(max_steps):
            a = np.clip(expert(obs) + rng.normal(0, noise, 2), env.action_space.low, env.action_space.high)
            obs, _, term, trunc, _ = env.step(a)
            frames[i, t + 1:] = obs["pixels"]
            actions[i, t] = a
            if term or trunc:
                break
    env.close()
    return frames, actions


def background_weight(frames: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Per-pixel loss weight of frames [..., 3, H, W] in [0, 1]: 1 + 50 * (largest channel difference from
    the background [3, H, W]), shape [..., 1, H, W]: the few pixels of the robot count 50x more."""
    return 1.0 + 50.0 * (frames - background).abs().amax(-3, keepdim=True)


def pixel_loss(pred: torch.Tensor, target: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """The reconstruction loss: mean over every element of background_weight(target) * (pred - target)^2,
    for predicted and real frames [..., 3, H, W] in [0, 1] and the background [3, H, W]."""
    return (background_weight(target, background) * (pred - target).pow(2)).mean()


class PixelWorldModel(SavedWorldModel, nn.Module):
    """enc: frames -> a spatial latent z [B, latent, 16, 16]; step: (z, a) -> z' (a conv net that sees the
    action as two constant channels); dec: z -> [B, 3, 64, 64] in [0, 1]. A spatial latent keeps *where*
    things are: a flat vector bottleneck learned the average frame (the robot smeared along every path)."""

    def __init__(self, action_dim: int = 2, latent: int = 8, channels: int = 16, image_size: int = 64,
                 action_scale: float = 0.5):
        super().__init__()
        if image_size != 64:
            raise ValueError(f"PixelWorldModel is built for 64x64 frames, got image_size={image_size}")
        c = channels
        self._init_args = {"action_dim": action_dim, "latent": latent, "channels": channels,
                           "image_size": image_size, "action_scale": action_scale}
        self.action_scale, self.action_dim = action_scale, action_dim
        self.enc = nn.Sequential(  # 64 -> 32 -> 16
            nn.Conv2d(3, c, 4, 2, 1), nn.SiLU(), nn.Conv2d(c, c, 4, 2, 1), nn.SiLU(), nn.Conv2d(c, latent, 3, 1, 1))
        self.dec = nn.Sequential(  # 16 -> 32 -> 64
            nn.Conv2d(latent, c, 3, 1, 1), nn.SiLU(), nn.ConvTranspose2d(c, c, 4, 2, 1), nn.SiLU(),
            nn.ConvTranspose2d(c, 3, 4, 2, 1))
        self.dyn = nn.Sequential(  # a few 3x3 convs: motion is local
            nn.Conv2d(latent + action_dim, c, 3, 1, 1), nn.SiLU(), nn.Conv2d(c, c, 3, 1, 1), nn.SiLU(),
            nn.Conv2d(c, latent, 3, 1, 1))
        self.register_buffer("background", torch.zeros(3, 64, 64))
        self.history: list[dict] = []

    def init_args(self) -> dict:
        return dict(self._init_args)

    @staticmethod
    def to_float(frames) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(frames))
        if x.shape[-1] != 3:
            raise ValueError(f"expected frames [..., H, W, 3], got {tuple(x.shape)}")
        return x.movedim(-1, -3).float() / 255.0

    def encode(self, frames) -> torch.Tensor:
        return self.enc(self.to_float(frames) if not torch.is_floating_point(torch.as_tensor(frames)) else frames)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.dec(z))

    def step(self, z: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        a = (torch.as_tensor(action).float() / self.action_scale)[:, :, None, None].expand(-1, -1, *z.shape[-2:])
        return z + self.dyn(torch.cat([z, a], 1))

    def weight(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel loss weight: 1 + 50 * (difference from the background), so the robot counts."""
        return background_weight(x, self.background)

    def fit(self, frames: np.ndarray, actions: np.ndarray, steps: int = 600, window: int = 3,
            batch_size: int = 16, lr: float = 1e-3, seed: int = 0, log_every: int = 100,
            recon_loss: Callable | None = None) -> PixelWorldModel:
        """Train on episodes of frames [N, T+1, 64, 64, 3] and actions [N, T, A], windows of `window` steps.
        `recon_loss(pred, target, background) -> loss` (what a lesson hands in) replaces `pixel_loss`."""
        if recon_loss is not None and not callable(recon_loss):
            raise TypeError(f"recon_loss must be a function (pred, target, background) -> loss, got "
                            f"{type(recon_loss).__name__}")
        recon_loss = recon_loss or pixel_loss
        if frames.shape[:2] != (actions.shape[0], actions.shape[1] + 1):
            raise ValueError(f"frames {frames.shape[:2]} must be (N, T+1) for actions {actions.shape[:2]}")
        if not 1 <= window <= actions.shape[1]:
            raise ValueError(f"window must be in [1, {actions.shape[1]}], got {window}")
        torch.manual_seed(seed)
        x_all = self.to_float(frames)  # [N, T+1, 3, 64, 64]
        a_all = torch.as_tensor(actions).float()
        self.background.copy_(x_all.flatten(0, 1).median(0).values)
        N, T = a_all.shape[:2]
        start = time.perf_counter()

        def sample(gen):  # an episode and a start step per sample
            return (torch.randint(0, N, (batch_size,), generator=gen),
                    torch.randint(0, T - window + 1, (batch_size,), generator=gen))

        def loss_fn(draw):
            ep, t0 = draw
            idx = t0[:, None] + torch.arange(window + 1)
            x, a = x_all[ep[:, None], idx], a_all[ep[:, None], idx[:, :-1]]  # [B, k+1, 3, 64, 64], [B, k, A]
            target_z = self.enc(x.flatten(0, 1)).unflatten(0, (batch_size, window + 1))
            z, zs = target_z[:, 0], [target_z[:, 0]]
            for t in range(window):
                z = self.step(z, a[:, t])
                zs.append(z)
            zs = torch.stack(zs, 1)
            pred = self.decode(zs.flatten(0, 1)).view_as(x)
            recon = recon_loss(pred, x, self.background)
            latent = (zs[:, 1:] - target_z[:, 1:].detach()).pow(2).mean()
            return recon + latent, (recon, latent)

        def log(it, loss, parts):
            if it % log_every == 0 or it == steps - 1:
                self.history.append({"step": it, "recon": parts[0].item(), "latent": parts[1].item(),
                                     "seconds": time.perf_counter() - start})

        minibatch_fit(self, loss_fn, steps=steps, lr=lr, seed=seed, sample=sample, after_step=log)
        return self

    @torch.no_grad()
    def imagine(self, first_frame: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """Open-loop video from one real frame [64, 64, 3] and actions [T, A]: frames [T+1, 64, 64, 3] uint8."""
        z = self.encode(self.to_float(first_frame[None]))
        out = [self.decode(z)]
        for a in torch.as_tensor(actions).float():
            z = self.step(z, a[None])
            out.append(self.decode(z))
        return (torch.cat(out).movedim(1, -1).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def robot_position(frames: np.ndarray, min_contrast: float = 40.0) -> np.ndarray:
    """Pixel (row, col) of the bluest spot, the robot, in frames [T, H, W, 3], NaN where no pixel is
    at least `min_contrast` bluer than red: a task-level error for a video model, which pixel MSE
    (dominated by the background) hides. Blurry predictions count if their blob is still bluish."""
    f = np.asarray(frames, float)
    blue = f[..., 2] - f[..., 0]
    out = np.full((len(f), 2), np.nan)
    for i, b in enumerate(blue):
        if b.max() >= min_contrast:
            out[i] = np.unravel_index(int(np.argmax(b)), b.shape)
    return out


class PixelPredictor(PixelWorldModel):
    """The latent is the frame itself: x' = x + g(x, a), a small conv net at full resolution (dilated, so
    it sees ~9 px around each pixel: farther than the robot moves in a step). Nothing has to be
    compressed, so the 3-pixel robot cannot be averaged away; errors compound open-loop instead."""

    def __init__(self, action_dim: int = 2, channels: int = 16, image_size: int = 64, action_scale: float = 0.5):
        nn.Module.__init__(self)
        if image_size != 64:
            raise ValueError(f"PixelPredictor is built for 64x64 frames, got image_size={image_size}")
        c = channels
        self.action_scale, self.action_dim = action_scale, action_dim
        self.enc, self.dec = nn.Identity(), nn.Identity()
        self.dyn = nn.Sequential(
            nn.Conv2d(3 + action_dim, c, 3, 1, 1), nn.SiLU(), nn.Conv2d(c, c, 3, 1, 2, dilation=2), nn.SiLU(),
            nn.Conv2d(c, c, 3, 1, 1), nn.SiLU(), nn.Conv2d(c, 3, 3, 1, 1))
        self.register_buffer("background", torch.zeros(3, 64, 64))
        self.history: list[dict] = []

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.clamp(0, 1)

    def step(self, z: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return super().step(z, action).clamp(0, 1)  # stay a valid image, or open-loop errors explode
