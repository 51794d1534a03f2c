"""RECAP in miniature: RL by advantage-conditioned policies (Physical Intelligence, pi*0.6, arXiv 2511.14759).

No policy gradient: each round collects data, fits a value function, labels every frame "better than
usual" or not, and trains the policy by supervised flow matching *conditioned on that label*.

    Rewards (normalised by T_max, the task's time limit): r_t = -1/T_max per step, 0 on the step that
        succeeds, -fail_penalty on the last step of a failure (time-outs are failures).
    Value target: R_t = clip(sum_{k>=t} r_k, -1, 0)  (steps-to-go; every failure reaches -1)
    Value: V(o) = sum_b p_b(o) z_b over `bins` bins z_b on [-1, 0]; cross-entropy on the two-hot
        projection of R_t onto its neighbouring bins (whose expectation is R_t exactly).
    Advantage (N-step): A_t = sum_{k<N} r_{t+k} + V(o_{t+N}) - V(o_t), the Monte-Carlo tail when
        the episode ends within N steps (labkit.rl.returns.nstep_returns with gamma = 1).
    Indicator: I_t = 1[A_t > eps], eps the (1 - positive_fraction) quantile of A over the autonomous
        frames; intervention frames (the expert correcting a failing rollout) are always positive.
    Policy: flow matching with conditioning c in {negative, positive, null}, c = I_t except null
        with probability `null_dropout` (so one net is both conditional and unconditional):
            loss = || v_theta(x_t, t, o, c) - (a - x0) ||^2
    Inference (classifier-free guidance): v = v(.|null) + beta (v(.|positive) - v(.|null));
        beta = 0 is the unconditional policy, beta = 1 plain positive conditioning, beta > 1 sharper.
    Theory (CFGRL, Frans et al. 2025): pi(a|o, I=1) is proportional to pi_ref(a|o) p(I=1|o, a), an
    improvement over pi_ref; guidance raises p(I=1|o, a) to the power beta.
    (The policy is `labkit.policies.advantage.AdvantageFlowPolicy`; this module is the loop that labels its data.)

Interventions, in simulation: a failed rollout is replayed from its seed up to a few steps before the
failure, and the task's scripted expert finishes it (earlier, with another seed, if it fails); the
correction is kept beside the failure (`labkit.rl.interventions.Takeover`). Simplified against the paper: one task (no task input), an
embedding for the indicator instead of text, the value on the policy's own observation window.
Measured on Detour with demos + crashing BC rollouts + noisy-expert rollouts (200 eval episodes, two
seeds): offline, RECAP beats flow on all data by far but not flow on the successes only. The value
reads velocities, so it recognises the smooth demos (advantage ~0) and ranks lucky noisy frames above
them; beta 1.5-2 recovers most of the gap. Two online rounds with interventions reached 96-99%.

    agent = RECAP(dataset, "labkit/Detour-v0", RECAPConfig(rounds=3))   # or a pretrained FlowPolicy
    history = agent.train()                                             # one dict per round
    guidance_sweep(agent.policy, "labkit/Detour-v0", betas=(0, 1, 1.5, 2, 3))
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import labkit.envs  # the tasks' scripted experts, which intervene
from labkit.data.dataset import EpisodeDataset
from labkit.data.keys import env_key
from labkit.eval import evaluate, rollout
from labkit.nn import mlp
from labkit.policies.advantage import (  # noqa: F401  (the policy, moved; lesson 05 imports these from here)
    ADVANTAGE_FIELDS,
    INDICATOR,
    NEGATIVE,
    NULL,
    POSITIVE,
    AdvantageFlowConfig,
    AdvantageFlowPolicy,
)
from labkit.policies.flow import FlowPolicy
from labkit.policies.train import fit, window_tensors
from labkit.rl.agent import Agent
from labkit.rl.buffer import flatten_obs
from labkit.rl.interventions import INTERVENTION, Takeover, corrected_episode
from labkit.rl.returns import nstep_returns
from labkit.training import minibatch_fit

# ---- rewards, value, advantages, indicator ---------------------------------------------------------

def recap_rewards(lengths, success, t_max: int, fail_penalty: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame normalised rewards and clipped value targets [N] for episodes laid end to end."""
    if t_max < 1:
        raise ValueError(f"t_max must be >= 1 (the task's longest episode), got {t_max}")
    rewards, returns = [], []
    for n, ok in zip(np.asarray(lengths, int), np.asarray(success, bool), strict=True):
        r = torch.full((int(n),), -1.0 / t_max)
        r[-1] = 0.0 if ok else -fail_penalty
        rewards.append(r)
        returns.append(r.flip(0).cumsum(0).flip(0).clamp(-1.0, 0.0))
    return torch.cat(rewards), torch.cat(returns)


