"""DSRL: steer a frozen diffusion/flow policy by choosing its initial noise with SAC.

Wagenmaker et al., "Steering Your Diffusion Policy with Latent Space RL" (CoRL 2025). The pretrained
policy pi_dp(s, w) is frozen and sampled deterministically, so the action chunk is a fixed function of
(observation history s, noise w). A small tanh-Gaussian actor pi^W(w | s) picks w in [-M, M]^(H*A);
the policy's weights never change and no gradient passes through it.

    DSRL-SAC (variant="sac"): the env's action *is* the noise (NoiseSpaceEnv); plain SAC on (s, w).
        y   = R + discount * (min_i Q̄_i(s', w') - alpha log pi^W(w'|s')),   w' ~ pi^W(.|s')
        L_Q = sum_i (Q_i(s, w) - y)^2
    DSRL-NA (variant="na", noise aliasing): a critic on the executed action chunk a = pi_dp(s, w),
        y   = R + discount * (min_i Q̄^A_i(s', pi_dp(s', w')) - alpha log pi^W(w'|s'))
        L_A = sum_i (Q^A_i(s, a) - y)^2
      distilled into a noise critic with fresh Gaussian noise (many noises alias to one chunk):
        L_W = sum_i (Q^W_i(s, w) - sg(Q^A_i(s, pi_dp(s, w))))^2,            w ~ N(0, I)
    Both:  actor  L_pi = E[alpha log pi^W(w|s) - min_i Q_i(s, w)]   (Q^W for NA)
           temperature tuned towards target entropy 0 (the paper's configs); Polyak tau 0.005.

`R` is the chunk's summed reward and discount = gamma**steps * (1 - terminated): the shared TD
convention of labkit.rl (see returns.chunk_discount).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from labkit.rl.actor import TanhGaussianActor, Temperature
from labkit.rl.buffer import ReplayBuffer, flatten_obs
from labkit.rl.critics import QEnsemble, min_of_random_subset, polyak_update, target_copy
from labkit.rl.loop import ChunkRuntime, OffPolicyAgent, PolicyChunkEnv, frozen
from labkit.rl.returns import chunk_discount

__all__ = ["DSRL", "DSRLConfig", "NoiseSpaceEnv", "SteeredPolicy", "actor_input", "denoise"]


# ---- the frozen base policy as a map (obs history, noise) -> chunk ------------------------------

def actor_input(policy, history: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the actor and critics see: the policy's normalised observation history, flattened [B, D]."""
    return flatten_obs(policy.normalize_obs(history), list(policy.config.obs_keys))


@torch.no_grad()
def denoise(policy, history: dict[str, torch.Tensor], noise: torch.Tensor, steps: int | None = None) -> torch.Tensor:
    """The normalised chunk [B, H, A] that deterministic sampling makes from `noise` ([B, H*A] or [B, H, A])."""
    c = policy.config
    noise = noise.reshape(len(noise), c.horizon, policy.action_dim).to(policy.device)
    return policy.sample(policy.normalize_obs(history), noise=noise, steps=steps, stochastic=False).actions


class NoiseSpaceEnv(PolicyChunkEnv):
    """The task seen through a frozen generative policy: action = its initial noise w.

    Observation: the policy's observation history {dataset key: [obs_horizon, ...]} in physical units
    (the first frame repeated at reset, as `Policy.select_action` does). Action: w in
    [-noise_bound, noise_bound]^(horizon * action_dim), denoised deterministically into a chunk of
    which the first `n_action_steps` are executed, stopping early at an episode's end (ChunkWrapper's
    semantics). Reward: the executed steps' sum. info adds `is_success` (any executed step),
    `chunk_steps`, `chunk_rewards`, `chunk` (the normalised full chunk, for DSRL-NA's action critic)
    and `actions` (the executed physical actions). See `labkit.rl.loop.PolicyChunkEnv`.
    """

    def __init__(self, env: gym.Env, policy, noise_bound: float = 1.5, denoise_steps: int | None = None):
        super().__init__(env, frozen(policy))
        if noise_bound <= 0:
            raise ValueError(f"noise_bound must be positive, got {noise_bound}")
        self.noise_bound, self.denoise_steps = float(noise_bound), denoise_steps
        self.noise_dim = self.chunk_dim
        self.action_space = spaces.Box(-self.noise_bound, self.noise_bound, (self.noise_dim,), np.float32)

    def chunk(self, noise) -> torch.Tensor:
        """The normalised chunk [H, A] that `noise` makes at the current observation history."""
        w = torch.as_tensor(np.asarray(noise, np.float32)).reshape(1, -1)
        if w.shape[1] != self.noise_dim:
            raise ValueError(f"noise must have {self.noise_dim} numbers (horizon * action_dim), got {w.shape[1]}")
        return denoise(self.policy, self.history(), w, self.denoise_steps)[0]

    def step(self, noise):
        return super().step(self.chunk(np.clip(noise, -self.noise_bound, self.noise_bound)))


