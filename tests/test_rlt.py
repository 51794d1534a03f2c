"""Tests of RLT (labkit.rl.rlt): the token's autoencoding loss and the anchored actor loss by hand, reference
dropout, the critic's TD target, the base's features, and an agent that trains with its token frozen."""

import types

import numpy as np
import pytest
import torch
from torch import nn

import labkit  # noqa: F401  (before anything imports mujoco: picks the GL backend, registers tasks)
from labkit.policies import BCPolicy, fit
from labkit.rl.rlt import (
    RLT,
    RLTConfig,
    RLToken,
    actor_objective,
    anchored_actor_loss,
    base_reference,
    chunk_critic_loss,
    drop_reference,
)

ENV = "labkit/Detour-v0"


def small_config(**kw) -> RLTConfig:
    return RLTConfig(**{**dict(token_steps=50, actor_init_steps=20, hidden=(32, 32), batch_size=32, utd=1,
                               warmup_steps=40, critic_warmup=5, gamma=0.9, seed=0), **kw})


# ---- stubs with known outputs, so the losses can be written out by hand --------------------------------

class StubActor(nn.Module):
    """a = 0.5 * (the last d inputs) + w, recording its input: (action, None) like TanhGaussianActor."""

    def __init__(self, d: int):
        super().__init__()
        self.d, self.w = d, nn.Parameter(torch.full((d,), 0.1))
        self.seen = None

    def forward(self, inp, deterministic=True):
        self.seen = inp.detach().clone()
        return 0.5 * inp[:, -self.d:] + self.w, None


class StubCritic(nn.Module):
    """Q_i(x, a) = k_i * sum(a) + sum(x), heads k = (1, 2): [E, B] like QEnsemble."""

    def forward(self, x, a):
        return torch.stack([k * a.sum(-1) + x.sum(-1) for k in (1.0, 2.0)])


def stub_agent(**config) -> types.SimpleNamespace:
    cfg = RLTConfig(**{"ref_dropout": 0.0, **config})
    return types.SimpleNamespace(config=cfg, actor=StubActor(2), actor_target=StubActor(2), critic=StubCritic(),
                                 critic_target=StubCritic(), gen=torch.Generator().manual_seed(0),
                                 actor_loss_fn=actor_objective)


X = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
REF = torch.tensor([[0.2, -0.4], [0.6, 0.0]])


# ---- the token ------------------------------------------------------------------------------------------

def test_token_reconstruction_loss_by_hand():
    tok = RLToken(3, token_dim=1, hidden=2)
    tok.mean.copy_(torch.tensor([1.0, 0.0, -1.0]))
    tok.std.copy_(torch.tensor([2.0, 1.0, 0.5]))
    with torch.no_grad():  # E(u) = relu(u @ [1,1,0]) * 1 ; D(z) = relu(z * [1, 0]) @ [[1,0,0],[0,0,0]] + [0,0,1]
        e1, e2 = tok.encoder[0], tok.encoder[2]
        e1.weight.copy_(torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
        e1.bias.zero_()
        e2.weight.copy_(torch.tensor([[1.0, 0.0]]))
        e2.bias.zero_()
        d1, d2 = tok.decoder[0], tok.decoder[2]
        d1.weight.copy_(torch.tensor([[1.0], [0.0]]))
        d1.bias.zero_()
        d2.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
        d2.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    h = torch.tensor([[3.0, 1.0, -1.0], [1.0, -2.0, 0.0]])
    # standardised: [[1, 1, 0], [0, -2, 2]]; z = relu(u0 + u1) = [2, 0]; D(z) = [[2, 0, 1], [0, 0, 1]]
    torch.testing.assert_close(tok(h), torch.tensor([[2.0], [0.0]]))
    want = ((2 - 1) ** 2 + (0 - 1) ** 2 + (1 - 0) ** 2 + (0 - 0) ** 2 + (0 + 2) ** 2 + (1 - 2) ** 2) / 6  # 8 / 6
    torch.testing.assert_close(tok.reconstruction_loss(h), torch.tensor(want))


def test_token_fit_learns_a_low_rank_code_and_freezes():
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(512, 2, generator=g) @ torch.randn(2, 12, generator=g)) * 3 + 5  # rank 2 in 12-d
    tok = RLToken(12, token_dim=2, hidden=32)
    losses = tok.fit(h, steps=400, lr=3e-3, batch_size=64)
    torch.testing.assert_close(tok.mean, h.mean(0))
    assert losses[-20:].mean() < 0.2 * losses[:5].mean()
    assert not any(p.requires_grad for p in tok.parameters()) and not tok.training


# ---- the anchored actor loss, reference dropout, the critic loss ------------------------------------------

