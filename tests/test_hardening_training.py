"""Hardening: a non-finite loss stops training with a named error (instead of writing a NaN checkpoint),
and a constant feature normalises to 0 instead of amplifying sensor noise a millionfold."""

import numpy as np
import pytest
import torch

from labkit.data import EpisodeDataset, Normalizer, open_dataset
from labkit.policies import BCPolicy, FlowPolicy, fit
from labkit.training import NonFiniteLossError, minibatch_fit


@pytest.fixture(scope="module")
def detour():
    return open_dataset("detour")


def nan_action_dataset(ds, episodes=6, clean_stats=False):
    """The first `episodes` episodes of `ds`, in memory, with one NaN in one action (built in memory, so
    it gets past a loader that refuses NaN). With `clean_stats` the statistics are the clean data's, so
    only the batches that draw the NaN frame go wrong; else the stats are NaN too and every batch does."""
    eps = [{k: v.copy() for k, v in ds.episode(i).items() if k.startswith(("observation.", "action"))}
           for i in range(episodes)]
    stats = EpisodeDataset.from_episodes(eps, fps=ds.fps).stats if clean_stats else None
    eps[2]["action"][5, 1] = np.nan
    return EpisodeDataset.from_episodes(eps, fps=ds.fps, stats=stats)


@pytest.mark.parametrize("cls,clean_stats", [(BCPolicy, False), (FlowPolicy, False), (BCPolicy, True)])
def test_nan_in_the_data_stops_policy_training_with_a_named_error(detour, cls, clean_stats):
    ds = nan_action_dataset(detour, clean_stats=clean_stats)
    assert np.isnan(ds.frames["action"]).sum() == 1
    policy = cls.from_dataset(ds, horizon=8, n_action_steps=4, hidden=32, layers=1)
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at step \d+.*non-finite data.*learning rate"):
        fit(policy, ds, steps=200, batch_size=64, progress=False, accelerator="cpu")
    assert all(torch.isfinite(p).all() for p in policy.parameters())  # stopped before the update
    assert isinstance(NonFiniteLossError("x"), FloatingPointError)


def test_nan_in_the_data_stops_minibatch_fit_at_that_step():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, generator=g), torch.randn(64, generator=g)
    y[7] = float("nan")
    model = torch.nn.Linear(3, 1)
    seen = []
    with pytest.raises(NonFiniteLossError, match=r"minibatch_fit's loss is nan at step (\d+).*non-finite data"
                                                 r".*too-high learning rate \(lr=0.01\)") as err:
        minibatch_fit(model, lambda idx: (seen.append(bool((idx == 7).any())) or
                                          (model(x[idx]).squeeze(-1) - y[idx]).pow(2).mean()),
                      len(x), steps=500, batch_size=8, lr=1e-2, after_step=lambda *a: None)
    step = seen.index(True)  # the first batch that drew the NaN example
    assert f"at step {step} " in str(err.value) and len(seen) == step + 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # an infinite loss (a diverging lr) is caught the same way
    with pytest.raises(NonFiniteLossError, match="loss is inf at step 0"):
        minibatch_fit(model, lambda idx: model.weight.abs().sum() * float("inf"), 4, steps=3, batch_size=2)


def test_constant_feature_normalises_to_zero_whatever_the_noise(detour):
    norm = detour.normalizer()
    state = torch.as_tensor(detour.frames["observation.state"])
    assert float(detour.stats["observation.state"]["std"][5]) == 0.0  # goal_y: constant in the shipped data
    noisy = state + 0.002 * torch.randn(state.shape, generator=torch.Generator().manual_seed(0))
    z = norm.normalize("observation.state", noisy)
    assert torch.equal(z[:, 5], torch.zeros(len(z)))  # was 0.002 / 1e-6 ~ 2000
    assert z.abs().max() < 10
    back = norm.unnormalize("observation.state", z)
    assert torch.equal(back[:, 5], torch.full((len(z),), 0.7))  # back to its value
    # NaN is not hidden by the constant mapping
    bad = state[:2].clone()
    bad[0, 5] = float("nan")
    assert torch.isnan(norm.normalize("observation.state", bad)[0, 5])
    # min_max (actions) likewise; a feature near 0 uses the absolute floor (EPS)
    n2 = Normalizer.from_stats({"action": {"min": [0.3, -1.0, 0.0], "max": [0.3, 1.0, 1e-7],
                                           "mean": [0.3, 0.0, 0.0], "std": [0.0, 0.5, 0.0]}})
    out = n2.normalize("action", torch.tensor([[0.302, 0.5, 0.001]]))
    assert torch.equal(out, torch.tensor([[0.0, 0.5, 0.0]]))
    assert torch.equal(n2.unnormalize("action", out), torch.tensor([[0.3, 0.5, 5e-8]]))


def test_varying_features_normalise_bit_for_bit_as_before(detour):
    """Only constant features changed: every varying one is still (x - mean) / std and
    (x - centre) / half-range, exactly, in float32 and float64."""
    norm = detour.normalizer()
    for dtype in (torch.float32, torch.float64):
        for key, mode in (("observation.state", "mean_std"), ("observation.proprio", "mean_std"), ("action", "min_max")):
            x = torch.as_tensor(detour.frames[key]).to(dtype)
            x = torch.cat([x, x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)])
            s = {k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in detour.stats[key].items() if k != "count"}
            if mode == "mean_std":
                c, scale = s["mean"], s["std"].clamp_min(1e-6)
            else:
                c, scale = (s["max"] + s["min"]) / 2, ((s["max"] - s["min"]) / 2).clamp_min(1e-6)
            varying = s["std"] > 0
            expected = (x - c.to(dtype)) / scale.to(dtype)
            got = norm.normalize(key, x)
            assert varying.sum() >= 2 and torch.equal(got[:, varying], expected[:, varying]), key
            z = torch.randn(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
            assert torch.equal(norm.unnormalize(key, z)[:, varying], (z * scale.to(dtype) + c.to(dtype))[:, varying])
