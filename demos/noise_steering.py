import marimo

__generated_with = "0.25.2"
app = marimo.App(width="medium", app_title="Noise steering (DSRL): choosing the noise chooses the action")


@app.cell
def _():
    import marimo as mo
    import numpy as np
    from matplotlib.colors import to_rgb
    from matplotlib.figure import Figure  # no pyplot: no global figure state to leak on every redraw
    from matplotlib.patches import Circle

    from labkit.teach import toy2d

    return Circle, Figure, mo, np, to_rgb, toy2d


@app.cell
def _(mo):
    mo.md(r"""
    # Noise steering (DSRL): choosing the noise chooses the action

    A flow policy turns Gaussian noise $z$ into an action $a = f(z)$ by integrating its velocity
    field; with the ODE sampler $f$ is deterministic. **DSRL** (lesson 04) leaves $f$ frozen and
    learns a policy *over the noise*: pick $z$ so that $f(z)$ earns reward. Here the base policy is
    the exact flow of a 2-D mixture (`labkit/teach/toy2d.py`, as in the denoising demo), the reward
    is a bump around a target action, and a few rounds of the cross-entropy method stand in for
    DSRL's SAC in noise space.

    Left: noise space, coloured by the mode each noise flows to (the *basins*). Right: action
    space. Move the target: where it sits on a mode, steering reaches it; where it sits between
    modes, no noise reaches it, because steering can only choose among actions the base can produce.
    That is lesson 04's PegInsert finding (the needed 1 mm correction lay outside the base's samples).
    """)
    return


@app.cell
def _(mo):
    modes = mo.ui.dropdown({"2 (left / right)": 2, "3": 3, "4": 4}, value="2 (left / right)", label="modes")
    target_x = mo.ui.slider(-1.0, 1.0, step=0.05, value=0.6, show_value=True, label="target action x")
    target_y = mo.ui.slider(-1.0, 1.0, step=0.05, value=0.0, show_value=True, label="target action y")
    rounds = mo.ui.slider(0, 20, value=8, show_value=True, label="steering rounds (0 = the base policy)")
    steps = mo.ui.slider(1, 30, value=10, show_value=True, label="flow steps K")
    seed = mo.ui.number(0, 9999, step=1, value=0, label="seed")
    mo.hstack([mo.vstack([modes, steps]), mo.vstack([target_x, target_y]), mo.vstack([rounds, seed])],
              justify="start", gap=2)
    return modes, rounds, seed, steps, target_x, target_y


@app.cell
def _(modes, np, rounds, seed, steps, target_x, target_y, toy2d):
    mix = toy2d.mixture(modes.value)
    target = np.array([target_x.value, target_y.value])
    WIDTH, N = 0.15, 256  # reward bump width (action units), noise samples per round

    def act(z):
        return toy2d.sample_flow(mix, len(z), steps.value, noise=z)[-1]

    def reward(a):
        return np.exp(-0.5 * (np.linalg.norm(a - target, axis=-1) / WIDTH) ** 2)

    # The cross-entropy method over the noise distribution N(mu, std^2 I): keep the best 10%, refit.
    _rng = np.random.default_rng(int(seed.value or 0))
    mu, std, history = np.zeros(2), np.ones(2), []
    for _ in range(rounds.value + 1):
        z = mu + std * _rng.standard_normal((N, 2))
        r = reward(act(z))
        history.append((mu.copy(), float(r.mean())))
        elite = z[np.argsort(r)[-N // 10:]]
        mu, std = elite.mean(0), np.maximum(elite.std(0), 0.05)
    z_last, a_last, r_last = z, act(z), r
    best_reachable = float(reward(act(_rng.standard_normal((4000, 2)) * 1.5)).max())  # by brute force
    return a_last, best_reachable, history, mix, r_last, target, z_last


@app.cell
def _(Circle, Figure, a_last, history, mix, np, r_last, steps, target, to_rgb, toy2d, z_last):
    _colors = np.array(["tab:blue", "tab:orange", "tab:green", "tab:purple"])
    fig = Figure(figsize=(12, 4.3), layout="constrained")
    ax_z, ax_a, ax_r = fig.subplots(1, 3, width_ratios=[1, 1, 0.8])

    _g = np.linspace(-3, 3, 90)
    _zz = np.stack(np.meshgrid(_g, _g), -1).reshape(-1, 2)
    _basin = toy2d.mode_assignment(mix, toy2d.sample_flow(mix, len(_zz), steps.value, noise=_zz)[-1])
    _rgb = np.array([to_rgb(c) for c in _colors])[np.maximum(_basin, 0) % 4]
    _rgb[_basin < 0] = 0.8  # grey: noise that lands between the modes
    ax_z.imshow(_rgb.reshape(len(_g), len(_g), 3), origin="lower", extent=(-3, 3, -3, 3), alpha=0.3)
    ax_z.scatter(z_last[:, 0], z_last[:, 1], s=6, c=r_last, cmap="viridis", vmin=0, vmax=1)
    _mus = np.array([m for m, _ in history])
    ax_z.plot(_mus[:, 0], _mus[:, 1], "k.-", lw=1, label="noise mean per round")
    _t = np.linspace(0, 2 * np.pi, 100)
    ax_z.plot(2 * np.cos(_t), 2 * np.sin(_t), "k:", lw=0.8, label="2 std of N(0, I)")
    ax_z.set(xlim=(-3, 3), ylim=(-3, 3), aspect="equal", title="noise space: basins of the modes")
    ax_z.legend(fontsize=7, loc="lower right")

    _a = np.linspace(-1.5, 1.5, 150)
    _xx, _yy = np.meshgrid(_a, _a)
    ax_a.contourf(_xx, _yy, mix.density(np.stack([_xx, _yy], -1)), levels=12, cmap="Greys", alpha=0.5)
    ax_a.scatter(a_last[:, 0], a_last[:, 1], s=6, c=r_last, cmap="viridis", vmin=0, vmax=1)
    ax_a.add_patch(Circle(tuple(target), 0.15, fill=False, color="tab:red", lw=2))
    ax_a.plot(*target, "r+", ms=12, mew=2, label="target (reward bump)")
    ax_a.set(xlim=(-1.5, 1.5), ylim=(-1.5, 1.5), aspect="equal", title="action space: a = f(z)")
    ax_a.legend(fontsize=7, loc="lower right")

    ax_r.plot([r for _, r in history], "o-")
    ax_r.set(ylim=(0, 1.02), xlabel="steering round", ylabel="mean reward", title="reward while steering")
    fig  # noqa: B018  (a marimo cell shows its last expression)
    return


@app.cell
def _(best_reachable, history, mo):
    mo.md(f"""
    The base policy's mean reward is **{history[0][1]:.2f}**; after {len(history) - 1} rounds of steering
    the noise it is **{history[-1][1]:.2f}**. The best reward *any* noise reaches (brute force over 4,000
    noises) is **{best_reachable:.2f}**: the ceiling that steering the noise cannot pass.

    ## Things to try
    - **Target on a mode** (x = 0.6, y = 0): steering concentrates the noise in that mode's basin and
      the reward approaches its ceiling within a few rounds. The base picks that mode half the time.
    - **Target between the modes** (x = 0): the ceiling collapses. Every noise flows to some mode, so
      the action the reward wants is not in the base's repertoire. Residual RL or DPPO, which move
      the action itself, can reach it; DSRL and best-of-N cannot.
    - **K = 1.** One Euler step maps every noise to the mixture mean: there is nothing left to steer.
    - **3 or 4 modes.** The basins are wedges of noise space: steering is a choice among them.
    """)
    return


if __name__ == "__main__":
    app.run()
