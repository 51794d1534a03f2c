"""PostBC: the tabular posterior, the ensemble spread (wide where demonstrations are thin), the
noised targets, and a PostBC policy training and round-tripping through a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labkit.policies import FlowPolicy, PostBCFlowPolicy, load_policy
from labkit.policies.flow import FlowConfig
from labkit.policies.postbc import ensemble_spread, tabular_bc, tabular_postbc, tabular_posterior


def test_tabular_posterior_is_add_one_smoothing():
    counts = np.array([[3, 0, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(tabular_bc(counts), [[0.75, 0, 0.25, 0], [0.25] * 4])
    np.testing.assert_allclose(tabular_posterior(counts), [[4 / 8, 1 / 8, 2 / 8, 1 / 8], [0.25] * 4])
    mixed = tabular_postbc(counts, alpha=0.5)
    np.testing.assert_allclose(mixed.sum(1), 1.0)
    assert (mixed > 0).all() and (tabular_bc(counts)[0] == 0).any()  # BC misses actions, PostBC does not


def test_tabular_postbc_approaches_bc_with_data():
    few, many = np.array([[1, 0, 0]]), np.array([[1000, 0, 0]])
    gap = lambda c: np.abs(tabular_postbc(c) - tabular_bc(c)).max()  # noqa: E731
    assert gap(many) < 0.01 < gap(few)


def _toy_tensors(dense_eps=40, sparse_eps=2, frames=5, seed=0):
    """1-D states: many episodes on [-1, 0], two on [0.5, 1]; action = sin(3 s)."""
    g = np.random.default_rng(seed)
    states, episodes = [], []
    for e in range(dense_eps + sparse_eps):
        lo, hi = (-1.0, 0.0) if e < dense_eps else (0.5, 1.0)
        states.append(g.uniform(lo, hi, frames))
        episodes += [e] * frames
    s = torch.tensor(np.concatenate(states), dtype=torch.float32)
    a = torch.sin(3 * s)
    return {"obs": {"observation.state": s.view(-1, 1, 1)}, "action": a.view(-1, 1, 1),
            "action_is_pad": torch.zeros(len(s), 1, dtype=torch.bool), "episode": torch.tensor(episodes)}


def _stats(state_std=1.0):
    full = lambda mean, std: {"mean": [mean], "std": [std], "min": [-1.0], "max": [1.0]}  # noqa: E731
    return {"observation.state": full(0.0, state_std), "action": full(0.0, 0.5)}


def _template():
    stats = _stats(state_std=0.6)
    cfg = FlowConfig(obs_horizon=1, horizon=1, n_action_steps=1, ema=False)
    return FlowPolicy(cfg, {"observation.state": [1], "action": [1]}, stats)


def test_ensemble_spread_is_wide_where_demonstrations_are_few():
    tensors = _toy_tensors()
    spread = ensemble_spread(_template(), tensors, size=5, steps=300, hidden=64, layers=2)
    assert spread.shape == tensors["action"].shape
    sparse = tensors["episode"] >= 40
    dense_mean, sparse_mean = spread[~sparse].mean().item(), spread[sparse].mean().item()
    assert sparse_mean > 2 * dense_mean, (dense_mean, sparse_mean)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # training_step called without a Trainer
def test_postbc_noises_targets_by_the_spread():
    torch.manual_seed(0)
    stats = _stats()
    cfg = {"obs_horizon": 1, "horizon": 1, "n_action_steps": 1, "alpha": 1.0, "beta": 2.0}
    policy = PostBCFlowPolicy(cfg, {"observation.state": [1], "action": [1]}, stats)
    seen = []
    policy.loss = lambda obs, action, is_pad: seen.append(action) or action.sum()
    n = 4000
    batch = {"obs": {"observation.state": torch.zeros(n, 1, 1)}, "action": torch.zeros(n, 1, 1),
             "action_is_pad": torch.zeros(n, 1, dtype=torch.bool),
             "posterior_std": torch.full((n, 1, 1), 0.1)}
    policy.training_step(batch, 0)
    # Physical std 0.1 * beta 2 = 0.2; the action range [-1, 1] normalises with scale 1.
    assert seen[0].std().item() == pytest.approx(0.2, rel=0.1)
    policy.config.alpha = 0.0
    policy.training_step(batch, 0)
    assert seen[1].abs().max().item() == 0.0


def test_postbc_config_errors():
    shapes = {"observation.state": [1], "action": [1]}
    stats = _stats()
    with pytest.raises(ValueError, match="alpha"):
        PostBCFlowPolicy({"alpha": 1.5}, shapes, stats)
    with pytest.raises(ValueError, match="ensemble_size"):
        PostBCFlowPolicy({"ensemble_size": 1}, shapes, stats)


def test_postbc_trains_on_a_dataset_and_round_trips(tmp_path):
    from labkit.data import DATASETS, load_dataset
    from labkit.policies import fit

    ds = load_dataset(DATASETS / "detour").select(range(10))
    policy = PostBCFlowPolicy.from_dataset(ds, ensemble_size=2, ensemble_steps=20)
    fit(policy, ds, steps=30, progress=False)
    assert policy.posterior_std.shape == (len(ds), 16, 2)
    assert np.isfinite(policy.losses()).all()
    back = load_policy(policy.save(tmp_path / "p.ckpt"))
    assert type(back) is PostBCFlowPolicy and back.config.ensemble_size == 2
    obs = {"observation.state": torch.randn(3, 2, 6)}
    noise = torch.randn(3, 16, 2)
    with torch.no_grad():
        torch.testing.assert_close(back.sample(back.normalize_obs(obs), noise=noise).actions,
                                   policy.sample(policy.normalize_obs(obs), noise=noise).actions)


def test_a_lessons_targets_train_and_wrong_ones_show():
    """posterior_targets is the formula PostBC trained on (bit for bit); from_dataset(targets_fn=...) with
    labkit's own function trains as the default, and a wrong one (noise on every element, alpha ignored)
    trains other weights."""
    from labkit.data import DATASETS, load_dataset
    from labkit.policies import fit
    from labkit.policies.postbc import posterior_targets

    action, std = torch.randn(500, 4, 2), torch.rand(500, 4, 2)
    torch.manual_seed(3)
    noisy = (torch.rand(len(action), 1, 1) < 0.3).float()  # the formula training_step used before
    old = action + noisy * 2.0 * std * torch.randn_like(action)
    torch.manual_seed(3)
    assert torch.equal(posterior_targets(action, std, 0.3, 2.0), old)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(posterior_targets(action, std, 0.3, 2.0, g1), posterior_targets(action, std, 0.3, 2.0, g2))

    def wrong(action, std, alpha, beta, generator):
        return action + beta * std * torch.randn(action.shape, generator=generator)

    ds = load_dataset(DATASETS / "detour").select(range(6))
    config = {"ensemble_size": 2, "ensemble_steps": 10, "hidden": 32, "layers": 1, "alpha": 0.2, "beta": 4.0}
    spread = fit(PostBCFlowPolicy.from_dataset(ds, **config), ds, steps=1, progress=False).posterior_std
    runs = {}
    for name, fn in [("default", None), ("right", posterior_targets), ("wrong", wrong)]:
        torch.manual_seed(0)
        policy = PostBCFlowPolicy.from_dataset(ds, targets_fn=fn, **config)
        policy.posterior_std = spread  # one ensemble for all three
        runs[name] = fit(policy, ds, steps=8, batch_size=64, progress=False).losses()
    np.testing.assert_array_equal(runs["right"], runs["default"])
    assert not np.allclose(runs["wrong"], runs["default"])