def two_hot(target: torch.Tensor, bins: int) -> torch.Tensor:
    """Targets in [-1, 0] as [N, bins] probabilities on the two nearest of `bins` evenly spaced bins."""
    pos = ((target.clamp(-1.0, 0.0) + 1.0) * (bins - 1)).float()
    lo = pos.floor().long().clamp(max=bins - 2)
    w_hi = pos - lo
    out = torch.zeros(len(target), bins, device=target.device)
    out.scatter_(1, lo[:, None], (1 - w_hi)[:, None])
    out.scatter_add_(1, (lo + 1)[:, None], w_hi[:, None])
    return out


class ValueModel(nn.Module):
    """Distributional V(o): an MLP giving logits over `bins` bins on [-1, 0]; the value is their mean."""

    def __init__(self, obs_dim: int, bins: int = 51, hidden: int = 256, layers: int = 2):
        super().__init__()
        if bins < 2:
            raise ValueError(f"bins must be >= 2, got {bins}")
        self.net = mlp(obs_dim, bins, hidden, layers, layer_norm=True)
        self.register_buffer("centres", torch.linspace(-1.0, 0.0, bins))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def value(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).softmax(-1) @ self.centres

    def loss(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(x), two_hot(target, len(self.centres)))


def fit_value(model: ValueModel, inputs: torch.Tensor, targets: torch.Tensor, steps: int = 1000,
              batch_size: int = 256, lr: float = 1e-3, seed: int = 0) -> np.ndarray:
    """Train `model` on (inputs [N, D], targets [N]) by minibatch cross-entropy (AdamW, cosine schedule);
    returns the loss per step. A small auxiliary model: `labkit.training.minibatch_fit`, not Lightning."""
    return minibatch_fit(model, lambda idx: model.loss(inputs[idx], targets[idx]), len(inputs), steps, batch_size,
                         lr, seed, optimizer="adamw", weight_decay=1e-4, schedule="cosine")


