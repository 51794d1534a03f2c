"""Tests of TQL (labkit.rl.tql): attention entropy, the critic and temperature losses against hand
computations, the Q-transformer's tokens and errors, the agent's update, and its `labkit fit` config."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import labkit  # noqa: F401  (before anything imports mujoco: picks the GL backend, registers tasks)
from labkit.rl import Agent
from labkit.rl.tql import (
    TQL,
    AttentionTemperature,
    EntropyAttention,
    TQLConfig,
    TransformerQ,
    attention_entropy,
    default_targets,
    fit_offline,
    resolve_targets,
    temperature_loss,
    tql_critic_loss,
)

ENV = "labkit/Detour-v0"
CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "rl").glob("tql_*.yaml"))


def small_config(**kw) -> TQLConfig:
    return TQLConfig(**{**dict(d_model=16, layers=2, heads=2, batch_size=16, utd=1, warmup_steps=20,
                               critic_warmup=0, seed=0), **kw})


# ---- arithmetic by hand ---------------------------------------------------------------------------------

def test_entropy_of_a_known_attention_matrix():
    # Row 1 uniform over 4 keys: log 4. Row 2 one-hot: 0. Row 3 (1/2, 1/2, 0, 0): log 2.
    p = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    expected = (math.log(4) + 0 + math.log(2)) / 3
    assert attention_entropy(torch.log(p)).item() == pytest.approx(expected, abs=1e-6)


def test_attention_layer_entropy_is_the_mean_over_heads_and_queries():
    torch.manual_seed(0)
    attn = EntropyAttention(8, heads=2)
    with torch.no_grad():  # zero queries: every logit is 0, so every row is uniform over the 5 tokens
        attn.qkv.weight[:8].zero_()
        attn.qkv.bias[:8].zero_()
    _, h = attn(torch.randn(3, 5, 8))
    assert h.item() == pytest.approx(math.log(5), abs=1e-6)
    # A scaled-up query-key product sharpens attention: entropy falls below log T.
    attn2 = EntropyAttention(8, heads=2)
    with torch.no_grad():
        attn2.qkv.weight[:16].mul_(30.0)
    assert attn2(torch.randn(3, 5, 8))[1].item() < 0.5 * math.log(5)


def test_critic_loss_combines_td_and_stopped_temperature_weighted_entropy():
    td = torch.tensor(0.8, requires_grad=True)
    entropy = torch.tensor([2.0, 1.5], requires_grad=True)
    tau = torch.tensor([0.1, 0.4], requires_grad=True)
    loss = tql_critic_loss(td, entropy, tau)
    assert loss.item() == pytest.approx(0.8 - (0.1 * 2.0 + 0.4 * 1.5))  # 0.0
    loss.backward()
    assert td.grad.item() == 1.0
    assert entropy.grad.tolist() == pytest.approx([-0.1, -0.4])  # descent raises entropy, more where tau is larger
    assert tau.grad is None  # sg(tau): the critic loss never moves the temperature


def test_temperature_moves_toward_the_entropy_target():
    tau = torch.tensor([0.5, 0.5], requires_grad=True)
    entropy = torch.tensor([3.0, 1.0], requires_grad=True)  # layer 0 above its target, layer 1 below
    target = torch.tensor([2.0, 2.0])
    loss = temperature_loss(tau, entropy, target)
    assert loss.item() == pytest.approx(0.5 * 1.0 + 0.5 * -1.0)
    loss.backward()
    assert tau.grad.tolist() == pytest.approx([1.0, -1.0])  # descent: tau_0 down, tau_1 up
    assert entropy.grad is None  # sg(H)

    temp = AttentionTemperature([2.0, 2.0], init=0.5, tau_min=0.0, tau_max=0.6)
    opt = torch.optim.SGD(temp.parameters(), lr=0.3)
    opt.zero_grad()
    temp.loss(torch.tensor([3.0, 1.0])).backward()
    opt.step()
    temp.project()
    assert temp.tau.tolist() == pytest.approx([0.2, 0.6])  # 0.5 - 0.3; 0.5 + 0.3 projected onto tau_max
    assert temp.clipped().requires_grad is False


def test_q_shape_token_count_and_entropies():
    q = TransformerQ(obs_dim=5, action_dim=6, d_model=16, layers=3, heads=4)
    assert q.tokens == 12  # 5 + 6 scalars + [VALUE]
    value, entropy = q(torch.randn(7, 5), torch.randn(7, 2, 3))  # an action chunk [B, H, A] is flattened
    assert value.shape == (7,) and entropy.shape == (3,)
    assert torch.all(entropy > 0) and torch.all(entropy <= math.log(12) + 1e-5)
    # Each scalar is its own token: Q depends on every one of them.
    obs = torch.randn(1, 5)
    obs2 = obs.clone()
    obs2[0, 4] += 1.0
    a = torch.randn(1, 6)
    assert q(obs, a)[0].item() != pytest.approx(q(obs2, a)[0].item())


def test_a_lesson_entropy_and_temperature_loss_are_the_ones_used():
    """fit_offline hands a lesson's entropy_fn to every attention layer and its temperature loss to the dual step."""
    q = TransformerQ(obs_dim=2, action_dim=2, d_model=8, layers=2, heads=2, entropy_fn=lambda logp: logp.new_tensor(7.0))
    assert q(torch.randn(3, 2), torch.randn(3, 2))[1].tolist() == [7.0, 7.0]
    calls = []
    temp = AttentionTemperature([1.0, 1.0], loss_fn=lambda tau, h, target: calls.append(h) or (tau * 0).sum())
    temp.loss(torch.tensor([2.0, 3.0]))
    assert len(calls) == 1 and calls[0].tolist() == [2.0, 3.0]


