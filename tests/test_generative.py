"""Diffusion and flow policies: they capture both modes of a bimodal target (where MSE would average),
their samplers are deterministic given the noise, their stochastic chains carry exact per-step
log-probabilities, and checkpoints keep the EMA weights."""

import gymnasium as gym
import numpy as np
import pytest
import torch

import labkit
from labkit.nn import EMA
from labkit.policies import DiffusionPolicy, FlowPolicy, SampleResult, fit
from labkit.policies.diffusion import ddim_timesteps

CLASSES = [DiffusionPolicy, FlowPolicy]
TOY_SHAPES = {"observation.state": [1], "action": [2]}
TOY_STATS = {"observation.state": {"mean": [0.0], "std": [1.0], "min": [-1.0], "max": [1.0]},
             "action": {"mean": [0.0, 0.0], "std": [1.0, 1.0], "min": [-1.0, -1.0], "max": [1.0, 1.0]}}


def toy_policy(cls, **config):
    """A policy over 2-D action chunks of length 4 with a one-number observation (min-max stats of
    [-1, 1], so normalised actions equal physical ones)."""
    config = {"obs_horizon": 1, "horizon": 4, "n_action_steps": 2, "hidden": 64, "layers": 2, **config}
    return cls(config, TOY_SHAPES, TOY_STATS)


def toy_obs(n):
    return {"observation.state": torch.zeros(n, 1, 1)}


def toy_chunk(n, gen):
    """Bimodal demonstrations: the whole chunk at (+0.6, +0.6) or at (-0.6, -0.6), with a little noise."""
    side = torch.randint(0, 2, (n, 1, 1), generator=gen).float() * 2 - 1
    return 0.6 * side.expand(n, 4, 2) + 0.03 * torch.randn(n, 4, 2, generator=gen)


@pytest.mark.parametrize("backbone", ["mlp", "unet"])
@pytest.mark.parametrize("cls", CLASSES)
def test_samples_land_on_both_modes_not_their_mean(cls, backbone):
    torch.manual_seed(0)
    policy = toy_policy(cls, backbone=backbone, down_dims=(16, 32), time_dim=16, ema=False)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    gen, losses = torch.Generator().manual_seed(0), []
    pad = torch.zeros(256, 4, dtype=torch.bool)
    for _ in range(300):
        loss = policy.loss(toy_obs(256), toy_chunk(256, gen), pad)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:20])
    policy.eval()
    with torch.no_grad():
        a = policy.sample(toy_obs(400)).actions.mean(dim=(1, 2))  # one number per chunk
    near_plus, near_minus = ((a - 0.6).abs() < 0.2).float().mean(), ((a + 0.6).abs() < 0.2).float().mean()
    assert near_plus > 0.25 and near_minus > 0.25, (near_plus, near_minus)
    assert (a.abs() < 0.3).float().mean() < 0.15  # little at the modes' mean, where MSE would put it all


@pytest.mark.parametrize("net", [{"cond": "film"}, {"cond": "concat"}, {"backbone": "unet"}])
@pytest.mark.parametrize("cls", CLASSES)
def test_sampler_shapes_and_determinism(cls, net):
    policy = toy_policy(cls, **net).eval()
    obs = policy.normalize_obs(toy_obs(3))
    for steps in (1, 5, 10):
        noise = torch.randn(3, 4, 2)
        out = policy.sample(obs, noise=noise, steps=steps)
        assert isinstance(out, SampleResult) and out.log_probs is None
        assert out.actions.shape == (3, 4, 2) and out.latents.shape == (3, steps + 1, 4, 2)
        assert torch.equal(out.latents[:, 0], noise) and torch.equal(out.latents[:, -1], out.actions)
        assert torch.equal(policy.sample(obs, noise=noise.clone(), steps=steps).actions, out.actions)
        assert not torch.allclose(policy.sample(obs, noise=-noise, steps=steps).actions, out.actions)
        stoch = policy.sample(obs, noise=noise, steps=steps, stochastic=True)
        assert stoch.log_probs.shape == (3, steps) and torch.isfinite(stoch.log_probs).all()
        again = policy.sample(obs, noise=noise, steps=steps, stochastic=True)
        assert not torch.allclose(again.actions, stoch.actions)  # fresh Gaussian noise at every step
    with pytest.raises(ValueError, match="noise must have shape"):
        policy.sample(obs, noise=torch.randn(3, 5, 2))


