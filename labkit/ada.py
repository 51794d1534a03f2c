"""ADA in miniature: identify a simulator from *unpaired* real rollouts, with a discriminator on observables.

Nelson, Kreiman, Levine, Krishnapriyan, "Adversarial Distribution Alignment" (arXiv 2604.01169) align a
model trained on simulation to experiments that show only some observables: a discriminator on those
observables says where the model's samples and the data differ, and the model moves to fool it while it
stays near its previous iterate. Here the model is a simulator's physics parameters x (labkit.sim2real's
twin: gain, joint offsets, latency, damping, mass), its samples are closed-loop rollouts of one policy
(the arm's scripted expert) in the simulator built from x, and the observables are what a real arm's
encoders and its own commands show at every control step:

    o_t = (q_t, q_{t+1} - q_t, u_t - q_t)        joint angles, their change, the command relative to them

    repeat:  x_1..x_N ~ N(mu, sigma^2)  (clipped to the box)            CEM's proposal around the last iterate
             D = argmin_D BCE( D(o_real) -> 1,  D(o from every x_i's rollouts) -> 0 )     a fresh MLP
             r(x_i) = mean of logit D(o) over x_i's rollouts                 how real x_i's rollouts look
             (mu, sigma) <- mean and std of the elite x_i by r               (labkit.sim2real's cem_refit)

Nothing is paired: the real rollouts start from other initial states than the simulated ones, so the
trajectory matching of lesson 09 (replaying recorded commands from the same state) cannot use them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from labkit.nn import mlp
from labkit.sim2real import JOINTS, TWIN, cem_refit, cem_sample
from labkit.training import minibatch_fit


def observables(twin_kwargs: dict, seeds, max_steps: int | None = None) -> np.ndarray:
    """The scripted expert's closed-loop rollouts on the twin built with `twin_kwargs`, one per seed ->
    observables [N, 15]: joint angles q_t, their change q_{t+1} - q_t and the command u_t - q_t (arm joints)."""
    from labkit.envs.arm import ArmPickCubeExpert  # noqa: PLC0415

    env = gym.make(TWIN, **twin_kwargs)
    expert = ArmPickCubeExpert(env)
    rows = []
    try:
        for s in seeds:
            obs, _ = env.reset(seed=int(s))
            expert.reset(seed=int(s))
            for _ in range(max_steps or 10**9):
                u = np.asarray(expert(obs), np.float64)
                nxt, _, term, trunc, _ = env.step(u)
                q, q2 = obs["state"][JOINTS], nxt["state"][JOINTS]
                rows.append(np.concatenate([q, q2 - q, u[JOINTS] - q]))
                obs = nxt
                if term or trunc:
                    break
    finally:
        env.close()
    if not rows:
        raise ValueError("no rollout steps: give at least one seed")
    return np.asarray(rows, np.float32)


class Discriminator(nn.Module):
    """A logit D(o) on observables, inputs standardised by the real data's statistics."""

    def __init__(self, real: np.ndarray, hidden: int = 64):
        super().__init__()
        self.net = mlp(real.shape[1], 1, hidden, 2)
        self.register_buffer("mean", torch.as_tensor(real.mean(0)))
        self.register_buffer("std", torch.as_tensor(real.std(0)).clamp(min=1e-4))

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        return self.net((o - self.mean) / self.std).squeeze(-1)


def train_discriminator(real: np.ndarray, sim: np.ndarray, steps: int = 300, hidden: int = 64,
                        seed: int = 0) -> Discriminator:
    """D(o): real observables -> 1, simulated -> 0, by BCE with the two classes weighted equally."""
    x = torch.as_tensor(np.concatenate([real, sim]))
    y = torch.cat([torch.ones(len(real)), torch.zeros(len(sim))])
    w = torch.cat([torch.full((len(real),), 0.5 / len(real)), torch.full((len(sim),), 0.5 / len(sim))]) * len(x)
    torch.manual_seed(seed)
    d = Discriminator(real, hidden)
    bce = nn.functional.binary_cross_entropy_with_logits
    minibatch_fit(d, lambda idx: (w[idx] * bce(d(x[idx]), y[idx], reduction="none")).mean(), len(x), steps, 256,
                  3e-3, seed)
    return d.eval()


def ada(real: np.ndarray, simulator: Callable[[np.ndarray], dict], low, high, seeds_per_candidate=(0, 1, 2),
        iters: int = 6, population: int = 16, elite: int = 4, integer: tuple[int, ...] = (), max_steps: int | None = None,
        disc_steps: int = 300, seed: int = 0, observe: Callable | None = None) -> tuple[np.ndarray, list[dict]]:
    """Align simulator parameters to real observables [M, 15] (`observables` of the real arm's rollouts).
    `simulator(x)` gives the twin kwargs of parameters x; each candidate is rolled out from
    `seeds_per_candidate` (a new set each iteration, never the real rollouts' seeds). Returns the final
    mean (the aligned parameters) and one history row per iteration (mean, std, best realness, the
    discriminator's accuracy on that iteration's data, minutes). `observe(twin_kwargs, seeds, max_steps)`
    replaces `observables` (another task's rollouts, or a stand-in in tests)."""
    observe = observe or observables
    low, high = np.asarray(low, float), np.asarray(high, float)
    if low.shape != high.shape or (low > high).any() or not 1 <= elite <= population:
        raise ValueError("need low <= high of one shape and 1 <= elite <= population")
    rng = np.random.default_rng(seed)
    mean, std = (low + high) / 2, (high - low) / 2
    history = []
    base = np.asarray(seeds_per_candidate, int)
    for it in range(iters):
        start = time.perf_counter()
        xs = cem_sample(mean, std, low, high, population, rng, tuple(integer))
        seeds = base + 100_000 + 1_000 * it  # fresh initial states every iteration, none of the real ones
        sims = [observe(simulator(x), seeds, max_steps) for x in xs]
        d = train_discriminator(real, np.concatenate(sims), disc_steps, seed=seed + it)
        with torch.no_grad():
            realness = np.array([float(d(torch.as_tensor(o)).mean()) for o in sims])
            acc = 0.5 * (float((d(torch.as_tensor(real)) > 0).float().mean())
                         + float((d(torch.as_tensor(np.concatenate(sims))) <= 0).float().mean()))
        mean, std = cem_refit(xs, -realness, elite)  # CEM minimises: the most real-looking are the elite
        std = std + 1e-3 * (high - low)  # a floor keeps it searching
        history.append({"mean": mean.copy(), "std": std.copy(), "best_realness": float(realness.max()),
                        "disc_accuracy": acc, "minutes": (time.perf_counter() - start) / 60})
    return mean, history
