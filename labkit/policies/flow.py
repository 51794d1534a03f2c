"""Flow-matching policy: learn a velocity field that carries Gaussian noise to action chunks.

Conditional flow matching on the linear path (Lipman et al. 2023; Liu et al.'s rectified flow; the
recipe pi0, QAM and OGPO use), on a normalised chunk a:
    x0 ~ N(0, I),  t ~ U[0, 1],  x_t = (1 - t) x0 + t a
    loss = || v_theta(x_t, t, obs) - (a - x0) ||^2          (whole chunk; see `mask_padding`)
Sampling integrates dx/dt = v_theta from x = noise at t = 0 to t = 1 with K Euler steps, dt = 1/K:
    x' = x + v_theta(x, t_i, obs) dt,   t_i = i / K
Stochastic mode (Euler-Maruyama with a constant diffusion coefficient sigma = `noise_scale`):
    x' = x + v_theta(x, t_i, obs) dt + sigma sqrt(dt) z,   z ~ N(0, I)
so each step is N(x + v dt, sigma^2 dt I) with an exact log-density (for DPPO/OGPO-style policy
gradients). No score correction is added, so the noise slightly widens the sampled distribution
(total added variance ~ sigma^2); keep sigma small. Like diffusion, each sample follows one mode of
multimodal demonstrations, where MSE regression averages them; it needs no noise schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from labkit.policies.generative import GenerativeConfig, GenerativePolicy, masked_mse


@dataclass
class FlowConfig(GenerativeConfig):
    noise_scale: float = 0.3  # stochastic sampling: sigma; per-step std sigma * sqrt(1/K) (0.095 at K=10)

    def __post_init__(self):
        super().__post_init__()
        if self.noise_scale <= 0:
            raise ValueError(f"noise_scale must be > 0 (it is the std of stochastic steps), got {self.noise_scale}")


def linear_path(action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A flow-matching training point on the linear path for chunks `action` [B, H, A]: draws
    x0 ~ N(0, I) (first) and t ~ U[0, 1] [B] (second) and returns (x_t, t, target velocity a - x0),
    x_t = (1 - t) x0 + t a. Every flow policy's loss regresses its velocity at (x_t, t) on the target."""
    x0 = torch.randn_like(action)
    t = torch.rand(len(action), device=action.device)
    x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * action
    return x_t, t, action - x0


def flow_matching_loss(v_model, action: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
                       is_pad: torch.Tensor | None = None) -> torch.Tensor:
    """The flow-matching loss of chunks `action` [B, H, A] with noise `x0` [B, H, A] and times `t` [B]: the MSE
    (`masked_mse`) between v_model(x_t, t) and the velocity a - x0 on the path x_t = (1 - t) x0 + t a."""
    tt = t.view(-1, 1, 1)
    x_t = (1 - tt) * x0 + tt * action
    return masked_mse(v_model(x_t, t), action - x0, is_pad)


def euler_sample(velocity, x0: torch.Tensor, steps: int) -> torch.Tensor:
    """The path [K+1, *x0.shape] of `steps` Euler steps of dx/dt = velocity(x, t) (t a float) from x0 at
    t = 0 to t = 1: the chain `FlowPolicy.sample` computes with stochastic=False, written on its own."""
    dt, path = 1.0 / steps, [x0]
    for i in range(steps):
        path.append(path[-1] + velocity(path[-1], i * dt) * dt)
    return torch.stack(path)


class FlowPolicy(GenerativePolicy):
    """A velocity field v_theta(x_t, t, obs) over the normalised action chunk."""

    config_class = FlowConfig

    def loss(self, obs, action, is_pad):
        x0 = torch.randn_like(action)  # drawn as `linear_path` draws them: x0 first, then t
        t = torch.rand(len(action), device=action.device)
        feat = self.model["encoder"](obs)
        return flow_matching_loss(lambda x, t_: self.model["denoiser"](x, t_, feat), action, x0, t,
                                  is_pad if self.config.mask_padding else None)

    def step_distribution(self, net, feat, x, i, steps, stochastic):
        """One Euler (or Euler-Maruyama) step from t = i/K to (i+1)/K."""
        dt = 1.0 / steps
        v = net["denoiser"](x, torch.full((len(x),), i * dt, device=x.device), feat)
        return x + v * dt, (self.config.noise_scale * math.sqrt(dt) if stochastic else 0.0)

    def lesson_chain(self, net, feat, x, steps):
        """The chain [B, K+1, H, A] of a lesson's Euler sampler, `sampler(velocity, x0, steps) -> [K+1, B, H, A]`."""
        return self.sampler(lambda z, t: net["denoiser"](z, torch.full((len(z),), t, device=z.device), feat),
                            x, steps).transpose(0, 1)
