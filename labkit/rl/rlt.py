"""RLT: an "RL token" read out of a frozen pretrained policy, and a small actor-critic on that token that
edits the policy's action chunk online, anchored to it.

Xu, Springenberg, Equi, Amin, Esmail, Levine, Ke, "RL Token: Bootstrapping Online RL with VLA Models"
(Physical Intelligence, arXiv 2604.23073). No code was released and the exact loss forms were not
retrieved: this is the reconstruction of ../shared/reference/algorithms.md section 8, at CPU scale, with
a labkit state policy (BC or flow, chunk H, n_action_steps E executed) standing in for the VLA.

    Phase 1 (the token, trained once on the demonstrations, then frozen with the base):
        h   = the base's penultimate features: the input of the last linear layer that writes its
              action chunk (BC: the head MLP's last hidden layer; flow/diffusion with an MLP denoiser:
              the denoiser's last hidden layer at the final sampling step). That is the representation
              the action is read out of, so it holds all the base knows about the observation; for a
              state policy the observation encoder is only a flatten, with nothing learned to keep.
        z   = E(h~),   h~ = (h - mean) / std (per feature, over the demos)        the RL token, 16-d
        L_rec = mean (D(z) - h~)^2                                                 (autoencoding)
    Phase 2 (TD3 on chunks; the token, its statistics and the base are frozen):
        a~  = the executed part of the base's normalised chunk, E*A numbers        the reference
        x   = z  (obs_input="state": the normalised observation history instead; "both": both)
        a   = clip(pi(x, m * a~), -1, 1),   pi = action_bound * tanh(MLP) (1.25: the demos' many full-speed
                                 +-1 actions are reachable),  m ~ Bernoulli(1 - ref_dropout) per row when
                                 training (reference dropout: the actor cannot simply copy a~)
        acting: a + clip(N(0, explore_std^2), +-noise_clip), clipped to [-1, 1], replaces the first E
                steps of the base's chunk (one decision per chunk, E env steps)
        y   = R + discount * min over a random pair of Q_target_i(x', a'),
              a' = clip(pi_target(x', a~') + clip(N(0, target_noise^2), +-noise_clip), -1, 1)
        L_Q = sum_i mean (Q_i(x, a) - y)^2
        L_pi = -mean_i Q_i(x, a) + beta * mean_b ||pi(x, m a~) - a~||^2          (the anchor, unclipped)
      Before RL (`actor_init_steps` on the demos' states) and during the critic's warm-up the actor fits
      the reference alone (L_pi = mean ||a - a~||^2, with dropout), so RL starts from the base's
      behaviour whatever beta is (beta = 0 then ablates only the anchor, not the start).
`R` is the chunk's summed reward and discount = gamma**steps * (1 - terminated) (labkit.rl's convention).
RLPD's demo mixing as in ResFiT: `offline_ratio` of each batch comes from the demos' chunk transitions.

What differs from ResFiT (labkit.rl.residual): ResFiT adds a small bounded residual to every env step on
the raw state; RLT outputs the whole executed chunk from a compact learned state, kept near the base
chunk by a penalty rather than a bound, one decision per chunk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from labkit.nn import MLPDenoiser, mlp
from labkit.rl.actor import TanhGaussianActor
from labkit.rl.best_of_n import critic_action, critic_obs, dataset_chunks
from labkit.rl.buffer import MixedSampler, ReplayBuffer
from labkit.rl.critics import QEnsemble, min_of_random_subset, polyak_update, target_copy
from labkit.rl.loop import ChunkRuntime, OffPolicyAgent, PolicyChunkEnv, frozen
from labkit.rl.returns import chunk_discount
from labkit.training import minibatch_fit

OBS_INPUTS = ("token", "state", "both")


@dataclass
class RLTConfig:
    """RLT's settings at CPU scale. The paper's token size, beta, chunk length and UTD were not retrieved."""

    token_dim: int = 16  # the RL token's width (the recipe's 16-d bottleneck)
    token_hidden: int = 128  # one hidden layer in the encoder and in the decoder
    token_steps: int = 3000  # autoencoder steps on the demos' features, before RL
    token_lr: float = 1e-3
    obs_input: str = "token"  # what actor and critic see: "token", "state" (ablation: no token) or "both"
    action_bound: float = 1.25  # the actor's tanh range, clipped to [-1, 1]: a demo's full-speed +-1 is reachable
    beta: float = 0.1  # anchor weight on ||a - a~||^2 (summed over the E*A numbers)
    ref_dropout: float = 0.5  # probability of zeroing an actor input's reference chunk while training
    explore_std: float = 0.05  # Gaussian exploration noise on the actor's chunk
    target_noise: float = 0.05  # TD3 target-policy smoothing std
    noise_clip: float = 0.3
    gamma: float = 0.99
    tau: float = 0.005
    actor_lr: float = 1e-4
    critic_lr: float = 3e-4
    batch_size: int = 256
    utd: int = 4  # updates per chunk: with E = 4, one per env step
    hidden: tuple[int, ...] = (256, 256)  # actor and critic MLPs (LayerNorm)
    ensemble: int = 2
    target_subset: int = 2
    grad_clip: float = 1.0
    offline_ratio: float = 0.5  # share of each batch from the demos (RLPD); the token needs demos anyway
    warmup_steps: int = 1000  # env steps of a~ + U(-warmup_noise, warmup_noise) before updates
    warmup_noise: float = 0.2
    actor_init_steps: int = 2000  # steps fitting the actor to the reference on the demos, before RL
    critic_warmup: int = 250  # updates in which the actor only fits the reference (the critic learns)
    denoise_steps: int | None = None  # a generative base's sampling steps (None: its own)
    buffer_size: int = 200_000
    seed: int = 0

    def __post_init__(self):
        self.hidden = tuple(self.hidden)
        if self.obs_input not in OBS_INPUTS:
            raise ValueError(f"obs_input must be one of {OBS_INPUTS}, got {self.obs_input!r}")
        for name in ("token_dim", "token_hidden", "token_steps", "gamma", "batch_size", "utd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("beta", "actor_init_steps", "explore_std", "target_noise", "noise_clip", "warmup_steps", "warmup_noise",
                     "critic_warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.action_bound < 1:
            raise ValueError(f"action_bound must be >= 1 (the actor must reach the normalised box's edges), "
                             f"got {self.action_bound}")
        if not 0.0 <= self.ref_dropout < 1.0:
            raise ValueError(f"ref_dropout must lie in [0, 1) (1 would never show the actor its reference), "
                             f"got {self.ref_dropout}")
        if not 0.0 <= self.offline_ratio <= 1.0:
            raise ValueError(f"offline_ratio must lie in [0, 1], got {self.offline_ratio}")
        if not 1 <= self.target_subset <= self.ensemble:
            raise ValueError(f"need 1 <= target_subset <= ensemble, got {self.target_subset}, {self.ensemble}")


# ---- phase 1: the base's representation and the RL token ------------------------------------------------

def readout_layer(policy) -> nn.Linear:
    """The last linear layer of the network that writes `policy`'s action chunk; its input is h."""
    head = getattr(policy, "head", None)
    if isinstance(head, nn.Sequential) and isinstance(head[-1], nn.Linear):  # BCPolicy's MLP
        return head[-1]
    if hasattr(policy, "net"):  # a generative policy: the denoiser it samples with (EMA in eval mode)
        den = policy.net()["denoiser"]
        if isinstance(den, MLPDenoiser):
            return den.net[-1] if den.cond == "concat" else den.out[-1]
    raise TypeError(f"RLT reads the penultimate features of an MLP base (BCPolicy, or a flow/diffusion policy "
                    f"with backbone='mlp'); got {type(policy).__name__}")