def test_bad_inputs_are_named():
    q = TransformerQ(obs_dim=5, action_dim=3, d_model=8, heads=2)
    with pytest.raises(ValueError, match=r"obs \[B, 5\] and action \[B, 3\]"):
        q(torch.randn(4, 6), torch.randn(4, 3))
    with pytest.raises(ValueError, match="multiple of heads"):
        TransformerQ(5, 3, d_model=10, heads=4)
    with pytest.raises(ValueError, match="one value per layer"):
        resolve_targets((2.0, 1.0, 0.5), tokens=9, layers=2)
    with pytest.raises(ValueError, match="cannot be reached"):
        resolve_targets(3.0, tokens=9, layers=2)  # log 9 = 2.197
    with pytest.raises(ValueError, match="tau_min <= init <= tau_max"):
        AttentionTemperature([1.0], init=2.0, tau_max=1.0)
    with pytest.raises(ValueError, match="temperature_lr"):
        TQLConfig(temperature_lr=0.0)
    assert default_targets(20, 2) == pytest.approx([0.85 * math.log(20), 0.7 * math.log(20)])


# ---- the offline fit and the agent ----------------------------------------------------------------------

def _toy_data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, a = torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g)
    r = (x[:, 0] > 0).float()
    rows = {"x": x, "a": a, "r": r, "x_next": x, "a_next": a, "discount": torch.zeros(n), "return": r}
    return {"train": rows, "test": rows}


def test_entropy_control_holds_entropy_near_its_target():
    data = _toy_data()
    kw = dict(d_model=16, layers=1, heads=2, steps=150, lr=3e-2, batch_size=64, eval_every=10, seed=0)
    plain = fit_offline(data, **kw)
    held = fit_offline(data, entropy_control=True, entropy_target=1.5, temperature_lr=0.05, **kw)
    assert plain[-1]["entropy_0"] < 1.2  # a large learning rate sharpens plain TD's attention (log 6 = 1.79)...
    assert held[-1]["entropy_0"] > plain[-1]["entropy_0"] + 0.3  # ...the temperature pulls it back up
    assert max(r["tau_0"] for r in held) > 0 and max(r["tau_0"] for r in plain) == 0.0
    assert plain[-1]["value_error"] < 0.05 and held[-1]["value_error"] < 0.05  # both learn the toy values


