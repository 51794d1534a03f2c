"""Posterior behavior cloning (PostBC; Wagenmaker, Dong, Tsao, Finn, Levine, 2025).

BC fits the actions the demonstrator took: a point estimate, so where demonstrations are few it puts
almost no probability on actions the demonstrator might well have taken, and RL finetuning can never
sample them. PostBC clones the *posterior* of the demonstrator's behaviour instead: wide where the
data are thin, BC where they are dense.

Tabular (firm): with counts N(s, a) and a uniform Dirichlet prior the posterior predictive is
add-one smoothing, and the pretrained policy mixes it with BC:
    pi_BC(a|s) = N(s,a) / N(s),   pi_post(a|s) = (N(s,a) + 1) / (N(s) + |A|),
    pi_PT = (1 - alpha) pi_BC + alpha pi_post.

Continuous (a reconstruction, see ../shared/reference/algorithms.md §1; its knobs are measured in
lesson 03): K regressors trained on bootstrap resamples of the demonstrations (whole episodes) give a
per-state spread sigma(s) of the predicted action chunk; a diffusion or flow policy is then trained
on targets a + beta * sigma(s) * eps, eps ~ N(0, I), for a fraction alpha of the samples, clean targets
for the rest. Only supervised learning, and the noise is state-dependent: large where the ensemble
disagrees (few or conflicting demonstrations), near zero where the data pin the action down.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from labkit.policies.bc import BCConfig, BCPolicy
from labkit.policies.diffusion import DiffusionConfig, DiffusionPolicy
from labkit.policies.flow import FlowConfig, FlowPolicy
from labkit.training import minibatch_fit


# ---- tabular ------------------------------------------------------------------------------------
def tabular_bc(counts: np.ndarray) -> np.ndarray:
    """pi_BC(a|s) from visit counts [S, A]; uniform in states never visited."""
    counts = np.asarray(counts, float)
    n = counts.sum(1, keepdims=True)
    return np.where(n > 0, counts / np.maximum(n, 1), 1.0 / counts.shape[1])


def tabular_posterior(counts: np.ndarray, prior: float = 1.0) -> np.ndarray:
    """Posterior predictive under a symmetric Dirichlet(prior) on pi(.|s): (N(s,a) + prior) / (N(s) + A prior)."""
    counts = np.asarray(counts, float)
    return (counts + prior) / (counts.sum(1, keepdims=True) + prior * counts.shape[1])


def tabular_postbc(counts: np.ndarray, alpha: float = 0.5, prior: float = 1.0) -> np.ndarray:
    """The PostBC pretrained policy: (1 - alpha) pi_BC + alpha pi_post."""
    return (1 - alpha) * tabular_bc(counts) + alpha * tabular_posterior(counts, prior)


# ---- continuous ---------------------------------------------------------------------------------
def ensemble_spread(template, tensors: dict, size: int = 5, steps: int = 1000, batch_size: int = 256,
                    hidden: int = 256, layers: int = 3, seed: int = 0) -> torch.Tensor:
    """Per-window std [N, H, A] (physical action units) of `size` BC regressors, each trained on a
    bootstrap resample of the episodes in `tensors` (from `window_tensors`, with its "episode" key).

    The members share `template`'s observation keys, chunking, shapes and normaliser. A plain loop
    (`labkit.training.minibatch_fit`: AdamW, cosine schedule), not Lightning: these are small
    auxiliary models and the loop is the whole of their training.
    """
    c = template.config
    episodes = tensors["episode"]
    ids, inverse = torch.unique(episodes, return_inverse=True)
    gen = torch.Generator().manual_seed(seed)
    preds = []
    for k in range(size):
        # Bootstrap over demonstrations: each episode drawn a multinomial number of times, and its
        # windows sampled in proportion, so a resample can miss a mode that few demos show.
        times = torch.bincount(torch.randint(0, len(ids), (len(ids),), generator=gen), minlength=len(ids))
        weight = times[inverse].float()
        torch.manual_seed(seed + 1 + k)
        cfg = BCConfig(obs_keys=c.obs_keys, obs_horizon=c.obs_horizon, horizon=c.horizon,
                       n_action_steps=c.n_action_steps, hidden=hidden, layers=layers)
        member = BCPolicy(cfg, template.shapes, template.stats, template.data_env)

        def loss(idx, member=member):
            obs = member.normalize_obs({key: v[idx] for key, v in tensors["obs"].items()})
            action = member.normalizer.normalize("action", tensors["action"][idx])
            return member.loss(obs, action, tensors["action_is_pad"][idx])

        minibatch_fit(member, loss, steps=steps, batch_size=batch_size, lr=1e-3, optimizer="adamw",
                      weight_decay=1e-6, schedule="cosine", weights=weight, generator=gen)
        with torch.no_grad():
            preds.append(torch.cat([member.predict_action_chunk({key: v[i:i + 4096] for key, v in tensors["obs"].items()})
                                    for i in range(0, len(episodes), 4096)]))
    return torch.stack(preds).std(0)


def posterior_targets(action: torch.Tensor, std: torch.Tensor, alpha: float, beta: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """PostBC's training targets for chunks `action` [B, H, A] with the ensemble's spread `std` [B, H, A]:
    action + beta * std * eps (eps ~ N(0, I)) for each sample with probability alpha (one coin per sample),
    the action unchanged for the others; `generator` makes both draws (None: torch's global one)."""
    noisy = (torch.rand(len(action), 1, 1, device=action.device, generator=generator) < alpha).float()
    eps = torch.randn(action.shape, device=action.device, dtype=action.dtype, generator=generator)
    return action + noisy * beta * std * eps


@dataclass
class PosteriorFields:
    """PostBC's knobs, shared by its diffusion and flow variants."""

    ensemble_size: int = 5  # K bootstrap regressors
    ensemble_steps: int = 1000  # gradient steps per regressor
    alpha: float = 0.5  # fraction of training targets that get posterior noise
    beta: float = 1.0  # noise scale, in units of the ensemble's std

    def __post_init__(self):
        super().__post_init__()
        if self.ensemble_size < 2:
            raise ValueError(f"ensemble_size must be >= 2 (a spread needs two members), got {self.ensemble_size}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha is a probability, got {self.alpha}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")


class PosteriorTargets:
    """Mixin for a generative policy: fit the ensemble before training, then noise the targets."""

    posterior_std: torch.Tensor | None = None  # [N, H, A], set by prepare_training (not checkpointed)
    # What a lesson hands in: its own `posterior_targets` (same arguments), which training then noises with.
    targets_fn = None

    @classmethod
    def from_dataset(cls, dataset, env: dict | None = None, targets_fn=None, **config):
        """The policy's `from_dataset`, training on a lesson's `targets_fn` when one is given."""
        policy = super().from_dataset(dataset, env, **config)
        policy.targets_fn = targets_fn
        return policy

    def prepare_training(self, tensors: dict, dataset) -> dict:
        """Fit the ensemble, unless `posterior_std` was already set for these windows (so a sweep
        over alpha and beta reuses one ensemble)."""
        c, n = self.config, len(tensors["action"])
        if self.posterior_std is not None and tuple(self.posterior_std.shape) != tuple(tensors["action"].shape):
            raise ValueError(f"posterior_std has shape {tuple(self.posterior_std.shape)} but the dataset has "
                             f"{n} windows of shape {tuple(tensors['action'].shape[1:])}; fit it on this dataset")
        if self.posterior_std is None:
            self.posterior_std = ensemble_spread(self, tensors, c.ensemble_size, c.ensemble_steps)
        return {**tensors, "posterior_std": self.posterior_std}

    def training_step(self, batch, batch_idx):
        c = self.config
        action = (self.targets_fn or posterior_targets)(batch["action"], batch["posterior_std"], c.alpha, c.beta, None)
        return super().training_step({**batch, "action": action}, batch_idx)


@dataclass
class PostBCFlowConfig(PosteriorFields, FlowConfig):
    pass


@dataclass
class PostBCDiffusionConfig(PosteriorFields, DiffusionConfig):
    pass


class PostBCFlowPolicy(PosteriorTargets, FlowPolicy):
    """A flow-matching policy trained on posterior-noised targets."""

    config_class = PostBCFlowConfig


class PostBCDiffusionPolicy(PosteriorTargets, DiffusionPolicy):
    """A diffusion policy trained on posterior-noised targets."""

    config_class = PostBCDiffusionConfig
