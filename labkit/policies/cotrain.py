"""Co-training on two bodies: robot demonstrations and (cheap) human demonstrations in one policy.

The human's demonstrations come in its own observation frame and its own action space, and the map
to the robot's is not given. So the policy shares what can be shared and keeps apart what cannot
(per-embodiment heads, as in cross-embodiment policies such as Octo or CrossFormer):

    z = trunk([state (own frame, normalised with its own body's stats), embodiment one-hot]),
        every layer FiLM-modulated by (instruction code, embodiment one-hot)
    chunk_e = head_e(z)                   one action head per body, in its own action units
    loss = mean over the mixed batch of the masked MSE of each window's own head

Every training step draws a batch mixed from the sources with fixed weights (`mix_batch`): the
weights, not the dataset sizes, set each body's share of the gradient. The instruction's code at the
end of the state is never normalised (`code_dims`): a task one body never did must still read as itself.
At run time the policy is the robot's (its `deploy` head): `fit` and `evaluate` treat it as any labkit
policy, and a plain single-source batch is a batch of the deploy body.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from labkit.data import Normalizer
from labkit.policies.base import Policy, PolicyConfig, dataset_env
from labkit.policies.train import window_tensors
from labkit.training import _index, global_rank, train_module


class MixingError(ValueError):
    """Mixing weights that cannot define a batch: negative, not summing to 1, or naming no source."""


# ---- the batch mixing (the lesson's exercise) -------------------------------------------------------
def batch_counts(weights: dict[str, float], batch_size: int) -> dict[str, int]:
    """How many of `batch_size` windows each source gets: floor(w * B) each, then the leftover windows
    one by one to the largest remainders (ties: the earlier source). The counts sum to B exactly."""
    if not weights:
        raise MixingError("weights name no source; give e.g. {'robot': 0.5, 'human': 0.5}")
    bad = {k: w for k, w in weights.items() if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0)}
    if bad:
        raise MixingError(f"mixing weights must be finite and >= 0, got {bad}")
    if abs(sum(weights.values()) - 1.0) > 1e-6:
        raise MixingError(f"mixing weights must sum to 1, got {sum(weights.values()):g} ({weights})")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    raw = {k: w * batch_size for k, w in weights.items()}
    counts = {k: int(math.floor(r)) for k, r in raw.items()}
    order = sorted(weights, key=lambda k: -(raw[k] - counts[k]))  # stable: ties keep the given order
    for k in order[:batch_size - sum(counts.values())]:
        counts[k] += 1
    return counts


def mix_batch(windows: dict[str, dict], weights: dict[str, float], batch_size: int,
              generator: torch.Generator) -> dict[str, dict]:
    """One co-training batch: {source: sub-batch} with `batch_counts(weights, batch_size)[source]`
    windows drawn uniformly with replacement from that source's windows (sources in the order of
    `weights`, one torch.randint(0, n_source, (count,), generator=generator) each; sources with a
    zero count are left out). `windows[source]` is a dict of tensors with a common first dimension."""
    unknown = [k for k in weights if k not in windows]
    if unknown:
        raise MixingError(f"weights name {unknown}, which are not among the sources {sorted(windows)}")
    out = {}
    for source, count in batch_counts(weights, batch_size).items():
        if count:
            n = len(windows[source]["action"])
            out[source] = _index(windows[source], torch.randint(0, n, (count,), generator=generator))
    return out


class MixedBatches:
    """`steps` batches of `mixer(windows, weights, batch_size, generator)`, for `train_module`."""

    def __init__(self, windows: dict[str, dict], weights: dict[str, float], batch_size: int, steps: int,
                 seed: int = 0, mixer=mix_batch):
        batch_counts(weights, batch_size)  # bad weights fail here, before any training
        self.windows, self.weights, self.batch_size, self.steps, self.mixer = windows, weights, batch_size, steps, mixer
        self.gen = torch.Generator().manual_seed(seed + 7919 * global_rank())

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.mixer(self.windows, self.weights, self.batch_size, self.gen)


# ---- the policy -------------------------------------------------------------------------------------
@dataclass
class CotrainConfig(PolicyConfig):
    obs_horizon: int = 1
    # Short chunks: 90% success vs 68% with H=8, run 4 (two robot tasks, 50 demos each, 2000 steps,
    # 50 evaluation episodes, one training seed).
    horizon: int = 4
    n_action_steps: int = 2
    hidden: int = 256
    layers: int = 3
    deploy: str = "robot"  # the body this policy drives at run time (the shapes and stats it is built with)
    embodiments: tuple[str, ...] = ("robot", "human")
    code_dims: int = 7  # trailing state dims left unnormalised: the instruction's code
    # The other bodies' action shapes and stats, {body: {"action_shape": [A], "stats": {...}}}: in the
    # config so that a checkpoint rebuilds every head and normaliser.
    others: dict = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        self.embodiments = tuple(self.embodiments)
        if self.obs_keys != ("observation.state",):
            raise ValueError(f"CotrainPolicy reads the state only (obs_keys=('observation.state',)), got {self.obs_keys}")
        if self.deploy not in self.embodiments:
            raise ValueError(f"deploy={self.deploy!r} is not one of embodiments={self.embodiments}")
        if self.hidden < 1 or self.layers < 1:
            raise ValueError(f"hidden and layers must be >= 1, got {self.hidden}, {self.layers}")


def _code_unnormalised(stats: dict, code_dims: int) -> dict:
    """`stats` with the state's last `code_dims` dims made identity (mean 0, std 1)."""
    stats = copy.deepcopy(stats)
    s = stats["observation.state"]
    for name, value in (("mean", 0.0), ("std", 1.0), ("min", -1.0), ("max", 1.0)):
        if name in s and code_dims:
            arr = np.asarray(s[name], np.float64).copy()
            arr[-code_dims:] = value
            s[name] = arr.tolist()
    return stats


