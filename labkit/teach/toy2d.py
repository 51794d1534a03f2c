"""A 2-D toy for lectures: how diffusion and flow samplers turn noise into a multimodal action distribution.

The target is a mixture of isotropic Gaussians, e.g. "go left / go right" around an obstacle. Nothing is
trained: for such a mixture the ideal network is known in closed form, so the demo shows what the
*samplers* do (step counts, noise) and no learning error.

Both samplers in labkit noise a clean action a the same way, x = alpha a + sigma z with z ~ N(0, I):
    DDPM / DDIM (labkit.policies.diffusion):  alpha = sqrt(abar_k), sigma = sqrt(1 - abar_k)
    flow matching (labkit.policies.flow):      alpha = t,           sigma = 1 - t    (x0 = z is the noise)
Given mode m, a ~ N(mu_m, s_m^2 I), so x | m ~ N(alpha mu_m, (alpha^2 s_m^2 + sigma^2) I): the noised
marginal is again a mixture, and Gaussian conditioning gives the posterior means per mode:
    E[a | x, m] = mu_m + alpha s_m^2 / v_m (x - alpha mu_m),   E[z | x, m] = sigma / v_m (x - alpha mu_m)
with v_m = alpha^2 s_m^2 + sigma^2. Averaging over the posterior responsibilities r_m(x) = p(m | x) gives
what a perfectly trained network would output:
    eps*(x, k) = E[z | x]            (the diffusion network's target, eps-prediction)
    v*(x, t)   = E[a - z | x]        (the flow network's target, a - x0 on the linear path)
At pure noise (alpha = 0) r_m = w_m whatever x is, so E[a | x] is the mixture mean: one deterministic
step lands every sample on the mean, between the modes (mode averaging, what MSE regression does).

Every sampler returns its whole chain, paths[i] for i = 0..K, shape [K+1, N, 2]: paths[0] is the noise
and paths[K] the samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from labkit.policies.diffusion import ddim_timesteps, squaredcos_cap_v2

T_TRAIN = 100  # DiffusionConfig.num_train_timesteps: the DDPM schedule the policies train on


@dataclass(frozen=True)
class Mixture:
    """A mixture of isotropic 2-D Gaussians: means [M, 2], stds [M], weights [M] (summing to 1)."""

    means: np.ndarray
    stds: np.ndarray
    weights: np.ndarray

    def __post_init__(self):
        means, stds, weights = (np.asarray(v, dtype=np.float64) for v in (self.means, self.stds, self.weights))
        if means.ndim != 2 or means.shape[1] != 2 or stds.shape != (len(means),) or weights.shape != (len(means),):
            raise ValueError(f"Mixture needs means [M, 2], stds [M] and weights [M]; got {means.shape}, "
                             f"{stds.shape}, {weights.shape}")
        if (stds <= 0).any() or (weights < 0).any() or not math.isclose(weights.sum(), 1.0, rel_tol=1e-6):
            raise ValueError("Mixture stds must be > 0 and weights >= 0 summing to 1")
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "stds", stds)
        object.__setattr__(self, "weights", weights)

    @property
    def mean(self) -> np.ndarray:
        """The mixture mean [2]: where regression (and a 1-step deterministic sampler) ends up."""
        return self.weights @ self.means

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n exact samples [n, 2] (for reference)."""
        m = rng.choice(len(self.weights), size=n, p=self.weights)
        return self.means[m] + self.stds[m, None] * rng.standard_normal((n, 2))

    def density(self, x: np.ndarray) -> np.ndarray:
        """p(x) for points x [..., 2] (for contour plots)."""
        return np.exp(_log_joint(self, x, 1.0, 0.0)).sum(-1)


def mixture(modes: int = 2, radius: float = 0.6, std: float = 0.1) -> Mixture:
    """`modes` equal-weight modes on a circle, the first on the left: 2 = "go left / go right"."""
    if modes < 1:
        raise ValueError(f"mixture needs at least 1 mode, got {modes}")
    angle = math.pi + 2 * math.pi * np.arange(modes) / modes
    means = radius * np.stack([np.cos(angle), np.sin(angle)], -1)
    return Mixture(means, np.full(modes, float(std)), np.full(modes, 1.0 / modes))