class SteeredPolicy(ChunkRuntime):
    """The base policy steered by the actor's deterministic noise, with the batched `Policy` runtime
    interface (`reset`, `select_action`, `predict_action_chunk`) that `labkit.eval.evaluate` drives."""

    def __init__(self, policy, actor: TanhGaussianActor, denoise_steps: int | None = None,
                 deterministic: bool = True):
        self.policy, self.actor, self.denoise_steps = frozen(policy), actor, denoise_steps
        self.deterministic = deterministic
        self.reset()

    @torch.no_grad()
    def predict_action_chunk(self, history: dict[str, torch.Tensor]) -> torch.Tensor:
        """Observation history {dataset key: [B, obs_horizon, ...]} -> steered chunk [B, H, A], physical units."""
        history = {k: torch.as_tensor(v).float() for k, v in history.items()}
        w, _ = self.actor(actor_input(self.policy, history), deterministic=self.deterministic)
        return self.policy.normalizer.unnormalize("action", denoise(self.policy, history, w, self.denoise_steps))


# ---- the trainer ----------------------------------------------------------------------------------

@dataclass
class DSRLConfig:
    """DSRL's settings; defaults follow the paper's configs (ajwagen/dsrl, cfg/gym and cfg/robomimic)."""

    variant: str = "sac"  # "sac" (critic on noise) or "na" (noise aliasing: action critic + distilled noise critic)
    noise_bound: float = 1.5  # M: the actor's noise lies in [-M, M] (the paper's action_magnitude)
    denoise_steps: int | None = None  # sampling steps of the base policy (None: its own config.steps)
    gamma: float = 0.99
    tau: float = 0.005  # Polyak rate of the target critics
    lr: float = 3e-4
    batch_size: int = 256
    utd: int = 20  # gradient steps per chunk collected (updates-to-data)
    hidden: tuple[int, ...] = (256, 256, 256)  # actor and critic MLPs (3 layers in the paper)
    activation: str = "tanh"
    ensemble: int = 2  # critics; the target takes the min over a random `target_subset` of them
    target_subset: int = 2
    layer_norm: bool = True
    target_entropy: float = 0.0  # the paper's configs use 0 (not SAC's usual -dim)
    init_temperature: float = 1.0
    warmup_steps: int = 2000  # env steps of base-policy rollouts (w ~ N(0, I), clipped) before training
    distill_steps: int = 10  # DSRL-NA: noise-critic distillation steps per gradient step
    buffer_size: int = 200_000
    seed: int = 0

    def __post_init__(self):
        self.hidden = tuple(self.hidden)
        if self.variant not in ("sac", "na"):
            raise ValueError(f"variant must be 'sac' or 'na', got {self.variant!r}")
        if not 1 <= self.target_subset <= self.ensemble:
            raise ValueError(f"need 1 <= target_subset <= ensemble, got {self.target_subset}, {self.ensemble}")
        if self.utd < 1 or self.batch_size < 1:
            raise ValueError(f"utd and batch_size must be >= 1, got {self.utd}, {self.batch_size}")


