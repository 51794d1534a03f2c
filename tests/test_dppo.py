"""Tests of DPPO (labkit.rl.dppo): the chain and its log-probs as DPPO samples them (GenerativePolicy.sample /
log_prob with a frozen prefix, std floor, noise clip), PPO pieces against hand computations, a short training run."""

import math

import numpy as np
import pytest
import torch

import labkit  # noqa: F401  (before anything imports mujoco: picks the GL backend, registers tasks)
import labkit.data
from labkit.data import load_dataset
from labkit.policies import DiffusionPolicy, fit
from labkit.rl.dppo import (
    DPPO,
    DPPOConfig,
    clip_schedule,
    denoising_discount,
    ppo_loss,
    reduce_log_probs,
    step_log_prob,
)
from labkit.rl.returns import gae

ENV = "labkit/Detour-v0"
SMALL = dict(horizon=8, n_action_steps=4, obs_horizon=2, hidden=64, layers=2, steps=5)


@pytest.fixture(scope="module")
def detour10():
    return load_dataset(labkit.data.DATASETS / "detour").select(range(10))


@pytest.fixture(scope="module")
def flow_policy(base_policy):
    return base_policy  # conftest's tiny flow policy (10 Detour demos, chunk 8, 4 executed, K = 5)


@pytest.fixture(scope="module")
def diffusion_policy(detour10):
    torch.manual_seed(0)
    return fit(DiffusionPolicy.from_dataset(detour10, **SMALL), detour10, steps=100, batch_size=64, progress=False)


def small_config(**kw) -> DPPOConfig:
    base = dict(num_envs=4, n_steps=10, minibatch_size=20, epochs=2, critic_hidden=64, critic_layers=2, seed=0)
    return DPPOConfig(**{**base, **kw})


def obs_batch(policy, n=6, seed=0):
    """Normalised observation histories of n random Detour-like states."""
    g = torch.Generator().manual_seed(seed)
    state = torch.randn(n, 2, 6, generator=g) * 0.3
    return policy.normalize_obs({"observation.state": state})


