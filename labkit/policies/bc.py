"""Behavior cloning: regress the demonstrated action chunk with mean-squared error.

The simplest policy, and the lesson of its failure: on multimodal demonstrations the MSE minimiser
is the *mean* of the modes, which can be an action no demonstrator took (into the wall, on Detour).
Action chunking (predict `horizon` actions, execute `n_action_steps`) reduces compounding error.
"""

from __future__ import annotations

from dataclasses import dataclass

from labkit.nn import mlp
from labkit.policies.base import Policy, PolicyConfig
from labkit.vision import ObsEncoder


@dataclass
class BCConfig(PolicyConfig):
    hidden: int = 256
    layers: int = 3

    def __post_init__(self):
        super().__post_init__()
        if self.hidden < 1 or self.layers < 1:
            raise ValueError(f"hidden and layers must be >= 1, got {self.hidden}, {self.layers}")


class BCPolicy(Policy):
    """An MLP from the observation history to a whole action chunk, trained with masked MSE."""

    config_class = BCConfig

    def __init__(self, config, shapes, stats, env=None):
        super().__init__(config, shapes, stats, env)
        c = self.config
        self.encoder = ObsEncoder({k: self.shapes[k] for k in c.obs_keys}, c.obs_horizon, c.image_dim,
                             c.image_encoder, c.pretrained, c.pretrained_meta)
        self.head = mlp(self.encoder.out_dim, c.horizon * self.action_dim, c.hidden, c.layers)

    def predict_normalized(self, obs):
        return self.head(self.encoder(obs)).view(-1, self.config.horizon, self.action_dim)

    def loss(self, obs, action, is_pad):
        err = (self.predict_normalized(obs) - action).pow(2).mean(-1)  # [B, H]
        keep = (~is_pad).float()  # padded steps past an episode's end carry no signal
        return (err * keep).sum() / keep.sum().clamp(min=1.0)
