"""Policies: LightningModules with the runtime contract robot code expects (see `base.Policy`)."""

from labkit.policies.base import ENV_TO_DATA, Policy, PolicyConfig, load_policy
from labkit.policies.bc import BCConfig, BCPolicy
from labkit.policies.train import fit

__all__ = ["ENV_TO_DATA", "Policy", "PolicyConfig", "load_policy", "BCConfig", "BCPolicy", "fit"]
