"""TQL: a transformer Q-function over per-scalar tokens, and the attention-entropy control that lets it scale.

Dong, Hung, Swerdlow, Sadigh, Finn, "Scaling Q-Functions with Transformers by Preventing Attention
Collapse" (arXiv 2602.01439). Making a transformer critic bigger tends to make its attention concentrate
on a few tokens (attention-entropy collapse) and its value surface rough; TQL keeps each layer's
attention entropy near a target with a learnable temperature, a dual variable like SAC's alpha.

    tokens   e_i = x_i * W_i + P_i for every scalar x_i of (observation, action or action chunk),
             plus a learned [VALUE] token first; L pre-LayerNorm transformer blocks; Q = head(h_[VALUE])
    H_l      = mean over batch, heads and queries of -sum_j p_ij log p_ij, the attention rows of layer l
             (attention computed here, not by a fused kernel, so H_l is exact and differentiable)
    critic   L_Q   = L_TD - sum_l sg(clip(tau_l, tau_min, tau_max)) * H_l     (raise entropy, weighted by tau_l)
    temps    L_tau = sum_l tau_l * (sg(H_l) - H*_l)  (descent lowers tau_l when H_l > H*_l, raises it below;
             tau is projected back onto [tau_min, tau_max] after each step, so it never winds up)

The paper's actor is FQL's (flow BC + a one-step policy). Here the actor is labkit's ResFiT residual
(`labkit.rl.residual`): a TD3 per-step correction of a frozen base policy, with RLPD demo mixing. TQL
changes only the critic and its loss, which is the paper's contribution; the `TQL` agent is ResFiT with
that critic. `collapse_study` is the paper's central measurement at CPU scale: fitting Q by TD on a
shipped dataset at two critic sizes, with and without the entropy control, against Monte-Carlo returns
of held-out episodes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from labkit.rl.critics import polyak_update, target_copy
from labkit.rl.residual import ResidualConfig, ResidualRL, td3_critic_loss

# ---- the Q-transformer --------------------------------------------------------------------------------


def attention_entropy(logp: torch.Tensor) -> torch.Tensor:
    """Mean attention-row entropy -sum_j p_j log p_j of log-probabilities [..., queries, keys] (nats)."""
    p = logp.exp()
    return -torch.where(p > 0, p * logp, 0.0).sum(-1).mean()  # 0 log 0 = 0 (a masked or underflowed key)


class EntropyAttention(nn.Module):
    """Multi-head self-attention that also returns its mean row entropy (H_l)."""

    def __init__(self, d_model: int, heads: int, entropy_fn: Callable = attention_entropy):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads})")
        self.heads, self.entropy_fn = heads, entropy_fn
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D = h.shape
        q, k, v = self.qkv(h).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # [B, heads, T, d]
        logp = torch.log_softmax(q @ k.transpose(-1, -2) / math.sqrt(D // self.heads), dim=-1)  # [B, heads, T, T]
        out = (logp.exp() @ v).transpose(1, 2).reshape(B, T, D)
        return self.out(out), self.entropy_fn(logp)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: h + Attn(LN h), then h + MLP(LN h)."""

    def __init__(self, d_model: int, heads: int, mlp_ratio: int = 2, entropy_fn: Callable = attention_entropy):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = EntropyAttention(d_model, heads, entropy_fn)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(),
                                 nn.Linear(mlp_ratio * d_model, d_model))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, entropy = self.attn(self.ln1(h))
        h = h + a
        return h + self.mlp(self.ln2(h)), entropy


