"""What diffusion and flow policies share: the denoiser + observation encoder, its EMA copy, and the
K-step sampler whose every step is a Gaussian, so that RL methods can steer and score it.

A method (diffusion.py, flow.py) provides two things: `loss(obs, action, is_pad)` and
`step_distribution(net, feat, x, i, steps, stochastic) -> (mean, std)`, the Gaussian of sampling
step i from latent z_i to z_{i+1}, in sampling order: z_0 is the noise (diffusion's x_T, flow's
x at t=0) and z_K the action chunk. `sample` and `log_prob` below are written once on top of it.
Deterministic sampling takes the mean (DDIM with eta=0, or the Euler ODE step); stochastic sampling
draws from N(mean, std^2), and the per-step log-densities are exact. The options policy-gradient
finetuning needs (DPPO: a frozen prefix of steps, a std floor, clipped noise, per-dimension
log-densities) are options of these two methods, so the Gaussian of a step is written once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from labkit.nn import EMA, FiLMBlock, activation, make_denoiser
from labkit.policies.base import Policy, PolicyConfig
from labkit.vision import ObsEncoder


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
    # Hidden layers of an MLP (width obs_hidden, then LayerNorm) over the observation features before the
    # denoiser; 0: the features as they are. Language on Tabletop needs it: the sentence and the state meet
    # only through linear FiLM maps otherwise (seen tasks, told the sentence: 41% without, 57% with, 2 x 256).
    obs_layers: int = 0
    obs_hidden: int = 256
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
        if self.cond not in ("film", "concat"):
            raise ValueError(f"cond must be 'film' or 'concat', got {self.cond!r}")
        sizes = ("hidden", "layers", "kernel_size", "n_groups", "time_dim", "obs_hidden")
        for k in sizes:  # hidden=(64, 64), as BC's MLP takes it, is a width and a depth here
            if not isinstance(getattr(self, k), int) or isinstance(getattr(self, k), bool):
                raise TypeError(f"{k} must be an int, got {getattr(self, k)!r} (the generative MLP takes hidden=<width> "
                                "and layers=<depth>)")
        small = {k: getattr(self, k) for k in sizes if getattr(self, k) < 1}
        if not isinstance(self.obs_layers, int) or isinstance(self.obs_layers, bool) or self.obs_layers < 0:
            raise ValueError(f"obs_layers must be an int >= 0 (0: no observation MLP), got {self.obs_layers!r}")
        if small or not self.down_dims or min(self.down_dims) < 1:
            raise ValueError(f"network sizes must be >= 1, got {small or {'down_dims': self.down_dims}}")
        activation(self.activation)  # a ValueError naming the choices


@dataclass
class SampleResult:
    """What `sample` returns.

    actions:   [B, H, A] the normalised action chunk (= latents[:, -1]).
    latents:   [B, K+1, H, A] the whole chain z_0 (the noise) ... z_K (the chunk), in sampling order
               (with `ft_steps` K': its last K'+1 latents z_{K-K'} ... z_K).
    log_probs: [B, K] log N(z_{i+1}; mean_theta(z_i), std_i^2) for step i, summed over the chunk's
               H*A dims ([B, K, H, A] with per_dim; K' steps with ft_steps); stochastic=True only,
               None for deterministic sampling.
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
    # What a lesson hands in: its own deterministic sampler (diffusion: a DDIM step, flow: an Euler sampler;
    # `lesson_chain` says each form), which `sample` then runs in place of labkit's, evaluation included.
    sampler: Callable | None = None

    @classmethod
    def from_dataset(cls, dataset, env: dict | None = None, sampler: Callable | None = None,
                     film: Callable | None = None, **config):
        """`Policy.from_dataset`, sampling with a lesson's `sampler` when one is given, and modulating
        every FiLM block with a lesson's `film(h, params) -> h'` (labkit.nn.film's contract) if given."""
        policy = super().from_dataset(dataset, env, **config)
        policy.sampler = sampler
        if film is not None:
            if not callable(film):
                raise TypeError(f"film must be a function (h, params) -> h, got {type(film).__name__}")
            blocks = [m for m in policy.modules() if isinstance(m, FiLMBlock)]  # the EMA copy's too
            if not blocks:
                raise ValueError("film= needs FiLM conditioning (backbone='mlp', cond='film')")
            for m in blocks:
                m.modulate = film
        return policy

    def __init__(self, config, shapes, stats, env=None):
        super().__init__(config, shapes, stats, env)
        c = self.config
        encoder = ObsEncoder({k: self.shapes[k] for k in c.obs_keys}, c.obs_horizon, c.image_dim,
                             c.image_encoder, c.pretrained, c.pretrained_meta, c.obs_layers, c.obs_hidden,
                             activation(c.activation))
        denoiser = make_denoiser(c.backbone, c.horizon, self.action_dim, encoder.out_dim, c)
        self.model = nn.ModuleDict({"encoder": encoder, "denoiser": denoiser})
        self.ema = EMA(self.model, c.ema_power, c.ema_max_decay) if c.ema else None

    # ---- what a method provides ----------------------------------------------------------------
    def step_distribution(self, net: nn.Module, feat: torch.Tensor, x: torch.Tensor, i: int, steps: int,
                          stochastic: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean [B, H, A] and std (a float or a scalar tensor) of z_{i+1} given z_i = x, step i of `steps`."""
        raise NotImplementedError

    def lesson_chain(self, net: nn.Module, feat: torch.Tensor, x: torch.Tensor, steps: int) -> torch.Tensor:
        """The deterministic chain [B, K+1, H, A] from noise `x` that the lesson's `sampler` computes."""
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
    def step_gaussian(self, net: nn.Module, feat: torch.Tensor, x: torch.Tensor, i: int, steps: int,
                      stochastic: bool, min_std: float | None = None) -> tuple[torch.Tensor, torch.Tensor | float]:
        """`step_distribution`, with a stochastic step's std floored at `min_std` when one is given
        (DPPO's exploration floor: every step then stays a proper Gaussian with a log-density)."""
        mean, std = self.step_distribution(net, feat, x, i, steps, stochastic)
        if stochastic and min_std is not None:
            std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device).clamp(min=min_std)
        return mean, std

    def sample(self, obs: dict[str, torch.Tensor], noise: torch.Tensor | None = None, steps: int | None = None,
               stochastic: bool = False, use_ema: bool | None = None, *, net: nn.Module | None = None,
               frozen: nn.Module | None = None, ft_steps: int | None = None, min_std: float | None = None,
               noise_clip: float | None = None, per_dim: bool = False) -> SampleResult:
        """Sample normalised chunks for normalised observations {key: [B, obs_horizon, ...]}.

        `noise` is the starting latent z_0 [B, H, A] (default N(0, I)): with stochastic=False the
        output is a deterministic function of (obs, noise), which is what noise-space RL (DSRL)
        steers. With stochastic=True every step draws z_{i+1} = mean_i + std_i * z, z ~ N(0, I), and
        `log_probs` holds the per-step log-densities that policy-gradient methods (DPPO, OGPO) need.
        Not under no_grad: gradients flow to the weights and to `noise` when asked for.

        What DPPO adds (the defaults leave the plain sampler above):
            net        the networks to sample with (default: `self.net(use_ema)`).
            ft_steps   K': keep only the last K' steps of the chain; latents [B, K'+1, H, A] start at
                       z_{K-K'} and log_probs cover those K' steps. The first K - K' steps run with
                       `frozen` (default: `net`), stochastic or not like the rest.
            min_std    floor on every stochastic step's std (`step_gaussian`).
            noise_clip clip the standard-normal draw z to +-noise_clip.
            per_dim    log_probs per dimension [B, K', H, A] instead of summed over the chunk [B, K'].
        """
        net, steps = net if net is not None else self.net(use_ema), steps or self.config.steps
        frozen = net if frozen is None else frozen
        first = steps - (steps if ft_steps is None else ft_steps)
        if not 0 <= first < steps:
            raise ValueError(f"ft_steps must lie in [1, steps={steps}], got {ft_steps}")
        feat = net["encoder"](obs)
        frozen_feat = frozen["encoder"](obs) if first > 0 else None
        shape = (len(feat), self.config.horizon, self.action_dim)
        if noise is None:
            noise = torch.randn(shape, device=feat.device)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape} (batch, horizon, action_dim), got {tuple(noise.shape)}")
        if self.sampler is not None and not stochastic and first == 0:  # the lesson's sampler
            latents = self.lesson_chain(net, feat, noise, steps)
            return SampleResult(latents[:, -1], latents)
        x, latents, log_probs = noise, [], []
        for i in range(steps):
            if i == first:
                latents.append(x)
            step_net, step_feat = (frozen, frozen_feat) if i < first else (net, feat)
            mean, std = self.step_gaussian(step_net, step_feat, x, i, steps, stochastic, min_std)
            if stochastic:
                z = torch.randn_like(mean)
                x = mean + std * (z if noise_clip is None else z.clamp(-noise_clip, noise_clip))
                if i >= first:
                    log_probs.append(gaussian_log_prob(x, mean, std, per_dim))
            else:
                x = mean
            if i >= first:
                latents.append(x)
        return SampleResult(x, torch.stack(latents, 1), torch.stack(log_probs, 1) if stochastic else None)

    def log_prob(self, obs: dict[str, torch.Tensor], latents: torch.Tensor, use_ema: bool | None = None, *,
                 net: nn.Module | None = None, steps: int | None = None, min_std: float | None = None,
                 per_dim: bool = False) -> torch.Tensor:
        """Per-step log-densities [B, K'] ([B, K', H, A] with per_dim) of a stored stochastic chain
        `latents` [B, K'+1, H, A] (as `sample` returns it). `steps` is the chain's full length K
        (default K': the whole chain), so that the stored part is its last K' steps; `net` and
        `min_std` as in `sample`. With use_ema=False (or a trainable `net`) they are differentiable
        in the weights: the new-policy side of a PPO ratio."""
        net = net if net is not None else self.net(use_ema)
        kept = latents.shape[1] - 1
        steps = steps or kept
        if not 1 <= kept <= steps:
            raise ValueError(f"latents hold {kept} steps, which must lie in [1, steps={steps}]")
        feat = net["encoder"](obs)
        out = []
        for j in range(kept):
            mean, std = self.step_gaussian(net, feat, latents[:, j], steps - kept + j, steps, True, min_std)
            out.append(gaussian_log_prob(latents[:, j + 1], mean, std, per_dim))
        return torch.stack(out, 1)

    def predict_normalized(self, obs):
        return self.sample(obs).actions


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std, per_dim: bool = False) -> torch.Tensor:
    """log N(x; mean, std^2 I) summed over all but the batch dimension (per_dim: not summed)."""
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device).expand_as(mean)
    log_prob = torch.distributions.Normal(mean, std).log_prob(x)
    return log_prob if per_dim else log_prob.flatten(1).sum(-1)