def direct_step_mean(policy, feat, x, i, steps):
    """The stochastic step's mean written out from the formulas in the module docstrings."""
    net = policy.net()
    if isinstance(policy, FlowPolicy):
        return x + net["denoiser"](x, torch.full((len(x),), i / steps), feat) / steps
    T, c = policy.config.num_train_timesteps, policy.config
    ts = ddim_timesteps(T, steps)
    abar = policy.alphas_cumprod
    ab_t = abar[ts[i]]
    ab_p = abar[ts[i + 1]] if i + 1 < steps else torch.tensor(1.0)
    eps = net["denoiser"](x, torch.full((len(x),), ts[i] / T), feat)
    a_hat = ((x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()).clamp(-1, 1)
    var = c.eta**2 * (1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p)
    return ab_p.sqrt() * a_hat + (1 - ab_p - var).clamp(min=0).sqrt() * eps, max(var.sqrt().item(), c.min_std)


@pytest.mark.parametrize("cls", CLASSES)
def test_stochastic_log_probs_match_direct_computation(cls):
    torch.manual_seed(1)
    policy = toy_policy(cls).eval()
    obs = policy.normalize_obs(toy_obs(5))
    steps = 4
    with torch.no_grad():
        out = policy.sample(obs, steps=steps, stochastic=True)
        feat = policy.net()["encoder"](obs)
        for i in range(steps):
            x, x_next = out.latents[:, i], out.latents[:, i + 1]
            if isinstance(policy, FlowPolicy):
                mean, std = direct_step_mean(policy, feat, x, i, steps), policy.config.noise_scale / steps**0.5
            else:
                mean, std = direct_step_mean(policy, feat, x, i, steps)
            expected = torch.distributions.Normal(mean, std).log_prob(x_next).sum(dim=(1, 2))
            torch.testing.assert_close(out.log_probs[:, i], expected, rtol=1e-5, atol=1e-4)
    # Re-scoring the stored chain gives the same numbers; with the live (trainable) weights, which
    # equal the EMA copy before any training, it is differentiable: the PPO ratio's numerator.
    torch.testing.assert_close(policy.log_prob(obs, out.latents), out.log_probs)
    rescored = policy.log_prob(obs, out.latents, use_ema=False)
    torch.testing.assert_close(rescored, out.log_probs)
    rescored.sum().backward()
    assert all(p.grad is not None for p in policy.model["denoiser"].parameters())


@pytest.mark.parametrize("cls", CLASSES)
def test_sampler_options_for_policy_gradients(cls):
    """DPPO's options of sample/log_prob: per-dim log-probs sum to the plain ones; ft_steps keeps the
    chain's tail (with a frozen prefix net, the tail's start changes); the std floor and noise clip act
    on stochastic steps only."""
    torch.manual_seed(2)
    policy = toy_policy(cls).eval()
    obs = policy.normalize_obs(toy_obs(3))
    noise = torch.randn(3, 4, 2)
    with torch.no_grad():
        torch.manual_seed(3)
        plain = policy.sample(obs, noise=noise, steps=4, stochastic=True)
        torch.manual_seed(3)
        per_dim = policy.sample(obs, noise=noise, steps=4, stochastic=True, ft_steps=4, per_dim=True)
        assert torch.equal(per_dim.latents, plain.latents) and per_dim.log_probs.shape == (3, 4, 4, 2)
        torch.testing.assert_close(per_dim.log_probs.sum((-1, -2)), plain.log_probs)
        torch.testing.assert_close(policy.log_prob(obs, plain.latents, per_dim=True), per_dim.log_probs)
        torch.manual_seed(3)
        tail = policy.sample(obs, noise=noise, steps=4, stochastic=True, ft_steps=2)
        assert torch.equal(tail.latents, plain.latents[:, 2:]) and torch.equal(tail.log_probs, plain.log_probs[:, 2:])
        torch.testing.assert_close(policy.log_prob(obs, tail.latents, steps=4), tail.log_probs)
        other = toy_policy(cls).eval().net()  # a different frozen net changes the prefix, not the shapes
        torch.manual_seed(3)
        moved = policy.sample(obs, noise=noise, steps=4, stochastic=True, ft_steps=2, frozen=other)
        assert moved.latents.shape == tail.latents.shape and not torch.allclose(moved.latents[:, 0], tail.latents[:, 0])
        # Deterministic sampling ignores the floor and the clip; a huge floor makes the std the floor.
        det = policy.sample(obs, noise=noise, steps=4)
        assert torch.equal(policy.sample(obs, noise=noise, steps=4, min_std=5.0, noise_clip=0.1).actions, det.actions)
        net, feat = policy.net(), policy.net()["encoder"](obs)
        mean, std = policy.step_gaussian(net, feat, noise, 0, 4, stochastic=True, min_std=5.0)
        assert float(std) == 5.0
        mean0, std0 = policy.step_gaussian(net, feat, noise, 0, 4, stochastic=True)
        assert torch.equal(mean, mean0) and float(std0) < 5.0
        torch.manual_seed(3)
        clipped = policy.sample(obs, noise=noise, steps=1, stochastic=True, min_std=5.0, noise_clip=0.1)
        mean1, _ = policy.step_gaussian(net, feat, noise, 0, 1, stochastic=True, min_std=5.0)
        dev = ((clipped.actions - mean1) / 5.0).abs()
        assert dev.max() <= 0.1 + 1e-5 and (dev > 0.1 - 1e-4).float().mean() > 0.5  # P(|z| > 0.1) = 0.92
    for bad in (0, 5):
        with pytest.raises(ValueError, match="ft_steps"):
            policy.sample(obs, steps=4, ft_steps=bad)


def test_ema_decay_schedule_and_update():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net)
    assert ema.decay() == 0.0  # the first update copies
    ema.step.fill_(450)
    assert 0.985 < ema.decay() < 0.995
    ema.step.fill_(10**9)
    assert ema.decay() == pytest.approx(0.9999)
    assert EMA(net, power=0, max_decay=0.999).decay() == 0.999
    ema = EMA(net)
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    torch.testing.assert_close(ema.model.weight, net.weight)
    assert not ema.model.weight.requires_grad
    # Later updates move the copy a fraction 1 - decay of the way to the live weights.
    ema.step.fill_(450)
    old, d = ema.model.weight.clone(), ema.decay()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    torch.testing.assert_close(ema.model.weight, d * old + (1 - d) * net.weight)
    with pytest.raises(ValueError, match="not the same network"):
        ema.update(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)))


