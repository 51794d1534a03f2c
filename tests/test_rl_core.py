"""Tests of the shared RL core (labkit.rl): returns, replay, critics, actor, chunk wrapper."""

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import labkit  # noqa: F401  (before anything imports mujoco: picks the GL backend, registers tasks)
from labkit.rl import (
    ChunkWrapper,
    MixedSampler,
    QEnsemble,
    ReplayBuffer,
    TanhGaussianActor,
    Temperature,
    chunk_return,
    mean_minus_std,
    min_of_random_subset,
    nstep_batch,
    nstep_returns,
    polyak_update,
    target_copy,
    transition_fields,
)

# ---- returns -------------------------------------------------------------------------------------


def test_nstep_returns_by_hand():
    # 8 steps, gamma 0.5, n 3; a terminal at step 2 and a time-limit truncation at step 4.
    r = torch.arange(1.0, 9.0)
    term = torch.zeros(8, dtype=torch.bool)
    trunc = torch.zeros(8, dtype=torch.bool)
    term[2], trunc[4] = True, True
    out = nstep_returns(r, term, trunc, gamma=0.5, n=3)
    expected = {  # t: (return, discount, last, steps)
        0: (1 + 0.5 * 2 + 0.25 * 3, 0.0, 2, 3),  # reaches the terminal: no bootstrap
        1: (2 + 0.5 * 3, 0.0, 2, 2),
        2: (3, 0.0, 2, 1),
        3: (4 + 0.5 * 5, 0.25, 4, 2),  # stops at the truncation but still bootstraps
        4: (5, 0.5, 4, 1),
        5: (6 + 0.5 * 7 + 0.25 * 8, 0.125, 7, 3),  # a full window
        6: (7 + 0.5 * 8, 0.25, 7, 2),  # the segment ends: bootstrap from what was seen
        7: (8, 0.5, 7, 1),
    }
    for t, (g, d, last, steps) in expected.items():
        assert out.returns[t].item() == pytest.approx(g), t
        assert out.discount[t].item() == pytest.approx(d), t
        assert out.last[t].item() == last and out.steps[t].item() == steps, t

    # [T, B]: each column is computed as if alone.
    term2 = torch.zeros(8, dtype=torch.bool)
    term2[5] = True
    both = nstep_returns(torch.stack([r, -r], 1), torch.stack([term, term2], 1), torch.stack([trunc, trunc * 0], 1),
                         0.5, 3)
    alone = nstep_returns(-r, term2, torch.zeros(8, dtype=torch.bool), 0.5, 3)
    torch.testing.assert_close(both.returns[:, 0], out.returns)
    torch.testing.assert_close(both.returns[:, 1], alone.returns)
    torch.testing.assert_close(both.discount[:, 1], alone.discount)
    assert alone.discount[3].item() == 0 and alone.discount[6].item() == pytest.approx(0.25)


def test_nstep_batch_gathers_next_obs_at_the_window_end():
    T = 5
    traj = {"obs": {"state": torch.arange(T).float()[:, None]}, "action": torch.zeros(T, 2),
            "reward": torch.ones(T), "next_obs": {"state": torch.arange(1, T + 1).float()[:, None]},
            "terminated": torch.tensor([0, 1, 0, 0, 0]).bool(), "truncated": torch.zeros(T).bool()}
    b = nstep_batch(traj, gamma=0.9, n=2)
    # t=0 stops at the terminal at 1; t=2 sums 2,3 -> next obs is s_4; t=4 hits the segment end.
    assert b["next_obs"]["state"][:, 0].tolist() == [2.0, 2.0, 4.0, 5.0, 5.0]
    assert b["reward"].tolist() == pytest.approx([1.9, 1.0, 1.9, 1.9, 1.0])
    assert b["discount"].tolist() == pytest.approx([0.0, 0.0, 0.81, 0.81, 0.9])
    buf = ReplayBuffer(10, transition_fields({"state": (1,)}, 2))
    buf.add(b)  # the output fits the standard fields
    assert len(buf) == T


def test_chunk_return():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 99.0], [1.0, 1.0, 1.0, 1.0]])  # 99 was never executed
    steps, term = torch.tensor([3, 4]), torch.tensor([True, False])
    ret, disc = chunk_return(rewards, steps, term, gamma=0.9)
    assert ret.tolist() == pytest.approx([6.0, 4.0])
    assert disc.tolist() == pytest.approx([0.0, 0.9**4])
    ret, _ = chunk_return(rewards, steps, term, gamma=0.9, discount_within=True)
    assert ret.tolist() == pytest.approx([1 + 0.9 * 2 + 0.81 * 3, 1 + 0.9 + 0.81 + 0.729])
    # Discounting within the chunk makes it the step-level n-step return.
    r = rewards[1]
    n = nstep_returns(r, torch.zeros(4).bool(), torch.zeros(4).bool(), 0.9, 4)
    assert n.returns[0].item() == pytest.approx(ret[1].item()) and n.discount[0].item() == pytest.approx(disc[1].item())


