"""Lecture demos: the closed-form 2-D toy behind demos/denoising.py, and every marimo demo runs headless."""

from __future__ import annotations

import importlib.util
import io
import math
import os
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")  # before anything imports matplotlib

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from labkit.teach import toy2d  # noqa: E402

pytestmark = pytest.mark.slow  # marimo demos (still in make test; skipped by make test-fast)

DEMOS = sorted((Path(__file__).resolve().parent.parent / "demos").glob("*.py"))
NOISE = {"DDPM (ancestral)": 1.0, "Flow (Euler-Maruyama SDE)": 0.1}  # eta = 1 is DDPM; a small flow sigma


def _noised_log_density(mix: toy2d.Mixture, x: np.ndarray, alpha: float, sigma: float) -> np.ndarray:
    """log p(x) for x = alpha a + sigma z, written independently of toy2d: a mixture of N(alpha mu, v I)."""
    var = alpha**2 * mix.stds**2 + sigma**2
    d2 = ((x[:, None, :] - alpha * mix.means) ** 2).sum(-1)
    logp = np.log(mix.weights) - d2 / (2 * var) - np.log(2 * math.pi * var)
    top = logp.max(-1)
    return top + np.log(np.exp(logp - top[:, None]).sum(-1))


def _score(mix, x, alpha, sigma, h=1e-5):
    """grad_x log p(x) by central differences."""
    cols = []
    for d in range(2):
        e = np.zeros(2)
        e[d] = h
        cols.append((_noised_log_density(mix, x + e, alpha, sigma) - _noised_log_density(mix, x - e, alpha, sigma)) / (2 * h))
    return np.stack(cols, -1)


def test_exact_eps_and_velocity_are_the_score_in_disguise():
    # Tweedie: E[z | x] = -sigma * score for x = alpha a + sigma z. So eps* = -sqrt(1 - abar) score, and on
    # the flow path (alpha, sigma) = (t, 1 - t): v* = E[a - z | x] = (x + (1 - t) score) / t.
    mix = toy2d.Mixture(means=[[-0.6, 0.0], [0.5, 0.4], [0.0, -0.7]], stds=[0.1, 0.2, 0.15], weights=[0.5, 0.3, 0.2])
    x = np.random.default_rng(0).normal(size=(64, 2))
    for abar in (0.05, 0.5, 0.95):
        score = _score(mix, x, math.sqrt(abar), math.sqrt(1 - abar))
        np.testing.assert_allclose(toy2d.mixture_eps(mix, x, abar), -math.sqrt(1 - abar) * score, atol=1e-5)
    for t in (0.2, 0.6, 0.9):
        score = _score(mix, x, t, 1 - t)
        np.testing.assert_allclose(toy2d.mixture_velocity(mix, x, t), (x + (1 - t) * score) / t, atol=1e-4)
    # At pure noise the velocity points every x at the mixture mean: the root of mode averaging.
    np.testing.assert_allclose(toy2d.mixture_velocity(mix, x, 0.0), mix.mean - x, atol=1e-12)


@pytest.mark.parametrize("modes", [2, 3])
@pytest.mark.parametrize("sampler", list(toy2d.SAMPLERS))
def test_fifty_steps_land_on_the_modes(sampler, modes):
    mix = toy2d.mixture(modes)
    paths = toy2d.sample(mix, sampler, 1000, 50, NOISE.get(sampler, 0.0), seed=1)
    assert paths.shape == (51, 1000, 2)
    assert abs(paths[0].std() - 1) < 0.1, "the chain should start from N(0, I) noise"
    at_mode, off_mode = toy2d.mode_fractions(mix, paths[-1])
    assert at_mode.sum() >= 0.9, f"{sampler}: only {at_mode.sum():.1%} within 3 stds of a mode"
    # Each sample follows one mode, in the target's proportions (no mode dropped or favoured).
    np.testing.assert_allclose(at_mode, mix.weights, atol=0.06)


