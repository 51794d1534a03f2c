"""Networks shared by every labkit policy: an MLP; for the generative policies (diffusion, flow), the
denoisers over an action chunk and an EMA of weights. Image and observation encoders: labkit.vision.

GroupNorm, never BatchNorm: batch statistics break with EMA weights and with batch-size-1 inference.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

# On CPU, PyTorch's Mish is slow: at width 256 it took 8x SiLU's time forward, and Mish forward and
# backward were a quarter of a flow policy's training step (measured, one thread; benchmarks/README.md).
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU, "mish": nn.Mish}


def activation(name: str) -> type[nn.Module]:
    """The activation class called `name` (a key of ACTIVATIONS), or a ValueError that lists them."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


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


# ---- generative policies: denoisers over an action chunk -------------------------------------------
# Every denoiser has the same call: net(x [B, H, A], t [B] in [0, 1], cond [B, C]) -> [B, H, A].
# Diffusion passes t = step / T and reads the output as the noise; flow passes its time and reads
# the output as the velocity.


def sinusoidal_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """Transformer-style sin/cos features of t in [0, 1] (scaled to [0, scale]), [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / max(half - 1, 1))
    ang = (t.float() * scale)[:, None] * freqs[None]
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


class TimeEmbedding(nn.Module):
    """Sinusoidal features followed by a small MLP (Diffusion Policy's diffusion-step encoder)."""

    def __init__(self, dim: int, act: type[nn.Module] = nn.Mish):
        super().__init__()
        self.dim = dim
        self.net = nn.Sequential(nn.Linear(dim, 4 * dim), act(), nn.Linear(4 * dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.net(sinusoidal_embedding(t, self.dim))


def film(h: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Feature-wise linear modulation: params = [scale, shift] (each as wide as h) from the conditioning;
    h * (1 + scale) + shift, so zero params leave h as it is."""
    scale, shift = params.chunk(2, dim=-1)
    return h * (1 + scale) + shift


class FiLMBlock(nn.Module):
    """Residual MLP block whose hidden features are scaled and shifted by the conditioning (FiLM).
    `modulate` (default `film`) is what a lesson replaces with the student's function."""

    modulate = None

    def __init__(self, hidden: int, cond_dim: int, act: type[nn.Module] = nn.Mish):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.act = act()
        self.film = nn.Linear(cond_dim, 2 * hidden)
        nn.init.zeros_(self.film.weight)  # start as an unconditioned residual MLP
        nn.init.zeros_(self.film.bias)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        y = (self.modulate or film)(self.fc1(self.act(h)), self.film(cond))
        return h + self.fc2(self.act(y))


class MLPDenoiser(nn.Module):
    """An MLP over the flattened chunk, conditioned on (obs features, time) by FiLM or concatenation.

    `cond="film"`: every residual block is modulated by the conditioning, so it cannot be ignored deep
    in the net. `cond="concat"`: the conditioning is appended to the input of a plain MLP.
    """

    def __init__(self, horizon: int, action_dim: int, cond_dim: int, hidden: int = 256, layers: int = 3,
                 time_dim: int = 64, cond: str = "film", act: str = "mish"):
        super().__init__()
        if cond not in ("film", "concat"):
            raise ValueError(f"cond must be 'film' or 'concat', got {cond!r}")
        act_cls = activation(act)
        self.cond, self.shape = cond, (horizon, action_dim)
        x_dim, c_dim = horizon * action_dim, cond_dim + time_dim
        self.time = TimeEmbedding(time_dim, act_cls)
        if cond == "concat":
            self.net = mlp(x_dim + c_dim, x_dim, hidden, layers, act_cls)
        else:
            self.inp = nn.Linear(x_dim, hidden)
            self.blocks = nn.ModuleList(FiLMBlock(hidden, c_dim, act_cls) for _ in range(layers))
            self.out = nn.Sequential(act_cls(), nn.Linear(hidden, x_dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        c = torch.cat([cond, self.time(t)], dim=-1)
        flat = x.flatten(1)
        if self.cond == "concat":
            return self.net(torch.cat([flat, c], dim=-1)).view(x.shape)
        h = self.inp(flat)
        for block in self.blocks:
            h = block(h, c)
        return self.out(h).view(x.shape)


class Conv1dBlock(nn.Sequential):
    """Conv1d -> GroupNorm -> Mish, length-preserving."""

    def __init__(self, inp: int, out: int, kernel: int, groups: int = 8):
        super().__init__(nn.Conv1d(inp, out, kernel, padding=kernel // 2), nn.GroupNorm(groups, out), nn.Mish())


class CondResBlock1d(nn.Module):
    """Two conv blocks; between them FiLM from the conditioning predicts a per-channel scale and bias."""

    def __init__(self, inp: int, out: int, cond_dim: int, kernel: int = 5, groups: int = 8):
        super().__init__()
        self.block1, self.block2 = Conv1dBlock(inp, out, kernel, groups), Conv1dBlock(out, out, kernel, groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * out))
        self.skip = nn.Conv1d(inp, out, 1) if inp != out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, bias = self.film(cond)[..., None].chunk(2, dim=1)
        return self.block2(self.block1(x) * scale + bias) + self.skip(x)


class UNet1dDenoiser(nn.Module):
    """Diffusion Policy's ConditionalUnet1D: a 1-D temporal U-Net over the chunk, FiLM-conditioned
    on (obs features, time) at every residual block; it convolves along the chunk's time axis."""

    def __init__(self, horizon: int, action_dim: int, cond_dim: int, down_dims: tuple[int, ...] = (64, 128, 256),
                 kernel: int = 5, groups: int = 8, time_dim: int = 64):
        super().__init__()
        factor = 2 ** (len(down_dims) - 1)
        if horizon % factor:
            raise ValueError(f"the U-Net halves the chunk {len(down_dims) - 1} times: horizon must be a multiple"
                             f" of {factor}, got {horizon} (change horizon or down_dims)")
        self.time = TimeEmbedding(time_dim)
        c = cond_dim + time_dim
        dims = [action_dim, *down_dims]
        levels = list(zip(dims[:-1], dims[1:], strict=True))
        self.down = nn.ModuleList(nn.ModuleList([
            CondResBlock1d(i, o, c, kernel, groups), CondResBlock1d(o, o, c, kernel, groups),
            nn.Conv1d(o, o, 3, stride=2, padding=1) if n < len(levels) - 1 else nn.Identity()])
            for n, (i, o) in enumerate(levels))
        self.mid = nn.ModuleList([CondResBlock1d(dims[-1], dims[-1], c, kernel, groups) for _ in range(2)])
        self.up = nn.ModuleList(nn.ModuleList([
            CondResBlock1d(2 * o, i, c, kernel, groups), CondResBlock1d(i, i, c, kernel, groups),
            nn.ConvTranspose1d(i, i, 4, stride=2, padding=1)]) for i, o in reversed(levels[1:]))
        self.final = nn.Sequential(Conv1dBlock(down_dims[0], down_dims[0], kernel, groups),
                                   nn.Conv1d(down_dims[0], action_dim, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        c = torch.cat([cond, self.time(t)], dim=-1)
        h, skips = x.transpose(1, 2), []  # [B, A, H]: channels are action dims, length is the chunk
        for res1, res2, downsample in self.down:
            h = res2(res1(h, c), c)
            skips.append(h)
            h = downsample(h)
        for res in self.mid:
            h = res(h, c)
        for res1, res2, upsample in self.up:
            h = upsample(res2(res1(torch.cat([h, skips.pop()], dim=1), c), c))
        return self.final(h).transpose(1, 2)


def make_denoiser(backbone: str, horizon: int, action_dim: int, cond_dim: int, config) -> nn.Module:
    """The denoiser a generative policy's config asks for: `backbone="mlp"` (default) or `"unet"`."""
    if backbone == "mlp":
        return MLPDenoiser(horizon, action_dim, cond_dim, config.hidden, config.layers, config.time_dim, config.cond,
                           config.activation)
    if backbone == "unet":
        return UNet1dDenoiser(horizon, action_dim, cond_dim, tuple(config.down_dims), config.kernel_size,
                              config.n_groups, config.time_dim)
    raise ValueError(f"backbone must be 'mlp' or 'unet', got {backbone!r}")


class EMA(nn.Module):
    """An exponential moving average of a model's weights, used for evaluation (Diffusion Policy's EMA).

    decay(step) = min(max_decay, 1 - (1 + step / inv_gamma) ** -power): 0 at the first update (a copy),
    0.99 after ~450 updates, 0.999 after ~10k, so short CPU runs are not dragged back to the initial
    weights as a fixed decay would. `power=0` gives a fixed decay of `max_decay`. The copy is a
    submodule, so it is in the policy's state_dict and every checkpoint carries it.
    """

    def __init__(self, model: nn.Module, power: float = 0.75, max_decay: float = 0.9999, inv_gamma: float = 1.0):
        super().__init__()
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.power, self.max_decay, self.inv_gamma = power, max_decay, inv_gamma
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def decay(self) -> float:
        if self.power <= 0:
            return self.max_decay
        return min(self.max_decay, max(0.0, 1 - (1 + int(self.step) / self.inv_gamma) ** -self.power))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.decay()
        ema, live = list(self.model.parameters()), list(model.parameters())
        if len(ema) != len(live):
            raise ValueError(f"EMA copy has {len(ema)} parameters, the model {len(live)}: not the same network")
        # frozen parameters (a pretrained image encoder) never move: nothing to average
        moving = [(e, p.detach()) for e, p in zip(ema, live, strict=True) if p.requires_grad]
        if moving:  # one fused call: a Python loop of lerp_ cost ~1 ms a step
            torch._foreach_lerp_([e for e, _ in moving], [p for _, p in moving], 1 - d)
        for e, b in zip(self.model.buffers(), model.buffers(), strict=True):
            e.copy_(b)
        self.step += 1
