"""Multi-step returns and their bootstrap discounts, for step-level (n-step) and chunk-level transitions,
and GAE advantages for on-policy methods over the same discounts.

Every function returns the pair the replay buffer stores, so that all methods share one TD target:
    y = R + discount * Q̄(s_next, a')
`discount` is gamma**m * (1 - terminated), with m the number of env steps summed into R. A terminal
state has no future (discount 0); a time-limit truncation does, so it keeps gamma**m and bootstraps
from the last observation seen. That is the distinction gymnasium's terminated/truncated flags exist for.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class NStep(NamedTuple):
    """n-step returns for each start step t of a trajectory (all shaped like the inputs, [T] or [T, B]).

    returns:  sum_{k<m} gamma**k r_{t+k}, stopping after the first terminal or truncation.
    discount: gamma**m, or 0 if a terminal was reached within the window.
    last:     index of the last step summed (t + m - 1): bootstrap from next_obs[last].
    steps:    m, the number of steps summed (n, or fewer at an episode or trajectory end).
    """

    returns: torch.Tensor
    discount: torch.Tensor
    last: torch.Tensor
    steps: torch.Tensor


def nstep_returns(rewards: torch.Tensor, terminated: torch.Tensor, truncated: torch.Tensor, gamma: float,
                  n: int) -> NStep:
    """n-step discounted returns over a trajectory segment, time first ([T] or [T, B] for B envs).

    Flags mark the step whose transition ended the episode. The window from t stops after such a step
    (it never sums rewards of the next episode) or at the segment's end, where it bootstraps like a
    truncation. Vectorised over t: the loop runs over the n offsets only.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not (rewards.shape == terminated.shape == truncated.shape):
        raise ValueError(f"rewards, terminated and truncated must share a shape [T] or [T, B]; got "
                         f"{list(rewards.shape)}, {list(terminated.shape)}, {list(truncated.shape)}")
    T = rewards.shape[0]
    rewards = rewards.float()
    term, ended = terminated.bool(), terminated.bool() | truncated.bool()
    t = torch.arange(T, device=rewards.device).view(-1, *([1] * (rewards.dim() - 1))).expand_as(rewards)

    ret = torch.zeros_like(rewards)
    steps = torch.zeros_like(rewards, dtype=torch.long)
    hit_terminal = torch.zeros_like(term)
    alive = torch.ones_like(term)  # still accumulating: no episode end yet and inside the segment
    for k in range(n):
        idx = t + k
        alive = alive & (idx < T)
        j = idx.clamp(max=T - 1)
        ret = ret + alive * (gamma**k) * rewards.gather(0, j)
        steps = steps + alive
        hit_terminal = hit_terminal | (alive & term.gather(0, j))
        alive = alive & ~ended.gather(0, j)
    discount = (gamma ** steps.float()) * (~hit_terminal).float()
    return NStep(ret, discount, t + steps - 1, steps)


def nstep_batch(traj: dict, gamma: float, n: int) -> dict:
    """Turn one trajectory segment into n-step transitions for `ReplayBuffer.add`.

    `traj` holds time-first tensors: obs, action, reward, next_obs, terminated, truncated (obs fields
    may be dicts). Returns the standard fields: obs, action, reward (n-step), next_obs (at t+m), discount.
    """
    out = nstep_returns(traj["reward"], traj["terminated"], traj["truncated"], gamma, n)

    def at_last(x):
        if isinstance(x, dict):
            return {k: at_last(v) for k, v in x.items()}
        idx = out.last.view(*out.last.shape, *([1] * (x.dim() - out.last.dim()))).expand_as(x)
        return x.gather(0, idx)

    return {"obs": traj["obs"], "action": traj["action"], "reward": out.returns,
            "next_obs": at_last(traj["next_obs"]), "discount": out.discount}


def chunk_discount(steps: torch.Tensor | int, terminated: torch.Tensor | bool, gamma: float) -> torch.Tensor:
    """Bootstrap discount of a chunk that ran `steps` env steps: gamma**steps, 0 after a terminal.
    Uses the steps actually executed, so a chunk cut short by a truncation discounts by less."""
    steps = torch.as_tensor(steps, dtype=torch.float32)
    terminated = torch.as_tensor(terminated, dtype=torch.bool)
    return gamma**steps * (~terminated).float()


def chunk_return(rewards: torch.Tensor, steps: torch.Tensor, terminated: torch.Tensor, gamma: float,
                 discount_within: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(return, discount) of chunks whose per-step rewards are [B, k], of which the first `steps` [B] ran.

    The chunk is one action of the agent, so by default its reward is the plain sum over the executed
    steps (what DSRL's wrapper reports); discount_within=True weights step i by gamma**i instead, as
    Q-chunking does, which makes the target equal the step-level n-step return. Either way the
    bootstrap is gamma**steps, zero after a terminal. Entries past `steps` are ignored.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, k] (chunks, steps per chunk), got {list(rewards.shape)}")
    k = rewards.shape[1]
    steps = torch.as_tensor(steps, device=rewards.device).long()
    ran = torch.arange(k, device=rewards.device) < steps.unsqueeze(-1)
    weights = gamma ** torch.arange(k, device=rewards.device).float() if discount_within else torch.ones(k)
    ret = (rewards.float() * weights.to(rewards.device) * ran).sum(-1)
    return ret, chunk_discount(steps, terminated, gamma).to(rewards.device)


def gae(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor, discounts: torch.Tensor,
        dones: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over [T, N] (time first), for on-policy
    methods (DPPO):
        delta_t = r_t + d_t V(s_{t+1}) - V(s_t),   A_t = delta_t + d_t lambda (1 - done_t) A_{t+1}
    `discounts` d_t = gamma**steps (1 - terminated), this module's bootstrap discount, bootstraps from
    `next_values` (the value of the observation after each decision, the final one at an episode's end);
    `dones` (terminated or truncated) cut the lambda-trace between episodes.
    Returns (advantages, returns = advantages + values)."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + discounts[t] * next_values[t] - values[t]
        last = delta + discounts[t] * lam * (1 - dones[t].float()) * last
        adv[t] = last
    return adv, adv + values
