"""QAM: Q-learning with adjoint matching. A critic-guided flow policy trained by regression, never by
backpropagating Q through its sampler.

Li, Levine, "Q-learning with Adjoint Matching" (arXiv 2601.14234); Adjoint Matching is Domingo-Enrich
et al. (2025). The target is the behaviour-regularised policy pi*(a|s) ~ pi_beta(a|s) exp(inv_temp Q(s, a)),
reached by finetuning a copy v_theta of a frozen flow policy v_beta. labkit's flow convention is the
paper's: t runs from noise (t = 0) to action (t = 1), x_t = (1 - t) x0 + t a, v ~ a - x0
(`labkit.policies.flow`). With K steps, h = 1/K, t_k = k h, on normalised action chunks:

    memoryless SDE   sigma_k = sqrt(2 (1 - t_k + h) / (t_k + h))
                     x_{k+1} = x_k + h (2 v_theta(x_k, t_k) - x_k / (t_k + h)) + sqrt(h) sigma_k xi   (k < K-1)
                     x_K     = x_{K-1} + h v_beta(x_{K-1}, t_{K-1})              (the last step: the base's ODE)
    lean adjoint     a_K = -inv_temp grad_a mean_i Qbar_i(s, clip(x_K, -1, 1))        (target critic)
                     a_k = a_{k+1} + h J_k^T a_{k+1},  J_k = d/dx [2 v_beta(x, t_k + h) - x / (t_k + h)] at x_k
                     (only the *base* velocity's Jacobian, by torch.func.vjp; the path is stop-gradient)
    adjoint matching L_AM = mean_batch sum_k || (2 / sigma_k)(v_theta(x_k, t_k) - v_beta(x_k, t_k)) + sigma_k a_k ||^2
    critic           y = R + discount * (mean_i Qbar_i(s', a') - rho std_i Qbar_i(s', a')),   a' = ODE(v_theta; s')
                     L_Q = sum_i mean (Q_i(s, a) - y)^2

2 v - x/(t+h) is the drift of the memoryless SDE: v plus sigma^2/2 times the score, -(x - t v)/(1 - t) on the
linear path; its noise schedule makes the final sample independent of the starting noise, which is what
lets a terminal reward tilt the distribution by exactly exp(inv_temp Q). At the optimum
v_theta = v_beta - sigma^2 a / 2. The agent acts with v_theta's deterministic Euler ODE from random noise
(the paper's default), clipped to [-1, 1]. Critic convention: labkit's chunk critic (`labkit.rl.best_of_n`):
x = the normalised observation history, a = the executed part of the chunk; R is the chunk's summed
reward and discount = gamma**k (1 - terminated), the n-step ("Q-chunking") target. v_beta stays frozen
(the paper also keeps training it by flow matching on the buffer; here it is the pretrained base).
`bandit_tilt` is section (e)'s 1-step toy: a bimodal 2-D base and a linear Q, samples vs inv_temp.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from labkit.rl.best_of_n import critic_action, critic_obs, dataset_chunks
from labkit.rl.buffer import MixedSampler, ReplayBuffer
from labkit.rl.critics import mean_minus_std, polyak_update
from labkit.rl.loop import ChunkRuntime, OffPolicyAgent, frozen

Velocity = Callable[[torch.Tensor, float], torch.Tensor]  # v(x [B, ...], t) -> [B, ...], t a float

# ---- the algorithm box: pure functions ----------------------------------------------------------------


def memoryless_sigma(k: int | torch.Tensor, steps: int) -> torch.Tensor | float:
    """sigma_k = sqrt(2 (1 - t_k + h) / (t_k + h)) with t_k = k h, h = 1/steps (the +h keeps it finite at t = 0)."""
    h = 1.0 / steps
    t = k * h
    if isinstance(t, torch.Tensor):
        return torch.sqrt(2 * (1 - t + h) / (t + h))
    return math.sqrt(2 * (1 - t + h) / (t + h))


def memoryless_step(x: torch.Tensor, v: torch.Tensor, k: int, steps: int, xi: torch.Tensor) -> torch.Tensor:
    """x_{k+1} = x_k + h (2 v - x_k / (t_k + h)) + sqrt(h) sigma_k xi, with v = v_theta(x_k, t_k)."""
    h = 1.0 / steps
    t = k * h
    return x + h * (2 * v - x / (t + h)) + math.sqrt(h) * memoryless_sigma(k, steps) * xi


@torch.no_grad()
def memoryless_path(v_fine: Velocity, v_base: Velocity, x0: torch.Tensor, steps: int,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """The stop-gradient path [K+1, *x0.shape]: K-1 memoryless SDE steps of v_fine, then one ODE step of
    v_base (as the adjoint-matching paper ends its sampler)."""
    if steps < 2:
        raise ValueError(f"the memoryless path needs steps >= 2 (K-1 SDE steps and a final ODE step), got {steps}")
    h, xs = 1.0 / steps, [x0]
    for k in range(steps - 1):
        xi = torch.randn(x0.shape, generator=generator, device=x0.device)
        xs.append(memoryless_step(xs[-1], v_fine(xs[-1], k * h), k, steps, xi))
    xs.append(xs[-1] + h * v_base(xs[-1], (steps - 1) * h))
    return torch.stack(xs)


def lean_adjoint(v_base: Velocity, xs: torch.Tensor, a_final: torch.Tensor) -> torch.Tensor:
    """The lean adjoint states [K, *x.shape] for the path xs [K+1, ...] (a_0 ... a_{K-1}), backward from
    a_K = a_final: a_k = a_{k+1} + h J_k^T a_{k+1}, J_k the Jacobian of 2 v_base(x, t_k + h) - x / (t_k + h)
    at x_k. One vector-Jacobian product per step through the base alone, never through v_theta."""
    steps = xs.shape[0] - 1
    if a_final.shape != xs.shape[1:]:
        raise ValueError(f"a_final must have the shape of one path point {tuple(xs.shape[1:])}, got {tuple(a_final.shape)}")
    h, adj, out = 1.0 / steps, a_final.detach(), []
    for k in reversed(range(steps)):
        t = k * h
        _, vjp = torch.func.vjp(lambda z, t=t: 2 * v_base(z, t + h) - z / (t + h), xs[k].detach())
        adj = adj + h * vjp(adj)[0]
        out.append(adj)
    return torch.stack(out[::-1])


def adjoint_matching_loss(v_fine: torch.Tensor, v_base: torch.Tensor, adj: torch.Tensor,
                          sigma: torch.Tensor) -> torch.Tensor:
    """L_AM = mean over the batch of sum over k and dims ||(2/sigma_k)(v_fine - v_base) + sigma_k a_k||^2, for
    velocities and adjoints [K, B, ...] at the path's points and sigma [K]."""
    if not v_fine.shape == v_base.shape == adj.shape or sigma.shape != v_fine.shape[:1]:
        raise ValueError(f"need v_fine, v_base, adj of one shape [K, B, ...] and sigma [K], got {tuple(v_fine.shape)}, "
                         f"{tuple(v_base.shape)}, {tuple(adj.shape)}, {tuple(sigma.shape)}")
    s = sigma.view(-1, *[1] * (v_fine.dim() - 1))
    return ((2 / s) * (v_fine - v_base) + s * adj).pow(2).flatten(2).sum(-1).sum(0).mean()


