"""A small tanh-Gaussian actor (SAC-style) and SAC's automatic temperature.

One class serves every method: DSRL's noise policy (scale = the noise bound, e.g. 1.5), ResFiT's
residual and EXPO's edit policy (a small scale, input = obs and base action), an RL-from-scratch
baseline (centre/scale from the env's Box bounds). The action is
    a = centre + scale * tanh(u),   u ~ N(mu(x), sigma(x)^2)
so it always lies strictly inside [centre - scale, centre + scale].

Its log-density is the Gaussian's, corrected by the change of variables u -> a:
    log pi(a|x) = log N(u; mu, sigma^2) - sum_d log(scale_d * (1 - tanh(u_d)^2))
The scale term is constant in the weights but is part of the density of a; it is exactly EXPO's
"- d log beta" correction. SAC's target entropies assume this density.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from labkit.nn import activation as activation_class


def log1m_tanh_sq(u: torch.Tensor) -> torch.Tensor:
    """log(1 - tanh(u)^2), computed stably as 2 (log 2 - u - softplus(-2u)); the naive form is -inf
    once tanh saturates to 1 in float32 (|u| > ~9)."""
    return 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))


class TanhGaussianActor(nn.Module):
    """MLP x -> (mu, log sigma) with tanh squashing to centre +- scale.

    `forward(x)` samples with the reparameterisation trick (gradients flow through the action) and
    returns (action [B, A], log_prob [B]); `forward(x, deterministic=True)` returns the mode
    centre + scale * tanh(mu) and log_prob None. `zero_init=True` zeroes the mean head, so the
    deterministic action starts exactly at `centre` (a zero residual: ResFiT starts at the base policy).
    """

    def __init__(self, in_dim: int, action_dim: int, hidden: tuple[int, ...] = (256, 256),
                 scale: float | torch.Tensor = 1.0, centre: float | torch.Tensor = 0.0, layer_norm: bool = False,
                 activation: str = "relu", log_std_bounds: tuple[float, float] = (-5.0, 2.0),
                 zero_init: bool = False):
        super().__init__()
        layers, width = [], in_dim
        for h in hidden:
            layers += [nn.Linear(width, h)] + ([nn.LayerNorm(h)] if layer_norm else []) + [activation_class(activation)()]
            width = h
        self.trunk = nn.Sequential(*layers)
        self.mean = nn.Linear(width, action_dim)
        self.log_std = nn.Linear(width, action_dim)
        if zero_init:
            nn.init.zeros_(self.mean.weight)
            nn.init.zeros_(self.mean.bias)
        scale = torch.as_tensor(scale, dtype=torch.float32).expand(action_dim).clone()
        if not torch.all(scale > 0):
            raise ValueError(f"scale must be positive, got {scale.tolist()}")
        # Buffers, not parameters: they move with .to(device) and live in the checkpoint, untrained.
        self.register_buffer("scale", scale)
        self.register_buffer("centre", torch.as_tensor(centre, dtype=torch.float32).expand(action_dim).clone())
        self.in_dim, self.action_dim, self.log_std_bounds = in_dim, action_dim, log_std_bounds

    @classmethod
    def for_box(cls, in_dim: int, low, high, **kwargs) -> TanhGaussianActor:
        """An actor whose actions fill a Box [low, high] (e.g. an env's action_space.low/high)."""
        low, high = torch.as_tensor(low, dtype=torch.float32).flatten(), torch.as_tensor(high, dtype=torch.float32).flatten()
        return cls(in_dim, low.numel(), scale=(high - low) / 2, centre=(high + low) / 2, **kwargs)

    def distribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, std) of the pre-tanh Gaussian. log sigma is squashed smoothly into its bounds (as in
        CleanRL's SAC) rather than clamped, so it keeps a gradient at the edges."""
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"actor expects inputs [B, {self.in_dim}], got {list(x.shape)}")
        h = self.trunk(x.float())
        lo, hi = self.log_std_bounds
        log_std = lo + 0.5 * (hi - lo) * (torch.tanh(self.log_std(h)) + 1)
        return self.mean(h), log_std.exp()

    def forward(self, x: torch.Tensor, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        mu, std = self.distribution(x)
        if deterministic:
            return self.centre + self.scale * torch.tanh(mu), None
        u = mu + std * torch.randn_like(mu)
        return self.centre + self.scale * torch.tanh(u), self._log_prob_u(u, mu, std)

    def _log_prob_u(self, u, mu, std) -> torch.Tensor:
        gauss = torch.distributions.Normal(mu, std).log_prob(u).sum(-1)
        return gauss - (torch.log(self.scale) + log1m_tanh_sq(u)).sum(-1)

    def log_prob(self, x: torch.Tensor, action: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        """log pi(action | x) of given actions (e.g. stored ones); they are pulled `eps` inside the
        bounds first, since atanh is infinite on them."""
        mu, std = self.distribution(x)
        y = ((action - self.centre) / self.scale).clamp(-1 + eps, 1 - eps)
        return self._log_prob_u(torch.atanh(y), mu, std)


class Temperature(nn.Module):
    """SAC's entropy temperature alpha, tuned so that E[-log pi] tracks `target_entropy`.

    Learned as log alpha (stays positive). SAC's usual target is -action_dim; DSRL's configs use 0,
    EXPO -action_dim/2.
    """

    def __init__(self, target_entropy: float, init: float = 1.0):
        super().__init__()
        self.target_entropy = float(target_entropy)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(init)))

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp().detach()

    def loss(self, log_prob: torch.Tensor) -> torch.Tensor:
        """Gradient raises alpha when the policy's entropy (-log_prob) is below the target."""
        return -(self.log_alpha.exp() * (log_prob.detach() + self.target_entropy)).mean()