def normal_log_density(x, mean, std):
    return -((x - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)


# ---- the chain DPPO samples, and its log-probs -------------------------------------------------------

def dppo_chain(policy, obs, K, ft_steps, frozen=None, min_std=0.1, noise_clip=3.0, stochastic=True):
    """The chain as DPPO draws it: the live net on the last ft_steps steps, per-dim log-probs."""
    return policy.sample(obs, steps=K, stochastic=stochastic, net=policy.net(use_ema=False), frozen=frozen,
                         ft_steps=ft_steps, min_std=min_std, noise_clip=noise_clip, per_dim=True)


def test_flow_chain_log_probs_equal_a_direct_gaussian(flow_policy):
    policy, K, sigma = flow_policy, 5, flow_policy.config.noise_scale
    obs = obs_batch(policy)
    torch.manual_seed(1)
    with torch.no_grad():
        chain = dppo_chain(policy, obs, K, K)
    assert chain.latents.shape == (6, K + 1, 8, 2) and chain.log_probs.shape == (6, K, 8, 2)
    assert torch.equal(chain.actions, chain.latents[:, -1])
    # By hand: Euler-Maruyama step i is N(x + v(x, i/K) / K, (sigma sqrt(1/K))^2), above the 0.1 floor here.
    std = sigma * math.sqrt(1 / K)
    assert std > 0.1
    net = policy.net(use_ema=False)
    feat = obs["observation.state"].flatten(1)  # the state encoder only flattens the history
    for i in range(K):
        x = chain.latents[:, i]
        with torch.no_grad():
            mean = x + net["denoiser"](x, torch.full((6,), i / K), feat) / K
        want = normal_log_density(chain.latents[:, i + 1], mean, std)
        torch.testing.assert_close(chain.log_probs[:, i], want, atol=1e-5, rtol=1e-5)
    # Summed over the chunk they are the policy's own per-step log-densities, and recomputing them
    # from the stored chain gives the stored values.
    torch.testing.assert_close(chain.log_probs.sum((-1, -2)), policy.log_prob(obs, chain.latents, use_ema=False),
                               atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(policy.log_prob(obs, chain.latents, net=net, steps=K, min_std=0.1, per_dim=True),
                                   chain.log_probs)


def test_log_prob_is_the_floored_clipped_step_gaussian_by_hand(flow_policy):
    """The sampler and log_prob written out: a frozen prefix, then live steps whose std is
    max(sigma sqrt(1/K), min_std), whose standard-normal draw is clipped, and whose log-density is
    the per-dim Gaussian at step_distribution's mean with the floored std."""
    policy, K, ft, min_std, clip = flow_policy, 5, 3, 0.2, 0.5
    obs = obs_batch(policy, n=5, seed=3)
    live, frozen = policy.net(use_ema=False), policy.net(use_ema=True)
    assert any(not torch.equal(p, q) for p, q in zip(live.parameters(), frozen.parameters(), strict=True))  # EMA != live
    sigma_step = policy.config.noise_scale * math.sqrt(1 / K)
    assert sigma_step < min_std  # the floor bites
    feat = obs["observation.state"].flatten(1)
    torch.manual_seed(4)
    with torch.no_grad():
        chain = dppo_chain(policy, obs, K, ft, frozen=frozen, min_std=min_std, noise_clip=clip)
        # The same draws by hand: z_0, then one clipped standard normal per step.
        torch.manual_seed(4)
        x = torch.randn(5, 8, 2)
        latents, want_lp = [], []
        for i in range(K):
            net = frozen if i < K - ft else live
            if i == K - ft:
                latents.append(x)
            mean = x + net["denoiser"](x, torch.full((5,), i / K), feat) / K
            m2, s2 = policy.step_distribution(net, feat, x, i, K, stochastic=True)
            torch.testing.assert_close(m2, mean)
            assert s2 == pytest.approx(sigma_step)
            z = torch.randn(5, 8, 2).clamp(-clip, clip)
            x = mean + min_std * z
            if i >= K - ft:
                latents.append(x)
                want_lp.append(normal_log_density(x, mean, min_std))
                # The clip binds: some draws sit exactly on the bound, none beyond it.
                dev = (x - mean) / min_std
                assert dev.abs().max() <= clip + 1e-5 and (dev.abs() > clip - 1e-4).any()
        torch.testing.assert_close(chain.latents, torch.stack(latents, 1))
        torch.testing.assert_close(chain.log_probs, torch.stack(want_lp, 1), atol=1e-5, rtol=1e-5)
        # Rescoring the stored last K' steps (step indices K-K' ... K-1 of K) gives the same numbers,
        # per dim and summed; without the floor the density is that of the narrower std.
        lp = policy.log_prob(obs, chain.latents, net=live, steps=K, min_std=min_std, per_dim=True)
        torch.testing.assert_close(lp, chain.log_probs)
        torch.testing.assert_close(policy.log_prob(obs, chain.latents, net=live, steps=K, min_std=min_std),
                                   lp.sum((-1, -2)))
        unfloored = policy.log_prob(obs, chain.latents, net=live, steps=K, per_dim=True)
        mean = chain.latents[:, 0] + live["denoiser"](chain.latents[:, 0], torch.full((5,), (K - ft) / K), feat) / K
        torch.testing.assert_close(unfloored[:, 0], normal_log_density(chain.latents[:, 1], mean, sigma_step),
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="steps"):
        policy.log_prob(obs, chain.latents, steps=2)


def test_std_floor_and_frozen_prefix_on_diffusion(diffusion_policy):
    policy, K = diffusion_policy, 5
    obs = obs_batch(policy, n=4)
    torch.manual_seed(2)
    live = policy.net(use_ema=False)
    with torch.no_grad():  # only the last 2 steps are finetuned; the std floor is raised to 0.3
        chain = dppo_chain(policy, obs, K, 2, frozen=policy.net(use_ema=True), min_std=0.3)
        lp = policy.log_prob(obs, chain.latents, net=live, steps=K, min_std=0.3, per_dim=True)
    assert chain.latents.shape == (4, 3, 8, 2) and chain.log_probs.shape == (4, 2, 8, 2)
    torch.testing.assert_close(lp, chain.log_probs)
    # DDIM's last step (to the clean chunk) has posterior std 0, so its std is exactly the floor.
    with torch.no_grad():
        mean, s = policy.step_distribution(live, live["encoder"](obs), chain.latents[:, 1], K - 1, K, stochastic=True)
    assert float(s) == pytest.approx(policy.config.min_std)  # the policy's own floor, 0.1 < 0.3
    torch.testing.assert_close(chain.log_probs[:, 1], normal_log_density(chain.latents[:, 2], mean, 0.3))
    # Every per-dim density is at most that of a Gaussian with the floor std at its mean.
    assert chain.log_probs.max() <= -math.log(0.3) - 0.5 * math.log(2 * math.pi) + 1e-5
    # Deterministic: the same prefix structure, no log-probs.
    with torch.no_grad():
        det = dppo_chain(policy, obs, K, 2, frozen=policy.net(use_ema=True), stochastic=False)
    assert det.log_probs is None and det.latents.shape == (4, 3, 8, 2)


def test_reduce_log_probs_clamps_then_averages_executed_dims():
    lp = torch.tensor([[[[1.0, 3.0], [-7.0, 0.0], [100.0, 100.0]]]])  # [B=1, K'=1, H=3, A=2]
    # executed steps: the first 2 -> clamp to [-5, 2] -> (1 + 2 - 5 + 0) / 4
    assert reduce_log_probs(lp, act_steps=2).item() == pytest.approx(-0.5)
    assert reduce_log_probs(lp).item() == pytest.approx((1 + 2 - 5 + 0 + 2 + 2) / 6)


# ---- PPO's pieces by hand ---------------------------------------------------------------------------

def test_clip_schedule_and_denoising_discount():
    clip = clip_schedule(3, eps=0.01, eps_base=0.001, rate=3.0)
    mid = 0.001 + 0.009 * (math.exp(1.5) - 1) / (math.exp(3) - 1)
    torch.testing.assert_close(clip, torch.tensor([0.001, mid, 0.01]))
    assert clip_schedule(1, 0.01, 0.001, 3.0).tolist() == pytest.approx([0.01])
    torch.testing.assert_close(denoising_discount(3, 0.9), torch.tensor([0.81, 0.9, 1.0]))


def test_gae_against_hand_computation():
    # Env 0: r = 0, 0, 1 then terminal. Env 1: truncated after step 1 (bootstraps), new episode at step 2.
    rewards = torch.tensor([[0.0, 0.0], [0.0, 0.5], [1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2], [0.6, 0.4], [0.8, 0.1]])
    next_values = torch.tensor([[0.6, 0.4], [0.8, 0.9], [0.0, 0.3]])  # env 1 step 1: V(final obs) = 0.9
    g, lam = 0.9, 0.5
    discounts = torch.tensor([[g, g], [g, g], [0.0, g]])
    dones = torch.tensor([[False, False], [False, True], [True, False]])
    adv, ret = gae(rewards, values, next_values, discounts, dones, lam)
    # env 0
    d2 = 1.0 - 0.8
    d1 = 0.0 + g * 0.8 - 0.6
    d0 = 0.0 + g * 0.6 - 0.5
    a2 = d2
    a1 = d1 + g * lam * a2
    a0 = d0 + g * lam * a1
    # env 1: the trace is cut at the truncation (step 1), but step 1 still bootstraps V(final obs)
    e2 = 0.0 + g * 0.3 - 0.1
    e1 = 0.5 + g * 0.9 - 0.4
    e0 = 0.0 + g * 0.4 - 0.2 + g * lam * e1
    want = torch.tensor([[a0, e0], [a1, e1], [a2, e2]])
    torch.testing.assert_close(adv, want)
    torch.testing.assert_close(ret, want + values)


def test_ppo_loss_clips_by_hand():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))
    adv = torch.tensor([[1.0, -2.0]])
    clip = torch.tensor([0.1, 0.2])
    loss, stats = ppo_loss(new, old, adv, clip)
    # step 0: max(-1 * 1.5, -1 * 1.1) = -1.1; step 1: max(2 * 0.5, 2 * 0.8) = 1.6
    assert loss.item() == pytest.approx((-1.1 + 1.6) / 2)
    assert stats["clipfrac"] == pytest.approx(1.0)


