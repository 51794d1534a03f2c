"""RL finetuning of pretrained policies: the shared off-policy core, written once.

    agent.py     the agent contract every method implements (step, counters, eval_policy, training
                 state; registered by its `method` name) and `train(agent, ...)`, the one driver
    buffer.py    ReplayBuffer (preallocated torch ring, dict observations) and RLPD's MixedSampler
    returns.py   n-step and chunk-level returns with their bootstrap discounts, and GAE
    critics.py   LayerNorm Q ensembles, min-of-random-pair and mean - rho*std targets, Polyak updates
    actor.py     tanh-Gaussian actor (noise policy, residual, edit policy) and SAC's temperature
    wrappers.py  ChunkWrapper: one agent action = one action chunk executed open-loop

    loop.py      OffPolicyAgent (one agent step: warm-up or policy interaction, then UTD updates) and
                 PolicyChunkEnv (a chunked policy's env view)
    interventions.py  Takeover: an expert finishing a failing rollout (RECAP's corrections)
    best_of_n.py BestOfN: sample N chunks from any generative policy, execute the critic's argmax

Methods, one per file:
    dsrl.py      DSRL: SAC on a frozen diffusion/flow policy's initial noise (and DSRL-NA)
    residual.py  ResFiT: a TD3 residual on every action of a frozen chunked policy, RLPD demo mixing
    expo.py      EXPO: an edit policy plus on-the-fly best-of-N by Q, for acting and the TD target
    dppo.py      DPPO: PPO through the denoising chain, min-std floor, denoising discount
    recap.py     RECAP: a distributional value, binarised advantages, an advantage-conditioned flow
                 policy with classifier-free guidance, rounds with expert interventions

Every method shares one TD target: y = reward + discount * Q̄(next_obs, a'), where the buffer's
`reward` is the n-step/chunk return and `discount` = gamma**steps * (1 - terminated).
"""

from labkit.rl.actor import TanhGaussianActor, Temperature
from labkit.rl.agent import RL_EVAL_SEED, Agent, train
from labkit.rl.best_of_n import BestOfN, best_of, collect_chunks, dataset_chunks, fit_chunk_critic
from labkit.rl.buffer import MixedSampler, ReplayBuffer, concat_batches, flatten_obs, transition_fields
from labkit.rl.critics import (
    EnsembleLinear,
    QEnsemble,
    mean_minus_std,
    min_of_random_subset,
    polyak_update,
    target_copy,
)
from labkit.rl.dppo import DPPO, DPPOConfig, DPPOPolicy
from labkit.rl.dsrl import DSRL, DSRLConfig, NoiseSpaceEnv, SteeredPolicy
from labkit.rl.expo import EXPO, EXPOConfig
from labkit.rl.loop import ChunkRuntime, OffPolicyAgent, PolicyChunkEnv
from labkit.rl.ogpo import OGPO, OGPOConfig  # noqa: F401  (OGPO: the whole chain by group-relative PPO on a TD critic)
from labkit.rl.qam import QAM, QAMConfig  # noqa: F401  (QAM: a flow policy finetuned by adjoint matching)
from labkit.rl.recap import RECAP, AdvantageFlowPolicy, RECAPConfig, guidance_sweep
from labkit.rl.residual import ResidualConfig, ResidualPolicy, ResidualRL
from labkit.rl.returns import NStep, chunk_discount, chunk_return, gae, nstep_batch, nstep_returns
from labkit.rl.rlt import RLT, RLTConfig, RLToken  # noqa: F401  (RLT: an RL token + an anchored chunk actor-critic)
from labkit.rl.tql import TQL, TQLConfig, TransformerQ  # noqa: F401  (TQL: a Q-transformer, attention-entropy control)
from labkit.rl.wrappers import ChunkWrapper

__all__ = [
    "Agent", "RL_EVAL_SEED", "train",
    "DSRL", "DSRLConfig", "NoiseSpaceEnv", "SteeredPolicy", "DPPO", "DPPOConfig", "DPPOPolicy", "EXPO", "EXPOConfig",
    "RECAP", "RECAPConfig", "AdvantageFlowPolicy", "guidance_sweep", "ResidualConfig", "ResidualPolicy", "ResidualRL",
    "BestOfN", "best_of", "collect_chunks", "dataset_chunks", "fit_chunk_critic",
    "ChunkRuntime", "OffPolicyAgent", "PolicyChunkEnv",
    "ChunkWrapper", "EnsembleLinear", "MixedSampler", "NStep", "QEnsemble", "ReplayBuffer", "TanhGaussianActor",
    "Temperature", "chunk_discount", "chunk_return", "concat_batches", "flatten_obs", "mean_minus_std",
    "min_of_random_subset", "gae", "nstep_batch", "nstep_returns", "polyak_update", "target_copy", "transition_fields",
]
