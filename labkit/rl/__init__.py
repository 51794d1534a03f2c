"""RL finetuning of pretrained policies: the shared off-policy core, written once.

    buffer.py    ReplayBuffer (preallocated torch ring, dict observations) and RLPD's MixedSampler
    returns.py   n-step and chunk-level returns with their bootstrap discounts
    critics.py   LayerNorm Q ensembles, min-of-random-pair and mean - rho*std targets, Polyak updates
    actor.py     tanh-Gaussian actor (noise policy, residual, edit policy) and SAC's temperature
    wrappers.py  ChunkWrapper: one agent action = one action chunk executed open-loop

Methods, one per file:
    dsrl.py      DSRL: SAC on a frozen diffusion/flow policy's initial noise (and DSRL-NA)

Every method shares one TD target: y = reward + discount * Q̄(next_obs, a'), where the buffer's
`reward` is the n-step/chunk return and `discount` = gamma**steps * (1 - terminated).
"""

from labkit.rl.actor import TanhGaussianActor, Temperature
from labkit.rl.buffer import MixedSampler, ReplayBuffer, concat_batches, flatten_obs, transition_fields
from labkit.rl.critics import (
    EnsembleLinear,
    QEnsemble,
    mean_minus_std,
    min_of_random_subset,
    polyak_update,
    target_copy,
)
from labkit.rl.dsrl import DSRL, DSRLConfig, NoiseSpaceEnv, SteeredPolicy
from labkit.rl.returns import NStep, chunk_discount, chunk_return, nstep_batch, nstep_returns
from labkit.rl.wrappers import ChunkWrapper

__all__ = [
    "DSRL", "DSRLConfig", "NoiseSpaceEnv", "SteeredPolicy",
    "ChunkWrapper", "EnsembleLinear", "MixedSampler", "NStep", "QEnsemble", "ReplayBuffer", "TanhGaussianActor",
    "Temperature", "chunk_discount", "chunk_return", "concat_batches", "flatten_obs", "mean_minus_std",
    "min_of_random_subset", "nstep_batch", "nstep_returns", "polyak_update", "target_copy", "transition_fields",
]