def _log_joint(mix: Mixture, x: np.ndarray, alpha: float, sigma: float) -> np.ndarray:
    """log w_m + log N(x; alpha mu_m, v_m I) for x [..., 2] -> [..., M]: the noised marginal, per mode."""
    var = alpha**2 * mix.stds**2 + sigma**2  # [M]
    d2 = ((x[..., None, :] - alpha * mix.means) ** 2).sum(-1)  # [..., M]
    return np.log(np.maximum(mix.weights, 1e-300)) - d2 / (2 * var) - np.log(2 * math.pi * var)


def posterior(mix: Mixture, x: np.ndarray, alpha: float, sigma: float):
    """For x = alpha a + sigma z: responsibilities r [N, M], E[a | x] [N, 2] and E[z | x] [N, 2]."""
    logp = _log_joint(mix, x, alpha, sigma)
    r = np.exp(logp - logp.max(-1, keepdims=True))  # softmax, shifted so that far-off points don't underflow
    r /= r.sum(-1, keepdims=True)
    var = (alpha**2 * mix.stds**2 + sigma**2)[:, None]  # [M, 1]
    resid = x[:, None, :] - alpha * mix.means  # [N, M, 2]: x minus the noised mode centre
    a_m = mix.means + alpha * mix.stds[:, None] ** 2 / var * resid  # E[a | x, m]
    z_m = sigma / var * resid  # E[z | x, m]
    return r, np.einsum("nm,nmd->nd", r, a_m), np.einsum("nm,nmd->nd", r, z_m)


def alphas_cumprod(T: int = T_TRAIN) -> np.ndarray:
    """abar_k, k = 0..T-1, of the squared-cosine schedule that DiffusionPolicy trains with."""
    return np.cumprod(1 - squaredcos_cap_v2(T).numpy())


def mixture_eps(mix: Mixture, x: np.ndarray, abar: float) -> np.ndarray:
    """The exact noise prediction eps*(x_k) = E[eps | x_k] at a timestep with cumulative alpha `abar`."""
    return posterior(mix, x, math.sqrt(abar), math.sqrt(1 - abar))[2]


def mixture_velocity(mix: Mixture, x: np.ndarray, t: float) -> np.ndarray:
    """The exact flow velocity v*(x, t) = E[a - x0 | x_t = x] on the path x_t = (1 - t) x0 + t a."""
    _, a_hat, x0_hat = posterior(mix, x, t, 1 - t)
    return a_hat - x0_hat


def sample_ddim(mix: Mixture, n: int, steps: int, eta: float = 0.0, seed: int = 0,
                T: int = T_TRAIN, clip: bool = True) -> np.ndarray:
    """DDIM with the exact eps*, on the same trailing timesteps and update as DiffusionPolicy.

    eta = 0 is deterministic DDIM; eta = 1 adds DDPM's posterior noise (ancestral sampling; with
    steps = T it is DDPM itself). `clip` clips the predicted clean action to [-1, 1] like the policy's
    `clip_sample`. Returns paths [steps+1, n, 2]; paths[0] ~ N(0, I) is x_T.
    """
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T} (the training timesteps), got {steps}")
    rng = np.random.default_rng(seed)
    abar = alphas_cumprod(T)
    ts = ddim_timesteps(T, steps)
    x = rng.standard_normal((n, 2))
    paths = [x]
    for i, t in enumerate(ts):
        abar_t = abar[t]
        abar_prev = abar[ts[i + 1]] if i + 1 < steps else 1.0  # after the last step: the clean action
        # The policy's network outputs eps and divides by sqrt(abar_t) to get a_hat; with the exact
        # posterior we read both off directly (same numbers, without amplifying rounding at t = T-1).
        _, a_hat, eps = posterior(mix, x, math.sqrt(abar_t), math.sqrt(1 - abar_t))
        if clip:
            a_hat = np.clip(a_hat, -1, 1)
        s = eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
        x = math.sqrt(abar_prev) * a_hat + math.sqrt(max(1 - abar_prev - s**2, 0.0)) * eps
        if s > 0:
            x = x + s * rng.standard_normal(x.shape)
        paths.append(x)
    return np.stack(paths)


