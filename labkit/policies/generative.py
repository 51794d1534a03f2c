"""What diffusion and flow policies share: the denoiser + observation encoder, its EMA copy, and the
K-step sampler whose every step is a Gaussian, so that RL methods can steer and score it.

A method (diffusion.py, flow.py) provides two things: `loss(obs, action, is_pad)` and
`step_distribution(net, feat, x, i, steps, stochastic) -> (mean, std)`, the Gaussian of sampling
step i from latent z_i to z_{i+1}, in sampling order: z_0 is the noise (diffusion's x_T, flow's
x at t=0) and z_K the action chunk. `sample` and `log_prob` below are written once on top of it.
Deterministic sampling takes the mean (DDIM with eta=0, or the Euler ODE step); stochastic sampling
draws from N(mean, std^2), and the per-step log-densities are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from labkit.policies.base import Policy, PolicyConfig
from labkit.nn import EMA, ObsEncoder, activation, make_denoiser


@dataclass
class GenerativeConfig(PolicyConfig):
    """Network, sampler and EMA settings shared by diffusion and flow policies."""

    backbone: str = "mlp"  # "mlp" (CPU default) or "unet" (Diffusion Policy's 1-D conv U-Net)
    cond: str = "film"  # MLP conditioning on (obs features, time): "film" or "concat"
    hidden: int = 256  # MLP width
    layers: int = 3  # MLP residual blocks (film) or hidden layers (concat)
    down_dims: tuple[int, ...] = (64, 128, 256)  # U-Net channels per level (Diffusion Policy: 256, 512, 1024)
    kernel_size: int = 5
    n_groups: int = 8  # GroupNorm groups in the U-Net
    time_dim: int = 64  # width of the time / diffusion-step embedding
    # MLP activation. Mish is Diffusion Policy's; SiLU, its smooth near-twin, is ~8x cheaper on CPU.
    activation: str = "mish"
    steps: int = 10  # sampling steps K at inference
    ema: bool = True  # evaluate with an exponential moving average of the weights
    ema_power: float = 0.75
    ema_max_decay: float = 0.9999
    # Diffusion Policy (and LeRobot's default) trains on the whole chunk, past an episode's end too,
    # where the dataset repeats the last action. Masking those steps leaves the chunk's tail
    # unconstrained near the end of every demo: on Detour the robot then wandered off just short of
    # the goal (flow, 3000 steps: 51% success masked, 98% unmasked).
    mask_padding: bool = False

    def __post_init__(self):
        super().__post_init__()
        self.down_dims = tuple(self.down_dims)
        if self.backbone not in ("mlp", "unet"):
            raise ValueError(f"backbone must be 'mlp' or 'unet', got {self.backbone!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        activation(self.activation)  # a ValueError naming the choices


@dataclass
class SampleResult:
    """What `sample` returns.

    actions:   [B, H, A] the normalised action chunk (= latents[:, -1]).
    latents:   [B, K+1, H, A] the whole chain z_0 (the noise) ... z_K (the chunk), in sampling order.
    log_probs: [B, K] log N(z_{i+1}; mean_theta(z_i), std_i^2) for step i, summed over the chunk's
               H*A dims (stochastic=True only; None for deterministic sampling).
    """

    actions: torch.Tensor
    latents: torch.Tensor
    log_probs: torch.Tensor | None = None


def masked_mse(pred: torch.Tensor, target: torch.Tensor, is_pad: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over a chunk [B, H, A], over its unpadded steps only when `is_pad` is given."""
    err = (pred - target).pow(2).mean(-1)
    if is_pad is None:
        return err.mean()
    keep = (~is_pad).float()
    return (err * keep).sum() / keep.sum().clamp(min=1.0)


