"""DPPO: PPO through the denoising chain of a pretrained diffusion or flow policy.

Ren et al., "Diffusion Policy Policy Optimization" (ICLR 2025; github.com/irom-princeton/dppo).
Every sampling step of a generative policy is a Gaussian, z_{i+1} ~ N(mu_theta(z_i, i, s), sigma_i^2),
so the K denoising steps form an inner MDP inside the env MDP and PPO applies to each step.

    Env MDP:  one decision = one action chunk (n_action_steps executed); reward = the chunk's sum;
              discount d_t = gamma**steps * (1 - terminated), labkit.rl's TD convention.
    GAE:      delta_t = r_t + d_t V(s_{t+1}) - V(s_t),   A_t = delta_t + d_t lambda (1 - done_t) A_{t+1}
              R_t = A_t + V(s_t); A normalised over the batch (optionally clipped at quantiles).
    Steps:    only the last K' of the K steps are finetuned (index j = 0..K'-1 among them); the first
              K - K' are sampled by the frozen base network. Every sampling std is floored at min_std.
    Log-prob: l_j = mean over the executed dims of clamp(log N(z_{j+1}; mu_theta(z_j), sigma_j^2), -5, 2)
    Ratio:    r_{t,j} = exp(l_j^theta - l_j^old)
    Adv:      A_{t,j} = gamma_den**(K' - j - 1) A_t                          (later steps weigh more)
    Clip:     eps_j = eps_base + (eps - eps_base) (e^{c j/(K'-1)} - 1) / (e^c - 1)   (grows along the chain)
    Loss:     L_pi = E[max(-A r, -A clip(r, 1 - eps_j, 1 + eps_j))],   L_V = 1/2 (V(s_t) - R_t)^2
              L = L_pi + vf_coef L_V + bc_coef L_BC,   L_BC = -E[l^theta(chain of the frozen base)]
    Stop:     an iteration's epochs end early once approx KL = E[(r - 1) - log r] exceeds target_kl.

The finetuned policy is a deep copy: the base policy passed in is never modified. `DPPO.policy` is a
labkit policy whose weights (live and EMA) are the finetuned ones, so it can be saved and evaluated
as any policy when K' = K. With K' < K the first steps must still run the frozen base, which
`DPPOPolicy` (what `DPPO.evaluate` rolls out) does.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from torch import nn

from labkit.nn import mlp
from labkit.policies.generative import GenerativePolicy, SampleResult
from labkit.rl.agent import RL_EVAL_SEED, Agent
from labkit.rl.buffer import flatten_obs
from labkit.rl.loop import ChunkRuntime, PolicyChunkEnv
from labkit.rl.returns import chunk_discount, gae

# ---- PPO's pieces on the denoising chain --------------------------------------------------------------
# The chain itself is the policy's: GenerativePolicy.sample(..., ft_steps, frozen, min_std, noise_clip,
# per_dim) draws it and GenerativePolicy.log_prob(..., steps, min_std, per_dim) rescores it.


def reduce_log_probs(log_probs: torch.Tensor, act_steps: int | None = None,
                     clamp: tuple[float, float] = (-5.0, 2.0)) -> torch.Tensor:
    """Per-dim log-probs [B, K', H, A] -> one number per step [B, K']: clamped per dim, then averaged
    over the first `act_steps` of the chunk (the executed ones; all when None). DPPO averages rather
    than sums, so a ratio's size does not grow with the chunk's dimension."""
    lp = log_probs if act_steps is None else log_probs[:, :, :act_steps]
    return lp.clamp(*clamp).mean((-1, -2))


def step_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, act_steps: int | None,
                  clamp: tuple[float, float]) -> torch.Tensor:
    """DPPO's log-probability l_j [B] of one denoising step z_{j+1} ~ N(mean, std^2 I) (x_next, mean [B, H, A],
    std broadcastable): the per-dim Gaussian log-density, clamped, averaged over the executed actions."""
    lp = -0.5 * ((x_next - mean) / std) ** 2 - torch.log(torch.as_tensor(std)) - 0.5 * math.log(2 * math.pi)
    return reduce_log_probs(lp[:, None], act_steps, clamp)[:, 0]


def clip_schedule(ft_steps: int, eps: float, eps_base: float, rate: float) -> torch.Tensor:
    """PPO clip range per finetuned step [K']: eps_base at the first (noisiest), growing exponentially
    (rate c) to eps at the last, which makes the chunk. One step: eps."""
    if ft_steps == 1:
        return torch.tensor([eps])
    j = torch.arange(ft_steps, dtype=torch.float32) / (ft_steps - 1)
    return eps_base + (eps - eps_base) * (torch.exp(rate * j) - 1) / (math.exp(rate) - 1)


def denoising_discount(ft_steps: int, gamma_denoising: float) -> torch.Tensor:
    """gamma_den**(K' - j - 1) for finetuned step j [K']: the step that makes the chunk weighs 1."""
    return gamma_denoising ** torch.arange(ft_steps - 1, -1, -1, dtype=torch.float32)


def ppo_loss(new_lp: torch.Tensor, old_lp: torch.Tensor, adv: torch.Tensor,
             clip: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate on [B, K'] step log-probs with step-weighted advantages [B, K'] and clip
    ranges [K']. Returns the loss and diagnostics (ratio, approx_kl, clipfrac)."""
    logratio = new_lp - old_lp
    ratio = logratio.exp()
    loss = torch.maximum(-adv * ratio, -adv * torch.minimum(torch.maximum(ratio, 1 - clip), 1 + clip)).mean()
    with torch.no_grad():
        stats = {"ratio": ratio.mean().item(), "ratio_dev": (ratio - 1).abs().max().item(),
                 "approx_kl": ((ratio - 1) - logratio).mean().item(),
                 "clipfrac": ((ratio - 1).abs() > clip).float().mean().item()}
    return loss, stats


# ---- envs and the runtime policy ------------------------------------------------------------------


def make_chunk_env(env_id: str, policy: GenerativePolicy, env_kwargs: dict | None = None,
                   env_wrapper: Callable[[gym.Env], gym.Env] | None = None) -> gym.Env:
    """The task at chunk level (labkit.rl.loop.PolicyChunkEnv): observation = the policy's observation
    history; action = a flattened normalised chunk [H * A], of which the first n_action_steps run.
    `env_wrapper` (e.g. a learned reward, labkit.rewards.LearnedReward) wraps the per-step env first."""
    env = gym.make(env_id, **(env_kwargs or {}))
    return _VectorFriendly(PolicyChunkEnv(env_wrapper(env) if env_wrapper is not None else env, policy))


class _VectorFriendly(gym.Wrapper):
    """Drops the per-step arrays from info (`chunk_rewards`, `actions`): their length varies (a chunk cut
    short by an episode's end), which a vector env cannot stack into one array."""

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        for key in ("chunk_rewards", "actions", "chunk"):
            info.pop(key, None)
        return obs, reward, terminated, truncated, info


class DPPOPolicy(ChunkRuntime):
    """The finetuned chain (frozen base steps, then the K' finetuned ones) with the batched runtime
    interface (`reset`, `select_action`, `predict_action_chunk`) that `labkit.eval.evaluate` drives."""

    def __init__(self, agent: DPPO, stochastic: bool = False):
        self.agent, self.policy, self.stochastic = agent, agent.policy, stochastic
        self.reset()

    @torch.no_grad()
    def predict_action_chunk(self, history: dict[str, torch.Tensor]) -> torch.Tensor:
        """Observation history {dataset key: [B, obs_horizon, ...]} -> chunk [B, H, A] in physical units."""
        chunk, _ = self.agent.act(self.policy.normalize_obs(history), self.stochastic)
        return self.policy.normalizer.unnormalize("action", chunk)


# ---- the trainer ------------------------------------------------------------------------------------


@dataclass
class DPPOConfig:
    """DPPO's settings; defaults follow the paper's code (cfg/gym/finetune, model/diffusion/diffusion_ppo.py),
    scaled to a CPU: fewer envs and steps per iteration."""

    num_envs: int = 8  # parallel envs (SyncVectorEnv)
    n_steps: int = 25  # chunk decisions per env per iteration
    denoise_steps: int | None = None  # K (None: the policy's own config.steps)
    ft_steps: int | None = None  # K': finetune the last K' steps (None: all K)
    gamma: float = 0.99  # per env step; a chunk of m steps discounts by gamma**m
    gae_lambda: float = 0.95
    gamma_denoising: float = 0.99
    clip_eps: float = 0.01  # clip range at the last step (Detour, PegInsert: faster with 0.05 and base 0.01)
    clip_eps_base: float = 0.001  # ... at the first finetuned step (the paper's gym configs use 0.01)
    clip_rate: float = 3.0  # c: how sharply the clip range grows along the chain
    min_std: float = 0.1  # floor on every step's std, sampling and log-probs alike
    noise_clip: float = 3.0  # sampled standard-normal noise is clipped to +-noise_clip
    logprob_clamp: tuple[float, float] = (-5.0, 2.0)  # per-dim log-density clamp
    executed_only: bool = True  # log-probs over the executed n_action_steps only (DPPO's reward_horizon)
    norm_adv: bool = True
    adv_quantile: float = 0.0  # clip normalised advantages to their [q, 1-q] quantiles (0: no clipping)
    epochs: int = 5  # passes over each iteration's data
    minibatch_size: int = 50  # decisions per gradient step (each with its K' denoising steps)
    actor_lr: float = 1e-4
    critic_lr: float = 1e-3
    vf_coef: float = 0.5
    bc_coef: float = 0.0  # weight of -log-likelihood of the frozen base's chains under the finetuned one
    target_kl: float | None = 1.0  # stop an iteration's epochs once the approx KL exceeds this
    max_grad_norm: float | None = 1.0
    critic_warmup: int = 0  # first iterations train the value net only
    reward_scale: float = 1.0
    critic_hidden: int = 256  # value net V(s): MLP (Mish) on the flattened normalised observation history
    critic_layers: int = 3
    seed: int = 0

    def __post_init__(self):
        self.logprob_clamp = tuple(self.logprob_clamp)
        positive = {k: getattr(self, k) for k in ("num_envs", "n_steps", "epochs", "minibatch_size", "clip_eps",
                                                  "clip_eps_base", "min_std", "noise_clip", "actor_lr", "critic_lr",
                                                  "critic_hidden", "critic_layers", "reward_scale")}
        bad = [f"{k}={v}" for k, v in positive.items() if not v > 0]
        if bad:
            raise ValueError(f"these DPPOConfig fields must be > 0: {', '.join(bad)}")
        for name in ("gamma", "gamma_denoising"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in (0, 1], got {getattr(self, name)}")
        if not 0 <= self.gae_lambda <= 1:
            raise ValueError(f"gae_lambda must lie in [0, 1], got {self.gae_lambda}")
        if not 0 <= self.adv_quantile < 0.5:
            raise ValueError(f"adv_quantile must lie in [0, 0.5), got {self.adv_quantile}")
        for name in ("denoise_steps", "ft_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or None for the default), got {getattr(self, name)}")
        if self.target_kl is not None and self.target_kl <= 0:
            raise ValueError(f"target_kl must be > 0 or None, got {self.target_kl}")
        if self.vf_coef < 0 or self.bc_coef < 0 or self.critic_warmup < 0:
            raise ValueError(f"vf_coef, bc_coef and critic_warmup must be >= 0, got {self.vf_coef}, "
                             f"{self.bc_coef}, {self.critic_warmup}")
        if not self.logprob_clamp[0] < self.logprob_clamp[1]:
            raise ValueError(f"logprob_clamp must be (low, high) with low < high, got {self.logprob_clamp}")


class DPPO(Agent):
    """PPO on the last K' denoising steps of a (deep-copied) diffusion or flow policy.

        agent = DPPO(flow_policy, "labkit/Detour-v0", DPPOConfig(num_envs=8))
        history = agent.train(steps=50, eval_every=10, eval_episodes=50)   # steps = PPO iterations
        agent.evaluate(episodes=50)          # the finetuned chain; flow_policy itself is unchanged

    `env_wrapper` wraps each training env (e.g. `lambda e: labkit.rewards.LearnedReward(e, model)` to train
    on a learned reward); evaluation always runs the plain task, so it measures the true success.
    What a lesson hands in: `log_prob_fn`, its own `step_log_prob` (same arguments), which then scores every
    denoising step, old (at collection) and new (in the PPO ratio); by default the policy's own log-densities.
    """

    name, method = "DPPO", "dppo"

    def __init__(self, policy: GenerativePolicy, env_id: str, config: DPPOConfig | dict | None = None,
                 env_kwargs: dict | None = None, env_wrapper: Callable[[gym.Env], gym.Env] | None = None,
                 log_prob_fn: Callable | None = None):
        if not isinstance(policy, GenerativePolicy):
            raise TypeError(f"DPPO finetunes a diffusion or flow policy (a GenerativePolicy), got {type(policy).__name__}")
        c = self.configure(config, DPPOConfig, env_id, env_kwargs)
        self.steps = c.denoise_steps or policy.config.steps
        self.ft_steps = c.ft_steps or self.steps
        if self.ft_steps > self.steps:
            raise ValueError(f"ft_steps ({self.ft_steps}) cannot exceed the denoising steps ({self.steps})")
        torch.manual_seed(c.seed)

        # The base keeps its weights; its evaluation net (EMA if it has one) runs the frozen steps and
        # starts the finetuned copy, whose live and EMA weights are then kept equal (`_sync_ema`).
        self.base = policy
        self.frozen = policy.net(use_ema=True)
        self.policy = copy.deepcopy(policy).eval()  # eval: no augmentation, so old/new log-probs agree
        self.policy.model.load_state_dict(self.frozen.state_dict())
        self.policy.requires_grad_(False)
        self.policy.model.requires_grad_(True)
        self._sync_ema()
        pc = policy.config
        self.obs_keys = list(pc.obs_keys)
        self.act_steps = pc.n_action_steps if c.executed_only else None
        obs_dim = sum(pc.obs_horizon * int(np.prod(policy.shapes[k])) for k in self.obs_keys)
        self.device = policy.device
        self.value = mlp(obs_dim, 1, c.critic_hidden, c.critic_layers).to(self.device)
        self.actor_opt = torch.optim.Adam(self.policy.model.parameters(), lr=c.actor_lr)
        self.critic_opt = torch.optim.Adam(self.value.parameters(), lr=c.critic_lr)
        self.clip = clip_schedule(self.ft_steps, c.clip_eps, c.clip_eps_base, c.clip_rate).to(self.device)
        self.den_discount = denoising_discount(self.ft_steps, c.gamma_denoising).to(self.device)
        self.log_prob_fn = log_prob_fn  # None: GenerativePolicy.log_prob, the same numbers as step_log_prob

        # Training envs only: `env_wrapper` (e.g. a learned reward) never touches evaluation, which
        # always measures the true task's success.
        self.env_wrapper = env_wrapper
        self.envs = SyncVectorEnv([lambda: make_chunk_env(env_id, policy, self.env_kwargs, env_wrapper)] * c.num_envs,
                                  autoreset_mode=AutoresetMode.SAME_STEP)
        self._obs, _ = self.envs.reset(seed=c.seed)
        self._ep_return = np.zeros(c.num_envs)
        self.env_steps, self.iteration, self.episodes = 0, 0, 0

    # ---- acting ---------------------------------------------------------------------------------
    def _sync_ema(self) -> None:
        """Copy the live weights into the EMA, so that the policy's own sampler uses the finetuned net."""
        if self.policy.ema is not None:
            self.policy.ema.model.load_state_dict(self.policy.model.state_dict())

    def policy_obs(self, obs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """The vector env's observation histories {dataset key: [N, To, ...]} -> the policy's normalised inputs."""
        return self.policy.normalize_obs({k: torch.as_tensor(np.asarray(obs[k]), dtype=torch.float32)
                                          for k in self.obs_keys})

    @torch.no_grad()
    def act(self, obs: dict[str, torch.Tensor], stochastic: bool = True) -> tuple[torch.Tensor, SampleResult]:
        """Normalised observations -> (the normalised chunk to execute [B, H, A], the chain). The chain runs
        the frozen base for its first K - K' steps and the live finetuned net for the last K'; it keeps those
        K' steps' latents [B, K'+1, H, A] and per-dim log-probs [B, K', H, A]. The chunk is the chain's end
        clipped to the action range [-1, 1]; the chain itself keeps exact log-probs."""
        chain = self._chain(obs, self.policy.net(use_ema=False), stochastic)
        return chain.actions.clamp(-1, 1), chain

    def _chain(self, obs: dict[str, torch.Tensor], net: nn.Module, stochastic: bool = True) -> SampleResult:
        """The K-step chain with `net` on its last K' steps (the frozen base before), DPPO's std floor and noise clip."""
        c = self.config
        return self.policy.sample(obs, steps=self.steps, stochastic=stochastic, net=net, frozen=self.frozen,
                                  ft_steps=self.ft_steps, min_std=c.min_std, noise_clip=c.noise_clip, per_dim=True)

    def step_log_probs(self, obs: dict[str, torch.Tensor], latents: torch.Tensor) -> torch.Tensor:
        """l_j [B, K']: the live net's clamped, averaged log-densities of a stored chain's K' finetuned steps."""
        c, net = self.config, self.policy.net(use_ema=False)
        if self.log_prob_fn is None:
            lp = self.policy.log_prob(obs, latents, net=net, steps=self.steps, min_std=c.min_std, per_dim=True)
            return reduce_log_probs(lp, self.act_steps, c.logprob_clamp)
        feat, first, out = net["encoder"](obs), self.steps - self.ft_steps, []
        for j in range(self.ft_steps):  # the lesson's own step log-prob, at each step's Gaussian
            mean, std = self.policy.step_gaussian(net, feat, latents[:, j], first + j, self.steps, True, c.min_std)
            std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
            out.append(self.log_prob_fn(latents[:, j + 1], mean, std, self.act_steps, c.logprob_clamp))
        return torch.stack(out, 1)

    def collect(self) -> dict:
        """n_steps chunk decisions in each of the num_envs envs with the stochastic chain; returns the
        flattened batch with GAE advantages and returns, and the episodes that ended."""
        c = self.config
        rows: dict[str, list] = {k: [] for k in ("obs", "next_obs", "latents", "log_probs", "reward", "discount",
                                               "done")}
        finished = []  # (success, return) of each episode that ended
        for _ in range(c.n_steps):
            obs = self.policy_obs(self._obs)
            chunk, chain = self.act(obs, stochastic=True)
            nxt, reward, term, trunc, info = self.envs.step(chunk.flatten(1).cpu().numpy())
            done = term | trunc
            final = info.get("final_info", {})
            steps = np.where(done, final.get("chunk_steps", 0), info.get("chunk_steps", 0)).astype(np.int64)
            # For bootstrapping, an episode that ended is worth V(its final observation), not V(the reset one).
            after = {k: v.copy() for k, v in nxt.items()}
            for i in np.flatnonzero(done):
                for k in after:
                    after[k][i] = info["final_obs"][i][k]
            self._ep_return += reward
            for i in np.flatnonzero(done):
                finished.append((bool(final["is_success"][i]), float(self._ep_return[i])))
                self._ep_return[i] = 0.0
            rows["obs"].append(obs)
            rows["next_obs"].append(self.policy_obs(after))
            rows["latents"].append(chain.latents)
            if self.log_prob_fn is None:
                rows["log_probs"].append(reduce_log_probs(chain.log_probs, self.act_steps, c.logprob_clamp))
            else:  # the old log-probs from the lesson's function too, so that the first ratio is 1
                with torch.no_grad():
                    rows["log_probs"].append(self.step_log_probs(obs, chain.latents))
            rows["reward"].append(torch.as_tensor(reward, dtype=torch.float32, device=self.device) * c.reward_scale)
            rows["discount"].append(chunk_discount(torch.as_tensor(steps), torch.as_tensor(term), c.gamma).to(self.device))
            rows["done"].append(torch.as_tensor(done, device=self.device))
            self.env_steps += int(steps.sum())
            self._obs = nxt
        self.episodes += len(finished)

        T, N = c.n_steps, c.num_envs
        stack = {k: torch.stack(v) for k, v in rows.items() if k not in ("obs", "next_obs")}  # [T, N, ...]
        obs = {k: torch.stack([o[k] for o in rows["obs"]]).flatten(0, 1) for k in self.obs_keys}
        next_obs = {k: torch.stack([o[k] for o in rows["next_obs"]]).flatten(0, 1) for k in self.obs_keys}
        with torch.no_grad():
            values = self.value(flatten_obs(obs, self.obs_keys)).view(T, N)
            next_values = self.value(flatten_obs(next_obs, self.obs_keys)).view(T, N)
        adv, returns = gae(stack["reward"], values, next_values, stack["discount"], stack["done"], c.gae_lambda)
        return {"obs": obs, "latents": stack["latents"].flatten(0, 1), "log_probs": stack["log_probs"].flatten(0, 1),
                "advantages": adv.flatten(), "returns": returns.flatten(), "values": values.flatten(),
                "finished": finished}

    # ---- learning -------------------------------------------------------------------------------
    def process_advantages(self, adv: torch.Tensor) -> torch.Tensor:
        """Normalise (and optionally quantile-clip) the env-level advantages [M] once per iteration."""
        c = self.config
        if c.norm_adv and len(adv) > 1:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        if c.adv_quantile > 0:
            lo, hi = torch.quantile(adv, torch.tensor([c.adv_quantile, 1 - c.adv_quantile], device=adv.device))
            adv = adv.clamp(lo, hi)
        return adv

    def losses(self, batch: dict, idx: torch.Tensor, adv: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Actor (PPO over the K' steps), value and BC losses on the decisions `idx` of a collected batch."""
        c = self.config
        obs = {k: v[idx] for k, v in batch["obs"].items()}
        new_lp = self.step_log_probs(obs, batch["latents"][idx])
        pg_loss, stats = ppo_loss(new_lp, batch["log_probs"][idx], adv[idx, None] * self.den_discount, self.clip)
        value = self.value(flatten_obs(obs, self.obs_keys)).squeeze(-1)
        value_loss = 0.5 * (value - batch["returns"][idx]).pow(2).mean()
        loss = pg_loss + c.vf_coef * value_loss
        bc_loss = torch.zeros((), device=self.device)
        if c.bc_coef > 0:  # keep the finetuned chain likely to reproduce the base's own chains
            with torch.no_grad():
                base = self._chain(obs, self.frozen)
            bc_loss = -self.step_log_probs(obs, base.latents).mean()
            loss = loss + c.bc_coef * bc_loss
        stats.update(pg_loss=pg_loss.item(), value_loss=value_loss.item(), bc_loss=bc_loss.item())
        return loss, stats

    def update(self, batch: dict) -> dict:
        """`epochs` passes of minibatch PPO over one iteration's batch; stops early past target_kl."""
        c = self.config
        adv = self.process_advantages(batch["advantages"])
        train_actor = self.iteration >= c.critic_warmup
        logs, stopped = [], False
        for _ in range(c.epochs):
            for idx in torch.randperm(len(adv)).split(c.minibatch_size):
                loss, stats = self.losses(batch, idx, adv)
                if train_actor and c.target_kl is not None and stats["approx_kl"] > c.target_kl:
                    stopped = True
                    break
                self.actor_opt.zero_grad()
                self.critic_opt.zero_grad()
                loss.backward()
                if c.max_grad_norm is not None:  # each net on its own, so value gradients never shrink the actor's
                    nn.utils.clip_grad_norm_(self.policy.model.parameters(), c.max_grad_norm)
                    nn.utils.clip_grad_norm_(self.value.parameters(), c.max_grad_norm)
                if train_actor:
                    self.actor_opt.step()
                self.critic_opt.step()
                logs.append(stats)
            if stopped:
                break
        self._sync_ema()
        out = {k: float(np.mean([s[k] for s in logs])) for k in (logs[0] if logs else {})}
        return {**out, "updates": len(logs), "kl_stop": stopped, "actor_trained": train_actor}

    # ---- the loop -------------------------------------------------------------------------------
    def eval_policy(self, stochastic: bool = False) -> DPPOPolicy:
        """The finetuned chain as a runtime policy for `labkit.eval.evaluate` (deterministic by default,
        as DPPO evaluates; stochastic=True samples as in training, with the std floor)."""
        return DPPOPolicy(self, stochastic)

    def evaluate(self, episodes: int = 50, seed: int = RL_EVAL_SEED, stochastic: bool = False, progress: bool = False):
        """`labkit.eval.evaluate` of the finetuned chain (compare with evaluate(agent.base, ...))."""
        from labkit.eval import evaluate

        return evaluate(self.eval_policy(stochastic), self.env_id, episodes, seed, env_kwargs=self.env_kwargs,
                        progress=progress)

    def step(self) -> dict:
        """One PPO iteration (collect, then update): the update's losses, approx_kl and clipfrac, and
        "ended": (return, success) of the training episodes that ended in its rollouts."""
        batch = self.collect()
        stats = self.update(batch)
        self.iteration += 1
        return {**stats, "ended": [(r, s) for s, r in batch["finished"]]}

    def counters(self) -> dict:
        return {"env_steps": self.env_steps, "iteration": self.iteration, "episodes": self.episodes}

    def training_state(self) -> dict:
        """Counters (networks and optimisers are saved by whoever holds them, e.g. a Lightning checkpoint)."""
        return {"env_steps": self.env_steps, "iteration": self.iteration, "episodes": self.episodes}

    def load_training_state(self, state: dict) -> None:
        """Continue from `training_state()`: the envs restart from fresh episodes seeded by the iteration
        (their mid-episode states were not saved), and the EMA copy follows the loaded weights."""
        self.env_steps, self.iteration, self.episodes = state["env_steps"], state["iteration"], state["episodes"]
        self._obs, _ = self.envs.reset(seed=self.config.seed + 1000 * self.iteration)
        self._ep_return[:] = 0.0
        self._sync_ema()

    def state_dict(self) -> dict:
        """The trained parts: the finetuned policy's weights, the value net, the config."""
        return {"config": dataclasses.asdict(self.config), "policy": self.policy.state_dict(),
                "value": self.value.state_dict(), "iteration": self.iteration, "env_steps": self.env_steps}