def sample_ddpm(mix: Mixture, n: int, steps: int, eta: float = 1.0, seed: int = 0, T: int = T_TRAIN,
                clip: bool = True) -> np.ndarray:
    """Ancestral (stochastic) sampling: the DDIM update with eta = 1, i.e. DDPM's posterior noise."""
    return sample_ddim(mix, n, steps, eta=eta, seed=seed, T=T, clip=clip)


def sample_flow(mix: Mixture, n: int, steps: int, sigma: float = 0.0, seed: int = 0,
                noise: np.ndarray | None = None) -> np.ndarray:
    """Euler steps of dx/dt = v*(x, t) from noise at t = 0 to t = 1, as FlowPolicy samples.

    sigma > 0 is FlowPolicy's stochastic mode (Euler-Maruyama, x' = x + v dt + sigma sqrt(dt) z): with no
    score correction the noise widens each mode (by up to ~sigma^2 in variance), which the demo shows.
    `noise` [n, 2] gives x0 instead of drawing it (what DSRL steers). Returns paths [steps+1, n, 2];
    paths[0] is x0, ~ N(0, I) unless given.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    rng = np.random.default_rng(seed)
    dt = 1.0 / steps
    if noise is not None and np.shape(noise) != (n, 2):
        raise ValueError(f"noise must have shape ({n}, 2), got {np.shape(noise)}")
    x = rng.standard_normal((n, 2)) if noise is None else np.asarray(noise, float)
    paths = [x]
    for i in range(steps):
        x = x + mixture_velocity(mix, x, i * dt) * dt
        if sigma > 0:
            x = x + sigma * math.sqrt(dt) * rng.standard_normal(x.shape)
        paths.append(x)
    return np.stack(paths)


SAMPLERS = {  # name -> (function(mix, n, steps, noise, seed), what the noise knob means or None)
    "DDPM (ancestral)": (lambda mix, n, k, noise, seed: sample_ddpm(mix, n, k, eta=noise, seed=seed), "eta"),
    "DDIM (deterministic)": (lambda mix, n, k, noise, seed: sample_ddim(mix, n, k, eta=0.0, seed=seed), None),
    "Flow (Euler ODE)": (lambda mix, n, k, noise, seed: sample_flow(mix, n, k, sigma=0.0, seed=seed), None),
    "Flow (Euler-Maruyama SDE)": (lambda mix, n, k, noise, seed: sample_flow(mix, n, k, sigma=noise, seed=seed),
                                  "sigma"),
}


def sample(mix: Mixture, sampler: str, n: int, steps: int, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """Run one of `SAMPLERS` by name; `noise` is eta (DDPM) or sigma (flow SDE), ignored otherwise."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")
    return SAMPLERS[sampler][0](mix, n, steps, noise, seed)


def mode_assignment(mix: Mixture, x: np.ndarray, within: float = 3.0) -> np.ndarray:
    """For samples x [N, 2]: the index of the nearest mode (distance in that mode's stds) if it lies
    within `within` stds of it, else -1 (between or off the modes: the mode-averaging region)."""
    d = np.linalg.norm(x[:, None, :] - mix.means, axis=-1) / mix.stds  # [N, M]
    nearest = d.argmin(-1)
    return np.where(d[np.arange(len(x)), nearest] <= within, nearest, -1)


def mode_fractions(mix: Mixture, x: np.ndarray, within: float = 3.0) -> tuple[np.ndarray, float]:
    """Fraction of samples at each mode [M], and the fraction at none (off the modes)."""
    m = mode_assignment(mix, x, within)
    return np.bincount(m[m >= 0], minlength=len(mix.weights)) / len(x), float((m < 0).mean())
