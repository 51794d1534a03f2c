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

Interventions, in simulation: a failed rollout is replayed from its seed up to a few steps before the
failure, and the task's scripted expert finishes it (earlier, with another seed, if it fails); the
correction is kept beside the failure. Simplified against the paper: one task (no task input), an
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
import dataclasses
import time
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from labkit.data.dataset import EpisodeDataset, compute_stats
from labkit.eval import evaluate
from labkit.policies.base import ENV_TO_DATA
from labkit.policies.flow import FlowConfig, FlowPolicy
from labkit.nn import EMA, make_denoiser, mlp
from labkit.policies.train import fit, window_tensors
from labkit.rl.buffer import flatten_obs
from labkit.rl.returns import nstep_returns

INDICATOR = "advantage.indicator"  # per-frame dataset column (int64) the conditional policy trains on
INTERVENTION = "intervention"  # per-frame dataset column (bool): an expert's correcting action
NEGATIVE, POSITIVE, NULL = 0, 1, 2  # the indicator's three values; NULL = "no label" (unconditional)
DATA_TO_ENV = {v: k for k, v in ENV_TO_DATA.items()}


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
    """Train `model` on (inputs [N, D], targets [N]) by minibatch cross-entropy; returns the loss per step.
    A plain loop: a small auxiliary model, as PostBC's ensemble."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(inputs), (batch_size,), generator=gen)
        loss = model.loss(inputs[idx], targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return np.array(losses)


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


# ---- the advantage-conditioned flow policy ---------------------------------------------------------

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
        x0 = torch.randn_like(action)
        t = torch.rand(len(action), device=action.device)
        x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * action
        pred = self.conditional_velocity(self.model, x_t, t, self.model["encoder"](obs), ind)
        return self.chunk_loss(pred, action - x0, is_pad)

    def step_distribution(self, net, feat, x, i, steps, stochastic):
        """FlowPolicy's Euler step, with the guided velocity in place of the plain one."""
        def guided(x, t, feat):
            return self.velocity(net, x, t, feat, self.guidance)

        return super().step_distribution({"denoiser": guided}, feat, x, i, steps, stochastic)

    def save(self, path):
        self.hparams["config"] = dataclasses.asdict(self.config)  # `guidance` may have changed since init
        return super().save(path)


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


# ---- the loop ----------------------------------------------------------------------------------------

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