def test_agent_update_trains_critic_and_temperature(base_policy, demos):
    agent = TQL(base_policy, ENV, small_config(entropy_target=(2.0, 2.0), tau_init=0.1), demos=demos)
    assert Agent.registry["tql"] is TQL
    assert isinstance(agent.critic.members[0], TransformerQ) and agent.critic.members[0].tokens == 6 + 2 + 2 + 1
    tau0 = agent.temperature.tau.detach().clone()
    rows = [agent.step() for _ in range(25)]
    last = rows[-1]
    assert {"critic_loss", "entropy_0", "entropy_1", "tau_0", "tau_1", "actor_loss"} <= set(last)
    # x = (state 6, base action 2), action 2, [VALUE]. Entropies start near log(11) = 2.40 > 2.0: the
    # temperatures fall.
    assert torch.all(agent.temperature.tau.detach() < tau0)
    assert np.isfinite(last["critic_loss"]) and agent.counters()["updates"] == 5  # 20 warm-up steps


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_tql_config_builds_the_agent(config, base_policy, demos):
    from labkit.fitting.rl import config_class

    spec = yaml.safe_load(config.read_text())["model"]
    assert spec["method"] == "tql" and config_class(TQL) is TQLConfig
    agent = Agent.registry[spec["method"]].from_config(base_policy, ENV, {**spec["config"], "warmup_steps": 2},
                                                       demos=demos)
    c = agent.config
    assert (c.d_model, c.layers, c.heads) == (spec["config"]["d_model"], spec["config"]["layers"],
                                              spec["config"]["heads"])
    assert c.entropy_control is spec["config"]["entropy_control"]
    agent.step()
    agent.step()
    assert agent.counters()["env_steps"] == 2 and agent.counters()["updates"] == 0


def test_offline_chunks_make_the_monte_carlo_return_the_td_fixed_point():
    from labkit.rl.tql import offline_chunks

    data = offline_chunks("peg", chunk=4, gamma=0.9)
    tr, te = data["train"], data["test"]
    assert tr["x"].shape[1] == 8 and tr["a"].shape[1] == 4 * 3  # PegInsert's state, 4 actions of 3
    assert len(te["x"]) > 0 and len(tr["x"]) > 3 * len(te["x"])  # the last 20% of episodes held out
    # G_t = R_t + discount_t * G_{t+k}: with the data's own next chunk, the return is what TD converges to.
    go = torch.nonzero(tr["discount"] > 0).squeeze(1)[:50]  # chunks with a future: the next starts 4 rows on
    assert torch.equal(tr["x_next"][go], tr["x"][go + 4]) and torch.equal(tr["a_next"][go], tr["a"][go + 4])
    assert torch.allclose(tr["return"][go], tr["r"][go] + tr["discount"][go] * tr["return"][go + 4], atol=1e-5)
    end = tr["discount"] == 0
    assert torch.equal(tr["return"][end], tr["r"][end]) and end.sum() > 0
    assert torch.unique(tr["discount"]).tolist() == pytest.approx([0.0, 0.9 ** 4])  # gamma^k, 0 at an end


def test_collapse_study_rows_and_plot(tmp_path):
    from labkit.rl.tql import collapse_study, plot_collapse

    sizes = {"tiny": {"d_model": 8, "layers": 1, "heads": 2}, "wide": {"d_model": 16, "layers": 2, "heads": 2}}
    rows = collapse_study(sizes, steps=10, eval_every=5, batch_size=16, progress=False)
    assert len(rows) == 2 * 2 * 2  # sizes x (plain, control) x two evaluations
    assert {r["size"] for r in rows} == {"tiny", "wide"} and {r["control"] for r in rows} == {False, True}
    assert "entropy_1" in rows[-1] and "entropy_1" not in rows[0]
    plot_collapse(rows, tmp_path / "collapse.png")
    assert (tmp_path / "collapse.png").stat().st_size > 1000


def test_the_study_command_refuses_a_bad_budget(capsys):
    from labkit.rl.tql import main

    with pytest.raises(SystemExit):
        main(["--steps", "0"])
    assert "--steps must be >= 1, got 0" in capsys.readouterr().err