class CotrainPolicy(Policy):
    """A shared trunk over (state, body) with one action-chunk head per body; regressed with MSE."""

    config_class = CotrainConfig

    def __init__(self, config, shapes, stats, env=None):
        if isinstance(config, dict):
            config = CotrainConfig(**config)
        super().__init__(config, shapes, _code_unnormalised(stats, config.code_dims), env)
        c = self.config
        missing = [e for e in c.embodiments if e != c.deploy and e not in c.others]
        if missing:
            raise ValueError(f"no action shape and stats for {missing}: build with CotrainPolicy.from_sources")
        self.state_dim = self.shapes["observation.state"][0]
        # The trunk: SiLU layers (Mish costs ~9x more on a CPU), each FiLM-modulated by the instruction's
        # code and the body (RT-1's conditioning): choosing "the red block" is a gating an MLP that only
        # concatenates the code learns slowly.
        sizes = [c.obs_horizon * self.state_dim + len(c.embodiments)] + [c.hidden] * c.layers
        self.trunk = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.film = nn.Linear(c.code_dims + len(c.embodiments), 2 * c.hidden * c.layers)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        dims = {e: self.action_dim if e == c.deploy else c.others[e]["action_shape"][0] for e in c.embodiments}
        self.heads = nn.ModuleDict({e: nn.Linear(c.hidden, c.horizon * a) for e, a in dims.items()})
        self.action_dims = dims
        modes = {"observation.state": "mean_std", "action": "min_max"}
        self.body_normalizers = nn.ModuleDict({
            e: Normalizer.from_stats(_code_unnormalised(c.others[e]["stats"], c.code_dims), modes)
            for e in c.embodiments if e != c.deploy})

    @classmethod
    def from_sources(cls, sources: dict, env: dict | None = None, **config) -> CotrainPolicy:
        """Build from {body: dataset}; the deploy body's dataset (default "robot") gives the policy's own
        shapes, stats and env, the others their heads' action shapes and their normalisers."""
        cfg = CotrainConfig(**config)
        if cfg.deploy not in sources:
            raise ValueError(f"sources lack the deploy body {cfg.deploy!r}; they have {sorted(sources)}")
        unknown = [k for k in sources if k not in cfg.embodiments]
        if unknown:
            raise ValueError(f"unknown embodiment(s) {unknown}; this policy has {cfg.embodiments}")
        cfg.others = {e: {"action_shape": list(ds.frames["action"].shape[1:]),
                          "stats": {k: ds.stats[k] for k in ("observation.state", "action")}}
                      for e, ds in sources.items() if e != cfg.deploy}
        for e in cfg.embodiments:
            if e != cfg.deploy and e not in cfg.others:  # a body with no data: a head all the same (robot-only runs)
                cfg.others[e] = {"action_shape": [sources[cfg.deploy].frames["action"].shape[1]],
                                 "stats": {k: sources[cfg.deploy].stats[k] for k in ("observation.state", "action")}}
        robot = sources[cfg.deploy]
        shapes = {k: list(robot.frames[k].shape[1:]) for k in ("observation.state", "action")}
        return cls(cfg, shapes, robot.stats, dataset_env(robot, env))

    def normalizer_of(self, body: str) -> Normalizer:
        return self.normalizer if body == self.config.deploy else self.body_normalizers[body]

    def chunk(self, state: torch.Tensor, body: str) -> torch.Tensor:
        """Normalised states [B, To, D] of `body` -> its head's normalised chunk [B, H, A_body]."""
        c = self.config
        onehot = torch.zeros(len(state), len(c.embodiments), device=state.device)
        onehot[:, c.embodiments.index(body)] = 1.0
        cond = torch.cat([state[:, -1, self.state_dim - c.code_dims:], onehot], 1)
        gamma, beta = self.film(cond).view(len(state), c.layers, 2, c.hidden).unbind(2)
        h = torch.cat([state.flatten(1), onehot], 1)
        for i, layer in enumerate(self.trunk):
            h = nn.functional.silu(layer(h) * (1 + gamma[:, i]) + beta[:, i])
        return self.heads[body](h).view(len(state), c.horizon, self.action_dims[body])

    def predict_normalized(self, obs):
        return self.chunk(obs["observation.state"], self.config.deploy)

    def body_loss(self, batch: dict, body: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of masked squared errors, number of unpadded steps) of one body's raw-unit sub-batch."""
        norm = self.normalizer_of(body)
        state = norm.normalize("observation.state", batch["obs"]["observation.state"].float())
        target = norm.normalize("action", batch["action"].float())
        err = (self.chunk(state, body) - target).pow(2).mean(-1)
        keep = (~batch["action_is_pad"]).float()
        return (err * keep).sum(), keep.sum()

    def batch_loss(self, batch: dict) -> torch.Tensor:
        """A mixed batch {body: sub-batch} (from `mix_batch`) or a plain batch of the deploy body: the
        mean over every unpadded step of the batch, whichever body it came from."""
        if "obs" in batch:
            batch = {self.config.deploy: batch}
        unknown = [b for b in batch if b not in self.config.embodiments]
        if unknown:
            raise ValueError(f"batch has sources {unknown}, which are not this policy's embodiments {self.config.embodiments}")
        parts = [self.body_loss(sub, body) for body, sub in batch.items()]
        return sum(p[0] for p in parts) / sum(p[1] for p in parts).clamp(min=1.0)


