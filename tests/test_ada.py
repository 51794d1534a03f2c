"""ADA (labkit.ada): the observables by hand, the discriminator, and the alignment loop on a stand-in simulator."""

import numpy as np
import pytest
import torch

import labkit  # noqa: F401  (registers the tasks, picks the GL backend)
from labkit.ada import ada, observables, train_discriminator


def test_observables_are_angles_their_change_and_the_command():
    o = observables({"real": False}, [3], max_steps=12)
    assert o.shape == (12, 15) and np.isfinite(o).all()
    # within an episode, q_{t+1} = q_t + (q_{t+1} - q_t)
    np.testing.assert_allclose(o[1:, :5], o[:-1, :5] + o[:-1, 5:10], atol=1e-5)
    assert np.abs(o[:, 10:]).max() > 1e-3  # the expert commands motion


def test_the_discriminator_tells_shifted_data_apart_and_not_equal_data():
    rng = np.random.default_rng(0)
    real = rng.normal(0, 1, (400, 3)).astype(np.float32)
    far = rng.normal(1.5, 1, (400, 3)).astype(np.float32)
    same = rng.normal(0, 1, (400, 3)).astype(np.float32)
    d, d2 = train_discriminator(real, far, steps=200), train_discriminator(real, same, steps=200)

    def accuracy(d, sim):
        with torch.no_grad():
            return 0.5 * float((d(torch.as_tensor(real)) > 0).float().mean() + (d(torch.as_tensor(sim)) <= 0).float().mean())

    acc_far, acc_same = accuracy(d, far), accuracy(d2, same)
    assert acc_far > 0.85 and acc_same < 0.65, (acc_far, acc_same)


def _gaussian_sim(kwargs, seeds, max_steps):
    """A stand-in simulator: observables ~ N((mu, 2 mu), 0.3^2), one batch of 200 per seed."""
    mu = kwargs["mu"]
    rng = np.random.default_rng(int(seeds[0]) + int(1000 * mu))
    return rng.normal([mu, 2 * mu], 0.3, (200 * len(seeds), 2)).astype(np.float32)


def test_alignment_finds_the_parameter_of_unpaired_data():
    real = np.random.default_rng(7).normal([0.6, 1.2], 0.3, (600, 2)).astype(np.float32)
    x, hist = ada(real, lambda x: {"mu": float(x[0])}, [-2.0], [2.0], seeds_per_candidate=[0], iters=6, population=12,
                  elite=3, disc_steps=150, observe=_gaussian_sim)
    assert abs(x[0] - 0.6) < 0.15, x
    assert hist[-1]["std"][0] < hist[0]["std"][0]  # the proposal narrows
    with pytest.raises(ValueError, match="elite"):
        ada(real, lambda x: {"mu": float(x[0])}, [-2.0], [2.0], elite=20, population=4, observe=_gaussian_sim)