class RECAP:
    """RECAP's collect / value / label / train loop around an AdvantageFlowPolicy.

    `source` is an EpisodeDataset (offline data, e.g. demos plus failed rollouts: round 0 trains on it
    before collecting anything) or a pretrained FlowPolicy (warm-started; round 0 collects first),
    optionally with prior data in `dataset`. Episodes are kept in memory as dicts: obs {dataset key:
    [T, ...]}, action [T, A], success, intervention [T], source, round.
    """

    def __init__(self, source, env_id: str, config: RECAPConfig | dict | None = None,
                 dataset: EpisodeDataset | None = None, env_kwargs: dict | None = None):
        import labkit.envs  # noqa: F401  (registers the tasks)

        config = RECAPConfig(**config) if isinstance(config, dict) else (config or RECAPConfig())
        self.config, self.env_id, self.env_kwargs = config, env_id, dict(env_kwargs or {})
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
        lengths = np.array([len(e["action"]) for e in eps])
        to = np.cumsum(lengths)
        frames = {k: np.concatenate([e["obs"][k] for e in eps]).astype(np.float32) for k in self.obs_keys}
        frames["action"] = np.concatenate([e["action"] for e in eps]).astype(np.float32)
        frames["episode_index"] = np.repeat(np.arange(len(eps)), lengths)
        frames["frame_index"] = np.concatenate([np.arange(n) for n in lengths])
        frames["index"] = np.arange(int(to[-1]))
        frames["next.success"] = np.zeros(int(to[-1]), bool)
        frames["next.success"][to - 1] = [e["success"] for e in eps]
        frames[INTERVENTION] = np.concatenate([e["intervention"] for e in eps])
        if indicator is not None:
            frames[INDICATOR] = np.asarray(indicator, np.int64)
        features = {k: {"dtype": str(v.dtype), "shape": list(v.shape[1:]) or [1]} for k, v in frames.items()}
        stats = compute_stats({k: frames[k] for k in (*self.obs_keys, "action")}, features, images=False)
        info = {"fps": self.fps, "features": features, "total_episodes": len(eps), "total_frames": int(to[-1])}
        episodes = {"episode_index": np.arange(len(eps)), "length": lengths,
                    "success": np.array([e["success"] for e in eps])}
        return EpisodeDataset(frames, to - lengths, to, info, stats, episodes)

    def _env_obs(self, obs_list: list[dict]) -> dict[str, np.ndarray]:
        return {k: np.stack([o[DATA_TO_ENV.get(k, k)] for o in obs_list]).astype(np.float32) for k in self.obs_keys}

    @torch.no_grad()
    def rollouts(self, seeds) -> list[dict]:
        """Episodes of the current policy (guidance beta = its `guidance`), envs stepped in lockstep."""
        seeds = list(seeds)
        envs = [gym.make(self.env_id, **self.env_kwargs) for _ in range(max(1, min(self.config.num_envs, len(seeds))))]
        out = []
        for first in range(0, len(seeds), len(envs)):
            batch = seeds[first:first + len(envs)]
            obs = [envs[j].reset(seed=s)[0] for j, s in enumerate(batch)]
            self.policy.reset()
            trajs = [{"obs": [], "action": []} for _ in batch]
            done, success = np.zeros(len(batch), bool), np.zeros(len(batch), bool)
            while not done.all():
                actions = self.policy.select_action({k: np.stack([o[k] for o in obs]) for k in obs[0]})
                for j in np.flatnonzero(~done):
                    trajs[j]["obs"].append(obs[j])
                    trajs[j]["action"].append(actions[j])
                    obs[j], _, term, trunc, info = envs[j].step(actions[j])
                    self.env_steps += 1
                    done[j], success[j] = term or trunc, bool(info.get("is_success", False))
            for j, s in enumerate(batch):
                n = len(trajs[j]["action"])
                out.append({"obs": self._env_obs(trajs[j]["obs"]), "action": np.stack(trajs[j]["action"]),
                            "success": bool(success[j]), "intervention": np.zeros(n, bool), "source": "rollout",
                            "round": self.round, "seed": s})
        for e in envs:
            e.close()
        return out

    def intervene(self, episode: dict) -> dict | None:
        """The failed `episode` corrected by the scripted expert: replay its actions up to some steps
        before the failure (the env is deterministic given its seed), then let the expert finish.
        Returns the corrected episode (expert frames flagged), or None if the expert never succeeds."""
        c, n = self.config, len(episode["action"])
        back = int(self.rng.integers(c.takeover_back[0], c.takeover_back[1] + 1))
        for attempt in range(c.takeover_tries):
            k = max(0, n - back * 2**attempt)
            obs, _ = self.env.reset(seed=episode["seed"])
            for a in episode["action"][:k]:
                obs, *_ = self.env.step(a)
                self.env_steps += 1
            self.expert.reset(seed=int(self.rng.integers(2**31)))
            seen, acts, done, ok = [], [], False, False
            while not done:
                a = np.asarray(self.expert(obs), np.float32)
                seen.append(obs)
                acts.append(a)
                obs, _, term, trunc, info = self.env.step(a)
                self.env_steps += 1
                done, ok = term or trunc, bool(info.get("is_success", False))
            if ok:
                tail = self._env_obs(seen)
                return {"obs": {key: np.concatenate([v[:k], tail[key]]) for key, v in episode["obs"].items()},
                        "action": np.concatenate([episode["action"][:k], np.stack(acts)]), "success": True,
                        "intervention": np.r_[np.zeros(k, bool), np.ones(len(acts), bool)],
                        "source": "intervention", "round": self.round, "seed": episode["seed"]}
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
        indicator, threshold = binarize(adv.numpy(), c.positive_fraction, ds.frames[INTERVENTION])
        return {"rewards": rewards, "targets": targets, "values": values, "advantages": adv,
                "indicator": indicator, "threshold": threshold}

    # ---- the loop ------------------------------------------------------------------------------
    def evaluate(self, beta: float | None = None, episodes: int | None = None, progress: bool = False):
        """labkit.eval.evaluate of the policy at guidance beta (default: its own) on the eval seeds."""
        before = self.policy.guidance
        self.policy.guidance = before if beta is None else beta
        try:
            return evaluate(self.policy, self.env_id, episodes or self.config.eval_episodes, self.config.eval_seed,
                            env_kwargs=self.env_kwargs, num_envs=self.config.num_envs, progress=progress)
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
        """One round (what a training step is when RECAP runs through `labkit fit`)."""
        return self.run_round()

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

    def train(self, rounds: int | None = None, progress: bool = True) -> list[dict]:
        """Run `rounds` rounds (default: config.rounds); returns the history, one dict per round."""
        bar = tqdm(range(rounds or self.config.rounds), desc="RECAP rounds", disable=not progress)
        for _ in bar:
            row = self.run_round()
            bar.set_postfix(success=f"{row['success']:.0%}")
        return self.history