def test_activation_is_a_choice_and_silu_learns_both_modes():
    torch.manual_seed(0)
    policy = toy_policy(FlowPolicy, activation="silu", ema=False)
    kinds = {type(m) for m in policy.model.modules()}
    assert torch.nn.SiLU in kinds and torch.nn.Mish not in kinds
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    gen, pad = torch.Generator().manual_seed(0), torch.zeros(256, 4, dtype=torch.bool)
    for _ in range(300):
        loss = policy.loss(toy_obs(256), toy_chunk(256, gen), pad)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        a = policy.eval().sample(toy_obs(400)).actions.mean(dim=(1, 2))
    assert ((a - 0.6).abs() < 0.2).float().mean() > 0.25 and ((a + 0.6).abs() < 0.2).float().mean() > 0.25
    with pytest.raises(ValueError, match="activation must be one of.*'silu'.*got 'swish'"):
        toy_policy(FlowPolicy, activation="swish")


@pytest.mark.parametrize("net", [{}, {"obs_layers": 2, "obs_hidden": 24}])
@pytest.mark.parametrize("cls", CLASSES)
def test_checkpoint_keeps_ema_weights_and_normaliser(cls, net, detour_ds, tmp_path):
    policy = cls.from_dataset(detour_ds, horizon=8, n_action_steps=4, hidden=32, layers=1, **net)
    if net:  # the observation MLP sits inside the encoder: the denoiser reads its 24 features
        assert policy.model["encoder"].out_dim == 24 and policy.model["encoder"].mlp[-1].normalized_shape == (24,)
    fit(policy, detour_ds, steps=20, batch_size=32, progress=False)
    assert int(policy.ema.step) == 20
    live, ema = policy.model.state_dict(), policy.ema.model.state_dict()
    assert any(not torch.equal(live[k], ema[k]) for k in live)  # the EMA really is a different net
    loaded = labkit.load_policy(policy.save(tmp_path / "p.ckpt"))
    assert isinstance(loaded, cls) and loaded.config == policy.config
    for k, v in ema.items():
        assert torch.equal(loaded.ema.model.state_dict()[k], v)
    obs = {"observation.state": torch.randn(3, 2, 6)}
    noise = torch.randn(3, 8, 2)
    a = policy.sample(policy.normalize_obs(obs), noise=noise).actions
    b = loaded.sample(loaded.normalize_obs(obs), noise=noise).actions
    assert torch.equal(a, b)
    torch.testing.assert_close(loaded.normalizer.unnormalize("action", a), policy.normalizer.unnormalize("action", a))
    # Prediction uses the EMA copy, training-mode sampling the live weights.
    assert not torch.equal(policy.sample(policy.normalize_obs(obs), noise=noise, use_ema=False).actions, a)


