"""Diffusion Policy (Chi et al., RSS 2023): learn to denoise action chunks, conditioned on observations.

Training (DDPM, Ho et al. 2020), on a normalised chunk a (actions min-max scaled to [-1, 1]):
    k ~ U{0, ..., T-1},  eps ~ N(0, I),  x_k = sqrt(abar_k) a + sqrt(1 - abar_k) eps
    loss = || eps_theta(x_k, k, obs) - eps ||^2            (whole chunk; see `mask_padding`)
with the squared-cosine schedule abar(s) = cos^2((s + 0.008) / 1.008 * pi/2) (`squaredcos_cap_v2`).

Sampling (DDIM, Song et al. 2021) with K << T steps on the "trailing" timesteps t_1 > ... > t_K
(t_1 = T-1, so one step starts from pure noise too), from x = noise:
    a_hat = clip((x - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t), -1, 1)     predicted clean chunk
    x'    = sqrt(abar_prev) a_hat + sqrt(1 - abar_prev - s_t^2) eps_theta + s_t z,   z ~ N(0, I)
    s_t   = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)
Deterministic mode takes eta = 0 (z unused): the chunk is a fixed function of (obs, noise).
Stochastic mode takes `eta` (default 1: with K = T this is DDPM's ancestral sampler) and draws with
std max(s_t, min_std) (DPPO's floor: every step, the last one included, stays a proper Gaussian
with a log-density). Why it matters: on multimodal demonstrations each sample follows one mode,
where MSE regression (bc.py) averages them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from labkit.policies.generative import GenerativeConfig, GenerativePolicy, masked_mse


@dataclass
class DiffusionConfig(GenerativeConfig):
    num_train_timesteps: int = 100  # T
    clip_sample: bool = True  # clip the predicted clean chunk to the normalised action range [-1, 1]
    eta: float = 1.0  # stochastic sampling: 0 = DDIM (no noise), 1 = DDPM-like posterior noise
    min_std: float = 0.1  # stochastic sampling: floor on every step's std (DPPO uses 0.1)

    def __post_init__(self):
        super().__post_init__()
        if self.steps > self.num_train_timesteps:
            raise ValueError(f"steps ({self.steps}) cannot exceed num_train_timesteps ({self.num_train_timesteps})")


def squaredcos_cap_v2(T: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the cosine schedule (Nichol & Dhariwal 2021), capped so that no step destroys everything."""
    abar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)], dtype=torch.float64)


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """K training timesteps to visit, from T-1 down ("trailing" spacing: 99, 89, ..., 9 for T=100, K=10)."""
    return [int(t) for t in np.round(np.arange(T, 0, -T / steps)).astype(int) - 1]


def ddpm_loss(eps_model, action: torch.Tensor, k: torch.Tensor, eps: torch.Tensor, alphas_cumprod: torch.Tensor,
              is_pad: torch.Tensor | None = None) -> torch.Tensor:
    """The DDPM loss of chunks `action` [B, H, A] at integer levels `k` [B] with noise `eps` [B, H, A]: the
    MSE (`masked_mse`) between eps_model(x_k, k) and eps, x_k = sqrt(abar_k) a + sqrt(1 - abar_k) eps."""
    abar = alphas_cumprod[k].view(-1, 1, 1)
    x_k = abar.sqrt() * action + (1 - abar).sqrt() * eps
    return masked_mse(eps_model(x_k, k), eps, is_pad)


def ddim_step(x_t: torch.Tensor, eps_hat: torch.Tensor, abar_t: torch.Tensor, abar_prev: torch.Tensor,
              s=0.0, clip: bool = True) -> torch.Tensor:
    """The mean of one DDIM step from level abar_t to abar_prev given the noise estimate `eps_hat`: the clean
    guess (clipped to [-1, 1] with `clip`) re-noised to abar_prev; `s` is the step's own noise std (eta = 0: 0)."""
    a_hat = (x_t - (1 - abar_t).sqrt() * eps_hat) / abar_t.sqrt()
    if clip:
        a_hat = a_hat.clamp(-1, 1)
    return abar_prev.sqrt() * a_hat + (1 - abar_prev - s**2).clamp(min=0).sqrt() * eps_hat


class DiffusionPolicy(GenerativePolicy):
    """A noise-prediction network eps_theta(x_k, k, obs) over the normalised action chunk."""

    config_class = DiffusionConfig

    def __init__(self, config, shapes, stats, env=None):
        super().__init__(config, shapes, stats, env)
        abar = torch.cumprod(1 - squaredcos_cap_v2(self.config.num_train_timesteps), 0).float()
        self.register_buffer("alphas_cumprod", abar, persistent=False)  # rebuilt from the config

    def loss(self, obs, action, is_pad):
        T = self.config.num_train_timesteps
        k = torch.randint(0, T, (len(action),), device=action.device)
        eps = torch.randn_like(action)
        feat = self.model["encoder"](obs)
        return ddpm_loss(lambda x, k_: self.model["denoiser"](x, k_.float() / T, feat), action, k, eps,
                         self.alphas_cumprod, is_pad if self.config.mask_padding else None)

    def step_distribution(self, net, feat, x, i, steps, stochastic):
        """One DDIM step from timestep t_i to t_{i+1} (or to the clean chunk after the last)."""
        c, T = self.config, self.config.num_train_timesteps
        ts = ddim_timesteps(T, steps)
        t, prev = ts[i], ts[i + 1] if i + 1 < steps else -1
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev] if prev >= 0 else torch.ones_like(abar_t)
        eps = net["denoiser"](x, torch.full((len(x),), t / T, device=x.device), feat)
        eta = c.eta if stochastic else 0.0
        s = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()
        mean = ddim_step(x, eps, abar_t, abar_prev, s, c.clip_sample)
        return mean, s.clamp(min=c.min_std) if stochastic else s

    def lesson_chain(self, net, feat, x, steps):
        """The chain [B, K+1, H, A] of a lesson's DDIM step, `sampler(x_t, eps_hat, abar_t, abar_prev)` (eta = 0)."""
        T = self.config.num_train_timesteps
        ts, latents = ddim_timesteps(T, steps), [x]
        for i, t in enumerate(ts):
            abar_prev = self.alphas_cumprod[ts[i + 1]] if i + 1 < steps else torch.ones_like(self.alphas_cumprod[t])
            eps = net["denoiser"](x, torch.full((len(x),), t / T, device=x.device), feat)
            x = self.sampler(x, eps, self.alphas_cumprod[t], abar_prev)
            latents.append(x)
        return torch.stack(latents, 1)