def test_anchored_actor_loss_by_hand_and_beta_adds_exactly_the_anchor():
    agent = stub_agent(beta=0.0)
    a = 0.5 * REF + 0.1  # the stub's chunk: [[0.2, -0.1], [0.4, 0.1]]
    q = torch.stack([k * a.sum(-1) + X.sum(-1) for k in (1.0, 2.0)])  # [[1.1, -0.5], [1.2, -0.0]]
    anchor = (a - REF).pow(2).sum(-1).mean()  # ((0 + .09) + (.04 + .01)) / 2 = 0.07
    torch.testing.assert_close(anchor, torch.tensor(0.07))
    loss0 = anchored_actor_loss(agent, X, REF)
    torch.testing.assert_close(loss0, -q.mean())
    agent.config.beta = 2.0
    loss2 = anchored_actor_loss(agent, X, REF)
    torch.testing.assert_close(loss2, -q.mean() + 2.0 * anchor)
    torch.testing.assert_close(loss2 - loss0, torch.tensor(0.14))
    # q_weight 0 (the warm-up and the actor's start): the anchor alone, whatever beta is.
    torch.testing.assert_close(anchored_actor_loss(agent, X, REF, q_weight=0.0), anchor)
    # The gradient of beta's term pulls the chunk towards the reference: d/dw = 2 beta mean_b (a - ref)
    agent.config.beta, agent.actor.w.grad = 1.0, None
    anchored_actor_loss(agent, X, REF, q_weight=0.0).backward()
    torch.testing.assert_close(agent.actor.w.grad, 2 * (a - REF).mean(0))
    # Past the box: Q scores the clipped chunk, the anchor measures the unclipped one (so it still pulls back).
    with torch.no_grad():
        agent.actor.w.fill_(1.0)
    raw = 0.5 * REF + 1.0  # [[1.1, 0.8], [1.3, 1.0]]
    q = torch.stack([k * raw.clamp(-1, 1).sum(-1) + X.sum(-1) for k in (1.0, 2.0)])
    torch.testing.assert_close(anchored_actor_loss(agent, X, REF), -q.mean() + (raw - REF).pow(2).sum(-1).mean())