# ---- the trainer ------------------------------------------------------------------------------------

def test_ratio_is_one_before_any_update(flow_policy):
    agent = DPPO(flow_policy, ENV, small_config())
    batch = agent.collect()
    n = agent.config.num_envs * agent.config.n_steps
    assert batch["latents"].shape == (n, 6, 8, 2) and batch["log_probs"].shape == (n, 5)
    assert len(batch["advantages"]) == len(batch["returns"]) == n and agent.env_steps > 0
    adv = agent.process_advantages(batch["advantages"])
    assert adv.mean().abs() < 1e-5 and (adv.std() - 1).abs() < 1e-4
    for idx in torch.randperm(n).split(agent.config.minibatch_size):  # the whole first epoch, before a step
        _, stats = agent.losses(batch, idx, adv)
        assert stats["ratio_dev"] < 1e-4, stats
        assert stats["clipfrac"] == 0.0 and abs(stats["approx_kl"]) < 1e-8


def test_short_training_fits_the_value_and_acts(flow_policy):
    base_weights = {k: v.clone() for k, v in flow_policy.named_parameters()}
    agent = DPPO(flow_policy, ENV, small_config(bc_coef=0.1, clip_eps=0.05, clip_eps_base=0.01),
                 env_kwargs={"reward_type": "dense"})  # dense (-distance) rewards: returns far from 0
    # The value net regresses the GAE returns of a fixed batch: its loss falls over repeated updates.
    batch = agent.collect()
    first = agent.update(batch)
    for _ in range(15):
        last = agent.update(batch)
    assert last["value_loss"] < 0.5 * first["value_loss"], (first["value_loss"], last["value_loss"])

    history = agent.train(steps=3, eval_every=2, eval_episodes=3, log_every=1, progress=False)
    assert [h["iteration"] for h in history] == [0, 1, 2, 3]
    assert "success" in history[0] and "success" in history[2] and "success" in history[3]
    steps = [h["env_steps"] for h in history]
    assert steps == sorted(steps) and steps[-1] == agent.env_steps > steps[1] > 0
    for row in history[1:]:
        for k in ("pg_loss", "value_loss", "bc_loss", "approx_kl", "clipfrac", "train_success"):
            assert k in row
        assert all(np.isfinite(v) for k, v in row.items() if isinstance(v, float) and k not in
                   ("train_success", "train_return"))
    for p in agent.policy.parameters():
        assert torch.isfinite(p).all()

    # The base policy is untouched; the finetuned copy moved, and its EMA follows its live weights.
    for k, v in flow_policy.named_parameters():
        assert torch.equal(v, base_weights[k]), k
    moved = [not torch.equal(p, q) for p, q in zip(agent.policy.model.parameters(),
                                                     flow_policy.net(use_ema=True).parameters(), strict=True)]
    assert any(moved)
    for p, q in zip(agent.policy.model.parameters(), agent.policy.ema.model.parameters(), strict=True):
        assert torch.equal(p, q)

    # The finetuned policy still acts with the right shapes, as a labkit policy and through DPPOPolicy,
    # and with K' = K the two make the same chunk from the same noise.
    obs = {"state": np.zeros((3, 6), np.float32), "proprio": np.zeros((3, 4), np.float32)}
    agent.policy.reset()
    assert agent.policy.select_action(obs).shape == (3, 2)
    runtime = agent.eval_policy()
    assert runtime.select_action({k: v[0] for k, v in obs.items()}).shape == (2,)
    history_obs = {"observation.state": torch.randn(3, 2, 6) * 0.2}
    torch.manual_seed(5)
    a = runtime.predict_action_chunk(history_obs)
    torch.manual_seed(5)
    b = agent.policy.predict_action_chunk(history_obs)
    norm = agent.policy.normalizer  # DPPO executes the chunk clipped to the normalised action range
    assert a.shape == (3, 8, 2)
    torch.testing.assert_close(a, norm.unnormalize("action", norm.normalize("action", b).clamp(-1, 1)))
    result = agent.evaluate(episodes=2, seed=0, stochastic=True)
    assert result.episodes == 2


