import marimo

__generated_with = "0.25.2"
app = marimo.App(width="medium", app_title="Imagination beside reality: a world model trained on demos only")


@app.cell
def _():
    import copy

    import gymnasium as gym
    import marimo as mo
    import numpy as np
    import torch
    from matplotlib.figure import Figure  # no pyplot: no global figure state to leak on every redraw
    from matplotlib.patches import Circle, Rectangle

    import labkit  # noqa: F401  (headless GL before mujoco)
    from labkit import world_models as W
    from labkit.data import DATASETS
    from labkit.data import load_dataset

    return Circle, DATASETS, Figure, Rectangle, W, copy, gym, load_dataset, mo, np, torch


@app.cell
def _(mo):
    mo.md(r"""
    # Imagination beside reality: a world model trained on demos only

    A world model predicts the next state from the state and the action; roll it forward and you can
    evaluate or improve a policy without touching the robot (lesson 07). Here it is lesson 07's
    ensemble of five probabilistic MLPs on `Detour`, with heads that predict success and *failure*
    (a collision). Two versions, trained when the demo opens (~30 s):

    - **demos only**: the 200 expert demonstrations. The expert never touches the wall, so the model
      has never seen a collision.
    - **refined**: the same model trained further on 60 real episodes of a careless driver that
      mostly hits the wall (VLAW's step: real rollouts, failures included, refine the world model).

    Choose an action sequence (two phases of constant velocity) and compare what happens in the
    simulator with what each model imagines, member by member.
    """)
    return


@app.cell
def _(DATASETS, W, copy, gym, load_dataset, mo, np):
    ENV = "labkit/Detour-v0"

    def drive(env, seed, actions):
        """A real episode with a fixed action sequence: states [T+1, 6], whether it hit the wall, and when."""
        obs, _ = env.reset(seed=seed)
        states, hit, ended = [obs["state"]], False, len(actions)
        for t, a in enumerate(actions):
            obs, _, term, trunc, info = env.step(np.asarray(a, np.float32))
            states.append(obs["state"])
            if term or trunc:
                hit, ended = bool(info.get("collision", False)), t + 1
                break
        return np.stack(states), hit, ended

    with mo.status.spinner("training two world models (demos only, then refined with crashes)..."):
        _demos = W.episodes_from_dataset(load_dataset(DATASETS / "detour"))
        wm_demo = W.StateWorldModel(6, 2, ensemble=5).fit(W.transitions_from_episodes(_demos), steps=800, seed=0)
        # A careless driver: a random, nearly straight velocity held for the whole episode. Most hit the wall.
        _env, _rng, _crashes = gym.make(ENV), np.random.default_rng(1), []
        for _i in range(60):
            _v = [_rng.uniform(-0.15, 0.15), _rng.uniform(0.2, 0.5)]
            _s, _hit, _T = drive(_env, 5000 + _i, [_v] * 100)
            _crashes.append({"state": _s, "action": np.array([_v] * _T, np.float32), "success": False, "failure": _hit})
        crash_rate = float(np.mean([c["failure"] for c in _crashes]))
        wm_refined = copy.deepcopy(wm_demo).fit(W.transitions_from_episodes(_demos + _crashes), steps=1000, seed=0)
    env = _env
    return crash_rate, drive, env, wm_demo, wm_refined


@app.cell
def _(mo):
    vx1 = mo.ui.slider(-0.5, 0.5, step=0.05, value=0.0, show_value=True, label="phase 1: vx (m/s)")
    vy1 = mo.ui.slider(0.0, 0.5, step=0.05, value=0.4, show_value=True, label="phase 1: vy (m/s)")
    switch = mo.ui.slider(1, 60, value=40, show_value=True, label="phase 2 starts at step")
    vx2 = mo.ui.slider(-0.5, 0.5, step=0.05, value=0.0, show_value=True, label="phase 2: vx")
    vy2 = mo.ui.slider(-0.5, 0.5, step=0.05, value=0.4, show_value=True, label="phase 2: vy")
    seed = mo.ui.number(0, 9999, step=1, value=0, label="start (reset seed)")
    mo.hstack([mo.vstack([vx1, vy1, switch]), mo.vstack([vx2, vy2, seed])], justify="start", gap=2)
    return seed, switch, vx1, vx2, vy1, vy2


