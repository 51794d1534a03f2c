"""A contrastive action verifier (CoVer in miniature): score (observation, action chunk) pairs, then run
the best of N sampled chunks.

CoVer (Kwok et al. 2026) trains a CLIP-style verifier: an observation encoder g and an action encoder h,
    e_x = g(x) / |g(x)|,   e_a = h(a) / |h(a)|,   s(x, a) = exp(logit_scale) * cos(e_x, e_a),
with InfoNCE over a batch of demonstrated pairs (x_i, a_i), hard negatives joining the denominator:
    L = 1/2 [ -log  e^{s(x_i, a_i)} / (sum_j e^{s(x_i, a_j)} + sum_k e^{s(x_i, a_ik^-)})
              -log  e^{s(x_i, a_i)} / sum_j e^{s(x_j, a_i)} ]
At test time a generative policy proposes N chunks and the one with the highest s(x, a) runs.

Conventions are labkit.rl.best_of_n's chunk-critic ones (x = the policy's normalised observation
history, flattened; a = the executed part of the normalised chunk), and `ChunkVerifier(x, a)` returns
[1, B], an "ensemble of one", so `BestOfN(policy, verifier, n)` runs it with no new loop.
Hard negatives here: perturbed demo chunks (`perturb_chunks`) and the chunks during which base-policy
rollouts failed (`failed_chunks`), each attached to the demonstration state nearest to where it ran.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from labkit.nn import mlp
from labkit.rl.best_of_n import critic_action, critic_obs
from labkit.training import minibatch_fit

PERTURBATIONS = ("noise", "shift", "mirror", "speed")


@dataclass
class VerifierConfig:
    """Network and training settings of a contrastive chunk verifier."""

    embed_dim: int = 64
    hidden: int = 256
    layers: int = 2
    steps: int = 1500
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    logit_scale_init: float = math.log(1 / 0.07)  # CLIP's (and CoVer's) initial temperature 0.07
    max_logit_scale: float = math.log(100.0)  # CLIP's clamp, so the softmax cannot saturate
    perturbations: tuple[str, ...] = PERTURBATIONS  # () for plain in-batch InfoNCE
    negatives: int = 4  # perturbed hard negatives per anchor
    noise: float = 0.3  # "noise": Gaussian std, as a fraction of each action dim's half range
    mirror_dim: int = 0  # "mirror": the action dim negated (Detour: x velocity, left <-> right)
    failed_fraction: float = 0.25  # share of each batch anchored at a failed chunk (if any are given)
    seed: int = 0

    def __post_init__(self):
        self.perturbations = tuple(self.perturbations)
        unknown = set(self.perturbations) - set(PERTURBATIONS)
        if unknown:
            raise ValueError(f"unknown perturbations {sorted(unknown)}; choose from {PERTURBATIONS}")
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError(f"need steps >= 1 and batch_size >= 2, got {self.steps}, {self.batch_size}")
        if not 0 <= self.failed_fraction < 1:
            raise ValueError(f"failed_fraction must lie in [0, 1), got {self.failed_fraction}")


# ---- the score and the loss -----------------------------------------------------------------------------


def cosine_score(e_x: torch.Tensor, e_a: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """s = exp(logit_scale) * cos(e_x, e_a) over the last dim (broadcasts: [B, d] x [B, K, d] needs e_x[:, None])."""
    return torch.as_tensor(logit_scale).exp() * F.cosine_similarity(e_x, e_a, dim=-1)


def info_nce(e_x: torch.Tensor, e_a: torch.Tensor, logit_scale: torch.Tensor, hard: torch.Tensor | None = None,
             hard_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE of matched embeddings e_x, e_a [B, d] (pair i is the positive of row and column
    i), with hard negative action embeddings `hard` [B, K, d] added to row i's denominator only
    (`hard_mask` [B, K], False = slot unused)."""
    if e_x.shape != e_a.shape or e_x.dim() != 2:
        raise ValueError(f"e_x and e_a must both be [B, d], got {tuple(e_x.shape)} and {tuple(e_a.shape)}")
    scale = logit_scale.exp()
    e_x, e_a = F.normalize(e_x, dim=-1), F.normalize(e_a, dim=-1)
    logits = scale * e_x @ e_a.T  # [B, B]: row i = observation i against every action
    target = torch.arange(len(e_x), device=e_x.device)
    rows = logits
    if hard is not None:
        if hard.dim() != 3 or hard.shape[0] != len(e_x) or hard.shape[2] != e_x.shape[1]:
            raise ValueError(f"hard negatives must be [B, K, d] = [{len(e_x)}, K, {e_x.shape[1]}], got {tuple(hard.shape)}")
        extra = scale * (e_x[:, None] * F.normalize(hard, dim=-1)).sum(-1)  # [B, K]
        if hard_mask is not None:
            extra = extra.masked_fill(~hard_mask, float("-inf"))
        rows = torch.cat([logits, extra], 1)
    return 0.5 * (F.cross_entropy(rows, target) + F.cross_entropy(logits.T, target))


