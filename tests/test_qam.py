"""Tests of QAM (labkit.rl.qam): the memoryless SDE, the lean adjoint, the adjoint-matching loss, the agent,
and the 1-step bandit's tilt."""

import math

import numpy as np
import pytest
import torch

import labkit  # noqa: F401  (before anything imports mujoco: picks the GL backend, registers tasks)
from labkit.data import DATASETS, load_dataset
from labkit.rl.qam import (
    QAM,
    QAMConfig,
    adjoint_matching_loss,
    bandit_tilt,
    lean_adjoint,
    memoryless_path,
    memoryless_sigma,
    memoryless_step,
    terminal_adjoint,
)

ENV = "labkit/PegInsert-v0"


@pytest.fixture(scope="module")
def peg():
    """The peg demos (with failures) and a tiny flow base on 5 of its successes."""
    from conftest import tiny_flow

    data = load_dataset(DATASETS / "peg")
    wins = np.flatnonzero(np.asarray(data.episodes["success"], bool))
    return data.select(list(range(8))), tiny_flow(data.select(wins[:5].tolist()), steps=30, batch_size=32)


def small(**kw) -> QAMConfig:
    return QAMConfig(**{"warmup_steps": 8, "critic_warmup": 0, "batch_size": 16, "ensemble": 2, "hidden": (32,),
                        **kw})


# ---- the memoryless SDE ------------------------------------------------------------------------------


def test_sigma_and_one_sde_step_by_hand():
    # K = 4, h = 1/4: sigma_k = sqrt(2 (1 - t_k + h) / (t_k + h))
    assert memoryless_sigma(0, 4) == pytest.approx(math.sqrt(10.0))  # 2 * 1.25 / 0.25
    assert memoryless_sigma(1, 4) == pytest.approx(2.0)  # 2 * 1.0 / 0.5
    assert memoryless_sigma(2, 4) == pytest.approx(math.sqrt(2.0))  # 2 * 0.75 / 0.75
    torch.testing.assert_close(memoryless_sigma(torch.tensor([0.0, 1.0]), 4), torch.tensor([math.sqrt(10.0), 2.0]))
    # k = 1 (t = 0.25): x + h (2 v - x / 0.5) + sqrt(h) sigma_1 xi = [1, -2] + 0.25 * [-1, 5] + 0.5 * 2 * [1, 0]
    x, v, xi = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0, 0.0]])
    torch.testing.assert_close(memoryless_step(x, v, 1, 4, xi), torch.tensor([[1.75, -0.75]]))


def test_path_runs_sde_steps_with_the_fine_field_and_ends_with_the_base_ode():
    x0 = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
    fine, base = (lambda x, t: torch.ones_like(x)), (lambda x, t: torch.full_like(x, -2.0))
    xs = memoryless_path(fine, base, x0, 4, torch.Generator().manual_seed(0))
    assert xs.shape == (5, 3, 2)
    torch.testing.assert_close(xs[0], x0)
    gen = torch.Generator().manual_seed(0)  # the same noise draws, step by step
    x = x0
    for k in range(3):
        x = memoryless_step(x, torch.ones_like(x), k, 4, torch.randn(3, 2, generator=gen))
        torch.testing.assert_close(xs[k + 1], x)
    torch.testing.assert_close(xs[4], xs[3] - 2.0 * 0.25)  # the last step: x + h v_beta, no noise
    assert not xs.requires_grad


# ---- the lean adjoint -----------------------------------------------------------------------------------


def test_lean_adjoint_on_a_linear_field_by_hand():
    # v_beta(x, t) = (1 + t) A x, so J_k = 2 (1 + t_k + h) A - I / (t_k + h) (the Jacobian at time t_k + h).
    A = np.array([[0.5, 1.0], [0.0, -0.3]])
    K, h = 3, 1 / 3
    At = torch.tensor(A, dtype=torch.float32)
    v = lambda x, t: (1 + t) * x @ At.T  # noqa: E731
    xs = torch.randn(K + 1, 2, 2, generator=torch.Generator().manual_seed(0))  # any path: J does not depend on x
    a_K = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
    adj = lean_adjoint(v, xs, a_K)
    want, a = [], a_K.numpy().astype(np.float64)
    for k in reversed(range(K)):
        t = k * h
        J = 2 * (1 + t + h) * A - np.eye(2) / (t + h)
        a = a + h * a @ J  # row vectors: (J^T a)^T = a^T J
        want.append(a)
    assert adj.shape == (K, 2, 2)
    np.testing.assert_allclose(adj.numpy(), np.stack(want[::-1]), rtol=1e-5)