class DSRL(OffPolicyAgent):
    """SAC in the noise space of a frozen generative policy (variant "sac"), or DSRL-NA (variant "na").

        agent = DSRL(flow_policy, "labkit/Detour-v0", DSRLConfig(utd=10))
        history = agent.train(env_steps=20_000, eval_every=5_000, eval_episodes=50)
        labkit.eval.evaluate(agent.eval_policy(), "labkit/Detour-v0", episodes=50)
    """

    method = "dsrl"

    def __init__(self, policy, env_id: str, config: DSRLConfig | dict | None = None,
                 env_kwargs: dict | None = None):
        c = config = self.configure(config, DSRLConfig, env_id, env_kwargs)
        self.seed_torch(c.seed)
        self.policy = frozen(policy)
        env = NoiseSpaceEnv(gym.make(env_id, **self.env_kwargs), policy, c.noise_bound, c.denoise_steps)
        pc = policy.config
        self.noise_shape = (pc.horizon, policy.action_dim)
        noise_dim = env.noise_dim
        obs_shapes = {k: tuple(s.shape) for k, s in env.observation_space.spaces.items()}
        obs_dim = sum(int(np.prod(s)) for s in obs_shapes.values())

        net = dict(hidden=c.hidden, ensemble=c.ensemble, layer_norm=c.layer_norm, activation=c.activation)
        self.actor = TanhGaussianActor(obs_dim, noise_dim, c.hidden, scale=c.noise_bound, activation=c.activation)
        self.temperature = Temperature(c.target_entropy, c.init_temperature)
        # The TD-trained critic: on the noise (SAC) or on the executed normalised chunk (NA).
        self.critic = QEnsemble(obs_dim, noise_dim, **net)
        self.critic_target = target_copy(self.critic)
        self.noise_critic = QEnsemble(obs_dim, noise_dim, **net) if c.variant == "na" else None
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=c.lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=c.lr)
        self.temp_opt = torch.optim.Adam(self.temperature.parameters(), lr=c.lr)
        self.noise_critic_opt = (torch.optim.Adam(self.noise_critic.parameters(), lr=c.lr)
                                 if self.noise_critic is not None else None)

        fields = {"obs": obs_shapes, "noise": (noise_dim,), "chunk": (noise_dim,), "reward": (),
                  "next_obs": obs_shapes, "discount": ()}
        self.buffer = ReplayBuffer(c.buffer_size, fields)
        self.start(env)

    @property
    def name(self) -> str:
        return f"DSRL-{self.config.variant.upper()}"

    # ---- acting ---------------------------------------------------------------------------------
    def _x(self, obs: dict) -> torch.Tensor:
        return actor_input(self.policy, {k: torch.as_tensor(v).float() for k, v in obs.items()})

    def collect(self, random: bool = False) -> dict:
        """Run one chunk in the env with w ~ pi^W(.|s) (or w ~ N(0, I) clipped, the base policy) and store it."""
        if random:
            w = torch.randn(1, self.env.noise_dim, generator=self.gen).clamp(-self.config.noise_bound,
                                                                             self.config.noise_bound)
        else:
            with torch.no_grad():
                w, _ = self.actor(self._x({k: v[None] for k, v in self._obs.items()}))
        next_obs, reward, terminated, truncated, info = self.env.step(w[0].numpy())
        self.buffer.add({
            "obs": {k: v[None] for k, v in self._obs.items()}, "noise": w, "chunk": info["chunk"].reshape(1, -1),
            "reward": [reward], "next_obs": {k: v[None] for k, v in next_obs.items()},
            "discount": chunk_discount(info["chunk_steps"], terminated, self.config.gamma).view(1)})
        self.env_steps += info["chunk_steps"]
        info.update(reward=reward, episode_done=self.advance(next_obs, terminated, truncated))
        return info

    # ---- learning -------------------------------------------------------------------------------
    def _critic_input(self, x: torch.Tensor, history: dict, w: torch.Tensor) -> torch.Tensor:
        """What the TD critic scores for noise w: w itself (SAC) or the chunk it denoises into (NA)."""
        if self.config.variant == "sac":
            return w
        return denoise(self.policy, history, w, self.config.denoise_steps).flatten(1)

    def _min_q(self, q: torch.Tensor) -> torch.Tensor:
        return min_of_random_subset(q, self.config.target_subset, self.gen)[0]

    def update(self) -> dict:
        """One gradient step of critic (+ NA distillation), actor and temperature on a replay batch."""
        c = self.config
        b = self.buffer.sample(c.batch_size, self.gen)
        x, x_next = actor_input(self.policy, b["obs"]), actor_input(self.policy, b["next_obs"])
        alpha = self.temperature.alpha

        # Critic: TD on stored transitions (noise for SAC, executed chunk for NA).
        with torch.no_grad():
            w_next, logp_next = self.actor(x_next)
            q_next = self._min_q(self.critic_target(x_next, self._critic_input(x_next, b["next_obs"], w_next)))
            y = b["reward"] + b["discount"] * (q_next - alpha * logp_next)
        q = self.critic(x, b["noise"] if c.variant == "sac" else b["chunk"])
        critic_loss = (q - y).pow(2).mean(1).sum()
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()
        out = {"critic_loss": critic_loss.item(), "q": q.mean().item()}

        # DSRL-NA: distil Q^A(s, pi_dp(s, w)) into Q^W(s, w) with fresh Gaussian noise.
        q_actor = self.critic
        if c.variant == "na":
            for _ in range(c.distill_steps):
                w = torch.randn(c.batch_size, self.env.noise_dim, generator=self.gen)
                with torch.no_grad():
                    target = self.critic(x, self._critic_input(x, b["obs"], w))
                distill_loss = (self.noise_critic(x, w) - target).pow(2).mean(1).sum()
                self.noise_critic_opt.zero_grad()
                distill_loss.backward()
                self.noise_critic_opt.step()
            out["distill_loss"] = distill_loss.item()
            q_actor = self.noise_critic

        # Actor: maximise the (noise-space) critic plus entropy; then the temperature.
        w, logp = self.actor(x)
        actor_loss = (alpha * logp - self._min_q(q_actor(x, w))).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()
        temp_loss = self.temperature.loss(logp)
        self.temp_opt.zero_grad()
        temp_loss.backward()
        self.temp_opt.step()

        polyak_update(self.critic_target, self.critic, c.tau)
        self.updates += 1
        out.update(actor_loss=actor_loss.item(), alpha=alpha.item(), entropy=-logp.mean().item())
        self.log.append(out)
        return out

    # ---- evaluation (the loop itself is labkit.rl.train) ---------------------------------------------
    def eval_policy(self) -> SteeredPolicy:
        """The base policy steered by the actor's deterministic (mode) noise, for `labkit.eval.evaluate`."""
        return SteeredPolicy(self.policy, self.actor, self.config.denoise_steps)

    def state_dict(self) -> dict:
        """The trained parts (the base policy is frozen and saved on its own)."""
        return {"config": dataclasses.asdict(self.config), "actor": self.actor.state_dict(),
                "critic": self.critic.state_dict(), "temperature": self.temperature.state_dict(),
                "noise_critic": self.noise_critic.state_dict() if self.noise_critic is not None else None}
