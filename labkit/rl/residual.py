"""ResFiT: a per-step residual, trained with off-policy TD3, on top of a frozen chunked base policy.

Ankile, Jiang, Duan, Shi, Abbeel, Nagabandi, "Residual Off-Policy RL for Finetuning Behavior Cloning
Policies" (arXiv 2509.19301, 2025). The base (any labkit Policy: BC, diffusion, flow) keeps running
its own chunks open-loop; a small residual corrects every env step, which restores closed-loop
feedback and bounds how far exploration can stray from the base. Everything lives in the normalised
action space [-1, 1] (the env's Box mapped linearly):

    x      = (normalised obs s, a_base(s))                       input of the residual and the critics
    delta  = action_scale * tanh(MLP(x))                         last layer zero-initialised: delta = 0
    a      = clip(a_base + delta + eps, -1, 1),  eps = clip(N(0, explore_std^2), +-noise_clip)   (acting)
    a'     = clip(a_base' + delta_target(x') + clip(N(0, target_noise^2), +-noise_clip), -1, 1)  (TD3 smoothing)
    y      = R_n + discount * min over a random pair of Q_target_i(x', a')     (n-step return R_n)
    L_Q    = sum_i mean (Q_i(x, a) - y)^2
    L_pi   = -mean_i Q_i(x, clip(a_base + delta(x), -1, 1)) + actor_l2 * |delta|^2   (after critic warm-up)

RLPD's recipe around it: LayerNorm critic ensemble, UTD > 1, half of every batch from demonstrations
relabelled with the base's own action as a_base (so the residual's target there is demo - base),
warm-up rollouts of a_base + U(-warmup_noise, warmup_noise), `critic_warmup` critic-only updates,
gradient-norm clipping. `discount` = gamma**m * (1 - terminated), labkit.rl's shared TD convention.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from labkit.data.keys import env_key, is_image_feature
from labkit.rl.actor import TanhGaussianActor
from labkit.rl.buffer import MixedSampler, ReplayBuffer, transition_fields
from labkit.rl.critics import QEnsemble, min_of_random_subset, polyak_update, target_copy
from labkit.rl.loop import ChunkRuntime, OffPolicyAgent, frozen
from labkit.rl.returns import nstep_batch


@dataclass
class ResidualConfig:
    """ResFiT's settings at CPU scale (algorithms.md section 3(e)); the paper's values in comments."""

    action_scale: float = 0.1  # |delta| <= action_scale in the normalised action space (paper 0.1-0.2)
    explore_std: float = 0.05  # Gaussian exploration noise on delta while training (paper 0.05)
    target_noise: float = 0.05  # TD3 target-policy smoothing std (we reuse the exploration std)
    noise_clip: float = 0.3  # both noises are clipped to +- this (paper 0.3)
    gamma: float = 0.99
    nstep: int = 3  # n-step returns (paper 3, 5 on the hardest task)
    tau: float = 0.005  # Polyak rate of the target critic and target residual
    actor_lr: float = 1e-4  # the paper's 1e-6 keeps the residual tiny over 300k steps; short runs need more
    critic_lr: float = 3e-4  # paper 1e-4
    batch_size: int = 256
    utd: int = 2  # updates per env step (paper 4)
    hidden: tuple[int, ...] = (256, 256)  # actor and critic MLPs, LayerNorm (paper 2x1024)
    ensemble: int = 2  # critic heads (paper 10); the target takes the min of a random pair
    target_subset: int = 2
    actor_l2: float = 0.0  # optional penalty on |delta|^2
    grad_clip: float = 1.0  # gradient-norm clip of actor and critic
    offline_ratio: float = 0.5  # share of each batch drawn from the demos (RLPD's symmetric sampling)
    warmup_steps: int = 1000  # env steps of a_base + U(-warmup_noise, warmup_noise) before updates (paper 10k)
    warmup_noise: float = 0.2  # (paper 0.2)
    critic_warmup: int = 1000  # critic-only updates before the residual starts to move (paper 10k)
    actor_every: int = 1  # actor (and its target) update every this many critic updates (TD3's delay)
    buffer_size: int = 200_000
    seed: int = 0

    def __post_init__(self):
        self.hidden = tuple(self.hidden)
        for name in ("action_scale", "gamma", "batch_size", "utd", "nstep", "actor_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("explore_std", "target_noise", "noise_clip", "warmup_noise", "actor_l2", "warmup_steps",
                     "critic_warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.offline_ratio <= 1.0:
            raise ValueError(f"offline_ratio must lie in [0, 1], got {self.offline_ratio}")
        if not 1 <= self.target_subset <= self.ensemble:
            raise ValueError(f"need 1 <= target_subset <= ensemble, got {self.target_subset}, {self.ensemble}")


class BaseRuntime(ChunkRuntime):
    """A private action queue over a frozen policy's `predict_action_chunk`: the base's own
    `select_action`, but with state of its own, so that training, evaluation and demo relabelling
    never disturb each other's chunk in progress."""

    def __init__(self, policy):
        self.policy = frozen(policy)
        self.reset()

    def predict_action_chunk(self, history):
        return self.policy.predict_action_chunk(history)


