"""labkit.training.minibatch_fit: the plain supervised loop the small auxiliary models share."""

import numpy as np
import pytest
import torch

from labkit.training import minibatch_fit


def regression(seed=0, n=512):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([1.5, -2.0, 0.5]) + 0.3 + 0.01 * torch.randn(n, generator=g)
    return x, y


def fit_line(seed=0, **kwargs):
    x, y = regression()
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    losses = minibatch_fit(model, lambda idx: (model(x[idx]).squeeze(-1) - y[idx]).pow(2).mean(), len(x),
                           **{"steps": 300, "batch_size": 32, "lr": 0.05, "seed": seed, **kwargs})
    return model, losses


def test_fits_a_linear_regression():
    model, losses = fit_line()
    assert isinstance(losses, np.ndarray) and losses.shape == (300,) and not model.training
    # Measured: the mean loss falls from 6.2 over the first 10 steps to 1.0e-4 (the noise) over the last 50.
    assert losses[-50:].mean() < losses[:10].mean() / 1000
    np.testing.assert_allclose(model.weight.detach().numpy()[0], [1.5, -2.0, 0.5], atol=0.02)
    np.testing.assert_allclose(model.bias.item(), 0.3, atol=0.02)


def test_same_seed_same_run_other_seed_other_batches():
    a, la = fit_line(seed=1)
    b, lb = fit_line(seed=1)
    _, lc = fit_line(seed=2)
    np.testing.assert_array_equal(la, lb)
    assert torch.equal(a.weight, b.weight) and not np.array_equal(la, lc)


def test_matches_the_hand_written_loop():
    """AdamW + cosine, as recap.fit_value and PostBC's ensemble had it written out: bit-identical."""
    x, y = regression()
    runs = []
    for helper in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        loss_fn = lambda idx: (model(x[idx]).squeeze(-1) - y[idx]).pow(2).mean()  # noqa: B023
        if helper:
            losses = minibatch_fit(model, loss_fn, len(x), 50, 16, 1e-2, 3, optimizer="adamw", weight_decay=1e-4,
                                   schedule="cosine")
        else:
            gen = torch.Generator().manual_seed(3)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 50)
            losses = []
            for _ in range(50):
                loss = loss_fn(torch.randint(0, len(x), (16,), generator=gen))
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
        runs.append((np.asarray(losses), model.weight.detach().clone()))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1])


def test_weights_choose_the_examples():
    # Two contradictory targets for the same input: the fit follows the examples that have weight.
    y = torch.cat([torch.zeros(50), torch.ones(50)])
    param = torch.zeros(1, requires_grad=True)
    minibatch_fit([param], lambda idx: (param - y[idx]).pow(2).mean(), steps=200, batch_size=16, lr=0.05,
                  weights=(y > 0.5).float())
    assert param.item() == pytest.approx(1.0, abs=0.01)


def test_continues_an_optimiser_clips_and_calls_back():
    x, y = regression()
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []

    def after(step, loss, extra):
        norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
        seen.append((step, loss, extra, norm))

    def loss_fn(idx):  # [2, 8] indices: a shape, as the world model's ensemble draws them
        assert idx.shape == (2, 8)
        loss = (model(x[idx]).squeeze(-1) - y[idx]).pow(2).mean()
        return loss, {"half": loss.item() / 2}

    losses = minibatch_fit(model, loss_fn, len(x), 20, (2, 8), optimizer=opt, grad_clip=0.5, after_step=after)
    assert [s[0] for s in seen] == list(range(20)) and [s[1] for s in seen] == losses.tolist()
    assert all(s[2]["half"] == pytest.approx(s[1] / 2) for s in seen)
    assert max(s[3] for s in seen) <= 0.5 + 1e-5 and opt.state_dict()["param_groups"][0]["lr"] == 0.1


def test_cosine_schedule_ends_at_zero_and_bad_options():
    x, y = regression()
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    minibatch_fit(model, lambda idx: model(x[idx]).pow(2).mean(), len(x), 10, optimizer=opt, schedule="cosine")
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    loss = lambda idx: model(x[idx]).pow(2).mean()  # noqa: E731
    with pytest.raises(ValueError, match="optimizer"):
        minibatch_fit(model, loss, len(x), 5, optimizer="sgd")
    with pytest.raises(ValueError, match="schedule"):
        minibatch_fit(model, loss, len(x), 5, schedule="linear")
    with pytest.raises(ValueError, match="steps"):
        minibatch_fit(model, loss, len(x), 0)
    with pytest.raises(ValueError, match="n >= 1"):
        minibatch_fit(model, loss, None, 5)