def terminal_adjoint(q_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """a_K = -inv_temp grad_x sum_batch q_fn(clip(x, -1, 1)): q_fn maps final samples [B, ...] to values [B]."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(q_fn(x.clamp(-1.0, 1.0)).sum(), x)
    return -inv_temp * grad


# ---- the agent ----------------------------------------------------------------------------------------


@dataclass
class QAMConfig:
    """QAM's settings at CPU scale (algorithms.md section 5(c)); the paper's values in comments."""

    inv_temp: float = 100.0  # paper 0.3 on OGBench (|Q| ~ 100 there); 0/1 rewards keep Q in [0, 1] (Peg: 10 no gain)
    flow_steps: int | None = None  # K (paper 10); None: the base policy's own steps
    gamma: float = 0.99
    tau: float = 0.005  # target critic rate
    rho: float = 0.5  # pessimism of the target: mean - rho * std over the ensemble
    critic_lr: float = 3e-4
    actor_lr: float = 1e-4  # paper 3e-4 from scratch; a pretrained copy needs smaller steps
    batch_size: int = 256
    utd: int = 1  # updates (critic + actor) per chunk collected
    hidden: tuple[int, ...] = (256, 256)  # critic MLP, LayerNorm (paper 4x512)
    ensemble: int = 10  # critics (paper 10)
    grad_clip: float = 1.0
    offline_ratio: float = 0.5  # share of every batch from the demos (RLPD's symmetric sampling)
    warmup_steps: int = 1000  # env steps of base rollouts before any update
    critic_warmup: int = 1000  # critic-only updates before the adjoint-matching loss moves v_theta
    buffer_size: int = 200_000
    seed: int = 0

    def __post_init__(self):
        self.hidden = tuple(self.hidden)
        if not (self.inv_temp >= 0 and math.isfinite(self.inv_temp)):
            raise ValueError(f"inv_temp must be a finite number >= 0 (0: no tilt, v_theta stays the base), "
                             f"got {self.inv_temp}")
        if self.flow_steps is not None and self.flow_steps < 2:
            raise ValueError(f"flow_steps must be >= 2 (or None: the base's own), got {self.flow_steps}")
        if self.ensemble < 2:
            raise ValueError(f"ensemble must be >= 2 (the target takes mean - rho * std over it), got {self.ensemble}")
        for name in ("gamma", "critic_lr", "actor_lr", "batch_size", "utd", "grad_clip"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("rho", "warmup_steps", "critic_warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.offline_ratio <= 1.0:
            raise ValueError(f"offline_ratio must lie in [0, 1], got {self.offline_ratio}")


def flow_velocity(net: nn.ModuleDict, feat: torch.Tensor) -> Velocity:
    """A labkit flow network's velocity at fixed observation features, as v(x, t) with t a float."""
    return lambda x, t: net["denoiser"](x, torch.full((len(x),), float(t), device=x.device), feat)


class QAMPolicy(ChunkRuntime):
    """v_theta's deterministic Euler ODE from random noise, clipped: the acting policy, as a batched
    runtime policy for `labkit.eval.evaluate` (the base policy's config and observation parsing)."""

    def __init__(self, agent: QAM):
        self.agent, self.policy = agent, agent.policy
        self.reset()

    @torch.no_grad()
    def predict_action_chunk(self, history: dict[str, torch.Tensor]) -> torch.Tensor:
        obs = self.policy.normalize_obs({k: torch.as_tensor(v).float() for k, v in history.items()})
        return self.policy.normalizer.unnormalize("action", self.agent.act(obs))


class QAM(OffPolicyAgent):
    """QAM on chunk-level actions of a flow policy, with RLPD demo mixing.

        agent = QAM(flow_policy, "labkit/PegInsert-v0", QAMConfig(), demos=dataset)
        history = agent.train(env_steps=20_000, eval_every=5_000)

    The base is frozen (v_beta: its EMA weights when it has them); `self.actor` (v_theta: encoder and
    velocity network) starts as a copy of it and is the only part of the policy that trains.
    """

    name = "QAM"
    method, takes_demos = "qam", True

    def __init__(self, policy, env_id: str, config: QAMConfig | dict | None = None, demos=None,
                 env_kwargs: dict | None = None):
        from labkit.policies import FlowPolicy

        c = config = self.configure(config, QAMConfig, env_id, env_kwargs)
        if not isinstance(policy, FlowPolicy):
            raise TypeError(f"QAM finetunes a flow policy (labkit.policies.FlowPolicy: its velocity is what adjoint "
                            f"matching regresses), got {type(policy).__name__}")
        self.require_demos(c, demos)
        self.seed_torch(c.seed)
        self.policy = frozen(policy)
        self.steps = c.flow_steps or policy.config.steps
        if self.steps < 2:
            raise ValueError(f"QAM needs >= 2 flow steps; the base samples with {self.steps}: set flow_steps")
        self.base = policy.net(use_ema=True)  # v_beta: the weights the base itself samples with
        self.actor = copy.deepcopy(self.base).requires_grad_(True).train()  # v_theta, starting at v_beta
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=c.actor_lr)

        env, obs_shapes, obs_dim, d = self.chunk_env_and_critic(policy, c.hidden, c.ensemble, c.critic_lr)

        fields = {"obs": obs_shapes, "action": (d,), "reward": (), "next_obs": obs_shapes, "discount": ()}
        self.buffer = ReplayBuffer(c.buffer_size, fields)
        self.demos = ReplayBuffer(1, fields)
        if demos is not None:
            batch = dataset_chunks(demos, policy, c.gamma, env.spec.max_episode_steps if env.spec else None)
            self.demos = ReplayBuffer(len(batch["reward"]), fields)
            self.demos.add({k: batch[k] for k in fields})
        self.sampler = MixedSampler(self.demos, self.buffer, c.offline_ratio)
        self.start(env)

    # ---- acting ---------------------------------------------------------------------------------
    def act(self, obs_norm: dict[str, torch.Tensor], net: nn.ModuleDict | None = None,
            generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised chunks [B, H, A]: the Euler ODE of `net` (default v_theta) from N(0, I), clipped. Training
        draws the noise from the agent's generator; evaluation from torch's, which `evaluate` seeds."""
        x0 = torch.randn(len(next(iter(obs_norm.values()))), self.policy.config.horizon, self.policy.action_dim,
                         generator=generator)
        with torch.no_grad():
            chunk = self.policy.sample(obs_norm, noise=x0, steps=self.steps, net=net or self.actor).actions
        return chunk.clamp(-1.0, 1.0)

    @torch.no_grad()
    def collect(self, random: bool = False) -> dict:
        """One chunk: the base's own sample in warm-up, else v_theta's."""
        obs = self.policy.normalize_obs(self.env.history())
        chunk = self.act(obs, self.base if random else None, self.gen)
        return self.act_chunk(chunk)

    # ---- learning -------------------------------------------------------------------------------
    def critic_loss(self, b: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_Q, Q [E, B]): TD to R + discount (mean - rho std) of the target ensemble at (s', v_theta's chunk)."""
        c = self.config
        with torch.no_grad():
            obs_next = self.policy.normalize_obs(b["next_obs"])
            a_next = critic_action(self.act(obs_next, generator=self.gen), self.execute)
            q_next = mean_minus_std(self.critic_target(critic_obs(self.policy, obs_next), a_next), c.rho)
            y = b["reward"] + b["discount"] * q_next
        q = self.critic(critic_obs(self.policy, self.policy.normalize_obs(b["obs"])), b["action"])
        return (q - y).pow(2).mean(1).sum(), q

    def actor_loss(self, obs_norm: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """L_AM on a batch of observations: sample the memoryless path with v_theta (no gradient), run the
        lean adjoint back from the target critic's action-gradient through v_beta, regress v_theta."""
        c, K = self.config, self.steps
        B, H, A = len(next(iter(obs_norm.values()))), self.policy.config.horizon, self.policy.action_dim
        x = critic_obs(self.policy, obs_norm)
        with torch.no_grad():
            v_beta = flow_velocity(self.base, self.base["encoder"](obs_norm))
            xs = memoryless_path(flow_velocity(self.actor, self.actor["encoder"](obs_norm)), v_beta,
                                 torch.randn(B, H, A, generator=self.gen), K, self.gen)
        a_K = terminal_adjoint(lambda z: self.critic_target(x, critic_action(z, self.execute)).mean(0), xs[-1],
                               c.inv_temp)
        adj = lean_adjoint(v_beta, xs, a_K)  # [K, B, H, A]
        pts = xs[:-1].flatten(0, 1)  # every point x_0 ... x_{K-1}, with its time
        t = torch.arange(K, dtype=torch.float32).repeat_interleave(B) / K
        rep = {k: v.repeat(K, *[1] * (v.dim() - 1)) for k, v in obs_norm.items()}
        with torch.no_grad():
            vb = self.base["denoiser"](pts, t, self.base["encoder"](rep)).view(K, B, H, A)
        vf = self.actor["denoiser"](pts, t, self.actor["encoder"](rep)).view(K, B, H, A)
        loss = adjoint_matching_loss(vf, vb, adj, memoryless_sigma(torch.arange(K, dtype=torch.float32), K))
        return loss, {"adj_final": a_K.abs().mean().item(), "drift": (vf - vb).abs().mean().item()}

    def update(self) -> dict:
        """One critic step; after `critic_warmup` updates also one adjoint-matching step of v_theta."""
        c = self.config
        b = self.sampler.sample(c.batch_size, self.gen)
        critic_loss, q = self.critic_loss(b)
        self.critic_opt.zero_grad()
        critic_loss.backward()
        nn.utils.clip_grad_norm_(self.critic.parameters(), c.grad_clip)
        self.critic_opt.step()
        out = {"critic_loss": critic_loss.item(), "q": q.mean().item()}
        if self.updates >= c.critic_warmup:
            am_loss, info = self.actor_loss(self.policy.normalize_obs(b["obs"]))
            self.actor_opt.zero_grad()
            am_loss.backward()
            nn.utils.clip_grad_norm_(self.actor.parameters(), c.grad_clip)
            self.actor_opt.step()
            out.update(am_loss=am_loss.item(), **info)
        polyak_update(self.critic_target, self.critic, c.tau)
        self.updates += 1
        self.log.append(out)
        return out

    # ---- evaluation -----------------------------------------------------------------------------
    def eval_policy(self) -> QAMPolicy:
        return QAMPolicy(self)

    def state_dict(self) -> dict:
        """The trained parts: v_theta's networks and the critic (the base is frozen and saved on its own)."""
        return {"config": dataclasses.asdict(self.config), "actor": self.actor.state_dict(),
                "critic": self.critic.state_dict()}


# ---- section (e)'s 1-step bandit ---------------------------------------------------------------------


class _Velocity(nn.Module):
    """A small MLP v(x, t) for 2-D points (the bandit toy's flow)."""

    def __init__(self, dim: int = 2, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype).expand(len(x)) if not torch.is_tensor(t) or t.dim() == 0 else t
        return self.net(torch.cat([x, t.view(-1, 1)], -1))


def bandit_tilt(inv_temps: Sequence[float] = (0.0, 0.3, 1.0, 3.0, 10.0), base_steps: int = 2000,
                am_steps: int = 300, batch: int = 256, steps: int = 10, samples: int = 2000, mode: float = 0.8,
                spread: float = 0.1, lr: float = 1e-3, seed: int = 0,
                loss_fn: Callable = adjoint_matching_loss) -> list[dict]:
    """The 1-step bandit of algorithms.md 5(e): behaviour data half at (-mode, 0), half at (+mode, 0) (std
    `spread`), Q(a) = a_x, so pi* ~ pi_beta exp(inv_temp a_x) puts 1 / (1 + exp(-2 inv_temp mode)) of its mass
    in the right-hand mode. Fits v_beta by flow matching, then for each inv_temp a copy v_theta by adjoint
    matching alone (`loss_fn`: a lesson's own adjoint_matching_loss); returns rows {inv_temp, right (v_theta's
    ODE samples with a_x > 0), base, exact, mean_x}."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    def data(n):
        side = torch.randint(0, 2, (n,), generator=gen) * 2 - 1
        return torch.stack([side * mode, torch.zeros(n)], -1) + spread * torch.randn(n, 2, generator=gen)

    def ode(v, n):
        x = torch.randn(n, 2, generator=gen)
        with torch.no_grad():
            for k in range(steps):
                x = x + v(x, k / steps) / steps
        return x

    base = _Velocity()
    opt = torch.optim.Adam(base.parameters(), lr=lr)
    for _ in range(base_steps):  # flow matching on the linear path, labkit's convention
        a, x0 = data(batch), torch.randn(batch, 2, generator=gen)
        t = torch.rand(batch, 1, generator=gen)
        loss = (base((1 - t) * x0 + t * a, t.squeeze(1)) - (a - x0)).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    base.requires_grad_(False)
    base_right = float((ode(base, samples)[:, 0] > 0).float().mean())
    sigma = memoryless_sigma(torch.arange(steps, dtype=torch.float32), steps)
    t_all = torch.arange(steps, dtype=torch.float32).repeat_interleave(batch) / steps
    rows = []
    for tau in inv_temps:
        fine = copy.deepcopy(base).requires_grad_(True)
        opt = torch.optim.Adam(fine.parameters(), lr=lr)
        for _ in range(am_steps if tau > 0 else 0):
            xs = memoryless_path(fine, base, torch.randn(batch, 2, generator=gen), steps, gen)
            adj = lean_adjoint(base, xs, -tau * torch.tensor([1.0, 0.0]).expand(batch, 2))  # grad_a (a_x) = (1, 0)
            pts = xs[:-1].flatten(0, 1)
            with torch.no_grad():
                vb = base(pts, t_all).view(steps, batch, 2)
            loss = loss_fn(fine(pts, t_all).view(steps, batch, 2), vb, adj, sigma)
            opt.zero_grad()
            loss.backward()
            opt.step()
        x = ode(fine, samples)
        rows.append({"inv_temp": float(tau), "right": float((x[:, 0] > 0).float().mean()), "base": base_right,
                     "exact": 1 / (1 + math.exp(-2 * tau * mode)), "mean_x": float(x[:, 0].mean())})
    return rows