# ---- replay --------------------------------------------------------------------------------------


def _batch(values, obs_dim=3):
    v = torch.as_tensor(values, dtype=torch.float32)
    obs = {"state": v[:, None].repeat(1, obs_dim), "proprio": v[:, None]}
    return {"obs": obs, "action": v[:, None].repeat(1, 2), "reward": v, "next_obs": obs, "discount": v}


def _buffer(capacity):
    return ReplayBuffer(capacity, transition_fields({"state": (3,), "proprio": (1,)}, 2))


def test_buffer_ring_overwrites_the_oldest():
    buf = _buffer(5)
    buf.add(_batch([0, 1, 2]))
    buf.add(_batch([3, 4, 5, 6]))
    assert len(buf) == 5 and buf.ptr == 2
    # Slot i holds transition i mod 5: 5 and 6 overwrote 0 and 1.
    assert buf.storage["reward"].tolist() == [5, 6, 2, 3, 4]
    assert buf.storage["obs"]["state"][:, 0].tolist() == [5, 6, 2, 3, 4]
    buf.add(_batch(list(range(10, 22))))  # larger than the buffer: its newest 5 survive
    assert sorted(buf.storage["reward"].tolist()) == [17, 18, 19, 20, 21]
    s = buf.sample(64, torch.Generator().manual_seed(0))
    assert s["obs"]["state"].shape == (64, 3) and s["action"].shape == (64, 2)
    assert set(s["reward"].tolist()) <= {17.0, 18.0, 19.0, 20.0, 21.0}
    torch.testing.assert_close(s["obs"]["proprio"][:, 0], s["reward"])  # rows stay aligned
    again = buf.sample(64, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again["reward"], s["reward"])  # seeded


def test_buffer_state_round_trip_keeps_the_ring():
    buf = _buffer(5)
    buf.add(_batch([0, 1, 2, 3, 4, 5, 6]))  # wrapped: slots hold [5, 6, 2, 3, 4], next write at 2
    other = _buffer(5)
    other.load_state_dict(buf.state_dict())
    assert (len(other), other.ptr) == (5, 2)
    assert other.storage["reward"].tolist() == [5, 6, 2, 3, 4]
    torch.testing.assert_close(other.storage["obs"]["state"], buf.storage["obs"]["state"])
    other.add(_batch([7]))  # continues where the saved one would have
    assert other.storage["reward"].tolist() == [5, 6, 7, 3, 4]

    part = _buffer(5)
    part.add(_batch([9, 8]))
    state = part.state_dict()
    assert state["data"]["reward"].shape == (2,)  # only the filled slots are saved
    fresh = _buffer(5)
    fresh.load_state_dict(state)
    assert fresh.storage["reward"][:2].tolist() == [9, 8] and len(fresh) == 2
    with pytest.raises(ValueError, match="capacity 5"):
        _buffer(6).load_state_dict(state)
    wrong = ReplayBuffer(5, transition_fields({"state": (4,), "proprio": (1,)}, 2))
    with pytest.raises(ValueError, match="obs\\['state'\\]"):
        wrong.load_state_dict(state)


def test_buffer_errors():
    buf = _buffer(4)
    with pytest.raises(RuntimeError, match="empty"):
        buf.sample(2)
    bad = _batch([0, 1])
    bad["action"] = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="action"):
        buf.add(bad)
    bad = _batch([0, 1])
    bad["obs"]["state"] = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="obs\\['state'\\]"):
        buf.add(bad)
    bad = _batch([0, 1])
    del bad["discount"]
    with pytest.raises(KeyError, match="discount"):
        buf.add(bad)
    bad = _batch([0, 1])
    bad["reward"] = torch.zeros(3)
    with pytest.raises(ValueError, match="batch size"):
        buf.add(bad)
    assert len(buf) == 0  # nothing half-written


@pytest.mark.parametrize("ratio,n", [(0.5, 256), (0.5, 7), (0.25, 10), (1.0, 9), (0.0, 9)])
def test_mixed_sampler_ratio_is_exact(ratio, n):
    offline, online = _buffer(50), _buffer(50)
    offline.add(_batch(np.zeros(20)))  # offline transitions have reward 0, online reward 1
    online.add(_batch(np.ones(30)))
    mix = MixedSampler(offline, online, ratio)
    s = mix.sample(n, torch.Generator().manual_seed(1))
    assert s["reward"].shape == (n,)
    assert int((s["reward"] == 0).sum()) == round(ratio * n)
    assert s["obs"]["state"].shape == (n, 3)


