"""OGPO: off-policy generative policy optimisation: the whole denoising chain trained by a group-relative
PPO objective whose reward is an off-policy critic.

Patil, Nakamoto et al., "Off-policy Generative Policy Optimization" (arXiv 2605.03065, ICML 2026). DPPO
(labkit.rl.dppo) treats the denoising steps as an inner MDP and needs on-policy returns; OGPO cuts the
two MDPs apart at the chunk: a TD critic Q(x, a), learnt from a replay buffer, is the terminal reward of
the denoising MDP, so every replayed state can be used again. Chunk-level here, as EXPO (labkit.rl.expo):
a = the executed part of a normalised chunk, x = the policy's normalised observation history.

    Critic:  y = R + discount * mean_{j < n_vr} min over a random pair of Q_target_i(x', a'_j),
             a'_j ~ pi (the chain sampled stochastically)              (Q-variance reduction: n_vr samples)
             L_Q = sum_i mean (Q_i(x, a) - y)^2
    Actor, per replayed state x: G chains c_g = (z_0 .. z_K) ~ pi_old(. | x), stochastic (std >= min_std)
             A_{i,g} = Q_i(x, a_g) - mean_g Q_i(x, a_g)                              (group-relative, per member i)
             A_g     = min_i A_{i,g} if all > 0;  max_i A_{i,g} if all < 0;  else 0     (conservative)
             A_g    <- A_g / (std_g A_g + 1e-6)                                        (normalised in the group)
             r_{g,k} = exp(l_k^theta(c_g) - l_k^old(c_g))   for every step k of the chain (DPPO's step log-prob:
                       per-dim, clamped, averaged over the executed actions: a whole chain's ratio over
                       K x H x A dims is numerically brittle)
             L_PPO   = mean_{g,k} max(-A_g r_{g,k}, -A_g clip(r_{g,k}, 1 - eps, 1 + eps))
             L       = L_PPO + bc_coef * L_FM(demonstration chunks)                ("OGPO+": flow matching
                       on successes, here the demos, which keeps the chain near the data while Q is young)
`discount` = gamma**k (1 - terminated) for a chunk of k executed steps: labkit.rl's TD convention.
The policy is finetuned in place (pass a copy to keep the original); rollouts and evaluation sample with
its EMA weights, as the paper's EMA policy does. The equations follow a third-party draft that cites the
paper (algorithms.md 6b): the chi^2 / slow-policy term is left out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from labkit.rl.best_of_n import critic_action, critic_obs, dataset_chunks
from labkit.rl.buffer import MixedSampler, ReplayBuffer
from labkit.rl.critics import min_of_random_subset, polyak_update
from labkit.rl.dppo import ppo_loss, reduce_log_probs
from labkit.rl.loop import OffPolicyAgent


@dataclass
class OGPOConfig:
    """OGPO's settings at CPU scale; the third-party draft's defaults in comments (algorithms.md 6b)."""

    group: int = 8  # G chains per replayed state (8)
    actor_batch: int = 32  # replayed states per actor update (x G chains)
    clip: float = 0.05  # PPO clip eps (0.01; one PPO epoch per group here, so the ratio starts at 1)
    epochs: int = 2  # PPO passes over each sampled group
    min_std: float = 0.1  # floor on every sampling step's std (sigma_sde 0.1)
    n_vr: int = 2  # next-state chains averaged in the TD target (4)
    bc_coef: float = 1.0  # flow matching on the demonstrations' chunks (1.0)
    gamma: float = 0.99
    tau: float = 0.02  # target critic rate (0.005): faster value propagation in short CPU runs
    lr: float = 3e-4  # critic
    actor_lr: float = 3e-5  # the generative policy
    batch_size: int = 256  # critic batch
    utd: int = 2  # critic updates per chunk collected
    actor_every: int = 2  # one actor update every this many critic updates
    hidden: tuple[int, ...] = (256, 256)
    ensemble: int = 2  # critics; targets take the min of a random pair
    conservative: bool = True  # two-sided ensemble advantages (off: the ensemble mean's)
    offline_ratio: float = 0.5  # share of each critic batch from the demos
    warmup_steps: int = 1000  # env steps of base rollouts before updates
    critic_warmup: int = 500  # critic-only updates before the actor moves
    buffer_size: int = 200_000
    seed: int = 0

    def __post_init__(self):
        self.hidden = tuple(self.hidden)
        if self.group < 2:
            raise ValueError(f"group must be >= 2: advantages are relative to the group's mean, got {self.group}")
        if not 0 < self.clip < 1:
            raise ValueError(f"clip must lie in (0, 1), got {self.clip}")
        if self.min_std <= 0:
            raise ValueError(f"min_std must be > 0 (every step needs a density), got {self.min_std}")
        if not 0.0 <= self.offline_ratio <= 1.0:
            raise ValueError(f"offline_ratio must lie in [0, 1], got {self.offline_ratio}")
        if self.ensemble < 2:
            raise ValueError(f"ensemble must be >= 2 (targets take the min of a pair), got {self.ensemble}")
        counts = dict(actor_batch=self.actor_batch, epochs=self.epochs, n_vr=self.n_vr, batch_size=self.batch_size,
                      utd=self.utd, actor_every=self.actor_every)
        bad = {k: v for k, v in counts.items() if v < 1}
        if bad or min(self.warmup_steps, self.critic_warmup) < 0 or self.bc_coef < 0:
            raise ValueError(f"need {sorted(counts)} >= 1 and warmup_steps, critic_warmup, bc_coef >= 0; got "
                             f"{bad or dict(warmup_steps=self.warmup_steps, critic_warmup=self.critic_warmup, bc_coef=self.bc_coef)}")


def group_advantages(q: torch.Tensor, conservative: bool = True) -> torch.Tensor:
    """Critic values [E, B, G] (E ensemble members, G chains per state) -> advantages [B, G]: relative to
    the group's mean per member, combined conservatively (min if every member says better, max if every
    member says worse, 0 where they disagree) or as the members' mean, then scaled by the group's std."""
    a = q - q.mean(-1, keepdim=True)
    if conservative:
        pos, neg = (a > 0).all(0), (a < 0).all(0)
        a = torch.where(pos, a.min(0).values, torch.where(neg, a.max(0).values, torch.zeros_like(a[0])))
    else:
        a = a.mean(0)
    return a / (a.std(-1, keepdim=True, unbiased=False) + 1e-6)


class OGPO(OffPolicyAgent):
    """OGPO on chunk-level actions of a generative (flow/diffusion) policy, with demonstrations mixed in.

        agent = OGPO(copy.deepcopy(flow_policy), "labkit/PegInsert-v0", OGPOConfig(), demos=dataset)
        history = agent.train(env_steps=20_000, eval_every=5_000, eval_episodes=50)
    """

    name = "OGPO"
    method, takes_demos = "ogpo", True

    def __init__(self, policy, env_id: str, config: OGPOConfig | dict | None = None, demos=None,
                 env_kwargs: dict | None = None):
        c = config = self.configure(config, OGPOConfig, env_id, env_kwargs)
        if not (hasattr(policy, "sample") and hasattr(policy, "log_prob")):
            raise TypeError(f"OGPO trains a generative policy's chain (sample + log_prob), got {type(policy).__name__}")
        if demos is None and (c.offline_ratio > 0 or c.bc_coef > 0):
            raise ValueError("offline_ratio > 0 or bc_coef > 0 uses demonstrations: pass demos=<EpisodeDataset>, "
                             "or set both to 0 to learn from online data only")
        self.seed_torch(c.seed)
        self.policy = policy
        policy.eval().requires_grad_(False)  # eval mode: rollouts sample with the EMA weights
        policy.model.requires_grad_(True)  # the live weights train
        env, obs_shapes, obs_dim, d = self.chunk_env_and_critic(policy, c.hidden, c.ensemble, c.lr)
        self.actor_opt = torch.optim.Adam(policy.model.parameters(), lr=c.actor_lr)

        fields = {"obs": obs_shapes, "action": (d,), "chunk": (self.chunk_dim,), "reward": (),
                  "next_obs": obs_shapes, "discount": ()}
        self.buffer = ReplayBuffer(c.buffer_size, fields)
        self.demos = ReplayBuffer(1, fields)
        if demos is not None:
            batch = dataset_chunks(demos, policy, c.gamma, env.spec.max_episode_steps if env.spec else None)
            self.demos = ReplayBuffer(len(batch["reward"]), fields)
            self.demos.add({k: batch[k] for k in fields})
        # OGPO+'s success buffer: the flow-matching term imitates the successful demonstrations only (the
        # critic learns from all of them); every demo counts when the dataset records no outcomes.
        self.successes = None
        if demos is not None and c.bc_coef > 0:
            won = demos.episodes.get("success") if isinstance(demos.episodes, dict) else None
            keep = np.repeat(np.asarray(won, bool), demos.lengths) if won is not None else np.ones(len(self.demos), bool)
            if not keep.any():
                raise ValueError("bc_coef > 0 imitates successful demonstrations, and the demos hold none: set bc_coef=0")
            rows = torch.as_tensor(np.flatnonzero(keep))
            self.successes = ReplayBuffer(len(rows), {"obs": obs_shapes, "chunk": (self.chunk_dim,)})
            self.successes.add({"obs": {k: v[rows] for k, v in batch["obs"].items()}, "chunk": batch["chunk"][rows]})
        self.sampler = MixedSampler(self.demos, self.buffer, c.offline_ratio)
        self.start(env)

    # ---- sampling the chain -------------------------------------------------------------------------
    def chains(self, obs_norm: dict[str, torch.Tensor], n: int, use_ema: bool = True):
        """n stochastic chains per observation (SampleResult over B * n rows, observation-major)."""
        rep = {k: v.repeat_interleave(n, dim=0) for k, v in obs_norm.items()}
        return self.policy.sample(rep, stochastic=True, use_ema=use_ema, min_std=self.config.min_std, per_dim=True)

    def step_log_probs(self, obs_norm: dict[str, torch.Tensor], latents: torch.Tensor) -> torch.Tensor:
        """DPPO's per-step log-probs [N, K] of stored chains under the live weights (differentiable)."""
        lp = self.policy.log_prob(obs_norm, latents, use_ema=False, min_std=self.config.min_std, per_dim=True)
        return reduce_log_probs(lp, self.execute)

    # ---- acting ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self, random: bool = False) -> dict:
        """One chunk from the EMA policy's stochastic chain (warm-up: the same; the policy is the base then)."""
        obs = self.policy.normalize_obs(self.env.history())
        chunk = self.chains(obs, 1).actions
        return self.act_chunk(chunk)

    # ---- learning -------------------------------------------------------------------------------------
    def update(self) -> dict:
        """One critic step on a mixed batch; every `actor_every`-th, after `critic_warmup`, one actor step."""
        c = self.config
        b = self.sampler.sample(c.batch_size, self.gen)
        obs, obs_next = self.policy.normalize_obs(b["obs"]), self.policy.normalize_obs(b["next_obs"])
        x, x_next = critic_obs(self.policy, obs), critic_obs(self.policy, obs_next)
        with torch.no_grad():  # Q-variance reduction: the target averages n_vr next chains
            nxt = critic_action(self.chains(obs_next, c.n_vr).actions, self.execute)
            q_next = self.critic_target(x_next.repeat_interleave(c.n_vr, 0), nxt)
            v_next = min_of_random_subset(q_next, 2, self.gen)[0].view(-1, c.n_vr).mean(1)
            y = b["reward"] + b["discount"] * v_next
        q = self.critic(x, b["action"])
        critic_loss = (q - y).pow(2).mean(1).sum()
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()
        polyak_update(self.critic_target, self.critic, c.tau)
        out = {"critic_loss": critic_loss.item(), "q": q.mean().item()}
        self.updates += 1
        if self.updates > c.critic_warmup and self.updates % c.actor_every == 0:
            out.update(self.actor_update(obs, x))
        self.log.append(out)
        return out

    def actor_update(self, obs: dict[str, torch.Tensor], x: torch.Tensor) -> dict:
        """Group-relative PPO on G chains at each of `actor_batch` replayed states, plus flow matching on
        successful demonstrations."""
        c = self.config
        rows = torch.randperm(len(x), generator=self.gen)[: c.actor_batch]
        o = {k: v[rows] for k, v in obs.items()}
        with torch.no_grad():
            res = self.chains(o, c.group, use_ema=False)
            old = reduce_log_probs(res.log_probs, self.execute)  # [N, K]
            q = self.critic(x[rows].repeat_interleave(c.group, 0), critic_action(res.actions, self.execute))
            adv = group_advantages(q.view(len(q), -1, c.group), c.conservative).reshape(-1, 1)  # [N, 1]
        rep = {k: v.repeat_interleave(c.group, 0) for k, v in o.items()}
        demo = None
        if self.successes is not None:
            demo = self.successes.sample(c.actor_batch * c.group, self.gen)
            demo_obs = self.policy.normalize_obs(demo["obs"])
            demo_chunk = demo["chunk"].view(len(demo["chunk"]), self.policy.config.horizon, -1)
        for _ in range(c.epochs):
            new = self.step_log_probs(rep, res.latents)
            loss, stats = ppo_loss(new, old, adv.expand_as(new), torch.tensor(c.clip))
            if demo is not None:
                bc = self.policy.loss(demo_obs, demo_chunk, torch.zeros(demo_chunk.shape[:2], dtype=torch.bool))
                loss = loss + c.bc_coef * bc
                stats["bc_loss"] = bc.item()
            self.actor_opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.policy.model.parameters(), 1.0)
            self.actor_opt.step()
        if self.policy.ema is not None:
            self.policy.ema.update(self.policy.model)
        return {"actor_loss": loss.item(), "adv_nonzero": (adv != 0).float().mean().item(), **stats}

    # ---- evaluation -----------------------------------------------------------------------------------
    def eval_policy(self):
        """The finetuned policy itself (every step of its chain is trained): deterministic sampling, EMA."""
        self.policy.eval()
        return self.policy

    def state_dict(self) -> dict:
        return {"config": dataclasses.asdict(self.config), "critic": self.critic.state_dict(),
                "policy": self.policy.state_dict()}