class ResidualSpace(nn.Module):
    """The residual's coordinates: normalised observation features and the [-1, 1] action space.

    Observations: the base policy's low-dimensional keys (current frame only), normalised with its
    own statistics. Actions: the env's Box [low, high] mapped linearly onto [-1, 1]."""

    def __init__(self, policy, low, high):
        super().__init__()
        self.keys = [k for k in policy.config.obs_keys if not is_image_feature(k)]
        if not self.keys:
            raise ValueError("the residual needs low-dimensional observations (e.g. 'observation.state'); "
                             f"the base policy sees only {list(policy.config.obs_keys)}")
        low, high = np.asarray(low, np.float32).ravel(), np.asarray(high, np.float32).ravel()
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high)) and np.all(high > low)):
            raise ValueError(f"the residual needs a bounded action Box, got low={low}, high={high}")
        self.normalizer = policy.normalizer
        self.register_buffer("low", torch.as_tensor(low))
        self.register_buffer("high", torch.as_tensor(high))
        self.obs_dim = sum(int(np.prod(policy.shapes[k])) for k in self.keys)
        self.action_dim = len(low)

    def to_unit(self, action: torch.Tensor) -> torch.Tensor:
        return 2 * (action - self.low) / (self.high - self.low) - 1

    def to_env(self, action: torch.Tensor) -> torch.Tensor:
        return self.low + (action + 1) * (self.high - self.low) / 2

    def execute(self, base_action: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The physical action clip(a_base + delta) for physical base actions [B, A] and residuals in
        [-1, 1] units: the same map as `apply_residual`, added in physical units so that delta = 0
        gives the base's own action bit for bit (clipped to the Box, as the env would)."""
        return torch.minimum(torch.maximum(base_action + delta * (self.high - self.low) / 2, self.low), self.high)

    def features(self, frame: dict[str, torch.Tensor], base_action: torch.Tensor) -> torch.Tensor:
        """x = (normalised obs, a_base in [-1, 1]) [B, obs_dim + A] from a frame {dataset key: [B, ...]}
        and the base's physical actions [B, A]."""
        obs = [self.normalizer.normalize(k, torch.as_tensor(frame[k]).float()).flatten(1) for k in self.keys]
        return torch.cat([*obs, self.to_unit(torch.as_tensor(base_action).float())], dim=-1)


def apply_residual(x: torch.Tensor, delta: torch.Tensor, action_dim: int) -> torch.Tensor:
    """clip(a_base + delta, -1, 1): a_base is the last `action_dim` entries of x."""
    return (x[:, -action_dim:] + delta).clamp(-1.0, 1.0)


@torch.no_grad()
def demo_transitions(policy, space: ResidualSpace, dataset, gamma: float, nstep: int,
                     max_episode_steps: int | None = None) -> dict:
    """ResFiT's offline data: n-step transitions of `dataset`'s episodes (the buffer's standard fields),
    with a_base relabelled by running the base's own action queue along each demo (all episodes in
    lockstep, one batch). An episode's last frame is a terminal (discount 0) unless it ran the full
    `max_episode_steps` (a truncation); its `next_obs` is its own x, as no observation follows it."""
    for key in ("next.reward", "action", *space.keys):
        if key not in dataset.frames:
            raise KeyError(f"demos lack {key!r} (have {sorted(dataset.frames)}): record them with labkit.data.record")
    n_ep, lengths = dataset.num_episodes, dataset.lengths
    T = int(lengths.max())
    steps = np.minimum(np.arange(T)[None], lengths[:, None] - 1)  # [n_ep, T]; pads with the last frame
    rows = dataset.episode_from[:, None] + steps
    runner, base = BaseRuntime(policy), []
    for t in range(T):  # the base's own queue, as it would run along each demo
        obs = {env_key(k): dataset.frames[k][rows[:, t]] for k in policy.config.obs_keys}
        base.append(torch.as_tensor(runner.select_action(obs)).view(n_ep, -1))
    valid = torch.as_tensor(np.arange(T)[None] < lengths[:, None]).flatten()  # episode-major order
    base = torch.stack(base, 1).flatten(0, 1)[valid]  # [N, A] in the dataset's frame order
    frames = {k: torch.as_tensor(dataset.frames[k][rows.flatten()][valid.numpy()]) for k in space.keys}
    x = space.features(frames, base)

    last = torch.zeros(len(x), dtype=torch.bool)
    last[torch.as_tensor(dataset.episode_to - 1)] = True
    full = torch.as_tensor(np.repeat(lengths >= (max_episode_steps or np.inf), lengths))
    nxt = torch.arange(len(x)) + (~last).long()  # the next frame of the same episode, or itself
    action = space.to_unit(torch.as_tensor(dataset.frames["action"]).float()).clamp(-1, 1)
    traj = {"obs": x, "action": action, "reward": torch.as_tensor(dataset.frames["next.reward"]).float(),
            "next_obs": x[nxt], "terminated": last & ~full, "truncated": last & full}
    return nstep_batch(traj, gamma, nstep)


class ResidualPolicy(ChunkRuntime):
    """Base + deterministic residual, as a batched runtime policy (`reset`, `select_action`) for
    `labkit.eval.evaluate` and for deployment. Acts per env step; has its own base action queue
    (the base's runtime), and hands on the base's env interface."""

    def __init__(self, base, actor: TanhGaussianActor, space: ResidualSpace):
        self.base, self.actor, self.space = BaseRuntime(base), actor, space
        self.policy = self.base.policy

    def reset(self) -> None:
        self.base.reset()

    @torch.no_grad()
    def select_action(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """One env observation (or a batch) -> a = clip(a_base + delta) in physical units, [A] (or [B, A])."""
        frame, single = self.policy.observation_frame(obs)
        base = torch.as_tensor(self.base.select_action(obs)).reshape(-1, self.space.action_dim)
        delta, _ = self.actor(self.space.features(frame, base), deterministic=True)
        action = self.space.execute(base, delta).numpy().astype(np.float32)
        return action[0] if single else action


class ResidualRL(OffPolicyAgent):
    """ResFiT: TD3 on a per-step residual over a frozen base policy, with RLPD demo mixing.

        agent = ResidualRL(base_policy, "labkit/Detour-v0", ResidualConfig(), demos=dataset)
        history = agent.train(env_steps=20_000, eval_every=5_000, eval_episodes=50)
        labkit.eval.evaluate(agent.eval_policy(), "labkit/Detour-v0", episodes=50)

    `demos` (an EpisodeDataset with `next.reward`, recorded with the env's reward type, usually the
    base's own training demos) fills the offline half of every batch; without demos set `offline_ratio=0`.
    What a lesson hands in: `critic_loss_fn(agent, batch)` and `actor_loss_fn(agent, x)`, its own TD3 losses
    (default `td3_critic_loss`, `td3_actor_loss`), with which every update then trains.
    """

    name = "ResFiT"
    method, takes_demos = "residual", True

    def __init__(self, policy, env_id: str, config: ResidualConfig | dict | None = None, demos=None,
                 env_kwargs: dict | None = None, critic_loss_fn: Callable | None = None,
                 actor_loss_fn: Callable | None = None):
        c = config = self.configure(config, ResidualConfig, env_id, env_kwargs)
        self.require_demos(c, demos)
        self.seed_torch(c.seed)
        self.policy = frozen(policy)
        env = gym.make(env_id, **self.env_kwargs)
        self.space = ResidualSpace(policy, env.action_space.low, env.action_space.high)
        A, in_dim = self.space.action_dim, self.space.obs_dim + self.space.action_dim

        # zero_init: the mean head starts at 0, so delta = 0 and the agent starts exactly at the base.
        self.actor = TanhGaussianActor(in_dim, A, c.hidden, scale=c.action_scale, layer_norm=True, zero_init=True)
        self.actor_target = target_copy(self.actor)
        self.critic = QEnsemble(in_dim, A, c.hidden, ensemble=c.ensemble, layer_norm=True)
        self.critic_target = target_copy(self.critic)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=c.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=c.critic_lr)

        fields = transition_fields((in_dim,), A)
        self.buffer = ReplayBuffer(c.buffer_size, fields)
        self.demos = ReplayBuffer(1, fields)
        if demos is not None:
            batch = demo_transitions(policy, self.space, demos, c.gamma, c.nstep,
                                     env.spec.max_episode_steps if env.spec else None)
            self.demos = ReplayBuffer(len(batch["reward"]), fields)
            self.demos.add(batch)
        self.sampler = MixedSampler(self.demos, self.buffer, c.offline_ratio)
        self.critic_loss_fn = critic_loss_fn or td3_critic_loss  # (agent, batch) -> scalar loss
        self.actor_loss_fn = actor_loss_fn or td3_actor_loss  # (agent, x [B, D + A]) -> scalar loss

        self.base = BaseRuntime(policy)
        self._pending: deque[dict] = deque()  # the last < n steps, waiting for their n-step return
        self.start(env)
        self._x, self._base = self._features(self._obs)

    # ---- data -----------------------------------------------------------------------------------
    def _features(self, obs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [1, D + A], the physical base action [1, A]) at one env observation; advances the base's
        action queue by one step."""
        frame, _ = self.policy.observation_frame(obs)
        base = torch.as_tensor(self.base.select_action(obs)).view(1, -1)
        return self.space.features(frame, base), base

    def _flush(self, all_steps: bool) -> None:
        """Store the n-step transitions that are complete: the oldest pending step once n are pending,
        or every pending step at an episode's end."""
        if not self._pending:
            return
        traj = {k: torch.cat([s[k] for s in self._pending]) for k in self._pending[0]}
        out = nstep_batch(traj, self.config.gamma, self.config.nstep)
        keep = len(self._pending) if all_steps else 1
        self.buffer.add({k: v[:keep] for k, v in out.items()})
        for _ in range(keep):
            self._pending.popleft()

    def restart(self, obs) -> None:
        """A fresh episode (on resume): no pending n-step steps, an empty base queue, new features."""
        super().restart(obs)
        self._pending.clear()
        self.base.reset()
        self._x, self._base = self._features(obs)

    # ---- acting ---------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self, random: bool = False) -> dict:
        """One env step with a = clip(a_base + delta + noise) (warm-up: a_base + uniform noise)."""
        c, x, A = self.config, self._x, self.space.action_dim
        if random:
            delta = (torch.rand(1, A, generator=self.gen) * 2 - 1) * c.warmup_noise
        else:
            noise = (torch.randn(1, A, generator=self.gen) * c.explore_std).clamp(-c.noise_clip, c.noise_clip)
            delta = self.actor(x, deterministic=True)[0] + noise
        action = apply_residual(x, delta, A)
        next_obs, reward, terminated, truncated, info = self.env.step(self.space.execute(self._base, delta)[0].numpy())
        x_next, base_next = self._features(next_obs)  # a_base at s' is what the base will really do there
        self._pending.append({"obs": x, "action": action, "reward": torch.tensor([float(reward)]), "next_obs": x_next,
                              "terminated": torch.tensor([terminated]), "truncated": torch.tensor([truncated])})
        self.env_steps += 1
        done = self.advance(next_obs, terminated, truncated)
        if done or len(self._pending) >= c.nstep:
            self._flush(all_steps=done)
        if done:
            self.base.reset()
            x_next, base_next = self._features(self._obs)
        self._x, self._base = x_next, base_next
        return {"reward": float(reward), "episode_done": done, "is_success": bool(info.get("is_success", False))}

    # ---- learning -------------------------------------------------------------------------------
    def update(self) -> dict:
        """One critic step; after `critic_warmup` updates, every `actor_every`-th also a residual step."""
        c = self.config
        b = self.sampler.sample(c.batch_size, self.gen)
        critic_loss = self.critic_loss_fn(self, b)
        self.critic_opt.zero_grad()
        critic_loss.backward()
        nn.utils.clip_grad_norm_(self.critic.parameters(), c.grad_clip)
        self.critic_opt.step()
        out = {"critic_loss": critic_loss.item()}

        if self.updates >= c.critic_warmup and self.updates % c.actor_every == 0:
            with torch.no_grad():
                delta = self.actor(b["obs"], deterministic=True)[0]  # for the log: the residual before this step
            actor_loss = self.actor_loss_fn(self, b["obs"])
            self.actor_opt.zero_grad()
            actor_loss.backward()
            nn.utils.clip_grad_norm_(self.actor.parameters(), c.grad_clip)
            self.actor_opt.step()
            polyak_update(self.actor_target, self.actor, c.tau)
            out.update(actor_loss=actor_loss.item(), delta=delta.abs().mean().item())
        polyak_update(self.critic_target, self.critic, c.tau)
        self.updates += 1
        self.log.append(out)
        return out

    # ---- evaluation -----------------------------------------------------------------------------
    def eval_policy(self) -> ResidualPolicy:
        """Base + deterministic residual, for `labkit.eval.evaluate` (a fresh base queue of its own)."""
        return ResidualPolicy(self.policy, self.actor, self.space)

    def state_dict(self) -> dict:
        """The trained parts (the base policy is frozen and saved on its own)."""
        return {"config": dataclasses.asdict(self.config), "actor": self.actor.state_dict(),
                "critic": self.critic.state_dict()}


def td3_critic_loss(agent: ResidualRL, batch: dict) -> torch.Tensor:
    """TD3's critic loss on a batch of n-step transitions: sum over heads of the mean squared TD error
    against y = R_n + discount * min over a random pair of Q_target(x', a'), a' the target residual's
    action with clipped smoothing noise. Draws the noise, then the pair, from `agent.gen`."""
    c, A = agent.config, agent.space.action_dim
    x, x_next = batch["obs"], batch["next_obs"]
    with torch.no_grad():
        noise = (torch.randn(len(x), A, generator=agent.gen) * c.target_noise).clamp(-c.noise_clip, c.noise_clip)
        a_next = apply_residual(x_next, agent.actor_target(x_next, deterministic=True)[0] + noise, A)
        q_next = min_of_random_subset(agent.critic_target(x_next, a_next), c.target_subset, agent.gen)[0]
        y = batch["reward"] + batch["discount"] * q_next
    q = agent.critic(x, batch["action"])
    return (q - y).pow(2).mean(1).sum()


def td3_actor_loss(agent: ResidualRL, x: torch.Tensor) -> torch.Tensor:
    """The residual's deterministic policy gradient loss: -Q (mean over heads and batch) at
    clip(a_base + delta(x)), plus actor_l2 * |delta|^2."""
    c = agent.config
    delta = agent.actor(x, deterministic=True)[0]
    q = agent.critic(x, apply_residual(x, delta, agent.space.action_dim))
    return -q.mean() + c.actor_l2 * delta.pow(2).sum(-1).mean()