class GenerativePolicy(Policy):
    """Base of DiffusionPolicy and FlowPolicy: networks, EMA, and the shared K-step sampler."""

    config_class = GenerativeConfig

    def __init__(self, config, shapes, stats, env=None):
        super().__init__(config, shapes, stats, env)
        c = self.config
        encoder = ObsEncoder({k: self.shapes[k] for k in c.obs_keys}, c.obs_horizon)
        denoiser = make_denoiser(c.backbone, c.horizon, self.action_dim, encoder.out_dim, c)
        self.model = nn.ModuleDict({"encoder": encoder, "denoiser": denoiser})
        self.ema = EMA(self.model, c.ema_power, c.ema_max_decay) if c.ema else None

    # ---- what a method provides ----------------------------------------------------------------
    def step_distribution(self, net: nn.Module, feat: torch.Tensor, x: torch.Tensor, i: int, steps: int,
                          stochastic: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean [B, H, A] and std (a float or a scalar tensor) of z_{i+1} given z_i = x, step i of `steps`."""
        raise NotImplementedError

    def chunk_loss(self, pred: torch.Tensor, target: torch.Tensor, is_pad: torch.Tensor) -> torch.Tensor:
        """The regression loss of both methods: MSE over the chunk, padded steps masked if configured."""
        return masked_mse(pred, target, is_pad if self.config.mask_padding else None)

    # ---- EMA -----------------------------------------------------------------------------------
    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            self.ema.update(self.model)

    def net(self, use_ema: bool | None = None) -> nn.ModuleDict:
        """The networks to sample with: by default the EMA copy in eval mode, the live ones in training."""
        if use_ema is None:
            use_ema = not self.training
        return self.ema.model if (use_ema and self.ema is not None) else self.model

    # ---- sampling ------------------------------------------------------------------------------
    def sample(self, obs: dict[str, torch.Tensor], noise: torch.Tensor | None = None, steps: int | None = None,
               stochastic: bool = False, use_ema: bool | None = None) -> SampleResult:
        """Sample normalised chunks for normalised observations {key: [B, obs_horizon, ...]}.

        `noise` is the starting latent z_0 [B, H, A] (default N(0, I)): with stochastic=False the
        output is a deterministic function of (obs, noise), which is what noise-space RL (DSRL)
        steers. With stochastic=True every step draws from its Gaussian and `log_probs` holds the
        per-step log-densities that policy-gradient methods (DPPO, OGPO) need. Not under no_grad:
        gradients flow to the weights and to `noise` when asked for.
        """
        net, steps = self.net(use_ema), steps or self.config.steps
        feat = net["encoder"](obs)
        shape = (len(feat), self.config.horizon, self.action_dim)
        if noise is None:
            noise = torch.randn(shape, device=feat.device)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape} (batch, horizon, action_dim), got {tuple(noise.shape)}")
        x, latents, log_probs = noise, [noise], []
        for i in range(steps):
            mean, std = self.step_distribution(net, feat, x, i, steps, stochastic)
            if stochastic:
                x = mean + std * torch.randn_like(mean)
                log_probs.append(gaussian_log_prob(x, mean, std))
            else:
                x = mean
            latents.append(x)
        return SampleResult(x, torch.stack(latents, 1), torch.stack(log_probs, 1) if stochastic else None)

    def log_prob(self, obs: dict[str, torch.Tensor], latents: torch.Tensor, use_ema: bool | None = None) -> torch.Tensor:
        """Per-step log-densities [B, K] of a stored stochastic chain `latents` [B, K+1, H, A] (as
        `sample` returns it). With use_ema=False they are differentiable in the trainable weights:
        the new-policy side of a PPO ratio."""
        net, steps = self.net(use_ema), latents.shape[1] - 1
        feat = net["encoder"](obs)
        out = []
        for i in range(steps):
            mean, std = self.step_distribution(net, feat, latents[:, i], i, steps, stochastic=True)
            out.append(gaussian_log_prob(latents[:, i + 1], mean, std))
        return torch.stack(out, 1)

    def predict_normalized(self, obs):
        return self.sample(obs).actions


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std) -> torch.Tensor:
    """log N(x; mean, std^2 I) summed over all but the batch dimension."""
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device).expand_as(mean)
    return torch.distributions.Normal(mean, std).log_prob(x).flatten(1).sum(-1)
