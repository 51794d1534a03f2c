"""Learned reward models (RoboReward-style success and progress judges, Bradley-Terry preferences).

    augment.py     replay episodes to trajectories; temporal clipping and counterfactual relabelling
    classifier.py  RewardModel: success classifier / progress regressor, from state or pixels; fit_reward
    preference.py  PreferenceReward: Bradley-Terry on pairs of trajectories
    metrics.py     accuracy, AUROC (ties count 1/2), reliability diagram and ECE, rank correlation
    wrapper.py     LearnedReward: a gymnasium wrapper, so any labkit.rl method trains on a learned reward
    verifier.py    ChunkVerifier: CoVer-style contrastive scorer of (observation, action chunk) for best-of-N
"""

from labkit.rewards.augment import (
    KINDS,
    TARGET_DIMS,
    Trajectory,
    concat,
    counterfactuals,
    make_examples,
    real_examples,
    replay_episodes,
    split_episodes,
    temporal_clips,
)
from labkit.rewards.classifier import RewardConfig, RewardModel, fit_module, fit_reward, load_reward
from labkit.rewards.metrics import accuracy, auroc, classification_report, ece, rank_correlation, reliability
from labkit.rewards.preference import PreferenceReward, bradley_terry_loss, fit_preference, preference_pairs
from labkit.rewards.verifier import ChunkVerifier, VerifierConfig, fit_verifier, info_nce, perturb_chunks
from labkit.rewards.wrapper import LearnedReward

__all__ = [
    "KINDS", "TARGET_DIMS", "Trajectory", "concat", "counterfactuals", "make_examples", "real_examples",
    "replay_episodes", "split_episodes", "temporal_clips",
    "RewardConfig", "RewardModel", "fit_module", "fit_reward", "load_reward",
    "accuracy", "auroc", "classification_report", "ece", "rank_correlation", "reliability",
    "PreferenceReward", "bradley_terry_loss", "fit_preference", "preference_pairs",
    "LearnedReward",
    "ChunkVerifier", "VerifierConfig", "fit_verifier", "info_nce", "perturb_chunks",
]
