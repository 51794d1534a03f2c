"""Policies: LightningModules with the runtime contract robot code expects (see `base.Policy`)."""

from labkit.policies.advantage import AdvantageFlowConfig, AdvantageFlowPolicy, guidance_sweep
from labkit.policies.base import Policy, PolicyConfig, load_policy, policy_from_checkpoint
from labkit.policies.bc import BCConfig, BCPolicy
from labkit.policies.diffusion import DiffusionConfig, DiffusionPolicy
from labkit.policies.flow import FlowConfig, FlowPolicy
from labkit.policies.generative import GenerativeConfig, GenerativePolicy, SampleResult
from labkit.policies.postbc import PostBCDiffusionPolicy, PostBCFlowPolicy
from labkit.policies.train import fit

__all__ = ["Policy", "PolicyConfig", "load_policy", "policy_from_checkpoint", "AdvantageFlowConfig",
           "AdvantageFlowPolicy", "guidance_sweep", "BCConfig", "BCPolicy", "DiffusionConfig",
           "DiffusionPolicy", "FlowConfig", "FlowPolicy", "GenerativeConfig", "GenerativePolicy", "SampleResult",
           "PostBCDiffusionPolicy", "PostBCFlowPolicy",
           "fit"]