def test_finetuning_the_last_steps_only(flow_policy):
    agent = DPPO(flow_policy, ENV, small_config(ft_steps=2, n_steps=5, epochs=1))
    frozen = [p.clone() for p in agent.frozen.parameters()]
    history = agent.train(steps=2, progress=False)
    assert len(history) == 2 and agent.ft_steps == 2
    assert agent.clip.shape == (2,) and agent.den_discount.tolist() == pytest.approx([0.99, 1.0])
    for p, q in zip(agent.frozen.parameters(), frozen, strict=True):  # the base's steps stay as they were
        assert torch.equal(p, q)
    chunk = agent.eval_policy().predict_action_chunk({"observation.state": torch.zeros(2, 2, 6)})
    assert chunk.shape == (2, 8, 2) and torch.isfinite(chunk).all()


def test_step_log_prob_by_hand():
    x, mean, std = torch.zeros(1, 3, 1), torch.tensor([[[0.0], [0.1], [10.0]]]), torch.tensor(0.1)
    per_dim = torch.tensor([normal_log_density(0.0, m, 0.1) for m in (0.0, 0.1, 10.0)])
    assert step_log_prob(x, mean, std, 2, (-5.0, 2.0)).item() == pytest.approx(per_dim[:2].clamp(-5, 2).mean().item())
    assert step_log_prob(x, mean, std, None, (-5.0, 2.0)).item() == pytest.approx(per_dim.clamp(-5, 2).mean().item())