class TransformerQ(nn.Module):
    """Q(obs, action) read from a [VALUE] token, one token per scalar of obs [B, obs_dim] and action
    [B, action_dim] (an action chunk flattened). forward -> (Q [B], per-layer attention entropy [L]);
    `entropy_fn` computes each layer's entropy from its log-attention (a lesson hands in its own)."""

    def __init__(self, obs_dim: int, action_dim: int, d_model: int = 64, layers: int = 2, heads: int = 4,
                 mlp_ratio: int = 2, entropy_fn: Callable = attention_entropy):
        super().__init__()
        if min(obs_dim, action_dim, d_model, layers, heads, mlp_ratio) < 1:
            raise ValueError(f"need positive sizes, got obs_dim={obs_dim}, action_dim={action_dim}, "
                             f"d_model={d_model}, layers={layers}, heads={heads}, mlp_ratio={mlp_ratio}")
        self.obs_dim, self.action_dim = obs_dim, action_dim
        n = obs_dim + action_dim
        self.scale = nn.Parameter(torch.randn(n, d_model) / math.sqrt(d_model) * 4)  # W_i: the scalar's value
        self.position = nn.Parameter(torch.randn(n, d_model) * 0.02)  # P_i: which scalar it is
        self.value_token = nn.Parameter(torch.randn(1, 1, d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(d_model, heads, mlp_ratio, entropy_fn) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(d_model), nn.Linear(d_model, 1)

    @property
    def tokens(self) -> int:
        """Sequence length: one token per scalar, plus [VALUE]."""
        return self.obs_dim + self.action_dim + 1

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        obs, action = obs.flatten(1), action.flatten(1)
        if obs.shape[1] != self.obs_dim or action.shape[1] != self.action_dim or len(obs) != len(action):
            raise ValueError(f"TransformerQ expects obs [B, {self.obs_dim}] and action [B, {self.action_dim}] "
                             f"(flattened), got {list(obs.shape)} and {list(action.shape)}")
        x = torch.cat([obs, action], -1).float()
        h = x.unsqueeze(-1) * self.scale + self.position  # [B, n, d]
        h = torch.cat([self.value_token.expand(len(x), -1, -1), h], 1)
        entropies = []
        for block in self.blocks:
            h, entropy = block(h)
            entropies.append(entropy)
        return self.head(self.norm(h[:, 0])).squeeze(-1), torch.stack(entropies)


class TransformerQEnsemble(nn.Module):
    """E TransformerQ members in labkit's critic convention: forward -> Q [E, B] (so ResFiT's losses and
    targets run unchanged); the members' entropies of the last call wait in `.entropy` [E, L]."""

    def __init__(self, obs_dim: int, action_dim: int, ensemble: int = 2, **kw):
        super().__init__()
        self.members = nn.ModuleList(TransformerQ(obs_dim, action_dim, **kw) for _ in range(ensemble))
        self.entropy: torch.Tensor | None = None

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        q, h = zip(*(m(obs, action) for m in self.members), strict=True)
        self.entropy = torch.stack(h)
        return torch.stack(q)


# ---- the entropy control -----------------------------------------------------------------------------


def tql_critic_loss(td_loss: torch.Tensor, entropy: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """L_Q = L_TD - sum_l sg(tau_l) * H_l (entropy [..., L], summed over any leading member axis)."""
    return td_loss - (tau.detach() * entropy).sum()


def temperature_loss(tau: torch.Tensor, entropy: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_tau = sum_l tau_l * (sg(H_l) - H*_l): its gradient raises tau_l while H_l < H*_l."""
    return (tau * (entropy.detach() - target)).sum()


def default_targets(tokens: int, layers: int) -> list[float]:
    """H*_l when none is given: from 0.85 to 0.7 of the uniform entropy log(tokens), first to last layer.
    (The paper's 3.5 / 3.0 nats for two layers are about these fractions of log T for OGBench's T ~ 60.)"""
    return [float(f * math.log(tokens)) for f in np.linspace(0.85, 0.7, layers)]


class AttentionTemperature(nn.Module):
    """tau_l, one per layer, with targets H*_l and bounds [tau_min, tau_max]."""

    def __init__(self, targets: Sequence[float], init: float = 0.0, tau_min: float = 0.0, tau_max: float = 1.0,
                 loss_fn: Callable = temperature_loss):
        super().__init__()
        self.loss_fn = loss_fn  # a lesson hands in its own (same arguments as temperature_loss)
        if not tau_min <= init <= tau_max:
            raise ValueError(f"need tau_min <= init <= tau_max, got {tau_min}, {init}, {tau_max}")
        if not all(math.isfinite(t) and t >= 0 for t in targets):
            raise ValueError(f"entropy targets must be finite nats >= 0, got {list(targets)}")
        self.tau_min, self.tau_max = float(tau_min), float(tau_max)
        self.tau = nn.Parameter(torch.full((len(targets),), float(init)))
        self.register_buffer("target", torch.tensor([float(t) for t in targets]))

    def clipped(self) -> torch.Tensor:
        """sg(clip(tau, tau_min, tau_max)): the weights the critic loss uses."""
        return self.tau.detach().clamp(self.tau_min, self.tau_max)

    def loss(self, entropy: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.tau, entropy, self.target)

    @torch.no_grad()
    def project(self) -> None:
        self.tau.clamp_(self.tau_min, self.tau_max)


def resolve_targets(target, tokens: int, layers: int) -> list[float]:
    """Per-layer H* from a config: None (default_targets), one number for every layer, or one per layer."""
    if target is None:
        return default_targets(tokens, layers)
    targets = [float(target)] * layers if isinstance(target, int | float) else [float(t) for t in target]
    if len(targets) != layers:
        raise ValueError(f"entropy_target needs one value per layer ({layers}), got {len(targets)}")
    if max(targets) > math.log(tokens):
        raise ValueError(f"an entropy target above log(tokens) = {math.log(tokens):.3f} nats cannot be reached, "
                         f"got {targets}")
    return targets


# ---- the agent: ResFiT's residual actor with a Q-transformer critic -------------------------------------


@dataclass
class TQLConfig(ResidualConfig):
    """ResFiT's settings (labkit.rl.residual) plus the Q-transformer and its entropy control
    (algorithms.md section 13: two layers, H* = (3.5, 3.0) nats at OGBench scale; CPU sizes here)."""

    d_model: int = 64
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 2
    entropy_control: bool = True  # False: plain TD (the collapsing baseline)
    entropy_target: float | tuple[float, ...] | None = None  # nats, per layer; None: default_targets
    tau_init: float = 0.0
    tau_min: float = 0.0
    tau_max: float = 1.0
    temperature_lr: float = 3e-3  # as in collapse_study

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.entropy_target, list):
            self.entropy_target = tuple(self.entropy_target)
        if self.temperature_lr <= 0:
            raise ValueError(f"temperature_lr must be positive, got {self.temperature_lr}")


class TQL(ResidualRL):
    """ResFiT with TQL's critic: a TransformerQ ensemble trained by TD minus the entropy term, with
    per-layer temperatures toward the entropy targets.

        agent = TQL(base_policy, "labkit/PegInsert-v0", TQLConfig(), demos=open_dataset("peg"))
        history = agent.train(env_steps=10_000, eval_every=2_500)

    Each update's metrics add `entropy_l` (mean over members) and `tau_l` for every layer l.
    """

    name = "TQL"
    method, takes_demos = "tql", True

    def __init__(self, policy, env_id: str, config: TQLConfig | dict | None = None, demos=None,
                 env_kwargs: dict | None = None):
        config = TQLConfig(**config) if isinstance(config, dict) else (config or TQLConfig())
        super().__init__(policy, env_id, config, demos=demos, env_kwargs=env_kwargs, critic_loss_fn=self._critic_loss)
        c = config
        A = self.space.action_dim
        torch.manual_seed(c.seed + 1)
        self.critic = TransformerQEnsemble(self.space.obs_dim + A, A, c.ensemble, d_model=c.d_model, layers=c.layers,
                                           heads=c.heads, mlp_ratio=c.mlp_ratio)
        self.critic_target = target_copy(self.critic)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=c.critic_lr)
        targets = resolve_targets(c.entropy_target, self.critic.members[0].tokens, c.layers)
        self.temperature = AttentionTemperature(targets, c.tau_init, c.tau_min, c.tau_max)
        self.temp_opt = torch.optim.Adam(self.temperature.parameters(), lr=c.temperature_lr)
        self._entropy = torch.zeros(c.layers)

    @staticmethod
    def _critic_loss(agent: TQL, batch: dict) -> torch.Tensor:
        td = td3_critic_loss(agent, batch)  # its last forward is the online critic on the batch
        entropy = agent.critic.entropy  # [E, L]
        agent._entropy = entropy.detach().mean(0)
        if not agent.config.entropy_control:
            return td
        return tql_critic_loss(td, entropy, agent.temperature.clipped())

    def update(self) -> dict:
        """ResFiT's update with TQL's critic loss, then one temperature step on this batch's entropies."""
        out = super().update()  # the same dict ResFiT logged: extended in place
        if self.config.entropy_control:
            loss = self.temperature.loss(self._entropy)
            self.temp_opt.zero_grad()
            loss.backward()
            self.temp_opt.step()
            self.temperature.project()
        for layer, (h, tau) in enumerate(zip(self._entropy.tolist(), self.temperature.clipped().tolist(), strict=True)):
            out[f"entropy_{layer}"], out[f"tau_{layer}"] = h, tau
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "temperature": self.temperature.state_dict()}


# ---- the collapse, measured offline ----------------------------------------------------------------------


def offline_chunks(dataset: str = "peg", chunk: int = 4, gamma: float = 0.99, heldout: float = 0.2) -> dict:
    """Chunk transitions of a shipped dataset for offline TD: {"train", "test"} each {"x" [N, obs_dim],
    "a" [N, chunk*A], "r", "x_next", "a_next" (the data's own next chunk: SARSA, so Q -> Q^behaviour),
    "discount", "return" (Monte-Carlo)}; the last `heldout` share of episodes is the test split.

    An untrained flow policy supplies the chunk convention and normaliser (`labkit.rl.best_of_n`); every
    episode end counts as terminal, so the TD fixed point is exactly the Monte-Carlo return's mean."""
    from labkit.data.shipped import open_dataset
    from labkit.policies import FlowPolicy
    from labkit.rl.best_of_n import critic_obs, dataset_chunks

    data = open_dataset(dataset)
    conv = FlowPolicy.from_dataset(data, horizon=chunk, n_action_steps=chunk, obs_horizon=1)
    ch = dataset_chunks(data, conv, gamma)
    episode = np.repeat(np.arange(data.num_episodes), data.lengths)
    t = np.arange(len(episode))
    nxt = torch.as_tensor(np.minimum(t + chunk, data.episode_to[episode] - 1))
    x = critic_obs(conv, conv.normalize_obs(ch["obs"]))
    rows = {"x": x, "a": ch["action"], "r": ch["reward"], "x_next": x[nxt], "a_next": ch["action"][nxt],
            "discount": ch["discount"], "return": ch["return"]}
    test = torch.as_tensor(episode >= round(data.num_episodes * (1 - heldout)))
    return {"train": {k: v[~test] for k, v in rows.items()}, "test": {k: v[test] for k, v in rows.items()}}


def fit_offline(data: dict, d_model: int = 64, layers: int = 2, heads: int = 4, entropy_control: bool = False,
                steps: int = 2000, lr: float = 3e-3, batch_size: int = 128, target_tau: float = 0.005,
                entropy_target=None, temperature_lr: float = 3e-3, tau_max: float = 1.0, mlp_ratio: int = 2,
                eval_every: int = 200, seed: int = 0, entropy_fn: Callable = attention_entropy,
                temperature_loss_fn: Callable = temperature_loss) -> list[dict]:
    """TD (SARSA) fitting of one TransformerQ on `offline_chunks` data, optionally with TQL's entropy
    control. Returns a row every `eval_every` steps: step, td_loss, entropy_l and tau_l per layer,
    value_error (mean |Q - G| on the held-out episodes), q_bias (mean Q - G there), roughness (how fast Q
    changes under small fixed action perturbations there: the paper's "non-smooth value surface"), cpu_s.
    `entropy_fn` and `temperature_loss_fn` replace `attention_entropy` and `temperature_loss` (a lesson's own)."""
    from labkit.training import minibatch_fit

    torch.manual_seed(seed)
    tr, te = data["train"], data["test"]
    q = TransformerQ(tr["x"].shape[1], tr["a"].shape[1], d_model, layers, heads, mlp_ratio, entropy_fn)
    q_target = target_copy(q)
    temp = AttentionTemperature(resolve_targets(entropy_target, q.tokens, layers), 0.0, 0.0, tau_max,
                                temperature_loss_fn)
    temp_opt = torch.optim.Adam(temp.parameters(), lr=temperature_lr)
    rows, cpu0, seen = [], time.process_time(), {"td": [], "H": []}

    def loss_fn(idx):
        with torch.no_grad():
            y = tr["r"][idx] + tr["discount"][idx] * q_target(tr["x_next"][idx], tr["a_next"][idx])[0]
        pred, entropy = q(tr["x"][idx], tr["a"][idx])
        td = (pred - y).pow(2).mean()
        loss = tql_critic_loss(td, entropy, temp.clipped()) if entropy_control else td
        return loss, (td.item(), entropy.detach())

    probe = torch.randn(te["a"].shape, generator=torch.Generator().manual_seed(seed))
    probe = 0.1 * probe / probe.norm(dim=1, keepdim=True)  # fixed action perturbations of norm 0.1

    @torch.no_grad()
    def held_out() -> tuple[float, float, float]:
        """(mean |Q - G|, mean Q - G, roughness = mean |Q(s, a + d) - Q(s, a)| / |d|) on held-out data."""
        def values(a):
            return torch.cat([q(te["x"][i:i + 1024], a[i:i + 1024])[0] for i in range(0, len(a), 1024)])
        pred = values(te["a"])
        rough = (values(te["a"] + probe) - pred).abs().mean().item() / 0.1
        return (pred - te["return"]).abs().mean().item(), (pred - te["return"]).mean().item(), rough

    def after_step(step, loss, extra):
        td, entropy = extra
        polyak_update(q_target, q, target_tau)
        if entropy_control:
            temp_opt.zero_grad()
            temp.loss(entropy).backward()
            temp_opt.step()
            temp.project()
        seen["td"].append(td)
        seen["H"].append(entropy)
        if (step + 1) % eval_every == 0:
            q.eval()
            err, bias, rough = held_out()
            q.train()
            H = torch.stack(seen["H"]).mean(0).tolist()
            rows.append({"step": step + 1, "td_loss": float(np.mean(seen["td"])), "value_error": err, "q_bias": bias,
                         "roughness": rough,
                         **{f"entropy_{i}": h for i, h in enumerate(H)},
                         **{f"tau_{i}": t for i, t in enumerate(temp.clipped().tolist())},
                         "cpu_s": time.process_time() - cpu0})
            seen["td"].clear()
            seen["H"].clear()

    minibatch_fit(q, loss_fn, len(tr["x"]), steps, batch_size, lr, seed, grad_clip=1.0, after_step=after_step)
    return rows


SIZES = {"small": {"d_model": 32, "layers": 2, "heads": 4}, "large": {"d_model": 128, "layers": 2, "heads": 4}}


def collapse_study(sizes: dict | None = None, steps: int = 2000, seeds: Sequence[int] = (0,), dataset: str = "peg",
                   chunk: int = 4, progress: bool = True, **fit_kw) -> list[dict]:
    """The paper's central measurement in miniature: for each critic size (SIZES by default) and seed,
    fit Q by TD with and without entropy control; one long-format row per evaluation, with `size`,
    `control` and `seed` beside `fit_offline`'s columns (a pandas DataFrame takes the list as is)."""
    data = offline_chunks(dataset, chunk)
    rows = []
    for name, size in (sizes or SIZES).items():
        for control in (False, True):
            for seed in seeds:
                run = fit_offline(data, **size, entropy_control=control, steps=steps, seed=seed, **fit_kw)
                rows += [{"size": name, "control": control, "seed": seed, **r} for r in run]
                if progress:
                    last = run[-1]
                    H = [v for k, v in last.items() if k.startswith("entropy_")]
                    print(f"{name:>6} control={control!s:5} seed={seed}: entropy {np.round(H, 3).tolist()} "
                          f"value error {last['value_error']:.3f} ({last['cpu_s'] / 60:.1f} CPU min)", flush=True)
    return rows


def plot_collapse(rows: list[dict], path=None):
    """The last layer's attention entropy and the held-out value error over training (mean over seeds),
    one colour per critic size, dashed without and solid with entropy control."""
    import matplotlib.pyplot as plt

    def last_layer(r):
        return r[f"entropy_{sum(k.startswith('entropy_') for k in r) - 1}"]

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    for size in sizes:
        for control in (False, True):
            sel = [r for r in rows if r["size"] == size and r["control"] == control]
            if not sel:
                continue
            steps = sorted({r["step"] for r in sel})
            ent = [np.mean([last_layer(r) for r in sel if r["step"] == s]) for s in steps]
            err = [np.mean([r["value_error"] for r in sel if r["step"] == s]) for s in steps]
            style = dict(color=f"C{sizes.index(size)}", linestyle="-" if control else "--",
                         label=f"{size}, {'entropy control' if control else 'plain TD'}")
            axes[0].plot(steps, ent, **style)
            axes[1].plot(steps, err, **style)
    axes[0].set(xlabel="gradient step", ylabel="attention entropy, last layer (nats)")
    axes[1].set(xlabel="gradient step", ylabel="held-out |Q - MC return|")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


__all__ = ["AttentionTemperature", "TQL", "TQLConfig", "TransformerQ", "TransformerQEnsemble", "attention_entropy",
           "collapse_study", "default_targets", "fit_offline", "offline_chunks", "plot_collapse", "tql_critic_loss",
           "temperature_loss"]


def main(argv: list[str] | None = None) -> int:
    """`python -m labkit.rl.tql --steps 600 --seeds 0 1 2 --out results/tql_collapse.jsonl`: the collapse
    study over training seeds, its rows appended to --out (the README's TQL numbers come from there)."""
    import argparse
    import json
    from datetime import date

    p = argparse.ArgumentParser(prog="python -m labkit.rl.tql", description=main.__doc__.split(":")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", default=None, help="a JSON-lines file the rows are appended to")
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error(f"--steps must be >= 1, got {a.steps}")
    torch.set_num_threads(1)
    rows = collapse_study(steps=a.steps, eval_every=max(a.steps // 6, 10), seeds=a.seeds)
    if a.out:
        with open(a.out, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, "date": date.today().isoformat(), "command": f"python -m labkit.rl.tql --steps "
                                    f"{a.steps} --seeds {' '.join(map(str, a.seeds))}"}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