@pytest.mark.parametrize("cls", CLASSES)
def test_select_action_on_detour(cls, detour_ds):
    policy = cls.from_dataset(detour_ds, horizon=8, n_action_steps=4, hidden=32, layers=1, steps=3)
    fit(policy, detour_ds, steps=10, batch_size=32, progress=False)
    env = gym.make("labkit/Detour-v0")
    obs, _ = env.reset(seed=0)
    policy.reset()
    for _ in range(6):
        a = policy.select_action(obs)
        assert a.shape == (2,) and a.dtype == np.float32 and np.isfinite(a).all()
        obs = env.step(a)[0]
    policy.reset()
    assert policy.select_action({k: np.stack([v] * 3) for k, v in obs.items()}).shape == (3, 2)


def test_mask_padding_option():
    policy = toy_policy(FlowPolicy, mask_padding=True)
    pred, target = torch.zeros(8, 4, 2), torch.randn(8, 4, 2)
    pad = torch.zeros(8, 4, dtype=torch.bool)
    pad[:, -1] = True
    base = policy.chunk_loss(pred, target, pad)
    target[:, -1] += 100.0  # garbage on padded steps must not move the masked loss
    torch.testing.assert_close(policy.chunk_loss(pred, target, pad), base)
    policy.config.mask_padding = False  # the default trains on the whole (edge-padded) chunk
    assert policy.chunk_loss(pred, target, pad) > base + 100.0


def test_bad_configs(detour_ds):
    with pytest.raises(ValueError, match="backbone"):
        DiffusionPolicy.from_dataset(detour_ds, backbone="transformer")
    with pytest.raises(ValueError, match="multiple of 4"):
        FlowPolicy.from_dataset(detour_ds, backbone="unet", horizon=6, n_action_steps=2)
    with pytest.raises(ValueError, match="cond"):
        FlowPolicy.from_dataset(detour_ds, cond="cross-attention")
    with pytest.raises(ValueError, match="num_train_timesteps"):
        DiffusionPolicy.from_dataset(detour_ds, steps=200)
    with pytest.raises(ValueError, match="unknown DiffusionConfig fields"):
        DiffusionPolicy({"betas": 1}, {"observation.state": [6], "action": [2]}, detour_ds.stats)
    with pytest.raises(ValueError, match="obs_layers must be an int >= 0"):
        FlowPolicy.from_dataset(detour_ds, obs_layers=-1)
    with pytest.raises(ValueError, match="obs_hidden"):
        FlowPolicy.from_dataset(detour_ds, obs_layers=1, obs_hidden=0)
    with pytest.raises(TypeError, match=r"hidden must be an int, got \(64, 64\)"):  # BC's form; was a raw '<' error
        FlowPolicy.from_dataset(detour_ds, hidden=(64, 64))


