"""EXPO: expressive policy optimisation with a base generative policy, a small edit policy and an
on-the-fly argmax, never backpropagating Q through the denoising chain.

Dong, Li, Sadigh, Finn, "EXPO: Stable Reinforcement Learning with Expressive Policies" (arXiv 2507.07986).
Chunk-level here: an action a is the executed part of a normalised chunk (see labkit.rl.best_of_n), and
x the policy's normalised observation history.

    Base pi_b: the generative policy, trained only with its own imitation loss on the replay buffer
               (offline demos + online chunks), sampled with its EMA weights.
    Edit pi_e(u | x, a): tanh-Gaussian, a_edit = a + beta * tanh(u)     (labkit's actor with scale = beta)
        L_edit = E_{(x, a) ~ B}[ alpha log pi_e(a_edit | x, a) - mean_i Q_i(x, a_edit) ]
        The log-density is of a_edit itself, so it already holds EXPO's "- d log beta" term; the
        temperature's target entropy is -d/2 + d log beta (SAC's -d/2 in units of tanh(u)).
    On-the-fly policy: C(x) = {a_i ~ pi_b(x)}_{i<N} u {a_j + beta tanh(u_j)}_{j<M} (edits of the first M)
        pi_otf(x) = argmax_{c in C(x)} min over a random pair of Q_target_i(x, c)
      used both to act and for the TD target, with no entropy term in the backup:
        y = R + discount * min over a random pair of Q_target_i(x', pi_otf(x')),   L_Q = sum_i mean (Q_i - y)^2
With beta = 0 (or n_edits = 0) there are no edits and pi_otf is best-of-N over base samples.
`discount` = gamma**k (1 - terminated) for a chunk of k executed steps: labkit.rl's TD convention.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from labkit.rl.actor import TanhGaussianActor, Temperature
from labkit.rl.best_of_n import best_of, critic_action, critic_obs, dataset_chunks, sample_chunks
from labkit.rl.buffer import MixedSampler, ReplayBuffer
from labkit.rl.critics import min_of_random_subset, polyak_update
from labkit.rl.loop import ChunkRuntime, OffPolicyAgent


@dataclass
class EXPOConfig:
    """EXPO's settings at CPU scale (algorithms.md section 4(e)); the paper's values in comments."""

    n_samples: int = 8  # N base samples per decision
    n_edits: int = 8  # M: edits of the first M samples (<= N)
    beta: float = 0.1  # edit scale in the normalised action space (paper 0.05-0.2); 0: best-of-N
    gamma: float = 0.99
    tau: float = 0.02  # target critic rate (paper 0.005-0.05): faster value propagation in short CPU runs
    lr: float = 3e-4  # critic, edit policy and temperature
    base_lr: float = 1e-4  # imitation steps of the base policy on the buffer
    base_updates: int = 1  # imitation steps per update (0 keeps the base frozen)
    batch_size: int = 256
    utd: int = 2  # updates per chunk collected
    hidden: tuple[int, ...] = (256, 256)  # critic and edit-policy MLPs
    ensemble: int = 2  # critics (paper 2; 10 in EXPO-FT); targets take the min of a random pair
    target_subset: int = 2
    target_entropy: float | None = None  # None: -d/2 + d log beta (d = executed chunk size)
    init_temperature: float = 0.1
    offline_ratio: float = 0.5  # share of each batch from the demos
    warmup_steps: int = 1000  # env steps of plain base-policy rollouts before updates (paper ~5000)
    critic_warmup: int = 500  # updates made while still acting with the base, before the argmax is trusted
    denoise_steps: int | None = None  # base sampling steps (None: the policy's own)
    buffer_size: int = 200_000
    seed: int = 0

    def __post_init__(self):
        self.hidden = tuple(self.hidden)
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        if not 0 <= self.n_edits <= self.n_samples:
            raise ValueError(f"need 0 <= n_edits <= n_samples (edits of the first samples), got {self.n_edits}")
        if self.beta < 0:
            raise ValueError(f"beta (the edit scale) must be >= 0, got {self.beta}")
        if not 1 <= self.target_subset <= self.ensemble:
            raise ValueError(f"need 1 <= target_subset <= ensemble, got {self.target_subset}, {self.ensemble}")
        if not 0.0 <= self.offline_ratio <= 1.0:
            raise ValueError(f"offline_ratio must lie in [0, 1], got {self.offline_ratio}")
        if self.utd < 1 or self.batch_size < 1 or min(self.base_updates, self.warmup_steps, self.critic_warmup) < 0:
            raise ValueError(f"need utd, batch_size >= 1 and base_updates, warmup_steps, critic_warmup >= 0, got "
                             f"{self.utd}, {self.batch_size}, {self.base_updates}, {self.warmup_steps}, "
                             f"{self.critic_warmup}")

    @property
    def edits(self) -> bool:
        return self.beta > 0 and self.n_edits > 0


class OnTheFlyPolicy(ChunkRuntime):
    """EXPO's acting policy (base samples + edits, argmax of the target critic) as a batched runtime
    policy for `labkit.eval.evaluate`. Edits are the edit policy's mode unless `stochastic`."""

    def __init__(self, agent: EXPO, stochastic: bool = False):
        self.agent, self.policy, self.stochastic = agent, agent.policy, stochastic
        self.reset()

    @torch.no_grad()
    def predict_action_chunk(self, history: dict[str, torch.Tensor]) -> torch.Tensor:
        obs = self.policy.normalize_obs({k: torch.as_tensor(v).float() for k, v in history.items()})
        chunk, _ = self.agent.on_the_fly(obs, deterministic=not self.stochastic)
        return self.policy.normalizer.unnormalize("action", chunk)