def test_actor_objective_by_hand_and_a_lesson_loss_is_the_one_that_trains():
    q = torch.tensor([[1.0, 3.0], [2.0, 2.0]])  # mean 2
    raw, ref = torch.tensor([[0.5, 0.0], [1.5, 1.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])  # ||.||^2 = .25, .25
    torch.testing.assert_close(actor_objective(q, raw, ref, 0.0), torch.tensor(-2.0))
    torch.testing.assert_close(actor_objective(q, raw, ref, 4.0), torch.tensor(-2.0 + 4 * 0.25))
    agent = stub_agent(beta=0.0)
    agent.actor_loss_fn = lambda q, raw, ref, beta: q.mean()  # the sign error a student might make
    torch.testing.assert_close(anchored_actor_loss(agent, X, REF), -anchored_actor_loss(stub_agent(beta=0.0), X, REF))


def test_reference_dropout_zeroes_whole_rows_of_the_reference_only():
    ref = torch.arange(1.0, 2001.0).view(1000, 2)
    assert drop_reference(ref, 0.0) is ref
    out = drop_reference(ref, 0.3, torch.Generator().manual_seed(1))
    dropped = (out == 0).all(1)
    assert torch.equal(out[~dropped], ref[~dropped])  # kept rows untouched, dropped rows all zero
    assert 0.25 < dropped.float().mean() < 0.35
    # Inside the actor loss: the actor's x columns are intact, its reference columns zeroed per row, and the
    # anchor still measures the distance to the true reference.
    agent = stub_agent(ref_dropout=0.5, beta=1.0)
    x, r = torch.ones(64, 2), torch.full((64, 2), 0.4)
    loss = anchored_actor_loss(agent, x, r, q_weight=0.0)
    seen = agent.actor.seen
    assert torch.equal(seen[:, :2], x)
    zero = (seen[:, 2:] == 0).all(1)
    assert 0 < zero.sum() < 64 and torch.equal(seen[~zero, 2:], r[~zero])
    a = 0.5 * seen[:, 2:] + 0.1  # dropped rows: a = 0.1, 0.3 from the reference; kept: a = 0.3, 0.1 from it
    torch.testing.assert_close(loss, (a - r).pow(2).sum(-1).mean())
    torch.testing.assert_close(loss, (zero.float() * 0.18 + (~zero).float() * 0.02).mean())


def test_chunk_critic_loss_by_hand():
    agent = stub_agent(target_noise=0.0)
    batch = {"obs": X, "action": torch.tensor([[0.5, 0.5], [-1.0, 0.0]]), "reward": torch.tensor([1.0, 0.0]),
             "next_obs": torch.tensor([[0.0, 0.0], [1.0, 1.0]]), "next_ref": REF,
             "discount": torch.tensor([0.5, 0.0])}
    a_next = 0.5 * REF + 0.1  # the target actor sees the full next reference (no dropout in the target)
    q_next = torch.stack([k * a_next.sum(-1) + batch["next_obs"].sum(-1) for k in (1.0, 2.0)]).min(0).values
    y = batch["reward"] + batch["discount"] * q_next  # [1 + .5 * 0.1, 0]
    torch.testing.assert_close(y, torch.tensor([1.05, 0.0]))
    q = torch.stack([k * batch["action"].sum(-1) + X.sum(-1) for k in (1.0, 2.0)])  # [[2, -2], [3, -3]]
    want = ((q - y).pow(2).mean(1)).sum()
    torch.testing.assert_close(chunk_critic_loss(agent, batch), want)
    torch.testing.assert_close(want, torch.tensor(((0.95**2 + 4) + (1.95**2 + 9)) / 2))


# ---- the base's features, errors ---------------------------------------------------------------------------

def tiny_bc(demos):
    torch.manual_seed(0)
    return fit(BCPolicy.from_dataset(demos, horizon=8, n_action_steps=4, obs_horizon=2, hidden=32, layers=2), demos,
               steps=30, batch_size=32, progress=False)


def test_base_features_are_the_readout_layers_input(demos, base_policy):
    bc = tiny_bc(demos).eval()
    obs = bc.normalize_obs({"observation.state": torch.as_tensor(demos.frames["observation.state"][:10])[:, None]
                            .repeat(1, 2, 1)})
    h, chunk = base_reference(bc, obs)
    torch.testing.assert_close(h, bc.head[:-1](bc.encoder(obs)))
    torch.testing.assert_close(chunk, bc.predict_normalized(obs))
    assert h.shape == (10, 32)
    # A flow base: the denoiser's last hidden layer at its final step; the chunk is the noise's sample.
    flow = base_policy.eval()
    h, chunk = base_reference(flow, obs, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(10, 8, flow.action_dim, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(chunk, flow.sample(obs, noise=noise).actions)
    assert h.shape == (10, flow.config.hidden)


@pytest.mark.parametrize("change, error", [
    ({"obs_input": "pixels"}, "obs_input must be one of"),
    ({"ref_dropout": 1.0}, r"ref_dropout must lie in \[0, 1\)"),
    ({"beta": -1.0}, "beta must be >= 0"),
    ({"token_dim": 0}, "token_dim must be positive"),
    ({"action_bound": 0.9}, "action_bound must be >= 1"),
    ({"target_subset": 3}, "target_subset <= ensemble"),
])
def test_bad_configs_are_named(change, error):
    with pytest.raises(ValueError, match=error):
        RLTConfig(**change)


def test_bad_inputs_are_named(base_policy):
    tok = RLToken(8, 2, 4)
    with pytest.raises(ValueError, match=r"base features \[B, 8\], got \[3, 5\]"):
        tok(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="pass demos="):
        RLT(base_policy, ENV, small_config())

    class NoMLP(nn.Module):
        pass

    with pytest.raises(TypeError, match="penultimate features of an MLP base"):
        RLT(NoMLP(), ENV, small_config(), demos=object())


# ---- the agent ---------------------------------------------------------------------------------------------

def test_agent_steps_train_actor_and_critic_with_the_token_and_base_frozen(demos):
    bc = tiny_bc(demos)
    agent = RLT(bc, ENV, small_config(), demos=demos)
    assert agent.token_losses[-10:].mean() < agent.token_losses[:5].mean()
    token = {k: v.clone() for k, v in agent.token.state_dict().items()}
    base = [p.clone() for p in bc.parameters()]
    actor = [p.clone() for p in agent.actor.parameters()]
    # Warm-up chunks: the reference plus uniform noise, E = 4 env steps each, chunk discounts gamma**4.
    out = [agent.step() for _ in range(5)]
    assert agent.env_steps == 20 and agent.updates == 0 and all(o["warm"] == 1.0 for o in out)
    b = agent.buffer.get(torch.arange(len(agent.buffer)))
    noise = b["action"] - b["ref"].clamp(-1, 1)
    assert 0.5 * agent.config.warmup_noise < noise.abs().max() <= agent.config.warmup_noise + 1e-6
    assert torch.isclose(b["discount"][0], torch.tensor(0.9**4))
    torch.testing.assert_close(b["next_obs"][:-1], b["obs"][1:])  # consecutive chunks chain
    while agent.warming_up():
        agent.step()
    out = [agent.step() for _ in range(20)]
    assert agent.updates == 20 and len(agent.log) == 20
    assert {"critic_loss", "actor_loss", "edit", "reward"} <= set(out[-1]) and np.isfinite(out[-1]["critic_loss"])
    for k, v in agent.token.state_dict().items():
        assert torch.equal(v, token[k]), f"the token's {k} changed during RL"
    assert all(torch.equal(p, q) for p, q in zip(bc.parameters(), base, strict=True)), "the base changed during RL"
    assert any(not torch.equal(p, q) for p, q in zip(agent.actor.parameters(), actor, strict=True))
    r = agent.evaluate(episodes=2, seed=5)
    assert 0.0 <= r.success_rate <= 1.0


def test_state_ablation_and_a_flow_base(base_policy, demos):
    agent = RLT(base_policy, ENV, small_config(obs_input="both", offline_ratio=0.0), demos=demos)
    obs = agent.policy.normalize_obs(agent.env.history())
    x, _ = agent.features(obs, torch.Generator().manual_seed(0))
    assert x.shape[1] == agent.config.token_dim + sum(v[0].numel() for v in obs.values())
    while agent.warming_up():
        agent.step()
    for _ in range(5):
        agent.step()
    assert agent.updates == 5