def test_mixed_sampler_errors():
    offline, online = _buffer(5), _buffer(5)
    offline.add(_batch([0.0]))
    with pytest.raises(RuntimeError, match="online buffer is empty"):
        MixedSampler(offline, online).sample(4)
    assert MixedSampler(offline, online, ratio=1.0).sample(4)["reward"].shape == (4,)
    with pytest.raises(ValueError, match="same fields"):
        MixedSampler(offline, ReplayBuffer(5, transition_fields((3,), 2)))


# ---- critics -------------------------------------------------------------------------------------


def test_ensemble_matches_member_by_member():
    torch.manual_seed(0)
    q = QEnsemble(4, 2, hidden=(8, 8), ensemble=3)
    obs, act = torch.randn(5, 4), torch.randn(5, 2)
    out = q(obs, act)
    assert out.shape == (3, 5)
    lin = [m for m in q.net if type(m).__name__ == "EnsembleLinear"]
    lns = [m for m in q.net if type(m).__name__ == "EnsembleLayerNorm"]
    assert len(lin) == 3 and len(lns) == 2
    for e in range(3):  # the same MLP written out for member e alone
        x = torch.cat([obs, act], -1)
        for i in range(2):
            x = x @ lin[i].weight[e] + lin[i].bias[e]
            x = F.layer_norm(x, (8,), lns[i].weight[e, 0], lns[i].bias[e, 0]).relu()
        torch.testing.assert_close(out[e], (x @ lin[2].weight[e] + lin[2].bias[e]).squeeze(-1))
    assert not torch.allclose(out[0], out[1])  # members are initialised independently
    with pytest.raises(ValueError, match="critic expects"):
        q(obs, torch.randn(5, 3))


def test_min_of_random_pair_and_mean_minus_std():
    q = torch.randn(10, 32, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    pairs = set()
    for _ in range(50):
        v, members = min_of_random_subset(q, 2, g)
        assert members.shape == (2,) and members[0] != members[1]
        torch.testing.assert_close(v, torch.minimum(q[members[0]], q[members[1]]))
        pairs.add(tuple(sorted(members.tolist())))
    assert len(pairs) > 10  # the pair really is random
    v, _ = min_of_random_subset(q[:2], 2, g)  # E == 2: clipped double-Q
    torch.testing.assert_close(v, q[:2].min(0).values)
    with pytest.raises(ValueError, match="subset size"):
        min_of_random_subset(q[:1], 2)

    mean = q.sum(0) / 10
    std = ((q - mean).pow(2).sum(0) / 9).sqrt()
    torch.testing.assert_close(mean_minus_std(q, rho=0.7), mean - 0.7 * std)


def test_polyak_update():
    torch.manual_seed(0)
    src = QEnsemble(3, 1, hidden=(4,), ensemble=2)
    tgt = target_copy(src)
    assert all(not p.requires_grad for p in tgt.parameters())
    before = [p.clone() for p in tgt.parameters()]
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))
    polyak_update(tgt, src, tau=0.1)
    for b, t, s in zip(before, tgt.parameters(), src.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)
    polyak_update(tgt, src, tau=1.0)
    for t, s in zip(tgt.parameters(), src.parameters(), strict=True):
        torch.testing.assert_close(t, s)