def test_lean_adjoint_equals_autograd_through_the_sde_when_fine_is_base():
    # With v_theta = v_beta time-independent and every step a memoryless step, a_k is exactly
    # d(-tau R(x_K)) / d x_k through the recursion (the noise held fixed): autograd must agree.
    torch.manual_seed(0)
    W, b = torch.randn(3, 3) * 0.7, torch.randn(3) * 0.3
    v = lambda x, t: torch.tanh(x @ W.T + b)  # noqa: E731
    c, tau, K = torch.tensor([1.0, -2.0, 0.5]), 2.0, 5
    noise = torch.randn(K, 4, 3)
    xs = [torch.randn(4, 3)]
    for k in range(K):
        xs.append(memoryless_step(xs[-1], v(xs[-1], 0.0), k, K, noise[k]))
    xs = torch.stack(xs)
    adj = lean_adjoint(v, xs, (-tau * c).expand(4, 3))
    for k in range(K):
        z = xs[k].clone().requires_grad_(True)
        x = z
        for j in range(k, K):
            x = memoryless_step(x, v(x, 0.0), j, K, noise[j])
        (grad,) = torch.autograd.grad((-tau * x @ c).sum(), z)
        torch.testing.assert_close(adj[k], grad, rtol=1e-4, atol=1e-5)


def test_terminal_adjoint_is_minus_inv_temp_grad_q_with_clipped_actions():
    c = torch.tensor([2.0, -1.0])
    x = torch.tensor([[0.5, 0.2], [1.5, -0.3]])  # 1.5 lies outside [-1, 1]: Q sees 1, no gradient there
    a = terminal_adjoint(lambda z: z @ c, x, inv_temp=3.0)
    torch.testing.assert_close(a, torch.tensor([[-6.0, 3.0], [0.0, 3.0]]))


# ---- the adjoint-matching loss -------------------------------------------------------------------------


def test_adjoint_matching_loss_by_hand():
    # K = 2, B = 1, one dim: (2/2 * 0.1 + 2 * 0.5)^2 + (2/1 * -0.2 + 1 * 0.3)^2 = 1.21 + 0.01
    vf, vb = torch.tensor([[[0.1]], [[-0.2]]]), torch.zeros(2, 1, 1)
    loss = adjoint_matching_loss(vf, vb, torch.tensor([[[0.5]], [[0.3]]]), torch.tensor([2.0, 1.0]))
    assert loss.item() == pytest.approx(1.22)
    # its minimiser: v_theta = v_beta - sigma^2 a / 2
    adj, sigma = torch.tensor([[[0.5]], [[0.3]]]), torch.tensor([2.0, 1.0])
    best = vb - sigma.view(2, 1, 1) ** 2 * adj / 2
    assert adjoint_matching_loss(best, vb, adj, sigma).item() == pytest.approx(0.0, abs=1e-12)


def test_agent_loss_is_zero_at_the_base_with_a_flat_critic(peg):
    demos, base = peg
    agent = QAM(base, ENV, small(), demos=demos)
    with torch.no_grad():  # a constant Q: its action-gradient, hence every adjoint, is zero
        for crit in (agent.critic, agent.critic_target):
            crit.net[-1].weight.zero_()
    obs = agent.policy.normalize_obs(agent.demos.sample(8, agent.gen)["obs"])
    loss, info = agent.actor_loss(obs)
    assert loss.item() == pytest.approx(0.0, abs=1e-10) and info["drift"] == 0.0
    with torch.no_grad():  # a critic that cares: the loss is no longer zero
        agent.critic_target.net[-1].weight.normal_()
    assert agent.actor_loss(obs)[0].item() > 1e-6


# ---- the agent -----------------------------------------------------------------------------------------