def test_one_step_collapses_to_the_mean():
    mix = toy2d.mixture(2)  # modes at (-0.6, 0) and (0.6, 0): the mean (0, 0) is between them
    flow = toy2d.sample_flow(mix, 500, steps=1)
    np.testing.assert_allclose(flow[-1], np.broadcast_to(mix.mean, (500, 2)), atol=1e-9)
    assert toy2d.mode_fractions(mix, flow[-1])[1] == 1.0  # every sample lands between the modes
    ddim = toy2d.sample_ddim(mix, 500, steps=1)  # t = T-1 is almost pure noise: almost the mean
    assert np.abs(ddim[-1] - mix.mean).max() < 0.01
    # A few steps already split the samples, and more steps leave fewer between the modes.
    off = [toy2d.mode_fractions(mix, toy2d.sample_flow(mix, 1000, k)[-1])[1] for k in (1, 2, 5, 20)]
    assert off == sorted(off, reverse=True) and off[-1] < 0.05, off
    # With one mode, the mean is the mode: one step is right there.
    uni = toy2d.mixture(1)
    assert toy2d.mode_fractions(uni, toy2d.sample_flow(uni, 200, 1)[-1])[0][0] == 1.0


def test_flow_from_given_noise_is_the_same_map():
    # DSRL steers x0: giving the noise must reproduce the seeded chain exactly, and reject a wrong shape.
    mix = toy2d.mixture(3)
    paths = toy2d.sample_flow(mix, 50, 8, seed=3)
    np.testing.assert_array_equal(toy2d.sample_flow(mix, 50, 8, noise=paths[0]), paths)
    with pytest.raises(ValueError, match="noise must have shape"):
        toy2d.sample_flow(mix, 50, 8, noise=paths[0][:10])


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="at least 1 mode"):
        toy2d.mixture(0)
    with pytest.raises(ValueError, match="unknown sampler"):
        toy2d.sample(toy2d.mixture(2), "Euler", 10, 5)
    with pytest.raises(ValueError, match="steps must be in 1..100"):
        toy2d.sample_ddim(toy2d.mixture(2), 10, 101)
    with pytest.raises(ValueError, match="weights"):
        toy2d.Mixture(means=[[0, 0], [1, 1]], stds=[0.1, 0.1], weights=[0.5, 0.6])


def _run_demo(path: Path):
    """Run a marimo demo's cells headless with its default control values (what `python demo.py` does,
    in this process so that labkit is imported once); a cell that raises raises here."""
    spec = importlib.util.spec_from_file_location(f"demo_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.app.run()


def test_there_are_demos():
    assert any(p.name == "denoising.py" for p in DEMOS), DEMOS


@pytest.mark.parametrize("path", DEMOS, ids=[p.stem for p in DEMOS])
def test_demo_runs_headless(path):
    outputs, defs = _run_demo(path)
    figures = [o for o in outputs if type(o).__name__ == "Figure"]
    for fig in figures:  # marimo renders figures in the browser; drawing here catches errors raised at draw time
        fig.savefig(io.BytesIO(), format="png")
    if path.stem == "denoising":
        assert figures, "the denoising demo should show a figure"
        assert defs["paths"].shape == (defs["steps"].value + 1, defs["n_samples"].value, 2)
    if path.stem == "noise_steering":  # a target on a mode: steering the noise reaches it; the base gets half
        first, last = defs["history"][0][1], defs["history"][-1][1]
        assert first < 0.6 and last > 0.9 and defs["best_reachable"] > 0.9, (first, last)
    if path.stem == "reward_threshold":  # the naive detector pays for failed endings; the fixed one does not
        finals, wins = defs["finals"], defs["final_success"]
        paid = {k: float((m.predict({"state": finals})[~wins] >= 0.5).mean()) for k, m in defs["models"].items()}
        assert paid["naive"] >= 0.1 and paid["fixed"] <= 0.05, paid
    if path.stem == "imagination":  # straight at the wall: only the model refined with crashes imagines one
        def crashes(name):
            _, fail_p, ended = defs["imagined"][name]
            return sum(1 for m in range(len(ended)) if ended[m] >= 0 and fail_p[m, ended[m] - 1] > 0.5)
        assert defs["real_hit"] and crashes("demos only") == 0 and crashes("refined") >= 3
    if path.stem == "mode_averaging":  # at the default coin-flip expert: the mean hits the wall, samples do not
        assert defs["mse_hits"].mean() >= 0.5 and defs["gen_hits"].mean() <= 0.1, (defs["mse_hits"].mean(),
                                                                                    defs["gen_hits"].mean())


def test_a_failing_cell_fails_the_demo_test(tmp_path):
    # The harness above must not swallow errors: append a cell that raises to a copy of a demo.
    source = DEMOS[0].read_text()
    cell = '@app.cell\ndef _():\n    raise RuntimeError("injected failure")\n    return\n\n\nif __name__ == "__main__":'
    broken = tmp_path / DEMOS[0].name
    broken.write_text(source.replace('if __name__ == "__main__":', cell))
    with pytest.raises(RuntimeError, match="injected failure"):
        _run_demo(broken)