def test_td_fits_a_known_q():
    """One state, actions in [-1, 1], reward 1 - a^2, next action always 0, gamma 0.9:
    Q(a) = 1 - a^2 + gamma * Q(0) = 1 - a^2 + 0.9 / 0.1 = 10 - a^2."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    gamma = 0.9
    q = QEnsemble(1, 1, hidden=(64, 64), ensemble=4)
    tgt = target_copy(q)
    opt = torch.optim.Adam(q.parameters(), lr=3e-3)
    s = torch.zeros(128, 1)
    losses = []
    for _ in range(600):
        a = torch.rand(128, 1, generator=g) * 2 - 1
        with torch.no_grad():
            next_q, _ = min_of_random_subset(tgt(s, torch.zeros(128, 1)), 2, g)
            y = (1 - a.squeeze(-1) ** 2) + gamma * next_q
        loss = (q(s, a) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        polyak_update(tgt, q, tau=0.1)
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert np.mean(losses[-50:]) < 0.01 * np.mean(losses[:10])
    a = torch.linspace(-1, 1, 9)[:, None]
    pred = q(torch.zeros(9, 1), a).mean(0)
    assert (pred - (10 - a.squeeze(-1) ** 2)).abs().max() < 0.25  # from ~10 at initialisation


# ---- actor ---------------------------------------------------------------------------------------


def test_tanh_gaussian_log_prob_is_the_change_of_variables():
    torch.manual_seed(0)
    low, high = torch.tensor([-2.0, 0.0, -0.1]), torch.tensor([2.0, 1.0, 0.1])
    actor = TanhGaussianActor.for_box(5, low, high, hidden=(16,))
    x = torch.randn(64, 5)
    mu, std = actor.distribution(x)
    torch.manual_seed(1)
    a, logp = actor(x)
    torch.manual_seed(1)
    u = mu + std * torch.randn_like(mu)  # the same draw
    scale, centre = (high - low) / 2, (high + low) / 2
    torch.testing.assert_close(a, centre + scale * torch.tanh(u))
    # log pi(a) = log N(u) - log |da/du|, with da/du = scale * (1 - tanh(u)^2), per dimension.
    direct = (torch.distributions.Normal(mu, std).log_prob(u) - torch.log(scale * (1 - torch.tanh(u) ** 2))).sum(-1)
    torch.testing.assert_close(logp, direct, rtol=1e-4, atol=1e-4)
    # An independent reference: torch's own transformed distribution.
    ref = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mu, std),
        [torch.distributions.TanhTransform(), torch.distributions.AffineTransform(centre, scale)])
    torch.testing.assert_close(logp, ref.log_prob(a).sum(-1), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(actor.log_prob(x, a), logp, rtol=1e-3, atol=1e-3)  # stored actions

    big = 1e3 * torch.randn(256, 5)  # saturating inputs: still inside the box, finite log-probs
    a, logp = actor(big)
    assert torch.all(a >= low) and torch.all(a <= high) and torch.isfinite(logp).all()
    a, none = actor(big, deterministic=True)
    assert none is None and torch.all(a >= low) and torch.all(a <= high)


def test_actor_zero_init_and_scale():
    torch.manual_seed(0)
    res = TanhGaussianActor(4, 3, hidden=(16, 16), scale=0.1, zero_init=True, layer_norm=True)
    x = torch.randn(8, 4)
    a, _ = res(x, deterministic=True)
    assert torch.equal(a, torch.zeros(8, 3))  # a zero residual at initialisation
    a, logp = res(x)
    assert a.abs().max() < 0.1 and torch.isfinite(logp).all()
    (-a.sum()).backward()  # gradients reach the zero-initialised head
    assert res.mean.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="actor expects"):
        res(torch.randn(8, 5))


def test_temperature_moves_toward_target_entropy():
    temp = Temperature(target_entropy=-2.0, init=1.0)
    temp.loss(torch.full((10,), 5.0)).backward()  # entropy -5 < target -2: alpha must rise
    assert temp.log_alpha.grad.item() < 0


# ---- chunk wrapper -------------------------------------------------------------------------------


def test_chunk_wrapper_matches_stepping_one_by_one():
    H, k = 4, 3
    env = ChunkWrapper(gym.make("labkit/Detour-v0", reward_type="dense"), horizon=H, execute=k)
    ref = gym.make("labkit/Detour-v0", reward_type="dense")
    assert env.action_space.shape == (H * 2,)
    obs, _ = env.reset(seed=3)
    ref_obs, _ = ref.reset(seed=3)
    rng = np.random.default_rng(0)
    for _ in range(5):
        chunk = rng.uniform(-0.5, 0.5, (H, 2)).astype(np.float32)
        obs, r, term, trunc, info = env.step(chunk.ravel())
        total = 0.0
        for a in chunk[:k]:
            ref_obs, rr, _, _, _ = ref.step(a)
            total += rr
        assert r == pytest.approx(total) and r < 0
        assert info["chunk_steps"] == k and len(info["chunk_rewards"]) == k
        np.testing.assert_array_equal(obs["state"], ref_obs["state"])
    with pytest.raises(ValueError, match="chunk action"):
        env.step(np.zeros(5))


def test_chunk_wrapper_stops_when_the_episode_ends():
    # Drive straight up into the wall: a collision terminates the episode mid-chunk.
    ref = gym.make("labkit/Detour-v0")
    ref.reset(seed=0)
    up = np.array([0.0, 0.5], np.float32)
    t_end = next(t for t in range(1, 100) if ref.step(up)[2])
    k = 5 if t_end % 5 else 6
    env = ChunkWrapper(gym.make("labkit/Detour-v0"), horizon=k)
    env.reset(seed=0)
    steps, term = [], False
    while not term:
        _, r, term, trunc, info = env.step(np.tile(up, k))
        steps.append(info["chunk_steps"])
    assert sum(steps) == t_end and steps[-1] == t_end % k < k
    assert info["collision"] and not info["is_success"] and r == 0.0

    # A time limit inside a chunk: truncation, counted steps.
    env = ChunkWrapper(gym.make("labkit/Detour-v0", max_episode_steps=10), horizon=4)
    env.reset(seed=0)
    out = [env.step(np.zeros(8)) for _ in range(3)]
    assert [o[4]["chunk_steps"] for o in out] == [4, 4, 2]
    assert [o[3] for o in out] == [False, False, True] and not out[-1][2]