def nstep_advantages(rewards: torch.Tensor, episode_end: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """A_t = sum_{k<n} r_{t+k} + V(o_{t+n}) - V(o_t) over episodes laid end to end ([N] each);
    `episode_end` marks every episode's last frame, where the sum stops (Monte-Carlo tail)."""
    out = nstep_returns(rewards, episode_end.bool(), torch.zeros_like(episode_end, dtype=torch.bool), 1.0, n)
    bootstrap = values[(out.last + 1).clamp(max=len(values) - 1)]
    return out.returns + out.discount * bootstrap - values


def binarize(advantages, positive_fraction: float = 0.3, forced=None) -> tuple[np.ndarray, float]:
    """(indicator [N] bool, threshold): A_t above the (1 - positive_fraction) quantile of the frames not
    `forced`, OR forced (interventions). Ties at the threshold are negative."""
    if not 0.0 < positive_fraction < 1.0:
        raise ValueError(f"positive_fraction must lie in (0, 1), got {positive_fraction}")
    a = np.asarray(advantages, np.float64)
    forced = np.zeros(len(a), bool) if forced is None else np.asarray(forced, bool)
    if forced.shape != a.shape:
        raise ValueError(f"forced must have one flag per advantage, got {forced.shape} for {a.shape}")
    free = a[~forced]
    threshold = float(np.quantile(free, 1.0 - positive_fraction)) if len(free) else float("-inf")
    return (a > threshold) | forced, threshold


# ---- the loop ----------------------------------------------------------------------------------------


def guidance_sweep(policy: AdvantageFlowPolicy, env_id: str, betas=(0.0, 1.0, 1.5, 2.0, 3.0), episodes: int = 50,
                   seed: int = 1000, env_kwargs: dict | None = None, progress: bool = True) -> list[dict]:
    """Success of `policy` at each guidance beta (0: unconditional), on the same seeded episodes."""
    rows, before = [], policy.guidance
    try:
        for beta in betas:
            policy.guidance = beta
            r = evaluate(policy, env_id, episodes, seed, env_kwargs=env_kwargs, progress=progress)
            lo, hi = r.interval
            rows.append({"beta": float(beta), "success": r.success_rate, "ci_low": lo, "ci_high": hi,
                         "episodes": episodes, "mean_length": float(r.lengths.mean()), "seconds": r.seconds})
    finally:
        policy.guidance = before
    return rows


@dataclass
class RECAPConfig:
    """One RECAP round: collect (rollouts + interventions) -> fit value -> binarise -> train policy -> evaluate."""

    rounds: int = 3
    rollouts: int = 30  # autonomous episodes of the current policy per round
    interventions: int = 10  # at most this many failed rollouts get an expert correction per round
    takeover_back: tuple[int, int] = (5, 20)  # the expert takes over this many steps (uniform) before the failure
    takeover_tries: int = 3  # if the expert fails, try again (another expert seed) twice as early
    bins: int = 51  # value bins on [-1, 0]
    value_hidden: int = 256
    value_layers: int = 2
    value_steps: int = 1000
    value_lr: float = 1e-3
    nstep: int = 10  # N of the advantage
    positive_fraction: float = 0.3  # autonomous frames labelled positive
    fail_penalty: float = 1.0  # normalised reward of a failure's last step (1: a failure costs a whole episode)
    t_max: int | None = None  # return normalisation; default: the env's time limit
    policy_steps: int = 2000  # flow-matching steps per round
    batch_size: int = 256
    reinit_policy: bool = False  # train each round from scratch instead of continuing
    policy: dict = field(default_factory=dict)  # AdvantageFlowConfig fields (when built from a dataset)
    expert: dict = field(default_factory=dict)  # keyword arguments of the intervening expert (labkit.envs.expert)
    eval_episodes: int = 50
    eval_seed: int = 1000  # labkit's evaluation seeds (the shipped datasets use 0..199)
    collect_seed: int = 10_000  # round r's rollouts reset with collect_seed + 1000 r + i
    num_envs: int = 10
    seed: int = 0

    def __post_init__(self):
        self.takeover_back = tuple(self.takeover_back)
        if self.rounds < 1 or self.rollouts < 0 or self.interventions < 0:
            raise ValueError(f"need rounds >= 1 and rollouts, interventions >= 0; got {self.rounds}, "
                             f"{self.rollouts}, {self.interventions}")
        if not 0.0 < self.positive_fraction < 1.0:
            raise ValueError(f"positive_fraction must lie in (0, 1), got {self.positive_fraction}")
        if len(self.takeover_back) != 2 or not 1 <= self.takeover_back[0] <= self.takeover_back[1]:
            raise ValueError(f"takeover_back must be (low, high) with 1 <= low <= high, got {self.takeover_back}")
        if self.nstep < 1 or self.bins < 2 or self.takeover_tries < 1:
            raise ValueError(f"need nstep >= 1, bins >= 2, takeover_tries >= 1; got {self.nstep}, {self.bins}, "
                             f"{self.takeover_tries}")
        if self.fail_penalty < 0:
            raise ValueError(f"fail_penalty must be >= 0, got {self.fail_penalty}")


class RECAP(Agent):
    """RECAP's collect / value / label / train loop around an AdvantageFlowPolicy; one agent step = one round.

    `source` is an EpisodeDataset (offline data, e.g. demos plus failed rollouts: round 0 trains on it
    before collecting anything) or a pretrained FlowPolicy (warm-started; round 0 collects first),
    optionally with prior data in `dataset`. Episodes are kept in memory as dicts: obs {dataset key:
    [T, ...]}, action [T, A], success, intervention [T], source, round.
    What a lesson hands in: `binarize_fn`, its own `binarize` (same arguments and return), which then labels
    every frame the policy trains on.
    """

    name, method, takes_demos = "RECAP", "recap", True

    @classmethod
    def from_config(cls, policy, env_id, config, demos=None, env_kwargs=None) -> RECAP:
        """From a trained flow policy (with `demos` as prior data) or, with no policy, from `demos` alone."""
        if policy is None and demos is None:
            raise ValueError("recap starts from a trained policy (`policy`) or from data alone (`demos`)")
        if policy is None:
            return cls(demos, env_id, config, env_kwargs=env_kwargs)
        return cls(policy, env_id, config, dataset=demos, env_kwargs=env_kwargs)

    def __init__(self, source, env_id: str, config: RECAPConfig | dict | None = None,
                 dataset: EpisodeDataset | None = None, env_kwargs: dict | None = None,
                 binarize_fn: Callable | None = None):
        config = self.configure(config, RECAPConfig, env_id, env_kwargs)
        torch.manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        if isinstance(source, EpisodeDataset):
            if dataset is not None:
                raise ValueError("give the data either as `source` or as `dataset`, not both")
            self.policy, dataset, self.trained = AdvantageFlowPolicy.from_dataset(source, **config.policy), source, False
        elif isinstance(source, AdvantageFlowPolicy):
            if config.policy:
                raise ValueError("config.policy builds a new policy; a given AdvantageFlowPolicy keeps its own config")
            self.policy, self.trained = source, True
        elif isinstance(source, FlowPolicy):
            self.policy, self.trained = AdvantageFlowPolicy.from_flow_policy(source, **config.policy), True
        else:
            raise ValueError(f"source must be an EpisodeDataset or a FlowPolicy, got {type(source).__name__}")
        self.binarize_fn = binarize_fn or binarize  # (advantages, positive_fraction, forced) -> (indicator, threshold)
        self.obs_keys = list(self.policy.config.obs_keys)
        self.env = gym.make(env_id, **self.env_kwargs)  # for interventions
        self.expert = labkit.envs.expert(self.env, **config.expert)
        self.t_max = config.t_max or self.env.spec.max_episode_steps
        if not self.t_max:
            raise ValueError(f"{env_id} has no time limit: set RECAPConfig.t_max")
        self.fps = float(self.env.metadata.get("render_fps") or 10)
        self.episodes = self._from_dataset(dataset) if dataset is not None else []
        self.value: ValueModel | None = None
        self.history: list[dict] = []
        self.env_steps, self.round, self._start = 0, 0, time.perf_counter()

    # ---- data ----------------------------------------------------------------------------------
    def _from_dataset(self, ds: EpisodeDataset) -> list[dict]:
        missing = [k for k in (*self.obs_keys, "action") if k not in ds.frames]
        if missing:
            raise ValueError(f"the dataset lacks {missing}, which the policy needs")
        out = []
        for i in range(ds.num_episodes):
            ep = ds.episode(i)
            ok = ds.episodes["success"][i] if "success" in ds.episodes else ep["next.success"].any()
            out.append({"obs": {k: ep[k] for k in self.obs_keys}, "action": ep["action"], "success": bool(ok),
                        "intervention": ep.get(INTERVENTION, np.zeros(len(ep["action"]), bool)).astype(bool),
                        "source": "dataset", "round": -1})
        return out

    def labelled_dataset(self, indicator=None) -> EpisodeDataset:
        """All episodes so far as an in-memory EpisodeDataset (with the `advantage.indicator` column when given)."""
        eps = self.episodes
        if not eps:
            raise ValueError("no episodes yet: give RECAP a dataset or collect rollouts first")
        labels = {INTERVENTION: np.concatenate([e["intervention"] for e in eps])}
        if indicator is not None:
            labels[INDICATOR] = np.asarray(indicator, np.int64)
        return EpisodeDataset.from_episodes(
            [{**{k: np.asarray(e["obs"][k], np.float32) for k in self.obs_keys},
              "action": np.asarray(e["action"], np.float32)} for e in eps],
            fps=self.fps, success=[e["success"] for e in eps], columns=labels)

    def _env_obs(self, obs_list: list[dict]) -> dict[str, np.ndarray]:
        return {k: np.stack([o[env_key(k)] for o in obs_list]).astype(np.float32) for k in self.obs_keys}

    def rollouts(self, seeds) -> list[dict]:
        """Episodes of the current policy (guidance beta = its `guidance`), through `labkit.eval.rollout`."""
        eps = rollout(self.policy, self.env_id, seeds, self.env_kwargs, self.config.num_envs, keep=("obs", "actions"))
        self.env_steps += sum(e.length for e in eps)
        return [{"obs": {k: e.obs[env_key(k)][:-1].astype(np.float32) for k in self.obs_keys}, "action": e.actions,
                 "success": e.success, "intervention": np.zeros(e.length, bool), "source": "rollout",
                 "round": self.round, "seed": e.seed} for e in eps]

    def intervene(self, episode: dict) -> dict | None:
        """The failed `episode` corrected by the scripted expert: a `Takeover` replays its actions up to
        some steps before the failure (the env is deterministic given its seed), then the expert finishes.
        Returns the corrected episode (expert frames flagged), or None if the expert never succeeds."""
        c, n = self.config, len(episode["action"])
        back = int(self.rng.integers(c.takeover_back[0], c.takeover_back[1] + 1))
        for attempt in range(c.takeover_tries):
            k = max(0, n - back * 2**attempt)
            takeover = Takeover(self.expert, episode["action"], k, expert_seed=int(self.rng.integers(2**31)))
            obs, _ = self.env.reset(seed=episode["seed"])
            seen, acts, done, ok = [], [], False, False
            while not done:
                acts.append(takeover(obs))
                seen.append(obs)
                obs, _, term, trunc, info = self.env.step(acts[-1])
                self.env_steps += 1
                done, ok = term or trunc, bool(info.get("is_success", False))
            if ok and len(acts) > k:
                return corrected_episode(episode, k, self._env_obs(seen[k:]), np.stack(acts[k:]),
                                         source="intervention", round=self.round, seed=episode["seed"])
            if k == 0:
                break
        return None

    def collect(self) -> dict:
        """This round's rollouts, plus expert corrections of up to `interventions` failures; all kept."""
        c = self.config
        new = self.rollouts(range(c.collect_seed + 1000 * self.round, c.collect_seed + 1000 * self.round + c.rollouts))
        failed = [e for e in new if not e["success"]][: c.interventions]
        fixed = [f for f in (self.intervene(e) for e in failed) if f is not None]
        self.episodes += new + fixed
        return {"collected": len(new), "collected_success": float(np.mean([e["success"] for e in new])) if new
                else float("nan"), "interventions": len(fixed), "intervention_failed": len(failed) - len(fixed)}

    # ---- value and labels ----------------------------------------------------------------------
    def _value_inputs(self, ds: EpisodeDataset) -> torch.Tensor:
        obs = window_tensors(self.policy, ds)["obs"]  # the policy's own observation windows, normalised
        with torch.no_grad():
            return flatten_obs(self.policy.normalize_obs(obs), self.obs_keys).cpu()

    def fit_value(self) -> np.ndarray:
        """Fit a fresh distributional value on every episode so far; returns its loss per step."""
        c, ds = self.config, self.labelled_dataset()
        x = self._value_inputs(ds)
        _, targets = recap_rewards(ds.lengths, ds.episodes["success"], self.t_max, c.fail_penalty)
        self.value = ValueModel(x.shape[1], c.bins, c.value_hidden, c.value_layers)
        return fit_value(self.value, x, targets, c.value_steps, c.batch_size, c.value_lr, c.seed + self.round)

    @torch.no_grad()
    def advantages(self) -> dict:
        """Per-frame rewards, value targets, values, N-step advantages, indicator and its threshold."""
        if self.value is None:
            raise ValueError("fit the value first (fit_value)")
        c, ds = self.config, self.labelled_dataset()
        rewards, targets = recap_rewards(ds.lengths, ds.episodes["success"], self.t_max, c.fail_penalty)
        values = self.value.value(self._value_inputs(ds))
        ends = torch.zeros(len(ds), dtype=torch.bool)
        ends[torch.as_tensor(ds.episode_to - 1)] = True
        adv = nstep_advantages(rewards, ends, values, c.nstep)
        indicator, threshold = self.binarize_fn(adv.numpy(), c.positive_fraction, ds.frames[INTERVENTION])
        return {"rewards": rewards, "targets": targets, "values": values, "advantages": adv,
                "indicator": indicator, "threshold": threshold}

    # ---- the loop ------------------------------------------------------------------------------
    def evaluate(self, episodes: int | None = None, seed: int | None = None, progress: bool = False,
                 beta: float | None = None):
        """labkit.eval.evaluate of the policy at guidance beta (default: its own) on the eval seeds
        (default: config.eval_episodes episodes from config.eval_seed)."""
        before = self.policy.guidance
        self.policy.guidance = before if beta is None else beta
        try:
            return evaluate(self.policy, self.env_id, episodes or self.config.eval_episodes,
                            self.config.eval_seed if seed is None else seed, env_kwargs=self.env_kwargs,
                            num_envs=self.config.num_envs, progress=progress)
        finally:
            self.policy.guidance = before

    def run_round(self, progress: bool = False) -> dict:
        """Collect (unless the policy is untrained), fit the value, label, train the policy, evaluate."""
        c, row = self.config, {"round": self.round}
        if self.trained:  # a dataset-built policy trains on the offline data before it collects
            row.update(self.collect())
        value_losses = self.fit_value()
        labels = self.advantages()
        ds = self.labelled_dataset(labels["indicator"])
        if c.reinit_policy:
            self.policy = AdvantageFlowPolicy(copy.deepcopy(self.policy.config), self.policy.shapes, self.policy.stats,
                                              self.policy.data_env)
        self.policy.loss_history.clear()
        fit(self.policy, ds, c.policy_steps, c.batch_size, seed=c.seed + self.round, progress=progress)
        self.trained = True
        result = self.evaluate(progress=progress) if c.eval_episodes else None
        sources = [e["source"] for e in self.episodes]
        row.update({
            "episodes": len(self.episodes), "frames": len(ds), "dataset_success": float(ds.episodes["success"].mean()),
            "interventions_total": sources.count("intervention"), "threshold": labels["threshold"],
            "positive_fraction": float(labels["indicator"].mean()),
            "value_loss_start": float(value_losses[:20].mean()), "value_loss_end": float(value_losses[-20:].mean()),
            "policy_loss_end": float(self.policy.losses()[-20:].mean()),
            "success": result.success_rate if result else float("nan"),
            "ci_low": result.interval[0] if result else float("nan"),
            "ci_high": result.interval[1] if result else float("nan"),
            "eval_episodes": c.eval_episodes, "guidance": self.policy.guidance, "env_steps": self.env_steps,
            "minutes": (time.perf_counter() - self._start) / 60,
        })
        self.history.append(row)
        self.round += 1
        return row

    def eval_policy(self) -> AdvantageFlowPolicy:
        """The policy at its own guidance, for `labkit.eval.evaluate` (the name every RL method shares)."""
        return self.policy

    def step(self) -> dict:
        """One round: its row (collected episodes, value and policy losses, its own evaluation)."""
        return self.run_round()

    def counters(self) -> dict:
        return {"env_steps": self.env_steps, "rounds": self.round}

    def networks(self) -> dict:
        return {}  # rebuilt every round (the value, and the policy with reinit_policy): in training_state

    def default_budget(self) -> int:
        return self.config.rounds

    def training_state(self) -> dict:
        """Everything a resumed run needs: the episodes (arrays as tensors, so the checkpoint loads with
        weights_only), the policy, the value, the counters and the generator. RECAP rebuilds its value
        each round (and its policy with reinit_policy), so its weights travel here rather than as a
        Lightning module's submodules."""
        def tensors(ep: dict) -> dict:
            return {k: ({kk: torch.from_numpy(vv) for kk, vv in v.items()} if isinstance(v, dict) else
                        torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in ep.items()}

        return {"episodes": [tensors(e) for e in self.episodes], "policy": self.policy.state_dict(),
                "value": self.value.state_dict() if self.value is not None else None, "round": self.round,
                "env_steps": self.env_steps, "trained": self.trained, "history": self.history,
                "rng": self.rng.bit_generator.state}

    def load_training_state(self, state: dict) -> None:
        """Continue from `training_state()` of a RECAP built with the same config."""
        def arrays(ep: dict) -> dict:
            return {k: ({kk: vv.numpy() for kk, vv in v.items()} if isinstance(v, dict) else
                        v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in ep.items()}

        self.episodes = [arrays(e) for e in state["episodes"]]
        self.policy.load_state_dict(state["policy"])
        if state["value"] is not None:
            pc = self.policy.config  # the value reads the policy's flattened observation window
            obs_dim = sum(pc.obs_horizon * int(np.prod(self.policy.shapes[k])) for k in self.obs_keys)
            self.value = ValueModel(obs_dim, self.config.bins, self.config.value_hidden, self.config.value_layers)
            self.value.load_state_dict(state["value"])
        self.round, self.env_steps, self.trained = state["round"], state["env_steps"], state["trained"]
        self.history = list(state["history"])
        self.rng.bit_generator.state = state["rng"]