def cotrain(policy: CotrainPolicy, sources: dict, weights: dict[str, float], steps: int = 2000,
            batch_size: int = 256, seed: int = 0, mixer=mix_batch, progress: bool = True, **trainer_kwargs) -> CotrainPolicy:
    """Train `policy` on {body: dataset} `sources`, every batch mixed by `mixer(windows, weights,
    batch_size, generator)` (`mix_batch`, or a lesson's own). Weights {"robot": 1.0} train on the
    robot's data alone. Returns the policy in eval mode."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not callable(mixer):
        raise TypeError(f"mixer must be a function (windows, weights, batch_size, generator) -> batch, got {mixer!r}")
    batch_counts(weights, batch_size)  # bad weights fail here, before any work
    unknown = [k for k in weights if k not in sources]
    if unknown:
        raise MixingError(f"weights name {unknown}, which are not among the sources {sorted(sources)}")
    windows = {k: window_tensors(policy, ds) for k, ds in sources.items() if weights.get(k, 0) > 0}
    for w in windows.values():
        w.pop("episode")
    batches = MixedBatches(windows, {k: w for k, w in weights.items() if w > 0}, batch_size, steps, seed, mixer)
    return train_module(policy, batches, steps, seed, progress, **trainer_kwargs)


__all__ = ["CotrainConfig", "CotrainPolicy", "MixingError", "MixedBatches", "batch_counts", "mix_batch", "cotrain"]
