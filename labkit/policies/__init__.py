"""Policies: LightningModules with the runtime contract robot code expects (see `base.Policy`).

Importing this package defines (and so registers) every policy class; `load_policy` rebuilds any of them
from its checkpoint alone.
"""

from __future__ import annotations

from pathlib import Path

import torch

from labkit.policies.advantage import AdvantageFlowConfig, AdvantageFlowPolicy
from labkit.policies.base import Policy, PolicyConfig
from labkit.policies.bc import BCConfig, BCPolicy
from labkit.policies.cotrain import CotrainConfig, CotrainPolicy  # lessons 13-14: for load_policy
from labkit.policies.diffusion import DiffusionConfig, DiffusionPolicy
from labkit.policies.flow import FlowConfig, FlowPolicy
from labkit.policies.generative import GenerativeConfig, GenerativePolicy, SampleResult
from labkit.policies.memory import ShortMemoryConfig, ShortMemoryPolicy
from labkit.policies.postbc import PostBCDiffusionPolicy, PostBCFlowPolicy
from labkit.policies.tokens import FastTokenizer, TokenConfig, TokenPolicy
from labkit.policies.train import fit
from labkit.training import read_checkpoint

__all__ = ["Policy", "PolicyConfig", "load_policy", "policy_from_checkpoint", "AdvantageFlowConfig",
           "AdvantageFlowPolicy", "BCConfig", "BCPolicy", "DiffusionConfig",
           "DiffusionPolicy", "FlowConfig", "FlowPolicy", "GenerativeConfig", "GenerativePolicy", "SampleResult",
           "PostBCDiffusionPolicy", "PostBCFlowPolicy", "FastTokenizer", "TokenConfig", "TokenPolicy",
           "CotrainConfig", "CotrainPolicy", "ShortMemoryConfig", "ShortMemoryPolicy",
           "fit"]


def load_policy(path: str | Path, map_location: str | torch.device = "cpu") -> Policy:
    """Rebuild a policy from a checkpoint written by `Policy.save` or by a Lightning Trainer.

    Loaded with `weights_only=True`: tensors and plain containers only, never arbitrary pickles.
    """
    return policy_from_checkpoint(read_checkpoint(path, "checkpoint", map_location), str(path))


def policy_from_checkpoint(ckpt: dict, source: str = "the checkpoint") -> Policy:
    """Rebuild a policy from a checkpoint's contents ({"hyper_parameters", "state_dict"}), in eval mode.
    The class must be a registered Policy subclass (the classes above, or any defined since)."""
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    name = hp.get("policy_class")
    if name not in Policy.registry:
        raise ValueError(f"{source} is not a labkit policy checkpoint (policy_class={name!r}; "
                         f"known: {sorted(Policy.registry)})")
    try:
        policy = Policy.registry[name](hp["config"], hp["shapes"], hp["stats"], hp.get("env"))
        policy.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
        # A damaged checkpoint: missing or mistyped fields, weights that do not fit the architecture.
        raise ValueError(f"{source}: cannot rebuild the {name} it names: {type(e).__name__}: {e}") from e
    return policy.eval()
