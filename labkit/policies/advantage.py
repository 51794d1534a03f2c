"""Advantage-conditioned flow policy: flow matching conditioned on "was this action better than usual",
sampled with classifier-free guidance (RECAP, Physical Intelligence pi*0.6, arXiv 2511.14759; CFGRL,
Frans et al. 2025). The RL loop that labels the data is `labkit.rl.recap.RECAP`.

Each training frame carries an indicator I_t in {negative, positive} (RECAP: I_t = 1[A_t > eps]).
Conditioning c in {negative, positive, null}: c = I_t, except null with probability `null_dropout`,
so one net is both the conditional and the unconditional policy. On FlowPolicy's linear path
(`labkit.policies.flow.linear_path`: x0 ~ N(0, I), t ~ U[0, 1], x_t = (1 - t) x0 + t a):
    loss = || v_theta(x_t, t, o, c) - (a - x0) ||^2
where c enters as a learnt embedding appended to the observation features.
Inference (classifier-free guidance), in every Euler step of FlowPolicy's sampler:
    v = v(x, t, o, null) + beta (v(x, t, o, positive) - v(x, t, o, null))
beta = 0 is the unconditional policy, beta = 1 plain positive conditioning, beta > 1 sharper.
Why it improves: pi(a|o, I=1) is proportional to pi_ref(a|o) p(I=1|o, a), better than pi_ref, and
guidance raises p(I=1|o, a) to the power beta. `labkit.rl.recap.guidance_sweep` measures
success against beta.

    policy = AdvantageFlowPolicy.from_dataset(labelled, guidance=1.5)   # needs the indicator column
    policy = AdvantageFlowPolicy.from_flow_policy(pretrained)           # warm start: the old policy at any beta
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from labkit.nn import EMA, make_denoiser
from labkit.policies.flow import FlowConfig, FlowPolicy, linear_path

INDICATOR = "advantage.indicator"  # per-frame dataset column (int64) the conditional policy trains on
NEGATIVE, POSITIVE, NULL = 0, 1, 2  # the indicator's three values; NULL = "no label" (unconditional)


@dataclass
class AdvantageFlowConfig(FlowConfig):
    null_dropout: float = 0.3  # training samples whose indicator is replaced by "null"
    guidance: float = 1.0  # beta at inference: 0 unconditional, 1 positive, > 1 classifier-free guidance
    indicator_dim: int = 16  # width of the indicator embedding appended to the observation features

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.null_dropout < 1.0:
            raise ValueError(f"null_dropout is a probability in [0, 1), got {self.null_dropout}")
        if self.guidance < 0:
            raise ValueError(f"guidance (beta) must be >= 0, got {self.guidance}")
        if self.indicator_dim < 1:
            raise ValueError(f"indicator_dim must be >= 1, got {self.indicator_dim}")


ADVANTAGE_FIELDS = {f.name for f in dataclasses.fields(AdvantageFlowConfig)} - {
    f.name for f in dataclasses.fields(FlowConfig)}


class AdvantageFlowPolicy(FlowPolicy):
    """A FlowPolicy whose denoiser also sees an embedded indicator (negative / positive / null), and
    samples with classifier-free guidance `guidance` (beta). Training needs the dataset column
    `advantage.indicator` (0 negative, 1 positive; 2 null); everything else is FlowPolicy."""

    config_class = AdvantageFlowConfig

    def __init__(self, config, shapes, stats, env=None):
        super().__init__(config, shapes, stats, env)
        c, encoder = self.config, self.model["encoder"]
        # The indicator joins the observation features, so the denoiser's conditioning is wider than
        # FlowPolicy's: rebuild it, add the embedding, and take the EMA copy of the whole again.
        self.model["denoiser"] = make_denoiser(c.backbone, c.horizon, self.action_dim,
                                               encoder.out_dim + c.indicator_dim, c)
        self.model["indicator"] = nn.Embedding(3, c.indicator_dim)
        self.ema = EMA(self.model, c.ema_power, c.ema_max_decay) if c.ema else None

    @property
    def guidance(self) -> float:
        return self.config.guidance

    @guidance.setter
    def guidance(self, beta: float) -> None:
        if beta < 0:
            raise ValueError(f"guidance (beta) must be >= 0, got {beta}")
        self.config.guidance = float(beta)

    @classmethod
    def from_flow_policy(cls, policy: FlowPolicy, **fields) -> AdvantageFlowPolicy:
        """Warm-start from a pretrained FlowPolicy: same chunking, normaliser and weights, with the
        indicator's inputs zeroed, so every indicator (and any beta) first gives the old policy."""
        if not isinstance(policy, FlowPolicy):
            raise ValueError(f"need a FlowPolicy to warm-start from, got {type(policy).__name__}")
        unknown = set(fields) - ADVANTAGE_FIELDS
        if unknown:
            raise ValueError(f"only {sorted(ADVANTAGE_FIELDS)} can change when warm-starting, got {sorted(unknown)}")
        base = {k: v for k, v in dataclasses.asdict(policy.config).items() if k not in ADVANTAGE_FIELDS}
        new = cls(cls.config_class(**base, **fields), policy.shapes, policy.stats, policy.data_env)
        old, state, e, td = policy.state_dict(), new.state_dict(), new.config.indicator_dim, new.config.time_dim
        for name, w in state.items():
            if name not in old:
                continue  # the indicator embedding
            o = old[name]
            if not isinstance(o, torch.Tensor) or o.shape == w.shape:  # (the normaliser's extra state is a dict)
                state[name] = copy.deepcopy(o)
            else:  # a layer reading [.., obs features, time]: zero columns for the embedding before time
                cut = o.shape[1] - td
                state[name] = torch.cat([o[:, :cut], o.new_zeros(o.shape[0], e, *o.shape[2:]), o[:, cut:]], 1)
        new.load_state_dict(state)
        return new.eval()

    def normalize_obs(self, obs):
        out = super().normalize_obs(obs)
        if INDICATOR in obs:  # pass the training label through to `loss`
            out[INDICATOR] = torch.as_tensor(obs[INDICATOR], device=self.device).long()
        return out

    def prepare_training(self, tensors: dict, dataset) -> dict:
        """Attach each window's indicator (windows are one per frame, in frame order)."""
        if INDICATOR not in dataset.frames:
            raise ValueError(f"the dataset has no {INDICATOR!r} column (0 negative, 1 positive per frame); "
                             "label it with RECAP.labelled_dataset(indicator) or add the column to dataset.frames")
        ind = torch.as_tensor(np.asarray(dataset.frames[INDICATOR])).long()
        if len(ind) != len(tensors["action"]) or not ((ind >= 0) & (ind <= NULL)).all():
            raise ValueError(f"{INDICATOR!r} needs one value in {{0, 1, 2}} per frame ({len(tensors['action'])})")
        return {**tensors, "obs": {**tensors["obs"], INDICATOR: ind}}

    def conditional_velocity(self, net, x, t, feat, indicator) -> torch.Tensor:
        """v_theta(x, t, o, c) for an indicator c (an int for the whole batch, or [B])."""
        c = torch.as_tensor(indicator, device=x.device).long().expand(len(x))
        return net["denoiser"](x, t, torch.cat([feat, net["indicator"](c)], -1))

    def velocity(self, net, x, t, feat, beta: float) -> torch.Tensor:
        """Classifier-free guidance: v = v(null) + beta (v(positive) - v(null)); one net call either way."""
        if beta == 1.0:
            return self.conditional_velocity(net, x, t, feat, POSITIVE)
        if beta == 0.0:
            return self.conditional_velocity(net, x, t, feat, NULL)
        both = self.conditional_velocity(net, x.repeat(2, *[1] * (x.dim() - 1)), t.repeat(2), feat.repeat(2, 1),
                                         torch.tensor([NULL, POSITIVE]).repeat_interleave(len(x)))
        v_null, v_pos = both.chunk(2)
        return v_null + beta * (v_pos - v_null)

    def loss(self, obs, action, is_pad):
        if INDICATOR not in obs:
            raise ValueError(f"training batches need obs[{INDICATOR!r}]; train with labkit.policies.fit on a "
                             "dataset that has that column")
        ind = obs[INDICATOR]
        ind = torch.where(torch.rand(len(ind), device=ind.device) < self.config.null_dropout, NULL, ind)
        x_t, t, target = linear_path(action)  # FlowPolicy's interpolation (drawn after the dropout)
        pred = self.conditional_velocity(self.model, x_t, t, self.model["encoder"](obs), ind)
        return self.chunk_loss(pred, target, is_pad)

    def step_distribution(self, net, feat, x, i, steps, stochastic):
        """FlowPolicy's Euler step, with the guided velocity in place of the plain one."""
        def guided(x, t, feat):
            return self.velocity(net, x, t, feat, self.guidance)

        return super().step_distribution({"denoiser": guided}, feat, x, i, steps, stochastic)

    def checkpoint(self) -> dict:
        self.hparams["config"] = dataclasses.asdict(self.config)  # `guidance` may have changed since init
        return super().checkpoint()