# ---- what a lesson hands in: its loss (through fit's training_step) and its sampler ------------------
def _lesson_step(cls, loss_fn):
    """A training step built on a lesson's loss function, drawing its randomness in labkit's order."""
    def step(policy, batch):
        obs = policy.normalize_obs(batch["obs"])
        action = policy.normalizer.normalize("action", batch["action"].float())
        if cls is DiffusionPolicy:
            T = policy.config.num_train_timesteps
            k, eps = torch.randint(0, T, (len(action),)), torch.randn_like(action)
            feat = policy.model["encoder"](obs)
            return loss_fn(lambda x, k_: policy.model["denoiser"](x, k_.float() / T, feat), action, k, eps,
                           policy.alphas_cumprod)
        x0, t = torch.randn_like(action), torch.rand(len(action))
        feat = policy.model["encoder"](obs)
        return loss_fn(lambda x, t_: policy.model["denoiser"](x, t_, feat), action, x0, t)
    return step


@pytest.mark.parametrize("cls", CLASSES)
def test_a_lessons_loss_trains_and_a_wrong_one_shows(cls, detour_ds):
    """fit(training_step=...) built on labkit's own loss trains bit for bit as the default; a wrong loss
    (regressing the clean chunk) trains other weights."""
    from labkit.policies.diffusion import ddpm_loss
    from labkit.policies.flow import flow_matching_loss

    right = ddpm_loss if cls is DiffusionPolicy else flow_matching_loss

    def wrong(model, action, _k_or_x0, t_or_eps, *rest):  # the target is the clean chunk, not noise/velocity
        return torch.nn.functional.mse_loss(model(action, t_or_eps if cls is FlowPolicy else _k_or_x0), action)

    ds, runs = detour_ds.select(range(5)), {}
    for name, step in [("default", None), ("right", _lesson_step(cls, right)), ("wrong", _lesson_step(cls, wrong))]:
        torch.manual_seed(0)  # the same initial weights for every run
        runs[name] = fit(cls.from_dataset(ds, hidden=32, layers=1), ds, steps=8, batch_size=32, progress=False,
                         training_step=step).losses()
    np.testing.assert_array_equal(runs["right"], runs["default"])
    assert not np.allclose(runs["wrong"], runs["default"])


@pytest.mark.parametrize("cls", CLASSES)
def test_a_lessons_sampler_drives_sampling_and_a_wrong_one_shows(cls, detour_ds):
    """from_dataset(sampler=...) with labkit's own step/sampler samples bit for bit as the default; a wrong
    one (DDIM without re-noising; Euler with the step's end time) changes the chunks and what
    predict_action_chunk returns. Stochastic sampling keeps labkit's chain."""
    from labkit.policies.diffusion import ddim_step
    from labkit.policies.flow import euler_sample

    if cls is DiffusionPolicy:
        right, wrong = ddim_step, lambda x, eps, ab_t, ab_prev: ddim_step(x, eps, ab_t, ab_prev) - (1 - ab_prev).sqrt() * eps
    else:
        right = euler_sample

        def wrong(velocity, x0, steps):
            return euler_sample(lambda x, t: velocity(x, t + 1 / steps), x0, steps)
    torch.manual_seed(0)
    base = cls.from_dataset(detour_ds, hidden=32, layers=1).eval()
    with torch.no_grad():  # random weights everywhere: the zero-initialised last layer makes any sampler look right
        for prm in base.parameters():
            prm.add_(0.1 * torch.randn_like(prm))
    obs = base.normalize_obs({"observation.state": torch.randn(4, 2, 6)})
    noise = torch.randn(4, 16, 2)
    mine = {}
    for name, fn in [("right", right), ("wrong", wrong)]:
        p = cls.from_dataset(detour_ds, sampler=fn, hidden=32, layers=1).eval()
        p.load_state_dict(base.state_dict())
        with torch.no_grad():
            mine[name] = p.sample(obs, noise=noise, steps=5)
            torch.manual_seed(1)
            stoch = p.sample(obs, noise=noise, steps=5, stochastic=True).latents
            torch.manual_seed(1)
            torch.testing.assert_close(stoch, base.sample(obs, noise=noise, steps=5, stochastic=True).latents,
                                       rtol=0, atol=0)
    with torch.no_grad():
        theirs = base.sample(obs, noise=noise, steps=5)
    assert torch.equal(mine["right"].latents, theirs.latents) and mine["right"].latents.shape == (4, 6, 16, 2)
    assert not torch.allclose(mine["wrong"].actions, theirs.actions, atol=1e-3)