def test_agent_step_trains_v_theta_and_the_critic_never_the_base(peg):
    demos, base = peg
    agent = QAM(base, ENV, small(), demos=demos)
    snap = lambda m: {k: v.clone() for k, v in m.state_dict().items() if torch.is_tensor(v)}  # noqa: E731
    base_before, policy_before = snap(agent.base), snap(agent.policy)
    actor_before, critic_before = snap(agent.actor), snap(agent.critic)
    for k, v in actor_before.items():  # v_theta starts as a copy of v_beta
        torch.testing.assert_close(v, base_before[k])
    rows = [agent.step() for _ in range(6)]
    assert agent.updates > 0 and "am_loss" in rows[-1]
    assert any(not torch.equal(v, agent.actor.state_dict()[k]) for k, v in actor_before.items())
    assert any(not torch.equal(v, agent.critic.state_dict()[k]) for k, v in critic_before.items())
    for before, module in ((base_before, agent.base), (policy_before, agent.policy)):
        for k, v in before.items():
            assert torch.equal(v, module.state_dict()[k]), k  # bit for bit
    runtime = agent.eval_policy()  # the acting policy runs in the env's units
    runtime.reset()
    env_obs = {"state": np.zeros(8, np.float32)}
    state = agent.gen.get_state()
    action = runtime.select_action(env_obs)
    assert action.shape == (base.action_dim,) and np.all(np.isfinite(action))
    assert torch.equal(agent.gen.get_state(), state)  # evaluation leaves the training generator alone


def test_inv_temp_zero_leaves_v_theta_at_the_base(peg):
    demos, base = peg
    agent = QAM(base, ENV, small(inv_temp=0.0), demos=demos)
    before = {k: v.clone() for k, v in agent.actor.state_dict().items()}
    for _ in range(4):
        agent.step()
    assert agent.updates > 0
    for k, v in before.items():  # zero adjoint and v_theta = v_beta: a zero gradient, Adam does not move
        torch.testing.assert_close(agent.actor.state_dict()[k], v)


@pytest.mark.parametrize("kw, error", [
    ({"inv_temp": -1.0}, "inv_temp must be a finite number >= 0"),
    ({"inv_temp": float("inf")}, "inv_temp must be a finite number >= 0"),
    ({"flow_steps": 1}, "flow_steps must be >= 2"),
    ({"ensemble": 1}, "ensemble must be >= 2"),
    ({"offline_ratio": 1.5}, r"offline_ratio must lie in \[0, 1\]"),
    ({"batch_size": 0}, "batch_size must be positive"),
    ({"rho": -0.5}, "rho must be >= 0"),
])
def test_bad_config_is_named(kw, error):
    with pytest.raises(ValueError, match=error):
        QAMConfig(**kw)


def test_bad_inputs_are_named(peg):
    demos, base = peg
    with pytest.raises(ValueError, match="pass demos=<EpisodeDataset>"):
        QAM(base, ENV, small())
    from labkit.policies import BCPolicy

    bc = BCPolicy.from_dataset(demos, horizon=8, n_action_steps=4, obs_horizon=2)
    with pytest.raises(TypeError, match="QAM finetunes a flow policy"):
        QAM(bc, ENV, small(offline_ratio=0.0))
    with pytest.raises(ValueError, match="steps >= 2"):
        memoryless_path(lambda x, t: x, lambda x, t: x, torch.zeros(1, 2), 1)
    with pytest.raises(ValueError, match="a_final must have the shape"):
        lean_adjoint(lambda x, t: x, torch.zeros(3, 2, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"sigma \[K\]"):
        adjoint_matching_loss(torch.zeros(2, 1, 1), torch.zeros(2, 1, 1), torch.zeros(2, 1, 1), torch.ones(3))


# ---- the claim in miniature: the 1-step bandit -----------------------------------------------------------


def test_bandit_tilt_moves_samples_into_the_favoured_mode():
    rows = bandit_tilt(inv_temps=(0.0, 3.0), base_steps=800, am_steps=150, batch=128, samples=1000)
    plain, tilted = rows
    assert abs(plain["base"] - 0.5) < 0.1  # the base keeps both modes
    assert plain["right"] == pytest.approx(plain["base"], abs=0.06)  # inv_temp 0: no training, same flow
    assert tilted["right"] > plain["base"] + 0.2  # Q = a_x pulls mass into the right-hand mode
    assert tilted["mean_x"] > plain["mean_x"] + 0.3
    # A lesson's loss with the adjoint's sign flipped (a common slip) tilts the other way: the loss trains.
    flipped = bandit_tilt(inv_temps=(3.0,), base_steps=800, am_steps=150, batch=128, samples=1000,
                          loss_fn=lambda vf, vb, adj, sigma: adjoint_matching_loss(vf, vb, -adj, sigma))[0]
    assert flipped["right"] < plain["base"] - 0.2
