"""A state world model: an ensemble of probabilistic MLPs (PETS, Chua et al. 2018) that predicts the
next state's change, plus heads that say whether the step ends the episode in success or failure.

Each member i maps a normalised (state, action) to a Gaussian over the normalised state delta and two
event logits (success, failure = e.g. a collision):
    mu_i, log var_i, l_i = f_i((s - m_s) / s_s, (a - m_a) / s_a)
    s' = s + m_d + s_d * (mu_i + exp(log var_i / 2) * eps)
Loss per member, on its own bootstrap-free shuffle of the data (members differ by their initialisation):
    L = mean[(mu - d)^2 exp(-log var) + log var] + BCE(l, events) + 0.01 (sum max_logvar - sum min_logvar)
with log var softly bounded in [min_logvar, max_logvar] (learned), as PETS does, so that the variance
cannot blow up or collapse where data is thin. The event heads are what lets imagination end an
episode: a model trained only on successful demonstrations has never seen a failure, so it never
predicts one; adding real rollouts with failures teaches it the wall.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from labkit.training import minibatch_fit
from labkit.world_models.io import SavedWorldModel

EVENTS = ("success", "failure")  # the event heads, in logit order


@dataclass
class WorldModelConfig:
    ensemble: int = 5
    hidden: int = 200
    layers: int = 3
    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 256
    event_weight: float = 1.0  # weight of the event (success / failure) cross-entropy
    event_pos_weight: float = 20.0  # events are rare (one per episode): up-weight the positives

    def __post_init__(self):
        if self.ensemble < 1 or self.hidden < 1 or self.layers < 1:
            raise ValueError(f"ensemble, hidden and layers must be >= 1, got {self.ensemble}, {self.hidden}, {self.layers}")


class EnsembleLinear(nn.Module):
    """E independent linear layers applied in one batched matmul: [E, B, in] -> [E, B, out]."""

    def __init__(self, ensemble: int, inp: int, out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(ensemble, inp, out) / np.sqrt(inp))
        self.bias = nn.Parameter(torch.zeros(ensemble, 1, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


def gaussian_nll(mean: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PETS's Gaussian negative log-likelihood (constants dropped), averaged over everything:
    mean[(mean - target)^2 * exp(-logvar) + logvar]."""
    return ((mean - target).pow(2) * torch.exp(-logvar) + logvar).mean()