@torch.no_grad()
def base_reference(policy, obs_norm: dict[str, torch.Tensor], denoise_steps: int | None = None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h [B, F], the base's normalised chunk [B, H, A]) for normalised observation histories: one forward
    pass (or one sampling chain, noise from `generator`), h caught on its way into the readout layer."""
    caught = []
    hook = readout_layer(policy).register_forward_hook(lambda m, inp, out: caught.append(inp[0]))
    try:
        if hasattr(policy, "sample"):
            B = len(next(iter(obs_norm.values())))
            noise = torch.randn(B, policy.config.horizon, policy.action_dim, generator=generator)
            chunk = policy.sample(obs_norm, noise=noise, steps=denoise_steps).actions
        else:
            chunk = policy.predict_normalized(obs_norm)
    finally:
        hook.remove()
    return caught[-1].reshape(len(chunk), -1), chunk  # the last call wrote the chunk (final sampling step)


class RLToken(nn.Module):
    """z = E((h - mean) / std), with a decoder D for the autoencoding loss. Trained by `fit`, then frozen."""

    def __init__(self, feat_dim: int, token_dim: int = 16, hidden: int = 128):
        super().__init__()
        self.feat_dim, self.token_dim = feat_dim, token_dim
        self.register_buffer("mean", torch.zeros(feat_dim))
        self.register_buffer("std", torch.ones(feat_dim))
        # ReLU, not labkit's default Mish: ~9x cheaper on a CPU, and nothing here needs smoothness.
        self.encoder = mlp(feat_dim, token_dim, hidden, 1, nn.ReLU)
        self.decoder = mlp(token_dim, feat_dim, hidden, 1, nn.ReLU)

    def standardise(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() != 2 or h.shape[1] != self.feat_dim:
            raise ValueError(f"the RL token reads base features [B, {self.feat_dim}], got {list(h.shape)}: "
                             "the base policy is not the one the token was trained on")
        return (h - self.mean) / self.std

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.standardise(h))

    def reconstruction_loss(self, h: torch.Tensor) -> torch.Tensor:
        """L_rec = mean over batch and features of (D(E(h~)) - h~)^2."""
        target = self.standardise(h)
        return (self.decoder(self.encoder(target)) - target).pow(2).mean()

    def fit(self, h: torch.Tensor, steps: int, lr: float = 1e-3, batch_size: int = 256, seed: int = 0) -> np.ndarray:
        """Set the standardisation from `h` (the demos' features), train on L_rec, freeze. Returns the losses."""
        self.mean.copy_(h.mean(0))
        self.std.copy_(h.std(0).clamp(min=1e-3))  # a dead ReLU unit (std 0) would otherwise divide by 0
        losses = minibatch_fit(self, lambda idx: self.reconstruction_loss(h[idx]), len(h), steps, batch_size, lr, seed)
        self.eval().requires_grad_(False)
        return losses


# ---- phase 2: the anchored actor-critic --------------------------------------------------------------------

def drop_reference(ref: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """ref [B, d] with each row zeroed with probability p (reference-action dropout)."""
    if p == 0:
        return ref
    keep = torch.rand(len(ref), 1, generator=generator) >= p
    return ref * keep


def act(actor: TanhGaussianActor, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The actor's deterministic chunk clip(pi(x, a~), -1, 1) [B, E*A] (the reference shown in full)."""
    return actor(torch.cat([x, ref], -1), deterministic=True)[0].clamp(-1, 1)


def actor_objective(q: torch.Tensor, raw: torch.Tensor, ref: torch.Tensor, beta: float) -> torch.Tensor:
    """L_pi = -mean_i,b Q_i + beta * mean_b ||raw - a~||^2: q [E, B] the critics at the clipped edit, raw
    [B, E*A] the actor's unclipped chunk (so the anchor also pulls back an edit past the box), ref [B, E*A]."""
    return -q.mean() + beta * (raw - ref).pow(2).sum(-1).mean()


def anchored_actor_loss(agent: RLT, x: torch.Tensor, ref: torch.Tensor, q_weight: float = 1.0) -> torch.Tensor:
    """`agent.actor_loss_fn` (default `actor_objective`) at a = pi(x, dropped a~); q_weight 0: the warm-up's
    fit to the reference alone, mean_b ||a - a~||^2. Draws the dropout from `agent.gen`."""
    c = agent.config
    raw = agent.actor(torch.cat([x, drop_reference(ref, c.ref_dropout, agent.gen)], -1), deterministic=True)[0]
    if q_weight == 0:
        return (raw - ref).pow(2).sum(-1).mean()
    return agent.actor_loss_fn(q_weight * agent.critic(x, raw.clamp(-1, 1)), raw, ref, c.beta)


def chunk_critic_loss(agent: RLT, batch: dict) -> torch.Tensor:
    """TD3's critic loss on chunk transitions: sum over heads of mean (Q_i(x, a) - y)^2, y as in the module
    docstring (the target actor sees the full reference a~'). Draws the smoothing noise, then the pair."""
    c = agent.config
    x_next = batch["next_obs"]
    with torch.no_grad():
        a_next = act(agent.actor_target, x_next, batch["next_ref"])
        noise = (torch.randn(a_next.shape, generator=agent.gen) * c.target_noise).clamp(-c.noise_clip, c.noise_clip)
        q_next = agent.critic_target(x_next, (a_next + noise).clamp(-1, 1))
        y = batch["reward"] + batch["discount"] * min_of_random_subset(q_next, c.target_subset, agent.gen)[0]
    return (agent.critic(batch["obs"], batch["action"]) - y).pow(2).mean(1).sum()


class RLTPolicy(ChunkRuntime):
    """The base's chunk with its first E steps replaced by the actor's deterministic edit, as a batched
    runtime policy for `labkit.eval.evaluate` (a flow base draws its noise from torch's global generator)."""

    def __init__(self, agent: RLT):
        self.agent, self.policy = agent, agent.policy
        self.reset()

    @torch.no_grad()
    def predict_action_chunk(self, history: dict[str, torch.Tensor]) -> torch.Tensor:
        obs = self.policy.normalize_obs({k: torch.as_tensor(v).float() for k, v in history.items()})
        x, chunk = self.agent.features(obs, generator=None)
        ref = critic_action(chunk, self.agent.execute)
        a = act(self.agent.actor, x, ref)
        return self.policy.normalizer.unnormalize("action", self.agent.edited(chunk, a))


class RLT(OffPolicyAgent):
    """RLT on a frozen chunked MLP policy (BC, or flow/diffusion with an MLP denoiser).

        agent = RLT(bc_policy, "labkit/PegInsert-v0", RLTConfig(), demos=dataset)
        history = agent.train(env_steps=10_000, eval_every=2_500, eval_episodes=20)

    `demos` (an EpisodeDataset with `next.reward`) trains the token and, with offline_ratio > 0, fills that
    share of every batch. The token is trained in the constructor (`token_losses` holds its curve).
    """

    name = "RLT"
    method, takes_demos = "rlt", True

    def __init__(self, policy, env_id: str, config: RLTConfig | dict | None = None, demos=None,
                 env_kwargs: dict | None = None, actor_loss_fn: Callable = actor_objective):
        c = config = self.configure(config, RLTConfig, env_id, env_kwargs)
        self.actor_loss_fn = actor_loss_fn  # a lesson hands in its own (same arguments as actor_objective)
        if demos is None:
            raise ValueError("RLT trains its token on the base's features over demonstrations: "
                             "pass demos=<EpisodeDataset> (e.g. the base's own training demos)")
        readout_layer(policy)  # a base without an MLP readout is named before anything runs
        self.seed_torch(c.seed)
        self.policy = frozen(policy)
        env = PolicyChunkEnv(gym.make(env_id, **self.env_kwargs), policy)
        self.execute = policy.config.n_action_steps
        d = self.execute * policy.action_dim

        # Phase 1: the demos' chunk transitions, the base's features on them, the token fitted and frozen.
        data = dataset_chunks(demos, policy, c.gamma, env.spec.max_episode_steps if env.spec else None)
        obs, obs_next = policy.normalize_obs(data["obs"]), policy.normalize_obs(data["next_obs"])
        h, chunk = base_reference(policy, obs, c.denoise_steps, self.gen)
        h_next, chunk_next = base_reference(policy, obs_next, c.denoise_steps, self.gen)
        self.token = RLToken(h.shape[1], c.token_dim, c.token_hidden)
        self.token_losses = self.token.fit(h, c.token_steps, c.token_lr, c.batch_size, c.seed)
        x, x_next = self._inputs(h, obs), self._inputs(h_next, obs_next)

        # Phase 2: actor on [x, a~] (absolute chunk in [-1, 1]), critic ensemble on (x, a).
        self.actor = TanhGaussianActor(x.shape[1] + d, d, c.hidden, scale=c.action_bound, layer_norm=True)
        self.actor_target = target_copy(self.actor)
        self.critic = QEnsemble(x.shape[1], d, c.hidden, ensemble=c.ensemble, layer_norm=True)
        self.critic_target = target_copy(self.critic)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=c.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=c.critic_lr)

        fields = {"obs": (x.shape[1],), "ref": (d,), "action": (d,), "reward": (), "next_obs": (x.shape[1],),
                  "next_ref": (d,), "discount": ()}
        self.buffer = ReplayBuffer(c.buffer_size, fields)
        self.demos = ReplayBuffer(len(x), fields)
        ref, ref_next = critic_action(chunk, self.execute), critic_action(chunk_next, self.execute)
        self.demos.add({"obs": x, "ref": ref, "action": data["action"], "reward": data["reward"],
                        "next_obs": x_next, "next_ref": ref_next, "discount": data["discount"]})
        # The actor starts at the base: fitted to reproduce a~ on the demos' states (with reference dropout,
        # so it learns the chunk from x too), before any RL.
        self.actor_init_losses = np.zeros(0)
        if c.actor_init_steps:
            self.actor_init_losses = minibatch_fit(self.actor, lambda idx: anchored_actor_loss(self, x[idx], ref[idx], 0.0),
                                                   len(x), c.actor_init_steps, c.batch_size, 1e-3, c.seed)
            self.actor.train()
            self.actor_target.load_state_dict(self.actor.state_dict())
        self.sampler = MixedSampler(self.demos, self.buffer, c.offline_ratio)
        self.start(env)
        self._x, self._chunk = self._now()

    # ---- features --------------------------------------------------------------------------------
    def _inputs(self, h: torch.Tensor, obs_norm: dict[str, torch.Tensor]) -> torch.Tensor:
        """x: the token of h, the flattened normalised history, or both (config.obs_input)."""
        parts = []
        if self.config.obs_input in ("token", "both"):
            parts.append(self.token(h))
        if self.config.obs_input in ("state", "both"):
            parts.append(critic_obs(self.policy, obs_norm))
        return torch.cat(parts, -1)

    @torch.no_grad()
    def features(self, obs_norm: dict[str, torch.Tensor], generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [B, Dx], the base's normalised chunk [B, H, A]) at normalised observation histories."""
        h, chunk = base_reference(self.policy, obs_norm, self.config.denoise_steps, generator)
        return self._inputs(h, obs_norm), chunk

    def edited(self, chunk: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The base's chunk [B, H, A] with its first E steps replaced by a [B, E*A]."""
        out = chunk.clone()
        out[:, : self.execute] = a.view(len(a), self.execute, -1)
        return out

    def _now(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features(self.policy.normalize_obs(self.env.history()), self.gen)

    def restart(self, obs) -> None:
        super().restart(obs)
        self._x, self._chunk = self._now()

    # ---- acting ------------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self, random: bool = False) -> dict:
        """One chunk: the actor's edit of the base chunk plus noise (warm-up: a~ + uniform noise)."""
        c, x = self.config, self._x
        ref = critic_action(self._chunk, self.execute)
        if random:
            a = ref + (torch.rand(ref.shape, generator=self.gen) * 2 - 1) * c.warmup_noise
        else:
            noise = (torch.randn(ref.shape, generator=self.gen) * c.explore_std).clamp(-c.noise_clip, c.noise_clip)
            a = act(self.actor, x, ref) + noise
        a = a.clamp(-1, 1)
        next_obs, reward, terminated, truncated, info = self.env.step(self.edited(self._chunk, a)[0].flatten().numpy())
        x_next, chunk_next = self._now()  # before a reset: the history after this chunk
        self.buffer.add({"obs": x, "ref": ref, "action": a, "reward": [reward], "next_obs": x_next,
                         "next_ref": critic_action(chunk_next, self.execute),
                         "discount": chunk_discount(info["chunk_steps"], terminated, c.gamma).view(1)})
        self.env_steps += info["chunk_steps"]
        done = self.advance(next_obs, terminated, truncated)
        self._x, self._chunk = self._now() if done else (x_next, chunk_next)
        return {"reward": reward, "episode_done": done, "is_success": info["is_success"]}

    # ---- learning ----------------------------------------------------------------------------------
    def update(self) -> dict:
        """One critic step and one actor step (fitting the reference alone during the critic's warm-up)."""
        c = self.config
        b = self.sampler.sample(c.batch_size, self.gen)
        critic_loss = chunk_critic_loss(self, b)
        self.critic_opt.zero_grad()
        critic_loss.backward()
        nn.utils.clip_grad_norm_(self.critic.parameters(), c.grad_clip)
        self.critic_opt.step()

        warm = self.updates < c.critic_warmup
        actor_loss = anchored_actor_loss(self, b["obs"], b["ref"], q_weight=0.0 if warm else 1.0)
        self.actor_opt.zero_grad()
        actor_loss.backward()
        nn.utils.clip_grad_norm_(self.actor.parameters(), c.grad_clip)
        self.actor_opt.step()
        polyak_update(self.actor_target, self.actor, c.tau)
        polyak_update(self.critic_target, self.critic, c.tau)
        with torch.no_grad():  # for the log: how far the (undropped) actor's chunk is from the reference
            a = act(self.actor, b["obs"], b["ref"])
        out = {"critic_loss": critic_loss.item(), "actor_loss": actor_loss.item(),
               "edit": (a - b["ref"]).abs().mean().item()}
        self.updates += 1
        self.log.append(out)
        return out

    # ---- evaluation --------------------------------------------------------------------------------
    def eval_policy(self) -> RLTPolicy:
        return RLTPolicy(self)

    def state_dict(self) -> dict:
        """The trained parts (the base policy is frozen and saved on its own)."""
        return {"config": dataclasses.asdict(self.config), "token": self.token.state_dict(),
                "actor": self.actor.state_dict(), "critic": self.critic.state_dict()}