class EXPO(OffPolicyAgent):
    """EXPO on chunk-level actions of a generative (diffusion/flow) policy, with RLPD demo mixing.

        agent = EXPO(flow_policy, "labkit/Detour-v0", EXPOConfig(), demos=dataset)
        history = agent.train(env_steps=20_000, eval_every=5_000, eval_episodes=50)

    The base policy is trained in place (pass a copy to keep the original). `demos` (an EpisodeDataset
    with `next.reward`) fills the offline share of every batch; without demos set `offline_ratio=0`.
    """

    name = "EXPO"
    method, takes_demos = "expo", True

    def __init__(self, policy, env_id: str, config: EXPOConfig | dict | None = None, demos=None,
                 env_kwargs: dict | None = None):
        c = config = self.configure(config, EXPOConfig, env_id, env_kwargs)
        if not hasattr(policy, "sample"):
            raise TypeError(f"EXPO needs a generative policy with sample(obs, ...), got {type(policy).__name__}")
        self.require_demos(c, demos)
        self.seed_torch(c.seed)
        self.policy = policy
        # Eval mode: sampling uses the EMA weights; only the live weights train, by imitation.
        policy.eval().requires_grad_(False)
        policy.model.requires_grad_(c.base_updates > 0)
        env, obs_shapes, obs_dim, d = self.chunk_env_and_critic(policy, c.hidden, c.ensemble, c.lr)
        self.edit = self.temperature = None
        if c.edits:
            self.edit = TanhGaussianActor(obs_dim + d, d, c.hidden, scale=c.beta)
            target = c.target_entropy if c.target_entropy is not None else -d / 2 + d * math.log(c.beta)
            self.temperature = Temperature(target, c.init_temperature)
            self.edit_opt = torch.optim.Adam(self.edit.parameters(), lr=c.lr)
            self.temp_opt = torch.optim.Adam(self.temperature.parameters(), lr=c.lr)
        self.base_opt = torch.optim.Adam(policy.model.parameters(), lr=c.base_lr) if c.base_updates else None

        fields = {"obs": obs_shapes, "action": (d,), "chunk": (self.chunk_dim,), "reward": (),
                  "next_obs": obs_shapes, "discount": ()}
        self.buffer = ReplayBuffer(c.buffer_size, fields)
        self.demos = ReplayBuffer(1, fields)
        if demos is not None:
            batch = dataset_chunks(demos, policy, c.gamma, env.spec.max_episode_steps if env.spec else None)
            batch = {k: batch[k] for k in fields}
            self.demos = ReplayBuffer(len(batch["reward"]), fields)
            self.demos.add(batch)
        self.sampler = MixedSampler(self.demos, self.buffer, c.offline_ratio)
        self._wins, self._decisions = 0, 0  # acting-time count of edited candidates winning the argmax
        self.start(env)

    # ---- the on-the-fly policy ------------------------------------------------------------------
    def on_the_fly(self, obs_norm: dict[str, torch.Tensor], deterministic: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised chunks [B, H, A], edit_won [B]) for normalised observation histories: the argmax
        over N base samples and M edits of the min of a random pair of target critics."""
        c = self.config
        x = critic_obs(self.policy, obs_norm)
        chunks = sample_chunks(self.policy, obs_norm, c.n_samples, c.denoise_steps, use_ema=True)  # [B, N, H, A]
        cand = critic_action(chunks, self.execute)  # [B, N, d]
        B, N, d = cand.shape
        if c.edits:
            M = c.n_edits
            xa = torch.cat([x.repeat_interleave(M, 0), cand[:, :M].flatten(0, 1)], -1)
            edited = cand[:, :M] + self.edit(xa, deterministic=deterministic)[0].view(B, M, d)
            cand = torch.cat([cand, edited], 1)
            tail = chunks[:, :M].clone()
            tail[:, :, : self.execute] = edited.view(B, M, self.execute, -1)
            chunks = torch.cat([chunks, tail], 1)
        _, idx, _ = best_of(self.critic_target, x, cand, c.target_subset, self.gen)
        return chunks[torch.arange(B), idx], idx >= N

    # ---- acting ---------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self, random: bool = False) -> dict:
        """One chunk: the base policy's own sample in warm-up and critic warm-up, else the on-the-fly
        policy's choice. (A young TD critic's argmax is worse than no argmax: on Detour it first
        learns that heading for the goal pays, and picks the chunks that go straight into the wall.)"""
        obs = self.policy.normalize_obs(self.env.history())
        if random or self.updates < self.config.critic_warmup:
            chunk = sample_chunks(self.policy, obs, 1, self.config.denoise_steps, use_ema=True)[:, 0]
        else:
            chunk, won = self.on_the_fly(obs)
            self._wins, self._decisions = self._wins + int(won.sum()), self._decisions + len(won)
        return self.act_chunk(chunk)

    def stats(self) -> dict:
        """The fraction of acting decisions since the last history row where an edit won the argmax."""
        if not self._decisions:
            return {}
        out = {"edit_win_acting": self._wins / self._decisions}
        self._wins, self._decisions = 0, 0
        return out

    # ---- learning -------------------------------------------------------------------------------
    def update(self) -> dict:
        """One step of critic, edit policy (+ temperature) and base imitation on a mixed batch."""
        c = self.config
        b = self.sampler.sample(c.batch_size, self.gen)
        obs, obs_next = self.policy.normalize_obs(b["obs"]), self.policy.normalize_obs(b["next_obs"])
        x, a = critic_obs(self.policy, obs), b["action"]

        with torch.no_grad():  # the on-the-fly policy at s' (no entropy term in the backup)
            chunk_next, won = self.on_the_fly(obs_next)
            q_next = self.critic_target(critic_obs(self.policy, obs_next), critic_action(chunk_next, self.execute))
            y = b["reward"] + b["discount"] * min_of_random_subset(q_next, c.target_subset, self.gen)[0]
        q = self.critic(x, a)
        critic_loss = (q - y).pow(2).mean(1).sum()
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()
        out = {"critic_loss": critic_loss.item(), "q": q.mean().item(), "edit_win": won.float().mean().item()}

        if c.edits:  # the edit policy on buffer actions: maximise Q of the edited action, plus entropy
            alpha = self.temperature.alpha
            delta, logp = self.edit(torch.cat([x, a], -1))
            edit_loss = (alpha * logp - self.critic(x, a + delta).mean(0)).mean()
            self.edit_opt.zero_grad()
            edit_loss.backward()
            self.edit_opt.step()
            temp_loss = self.temperature.loss(logp)
            self.temp_opt.zero_grad()
            temp_loss.backward()
            self.temp_opt.step()
            out.update(edit_loss=edit_loss.item(), alpha=alpha.item(), entropy=-logp.mean().item())

        for _ in range(c.base_updates):  # the base imitates everything in the buffer (demos + chosen chunks)
            chunk = b["chunk"].view(len(a), self.policy.config.horizon, -1)
            bc_loss = self.policy.loss(obs, chunk, torch.zeros(chunk.shape[:2], dtype=torch.bool))
            self.base_opt.zero_grad()
            bc_loss.backward()
            self.base_opt.step()
            if self.policy.ema is not None:
                self.policy.ema.update(self.policy.model)
            out["bc_loss"] = bc_loss.item()

        polyak_update(self.critic_target, self.critic, c.tau)
        self.updates += 1
        self.log.append(out)
        return out

    # ---- evaluation -----------------------------------------------------------------------------
    def on_the_fly_policy(self, stochastic: bool = False) -> OnTheFlyPolicy:
        """The acting policy (edits at their mode unless stochastic), for `labkit.eval.evaluate`."""
        return OnTheFlyPolicy(self, stochastic)

    eval_policy = on_the_fly_policy

    def state_dict(self) -> dict:
        """The trained parts: critic, edit policy, temperature, and the (trained) base policy's weights."""
        return {"config": dataclasses.asdict(self.config), "critic": self.critic.state_dict(),
                "edit": self.edit.state_dict() if self.edit is not None else None,
                "temperature": self.temperature.state_dict() if self.temperature is not None else None,
                "policy": self.policy.state_dict()}
