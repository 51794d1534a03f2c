import marimo

__generated_with = "0.25.2"
app = marimo.App(width="medium", app_title="Denoising: from noise to a multimodal action")


@app.cell
def _():
    import marimo as mo
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no global figure state to leak on every redraw

    from labkit.teach import toy2d

    return Figure, mo, np, toy2d


@app.cell
def _(mo):
    mo.md(r"""
    # Denoising: from noise to a multimodal action

    A robot in front of an obstacle may **go left or go right**: the expert actions form two separate
    clumps (modes). Regression to the mean (MSE behaviour cloning) answers with the average of the
    two, straight into the obstacle. Diffusion and flow policies instead start from Gaussian noise
    and move it, step by step, onto *one* of the modes.

    Nothing is trained here. For a mixture of Gaussians the ideal network is known in closed form
    (`labkit/teach/toy2d.py`): the exact noise prediction $\epsilon^*(x, k) = E[\epsilon \mid x_k = x]$
    of DDPM/DDIM and the exact velocity $v^*(x, t) = E[a - x_0 \mid x_t = x]$ of flow matching. So
    what you see is the **sampler** alone: how many steps it takes and what its noise does.
    The samplers, schedule (`squaredcos_cap_v2`, 100 training steps, trailing DDIM timesteps) and
    updates are the ones `DiffusionPolicy` and `FlowPolicy` use.
    """)
    return


@app.cell
def _(mo, toy2d):
    modes = mo.ui.dropdown({"1 (unimodal)": 1, "2 (left / right)": 2, "3": 3, "4": 4},
                           value="2 (left / right)", label="modes")
    width = mo.ui.slider(0.05, 0.3, step=0.01, value=0.1, show_value=True, label="mode std")
    sampler = mo.ui.dropdown(list(toy2d.SAMPLERS), value="DDIM (deterministic)", label="sampler")
    steps = mo.ui.slider(1, 50, value=10, show_value=True, label="steps K")
    n_samples = mo.ui.slider(10, 2000, step=10, value=500, show_value=True, label="samples")
    seed = mo.ui.number(0, 9999, step=1, value=0, label="seed")
    return modes, n_samples, sampler, seed, steps, width


@app.cell
def _(mo, sampler, toy2d):
    # The noise knob means eta for DDPM (1 = DDPM's posterior noise) and sigma for the flow SDE; the
    # deterministic samplers have none. Rebuilt (and reset to its default) when the sampler changes.
    _knob = toy2d.SAMPLERS[sampler.value][1]
    noise = mo.ui.slider(0.0, 1.5, step=0.05, value={"eta": 1.0, "sigma": 0.3}.get(_knob, 0.0),
                         show_value=True, disabled=_knob is None,
                         label=f"noise ({_knob})" if _knob else "noise (none: deterministic)")
    return (noise,)


@app.cell
def _(mo, modes, n_samples, noise, sampler, seed, steps, width):
    mo.hstack([mo.vstack([modes, width]), mo.vstack([sampler, noise]), mo.vstack([steps, n_samples, seed])],
              justify="start", gap=2)
    return


@app.cell
def _(modes, n_samples, noise, sampler, seed, steps, toy2d, width):
    mix = toy2d.mixture(modes.value, std=width.value)
    paths = toy2d.sample(mix, sampler.value, n_samples.value, steps.value, noise.value, int(seed.value or 0))
    assigned = toy2d.mode_assignment(mix, paths[-1])  # nearest mode within 3 stds, else -1
    at_mode, off_mode = toy2d.mode_fractions(mix, paths[-1])
    return assigned, at_mode, mix, off_mode, paths