def test_the_log_prob_a_lesson_hands_in_trains(flow_policy):
    """Lesson 05 hands in its own step log-prob: labkit's `step_log_prob` scores a chain as the policy
    does (the default), trains (almost exactly) the same; a wrong one (the log-prob's sign flipped, so the
    ratio moves the wrong way) trains something else."""
    def run(fn=None):
        torch.manual_seed(0)
        agent = DPPO(flow_policy, ENV, small_config(n_steps=5, clip_eps=0.05, clip_eps_base=0.01), log_prob_fn=fn)
        agent.train(steps=2, progress=False)
        return agent, torch.cat([p.flatten() for p in agent.policy.model.parameters()])

    default, w_default = run()
    mine, w_mine = run(step_log_prob)
    obs = obs_batch(flow_policy)
    _, chain = default.act(obs)
    with torch.no_grad():
        torch.testing.assert_close(mine.step_log_probs(obs, chain.latents), default.step_log_probs(obs, chain.latents),
                                   atol=1e-5, rtol=1e-5)
    _, w_wrong = run(lambda x, m, s, a, c: -step_log_prob(x, m, s, a, c))
    w_start = torch.cat([p.flatten() for p in flow_policy.net(use_ema=True).parameters()])
    moved, off, wrong = [(w - v).abs().max().item() for w, v in
                         ((w_default, w_start), (w_mine, w_default), (w_wrong, w_default))]
    assert off < 0.01 * moved and wrong > moved, (moved, off, wrong)


def test_bad_config(flow_policy):
    with pytest.raises(ValueError, match="clip_eps"):
        DPPOConfig(clip_eps=0.0)
    with pytest.raises(ValueError, match="gamma"):
        DPPOConfig(gamma=1.5)
    with pytest.raises(ValueError, match="adv_quantile"):
        DPPOConfig(adv_quantile=0.5)
    with pytest.raises(ValueError, match="logprob_clamp"):
        DPPOConfig(logprob_clamp=(2.0, -5.0))
    with pytest.raises(ValueError, match="ft_steps"):
        DPPO(flow_policy, ENV, small_config(ft_steps=6))
    with pytest.raises(ValueError, match="exactly one"):
        DPPO(flow_policy, ENV, small_config()).train()
    with pytest.raises(TypeError, match="GenerativePolicy"):
        DPPO(object(), ENV)