# ---- the verifier ---------------------------------------------------------------------------------------


class ChunkVerifier(nn.Module):
    """e_x = g(x), e_a = h(a) (MLPs), s(x, a) = exp(logit_scale) cos(e_x, e_a). forward -> [1, B]."""

    def __init__(self, obs_dim: int, action_dim: int, config: VerifierConfig | None = None):
        super().__init__()
        self.config = c = config or VerifierConfig()
        self.obs_dim, self.action_dim = obs_dim, action_dim
        self.g = mlp(obs_dim, c.embed_dim, c.hidden, c.layers)
        self.h = mlp(action_dim, c.embed_dim, c.hidden, c.layers)
        self.logit_scale = nn.Parameter(torch.tensor(float(c.logit_scale_init)))

    def _check(self, x: torch.Tensor, a: torch.Tensor) -> None:
        if x.shape[-1] != self.obs_dim or a.shape[-1] != self.action_dim:
            raise ValueError(f"verifier expects x [..., {self.obs_dim}] and a [..., {self.action_dim}] (executed part "
                             f"of a normalised chunk, flattened), got {tuple(x.shape)} and {tuple(a.shape)}")

    def clamp_(self) -> None:
        """Keep logit_scale <= max_logit_scale (CLIP clamps it after each step)."""
        with torch.no_grad():
            self.logit_scale.clamp_(max=self.config.max_logit_scale)

    def score(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """s(x, a) [B] for observations x [B, D] and executed chunks a [B, d]."""
        self._check(x, a)
        return cosine_score(self.g(x), self.h(a), self.logit_scale)

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """[1, B]: the critic convention of labkit.rl.best_of_n (an ensemble of one member)."""
        return self.score(x, a)[None]


# ---- negatives ------------------------------------------------------------------------------------------


def shift_chunks(chunks: torch.Tensor, shift: torch.Tensor | int) -> torch.Tensor:
    """Each chunk [B, H, A] started `shift` steps later (int or [B]), its last action repeated to keep length H:
    out[b, t] = chunks[b, min(t + shift_b, H - 1)]."""
    B, H, A = chunks.shape
    s = torch.as_tensor(shift).long().reshape(-1, 1).expand(B, 1)
    idx = (torch.arange(H)[None] + s).clamp(min=0, max=H - 1)  # [B, H]
    return torch.gather(chunks, 1, idx[..., None].expand(B, H, A))


def perturb_chunks(chunks: torch.Tensor, kind: str, generator: torch.Generator | None = None,
                   noise: float = 0.3, mirror_dim: int = 0) -> torch.Tensor:
    """Perturbed copies of normalised chunks [B, H, A] (min-max units, [-1, 1]), as hard negatives:
    "noise"  + N(0, noise^2) per step and dim;
    "shift"  the chunk started s ~ U{1..H/2} steps later (its last action repeated): moves made too early;
    "mirror" dim `mirror_dim` negated: for symmetric ranges (Detour's velocity) the other way round;
    "speed"  scaled about the range centre by a factor in [0.3, 0.6] or [1.5, 2], clipped to [-1, 1]."""
    if chunks.dim() != 3:
        raise ValueError(f"chunks must be [B, H, A], got {tuple(chunks.shape)}")
    B, H, A = chunks.shape
    if kind == "noise":
        return chunks + noise * torch.randn(chunks.shape, generator=generator)
    if kind == "shift":
        return shift_chunks(chunks, torch.randint(1, max(2, H // 2 + 1), (B,), generator=generator))
    if kind == "mirror":
        if not 0 <= mirror_dim < A:
            raise ValueError(f"mirror_dim {mirror_dim} is not an action dim (A = {A})")
        out = chunks.clone()
        out[..., mirror_dim] = -out[..., mirror_dim]
        return out
    if kind == "speed":
        slow = 0.3 + 0.3 * torch.rand(B, 1, 1, generator=generator)
        fast = 1.5 + 0.5 * torch.rand(B, 1, 1, generator=generator)
        factor = torch.where(torch.rand(B, 1, 1, generator=generator) < 0.5, slow, fast)
        return (chunks * factor).clamp(-1, 1)
    raise ValueError(f"unknown perturbation {kind!r}; choose from {PERTURBATIONS}")


def random_perturbations(chunks: torch.Tensor, k: int, kinds: tuple[str, ...], generator: torch.Generator | None = None,
                         noise: float = 0.3, mirror_dim: int = 0) -> torch.Tensor:
    """k perturbed copies per chunk, each of a kind drawn at random from `kinds`: [B, k, H, A]."""
    if not kinds:
        raise ValueError("no perturbation kinds given")
    out = torch.stack([perturb_chunks(chunks, kd, generator, noise, mirror_dim) for kd in kinds], 1)  # [B, K, H, A]
    pick = torch.randint(0, len(kinds), (len(chunks), k), generator=generator)
    return out[torch.arange(len(chunks))[:, None], pick]


def failed_chunks(data: dict, last: int = 1) -> dict:
    """The chunks during which rollouts failed, from `labkit.rl.best_of_n.collect_chunks` data: the
    terminal chunk of every episode that ended without success (discount 0 and return 0 under sparse
    rewards), plus the `last - 1` chunks before it. Returns {"obs": {key: [M, To, ...]}, "chunk": [M, H*A]}."""
    for key in ("obs", "chunk", "discount", "return"):
        if key not in data:
            raise KeyError(f"data lacks {key!r}; pass what labkit.rl.best_of_n.collect_chunks returns")
    end = (data["discount"] == 0) & (data["return"] == 0)
    idx = torch.nonzero(end).flatten()
    idx = torch.unique(torch.cat([(idx - j).clamp(min=0) for j in range(last)])) if len(idx) else idx
    # Keep only failed-episode chunks (a predecessor could belong to an earlier, successful episode).
    idx = idx[data["return"][idx] == 0]
    return {"obs": {k: v[idx] for k, v in data["obs"].items()}, "chunk": data["chunk"][idx]}


# ---- data and training ----------------------------------------------------------------------------------


def verifier_data(policy, dataset) -> dict:
    """Demonstrated pairs in the policy's convention: {"x": [N, D], "chunk": [N, H, A] normalised,
    "episode": [N]} (one pair per frame; x = critic_obs of the normalised observation history)."""
    c = policy.config
    w = dataset.windows(obs_horizon=c.obs_horizon, horizon=c.horizon, keys=c.obs_keys)
    obs = {k: torch.as_tensor(v).float() for k, v in w["obs"].items()}
    x = critic_obs(policy, policy.normalize_obs(obs))
    chunk = policy.normalizer.normalize("action", torch.as_tensor(w["action"]).float())
    return {"x": x, "chunk": chunk, "episode": torch.as_tensor(dataset.frames["episode_index"][w["index"]]).long()}


def verifier_loss(verifier: ChunkVerifier, x: torch.Tensor, a: torch.Tensor, hard: torch.Tensor | None = None,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """The training loss of one batch: embed observations x [B, D] with g, executed chunks a [B, d] and
    hard negatives `hard` [B, K, d] (or None) with h, and take `info_nce` (mask [B, K], False = unused)."""
    e_x, e_a = verifier.g(x), verifier.h(a)
    e_hard = None if hard is None else verifier.h(hard.flatten(0, 1)).view(len(x), hard.shape[1], -1)
    return info_nce(e_x, e_a, verifier.logit_scale, e_hard, mask)


def fit_verifier(policy, dataset, config: VerifierConfig | None = None, failed: dict | None = None,
                 training_step=None) -> tuple[ChunkVerifier, list[float]]:
    """Train a ChunkVerifier on `dataset`'s demonstrated (x, chunk) pairs in `policy`'s convention.

    Each step: a batch of demo anchors, in-batch negatives, `negatives` perturbed copies of each
    anchor's chunk, and (when `failed`, from `failed_chunks`, is given) a `failed_fraction` of anchors
    chosen as the demo state nearest to a failed chunk's, that chunk joining their denominator.
    `training_step(verifier, x, a, hard, mask) -> loss` (what a lesson hands in) replaces `verifier_loss`.
    Returns (verifier in eval mode, loss per step)."""
    c = config or VerifierConfig()
    E = policy.config.n_action_steps
    demo = verifier_data(policy, dataset)
    x, chunks = demo["x"], demo["chunk"]
    torch.manual_seed(c.seed)
    gen = torch.Generator().manual_seed(c.seed)
    verifier = ChunkVerifier(x.shape[1], E * chunks.shape[2], c)

    n_failed = 0
    if failed is not None and len(failed["chunk"]):
        fx = critic_obs(policy, policy.normalize_obs(failed["obs"]))
        fa = critic_action(failed["chunk"].view(len(fx), -1, chunks.shape[2]), E)
        anchor = torch.cdist(fx, x).argmin(1)  # the nearest demonstrated state to each failure
        n_failed = int(round(c.failed_fraction * c.batch_size))
    n_demo = c.batch_size - n_failed
    k = c.negatives if c.perturbations else 0
    step = training_step or verifier_loss

    def loss_fn(idx):  # n_demo demo anchors, then the failed chunks' anchors and the negatives (drawn from gen)
        slots, masks = [], []
        if n_failed:
            f = torch.randint(0, len(fa), (n_failed,), generator=gen)
            idx = torch.cat([idx, anchor[f]])
            fail_neg = torch.cat([torch.zeros(n_demo, fa.shape[1]), fa[f]])[:, None]  # [B, 1, d]
            slots.append(fail_neg)
            masks.append(torch.arange(len(idx))[:, None] >= n_demo)
        if k:
            pert = random_perturbations(chunks[idx], k, c.perturbations, gen, c.noise, c.mirror_dim)
            slots.append(critic_action(pert, E))
            masks.append(torch.ones(len(idx), k, dtype=torch.bool))
        hard = torch.cat(slots, 1) if slots else None  # [B, K, d] executed chunks
        mask = torch.cat(masks, 1) if slots else None
        return step(verifier, x[idx], critic_action(chunks[idx], E), hard, mask)

    losses = minibatch_fit(verifier, loss_fn, len(x), c.steps, n_demo, c.lr, optimizer="adamw",
                           weight_decay=c.weight_decay, generator=gen, after_step=lambda *_: verifier.clamp_())
    return verifier, losses.tolist()


@torch.no_grad()
def ranking_accuracy(verifier: ChunkVerifier, x: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor
                     ) -> float:
    """Fraction of observations x [B, D] at which s(x, positive) > s(x, negative) (executed chunks [B, d])."""
    return float((verifier.score(x, positive) > verifier.score(x, negative)).float().mean())
