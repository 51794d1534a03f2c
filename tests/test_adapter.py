"""The AsyncVLA-style adapter: stale guidance indexing, the delayed chunk schedule, adapter training."""

import numpy as np
import pytest
import torch

import labkit  # noqa: F401  (headless GL first)
from labkit.robot.adapter import (
    AsyncChunkPolicy,
    LocalAdapter,
    SlowSource,
    fit_adapter,
    ridge,
    stale_guidance,
)


class CountingSource:
    """Chunk k is filled with k*100 + step index, so the schedule can be read off the actions."""

    obs_horizon, horizon, n_action_steps = 1, 8, 4

    def __init__(self):
        self.calls = 0

    def predict_chunk(self, history):
        chunk = self.calls * 100 + np.arange(self.horizon, dtype=np.float64)[:, None] * np.ones((1, 2))
        self.calls += 1
        return chunk


def test_stale_guidance_by_hand():
    chunks = np.arange(5 * 3).reshape(5, 3, 1).astype(float)  # frame f, step j -> 3f + j
    episode = np.array([0, 0, 0, 1, 1])
    g, ok = stale_guidance(chunks, episode, age=1)
    assert ok.tolist() == [False, True, True, False, True]
    assert g[ok, 0].tolist() == [0 * 3 + 1, 1 * 3 + 1, 3 * 3 + 1]  # chunks[t - 1, 1]
    with pytest.raises(ValueError, match="age"):
        stale_guidance(chunks, episode, age=3)


@pytest.mark.parametrize("delay", [0, 2, 5])
def test_async_policy_schedule(delay):
    pol = AsyncChunkPolicy(CountingSource(), delay=delay)
    acts = [pol({"state": np.zeros(3)})[0] for _ in range(12)]
    # the first chunk runs at once; chunk k (asked at step 4k) takes over at step 4k + delay
    want = []
    for t in range(12):
        k = max([0] + [c for c in (1, 2) if t >= 4 * c + delay])
        want.append(k * 100 + min(t - 4 * k, 7))
    assert acts == want
    with pytest.raises(ValueError, match="delay"):
        AsyncChunkPolicy(CountingSource(), delay=-1)


def test_slow_source_sleeps():
    import time

    src = SlowSource(CountingSource(), 0.05)
    t0 = time.perf_counter()
    src.predict_chunk([{}])
    assert time.perf_counter() - t0 >= 0.05 and src.horizon == 8


def test_ridge_by_hand():
    x = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)
    y = 3 * x + 1
    W = ridge(x, y, lam=0.0)
    assert torch.allclose(W[:, 0], torch.tensor([3.0, 1.0], dtype=torch.float64))
    assert ridge(x, y, lam=1e6).abs().max() < 1e-3  # a huge penalty shrinks everything to zero


class UnitNorm:
    def normalize(self, key, x):
        return torch.as_tensor(x).float()

    def unnormalize(self, key, x):
        return torch.as_tensor(x).float()


def test_local_adapter_linear_and_clipped():
    W = torch.zeros(3, 3, 2)  # ages 0..2, innovation dim 2 (+ bias), action dim 2
    W[1, 0, 0] = 1.0  # at age 1: residual[0] = innovation[0]
    ad = LocalAdapter(W, UnitNorm(), max_correction=0.5)
    a = np.array([1.0, 2.0])
    now, then = {"state": np.array([0.3, 9.0])}, {"state": np.array([0.0, 0.0])}
    assert np.allclose(ad.correct(a, now, then, 0), a)  # age 0: no correction
    assert np.allclose(ad.correct(a, now, then, 1), [1.3, 2.0])
    far = {"state": np.array([5.0, 0.0])}
    assert np.allclose(ad.correct(a, far, then, 1), [1.5, 2.0])  # clipped to max_correction
    assert np.allclose(ad.correct(a, now, then, 7), a)  # past max_age: the last age's weights (zero)


def test_fit_adapter_reduces_heldout_error():
    from labkit.data import DATASETS, load_dataset
    from labkit.policies import FlowPolicy

    ds = load_dataset(DATASETS / "arm").select(range(20))
    torch.manual_seed(0)  # before the policy is built: its weights must not depend on the tests run before
    pol = FlowPolicy.from_dataset(ds, horizon=8, n_action_steps=4, obs_horizon=2, hidden=32, layers=1).eval()
    ad, rep = fit_adapter(pol, ds, max_age=5, lam=1.0)
    assert rep["mse_stale"].shape == (6,) and len(ad.W) == 6
    # An untrained policy's chunks are poor; for stale chunks (age >= 1) the innovation explains part of
    # the residual on held-out episodes. At age 0 there is no innovation, only a fitted bias, which may
    # miss the held-out episodes' by a little either way.
    assert np.all(rep["mse_adapted"][1:] < rep["mse_stale"][1:])
    assert rep["mse_adapted"][0] == pytest.approx(rep["mse_stale"][0], rel=0.05)
    src = AsyncChunkPolicy(pol, delay=2, adapter=ad)
    obs = {"state": ds.frames["observation.state"][0]}
    assert src(obs).shape == (6,)
    with pytest.raises(ValueError, match="max_age"):
        fit_adapter(pol, ds, max_age=8)


def test_local_adapter_dims_select_the_innovation():
    W = torch.zeros(1, 2, 1)
    W[0, 0, 0] = 1.0  # residual = the first *selected* innovation entry
    ad = LocalAdapter(W, UnitNorm(), max_correction=None, dims=[2])
    now, then = {"state": np.array([5.0, 5.0, 0.25])}, {"state": np.zeros(3)}
    assert np.allclose(ad.correct(np.array([1.0]), now, then, 0), [1.25])


def test_fit_adapter_solves_with_a_handed_in_ridge():
    """`solve=` replaces labkit's ridge: the same solve gives the same adapter; a wrong one (the penalty
    a hundred times too strong) changes its held-out error."""
    from labkit.data import DATASETS, load_dataset
    from labkit.policies import FlowPolicy

    ds = load_dataset(DATASETS / "arm").select(range(20))
    torch.manual_seed(0)
    pol = FlowPolicy.from_dataset(ds, horizon=8, n_action_steps=4, obs_horizon=2, hidden=32, layers=1).eval()
    calls = []

    def mine(x, y, lam):
        calls.append(x.shape)
        X = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        return torch.linalg.solve(X.T @ X + lam * torch.eye(X.shape[1], dtype=x.dtype), X.T @ y)

    def overpenalised(x, y, lam):
        return mine(x, y, 100 * lam)

    fits = []
    for solve in (None, mine, overpenalised):
        torch.manual_seed(1)  # the flow policy's chunks are sampled: the same noise for each fit
        fits.append(fit_adapter(pol, ds, max_age=3, lam=1.0, solve=solve))
    (ad0, rep0), (ad1, rep1), (_, rep2) = fits
    assert len(calls) == 8 and torch.equal(ad0.W, ad1.W)  # one solve per age (0..3), in each of two fits
    np.testing.assert_array_equal(rep0["mse_adapted"], rep1["mse_adapted"])
    assert not np.allclose(rep2["mse_adapted"], rep0["mse_adapted"])