@app.cell
def _(Figure, assigned, at_mode, mix, np, off_mode, paths, sampler, steps):
    _colors = np.array(["tab:blue", "tab:orange", "tab:green", "tab:purple"])
    _off = "tab:red"
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    ax, bar = fig.subplots(1, 2, width_ratios=[1.6, 1])

    # Left: the target density, a subset of sampling chains from noise (grey dots) to samples.
    _g = np.linspace(-2.5, 2.5, 200)
    _xx, _yy = np.meshgrid(_g, _g)
    _dens = mix.density(np.stack([_xx, _yy], -1))
    ax.contourf(_xx, _yy, _dens, levels=12, cmap="Greys", alpha=0.5)
    _theta = np.linspace(0, 2 * np.pi, 100)
    for _mu, _s in zip(mix.means, mix.stds, strict=True):  # the "near a mode" region: 3 stds
        ax.plot(_mu[0] + 3 * _s * np.cos(_theta), _mu[1] + 3 * _s * np.sin(_theta), "k--", lw=0.7)
    _col = np.where(assigned >= 0, _colors[np.maximum(assigned, 0) % len(_colors)], _off)
    _show = np.random.default_rng(0).permutation(paths.shape[1])[:60]
    for _j in _show:
        ax.plot(paths[:, _j, 0], paths[:, _j, 1], color=_col[_j], lw=0.6, alpha=0.45)
    ax.scatter(paths[0, _show, 0], paths[0, _show, 1], s=6, color="0.5", label="noise (start)")
    ax.scatter(paths[-1, :, 0], paths[-1, :, 1], s=7, c=_col, zorder=3)
    ax.scatter([], [], s=7, color="k", label=f"samples (end): colour = mode, {_off[4:]} = off")
    ax.plot(*mix.mean, "kx", ms=11, mew=2.5, label="mixture mean (what regression predicts)")
    ax.set(xlim=(-2.5, 2.5), ylim=(-2.5, 2.5), aspect="equal",
           title=f"{sampler.value}, K = {steps.value}: chains from noise to actions")
    ax.legend(loc="lower right", fontsize=8)

    # Right: where the samples landed, against the target's mode weights.
    _names = [f"mode {m + 1}" for m in range(len(at_mode))] + ["between /\noff modes"]
    bar.bar(_names, [*at_mode, off_mode], color=[*_colors[np.arange(len(at_mode)) % 4], _off])
    bar.scatter(range(len(at_mode) + 1), [*mix.weights, 0.0], marker="_", s=900, color="k", zorder=3,
                label="target")
    bar.set(ylim=(0, 1), ylabel="fraction of samples", title="samples within 3 stds of each mode")
    bar.legend(loc="upper right", fontsize=8)
    fig  # noqa: B018  (a marimo cell shows its last expression)
    return


@app.cell
def _(at_mode, mix, mo, np, off_mode, paths):
    _spread = np.linalg.norm(paths[-1] - mix.means[np.argmin(
        np.linalg.norm(paths[-1][:, None] - mix.means, axis=-1), -1)], axis=-1).mean()
    mo.md(f"""
    **{100 * at_mode.sum():.1f}%** of the samples landed on a mode, **{100 * off_mode:.1f}%** between
    or off the modes. Mean distance to the nearest mode centre: **{_spread:.3f}**
    (exact samples: {mix.stds.mean() * np.sqrt(np.pi / 2):.3f}, i.e. std $\\cdot\\sqrt{{\\pi/2}}$).
    """)
    return


@app.cell
def _(mo):
    mo.md(r"""
    ## Things to try

    - **K = 1, any deterministic sampler.** At pure noise the network cannot tell the modes apart, so
      its prediction is the mixture mean, and one step lands every sample there: exactly what
      MSE regression does. With **1 mode** that is the right answer; with 2 it is the obstacle.
    - **K = 2, 3, 5.** Samples move off the mean but many still sit between the modes. Each step
      can only commit part of the way; around 10 steps the modes are clean.
    - **Flow vs DDIM at the same K.** Same exact target, different paths (straight-ish lines vs the
      cosine schedule), so different few-step errors.
    - **Count the spread.** Even where all samples reach a mode, few steps make each mode *too
      narrow* (compare the mean distance with the exact value): deterministic steps shrink variance,
      and the last step outputs the posterior mean $E[a \mid x]$, not a sample.
    - **Flow SDE with large sigma.** labkit's stochastic flow adds noise without a score correction
      (so each step stays a simple Gaussian for RL), and the modes widen: keep sigma small.
    - **DDPM with eta from 0 to 1.** eta = 0 is DDIM; eta = 1 is DDPM's ancestral noise.

    The update rules, with $\hat a = E[a \mid x]$ and $\hat\epsilon = E[\epsilon \mid x]$:

    - DDIM/DDPM: $x' = \sqrt{\bar\alpha'}\,\hat a + \sqrt{1-\bar\alpha'-s^2}\,\hat\epsilon + s z$,
      $s = \eta\sqrt{\tfrac{1-\bar\alpha'}{1-\bar\alpha}\big(1-\tfrac{\bar\alpha}{\bar\alpha'}\big)}$
    - Flow: $x' = x + v^*(x, t)\,\Delta t + \sigma\sqrt{\Delta t}\, z$, with $v^* = \hat a - \hat x_0$
    """)
    return


if __name__ == "__main__":
    app.run()