def soft_bound(logvar: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Softly squash log-variances into [lo, hi] (PETS): smooth, so gradients never vanish at the bound."""
    logvar = hi - F.softplus(hi - logvar)
    return lo + F.softplus(logvar - lo)


def transitions_from_episodes(episodes: list[dict]) -> dict[str, np.ndarray]:
    """Flatten episodes {"state": [T or T+1, D], "action": [T, A], "success", "failure"} into transitions.

    Returns state, action, next_state (zeros where unknown), has_next (a dataset's last frame has no
    next state: no dynamics target there, but still an event label) and events [N, 2]: the episode's
    outcome on its last step, zeros elsewhere."""
    if not episodes:
        raise ValueError("no episodes given")
    rows = {k: [] for k in ("state", "action", "next_state", "has_next", "events")}
    for ep in episodes:
        s, a = np.asarray(ep["state"], np.float32), np.asarray(ep["action"], np.float32)
        T = len(a)
        if len(s) not in (T, T + 1):
            raise ValueError(f"an episode has {len(s)} states for {T} actions; expected {T} or {T + 1}")
        nxt = np.zeros_like(s[:T])
        nxt[: len(s) - 1] = s[1:T + 1]
        has = np.arange(T) < len(s) - 1
        ev = np.zeros((T, 2), np.float32)
        ev[-1] = [bool(ep.get("success", False)), bool(ep.get("failure", False))]
        for k, v in zip(rows, (s[:T], a, nxt, has, ev), strict=True):
            rows[k].append(v)
    return {k: np.concatenate(v) for k, v in rows.items()}


class StateWorldModel(SavedWorldModel, nn.Module):
    """p(s_{t+1}, events | s_t, a_t) as an ensemble; inputs and outputs in physical units."""

    def __init__(self, state_dim: int, action_dim: int, config: WorldModelConfig | None = None,
                 training_step: Callable | None = None, **kwargs):
        super().__init__()
        if training_step is not None and not callable(training_step):
            raise TypeError(f"training_step must be a function (wm, batch) -> loss, got {type(training_step).__name__}")
        # What a lesson hands in: `training_step(wm, batch) -> loss` replaces `loss` in every `fit` of this
        # model (and of its copies); it is not saved, a loaded model trains with `loss`.
        self.training_step = training_step
        self.config = config or WorldModelConfig(**kwargs)
        c, self.state_dim, self.action_dim = self.config, state_dim, action_dim
        dims = [state_dim + action_dim] + [c.hidden] * c.layers
        self.layers = nn.ModuleList(EnsembleLinear(c.ensemble, i, o) for i, o in zip(dims[:-1], dims[1:], strict=True))
        self.head = EnsembleLinear(c.ensemble, c.hidden, 2 * state_dim + len(EVENTS))
        self.max_logvar = nn.Parameter(torch.full((state_dim,), 0.5))
        self.min_logvar = nn.Parameter(torch.full((state_dim,), -10.0))
        for name, dim in (("s", state_dim), ("a", action_dim), ("d", state_dim)):
            self.register_buffer(f"mean_{name}", torch.zeros(dim))
            self.register_buffer(f"std_{name}", torch.ones(dim))
        # The box of states seen in training, widened by a margin: imagined states are kept inside it.
        self.register_buffer("low_s", torch.full((state_dim,), -float("inf")))
        self.register_buffer("high_s", torch.full((state_dim,), float("inf")))
        self.history: list[dict] = []  # one dict per logged training step (loss, validation error)
        self._opt: torch.optim.Optimizer | None = None

    def init_args(self) -> dict:
        return {"state_dim": self.state_dim, "action_dim": self.action_dim, **dataclasses.asdict(self.config)}

    # ---- the model ------------------------------------------------------------------------------
    def forward(self, state: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Physical [B, D], [B, A] (or already [E, B, .]) -> normalised delta mean, log var [E, B, D] and
        event logits [E, B, 2]."""
        x = torch.cat([(state - self.mean_s) / self.std_s, (action - self.mean_a) / self.std_a], -1)
        if x.ndim == 2:
            x = x.unsqueeze(0).expand(self.config.ensemble, -1, -1)
        for layer in self.layers:
            x = F.silu(layer(x))
        out = self.head(x)
        D = self.state_dim
        mean, logvar, logits = out[..., :D], out[..., D:2 * D], out[..., 2 * D:]
        return mean, soft_bound(logvar, self.min_logvar, self.max_logvar), logits

    @torch.no_grad()
    def predict(self, state, action, member: torch.Tensor | None = None, sample: bool = True,
                generator: torch.Generator | None = None, all_events: bool = False):
        """One imagined step. `member` [B]: which ensemble member each row uses (default: random per row,
        PETS's TS-1). Returns (next_state [B, D], event probabilities [B, 2] of that member), and with
        `all_events` also every member's event probabilities [E, B, 2] (for pessimistic labelling)."""
        state = torch.as_tensor(state, dtype=torch.float32)
        action = torch.as_tensor(action, dtype=torch.float32)
        mean, logvar, logits = self(state, action)
        B = len(state)
        if member is None:
            member = torch.randint(0, self.config.ensemble, (B,), generator=generator)
        rows = torch.arange(B)
        probs = torch.sigmoid(logits)
        mean, logvar = mean[member, rows], logvar[member, rows]
        delta = mean + (torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator) if sample else 0.0)
        out = (self.bounded(state + self.mean_d + self.std_d * delta), probs[member, rows])
        return (*out, probs) if all_events else out

    @torch.no_grad()
    def predict_members(self, state: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Member i's mean prediction for its own rows: state [E, M, D], action [E, M, A] ->
        (next_state [E, M, D], event probabilities [E, M, 2]); one pass, no sampling (for planning)."""
        if state.ndim != 3 or state.shape[0] != self.config.ensemble:
            raise ValueError(f"state must be [ensemble={self.config.ensemble}, M, D], got {tuple(state.shape)}")
        mean, _, logits = self(state, action)
        return self.bounded(state + self.mean_d + self.std_d * mean), torch.sigmoid(logits)

    def bounded(self, state: torch.Tensor) -> torch.Tensor:
        """States clamped into the (widened) box of the training states. Compounding imagination can leave
        the data, where the model's output means nothing: one Detour rollout reached |s| ~ 5e5 in 20
        steps and turned the policy trained on it to NaN (lesson 07, FAST, seed 4)."""
        return torch.minimum(torch.maximum(state, self.low_s), self.high_s)

    # ---- training -------------------------------------------------------------------------------
    def set_normalizer(self, data: dict[str, np.ndarray]) -> None:
        """Input and target statistics from transitions (std floored: goal coordinates hardly vary)."""
        has = data["has_next"].astype(bool)
        delta = data["next_state"][has] - data["state"][has]
        for name, x in (("s", data["state"]), ("a", data["action"]), ("d", delta)):
            x = torch.as_tensor(x, dtype=torch.float32)
            getattr(self, f"mean_{name}").copy_(x.mean(0))
            getattr(self, f"std_{name}").copy_(x.std(0).clamp(min=1e-3))
        states = torch.as_tensor(np.concatenate([data["state"], data["next_state"][has]]), dtype=torch.float32)
        lo, hi = states.min(0).values, states.max(0).values
        margin = 0.25 * (hi - lo) + 1e-3  # room to extrapolate a little, not to run away
        self.low_s.copy_(lo - margin)
        self.high_s.copy_(hi + margin)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Gaussian NLL on the delta (rows with a next state) + event cross-entropy, for batch [E, B, .]."""
        mean, logvar, logits = self(batch["state"], batch["action"])
        target = (batch["next_state"] - batch["state"] - self.mean_d) / self.std_d
        has = batch["has_next"].bool()
        nll = gaussian_nll(mean[has], logvar[has], target[has]) if has.any() else mean.sum() * 0
        pos_w = torch.tensor(self.config.event_pos_weight)
        bce = F.binary_cross_entropy_with_logits(logits, batch["events"], pos_weight=pos_w)
        bound = 0.01 * (self.max_logvar.sum() - self.min_logvar.sum())
        return nll + self.config.event_weight * bce + bound, {"nll": nll.item(), "event_bce": bce.item()}

    def batch_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss `fit` minimises on one batch [E, B, .], as a scalar tensor (`loss` without its parts)."""
        return self.loss(batch)[0]

    def fit(self, data: dict[str, np.ndarray], steps: int = 2000, seed: int = 0, val: dict | None = None,
            log_every: int = 50, reset_optimizer: bool = False) -> StateWorldModel:
        """Train for `steps` on transitions (`transitions_from_episodes`). The first call also sets the
        normaliser; later calls continue from the current weights (refining on new data), as VLAW
        finetunes its world model on real rollouts. `val` transitions give a held-out one-step error."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        missing = {"state", "action", "next_state", "has_next", "events"} - set(data)
        if missing:
            raise KeyError(f"transitions lack {sorted(missing)} (build them with transitions_from_episodes)")
        if self._opt is None:
            self.set_normalizer(data)
        if self._opt is None or reset_optimizer:
            self._opt = torch.optim.AdamW(self.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)
        t = {k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in data.items()}
        start = self.history[-1]["step"] + 1 if self.history else 0

        def log(step, loss, parts):
            if step % log_every == 0 or step == steps - 1:
                row = {"step": start + step, "loss": loss, **parts}
                if val is not None:
                    row["val_error"] = self.one_step_error(val)
                self.history.append(row)

        def loss(idx):  # each member its own minibatch: indices [E, B]
            batch = {k: v[idx] for k, v in t.items()}
            if self.training_step is None:
                return self.loss(batch)
            out = self.training_step(self, batch)
            return out, {}

        minibatch_fit(self, loss, len(t["state"]), steps,
                      (self.config.ensemble, self.config.batch_size), seed=seed, optimizer=self._opt,
                      after_step=log)
        return self

    @torch.no_grad()
    def one_step_error(self, data: dict[str, np.ndarray]) -> float:
        """Root-mean-square error of the ensemble-mean next state (physical units) on transitions with one."""
        has = np.asarray(data["has_next"], bool)
        s = torch.as_tensor(data["state"][has], dtype=torch.float32)
        mean, _, _ = self(s, torch.as_tensor(data["action"][has], dtype=torch.float32))
        pred = s + self.mean_d + self.std_d * mean.mean(0)
        return float((pred - torch.as_tensor(data["next_state"][has])).pow(2).mean().sqrt())

    @torch.no_grad()
    def event_accuracy(self, data: dict[str, np.ndarray], threshold: float = 0.5) -> dict[str, float]:
        """Recall of each event (fraction of true events the ensemble mean flags) and false-alarm rate."""
        _, _, logits = self(torch.as_tensor(data["state"]), torch.as_tensor(data["action"]))
        flag = (torch.sigmoid(logits).mean(0) > threshold).numpy()
        ev = np.asarray(data["events"], bool)
        out = {}
        for j, name in enumerate(EVENTS):
            out[f"{name}_recall"] = float(flag[ev[:, j], j].mean()) if ev[:, j].any() else float("nan")
            out[f"{name}_false_alarm"] = float(flag[~ev[:, j], j].mean())
        return out