@app.cell
def _(drive, env, np, seed, switch, torch, vx1, vx2, vy1, vy2, wm_demo, wm_refined):
    actions = np.array([[vx1.value, vy1.value]] * switch.value + [[vx2.value, vy2.value]] * (100 - switch.value),
                       np.float32)
    real, real_hit, real_end = drive(env, int(seed.value or 0), actions)

    def imagine(wm):
        """Every member's mean path from the real start, stopped where it predicts success or failure (p > 0.5)."""
        E = wm.config.ensemble
        s = torch.as_tensor(np.repeat(real[:1], E, 0))
        paths, fail_p, ended = [s.numpy()], [], np.full(E, -1)
        for t, a in enumerate(actions):
            s, p = wm.predict(s, torch.as_tensor(np.repeat(a[None], E, 0)), member=torch.arange(E), sample=False)
            paths.append(s.numpy())
            fail_p.append(p[:, 1].numpy())
            stop = (p.numpy() > 0.5).any(1) & (ended < 0)
            ended[stop] = t + 1
            if (ended >= 0).all():
                break
        return np.stack(paths, 1), np.stack(fail_p, 1), ended  # [E, T+1, 6], [E, T], [E]

    imagined = {"demos only": imagine(wm_demo), "refined": imagine(wm_refined)}
    return actions, imagined, real, real_end, real_hit


@app.cell
def _(Circle, Figure, Rectangle, imagined, np, real, real_end, real_hit):
    fig = Figure(figsize=(12, 4.6), layout="constrained")
    axes = fig.subplots(1, 3, width_ratios=[1, 1, 1.1])
    for _ax, (_name, (_paths, _fp, _ended)), _col in zip(axes[:2], imagined.items(), ("tab:red", "tab:blue"), strict=True):
        _ax.add_patch(Rectangle((-0.35, -0.06), 0.7, 0.12, color="0.35"))
        _ax.add_patch(Circle((real[0, 4], real[0, 5]), 0.06, color="tab:green", alpha=0.5))
        _ax.plot(real[:, 0], real[:, 1], "k-", lw=2.5, label="reality" + (" (hit the wall)" if real_hit else ""))
        for _m in range(len(_paths)):
            _T = _ended[_m] if _ended[_m] >= 0 else _paths.shape[1] - 1
            _ax.plot(_paths[_m, : _T + 1, 0], _paths[_m, : _T + 1, 1], color=_col, lw=1, alpha=0.8,
                     label="imagined (5 members)" if _m == 0 else None)
            if _ended[_m] >= 0 and _fp[_m, _ended[_m] - 1] > 0.5:
                _ax.plot(*_paths[_m, _T, :2], "x", color=_col, ms=10, mew=2)
        _ax.set(xlim=(-1, 1), ylim=(-1, 1), aspect="equal", title=f"{_name}: x = imagined crash")
        _ax.legend(fontsize=7, loc="lower right")
    _ax3 = axes[2]
    for (_name, (_paths, _fp, _ended)), _col in zip(imagined.items(), ("tab:red", "tab:blue"), strict=True):
        for _m in range(len(_fp)):
            _ax3.plot(np.arange(1, _fp.shape[1] + 1), _fp[_m], color=_col, alpha=0.6, label=_name if _m == 0 else None)
    if real_hit:
        _ax3.axvline(real_end, color="k", lw=2, label="real collision")
    _ax3.set(xlabel="step", ylabel="predicted P(failure)", ylim=(-0.02, 1.02), xlim=(0, min(100, real_end + 30)),
             title="does the model see the crash coming?")
    _ax3.legend(fontsize=7)
    fig  # noqa: B018  (a marimo cell shows its last expression)
    return


@app.cell
def _(crash_rate, imagined, mo, real_end, real_hit):
    def _said(name):
        _paths, _fp, _ended = imagined[name]
        crashed = sum(1 for m in range(len(_ended)) if _ended[m] >= 0 and _fp[m, _ended[m] - 1] > 0.5)
        return f"{crashed} of {len(_ended)} members imagine a crash"

    mo.md(f"""
    Reality: **{"a collision at step " + str(real_end) if real_hit else "no collision"}**.
    Demos only: **{_said("demos only")}**; refined: **{_said("refined")}**.
    (The careless driver used for refinement hit the wall in {crash_rate:.0%} of its 60 episodes.)

    ## Things to try
    - **Straight at the wall** (the default). Reality stops at the wall; the demos-only model drives
      through it, because no demonstration ever stopped there: it is *optimistic*, and a policy
      evaluated in it would look better than it is (lesson 07: MSE-BC 0% real, 86% imagined).
    - **Round the wall** (phase 1 vx = -0.5 for ~10 steps, then vy). Both models follow reality
      closely: on the demonstrations' own ground the dynamics are easy.
    - **Backwards or sideways** (vy < 0 in phase 2): states no data covered; the members disagree,
      and that disagreement is the ensemble's honest "I don't know".
    """)
    return


if __name__ == "__main__":
    app.run()
