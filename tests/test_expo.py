"""Tests of best-of-N with a critic (labkit.rl.best_of_n) and EXPO (labkit.rl.expo)."""

import numpy as np
import pytest
import torch

import labkit  # noqa: F401  (before anything imports mujoco: picks the GL backend, registers tasks)
from labkit.eval import evaluate
from labkit.rl.best_of_n import (
    BestOfN,
    best_of,
    collect_chunks,
    critic_action,
    dataset_chunks,
    fit_chunk_critic,
    sample_chunks,
    score_candidates,
)
from labkit.rl.expo import EXPO, EXPOConfig

ENV = "labkit/Detour-v0"
GAMMA = 0.9


def copy_of(policy):
    """A fresh copy of the base (EXPO trains its base in place)."""
    new = type(policy)(policy.config, policy.shapes, policy.stats)
    new.load_state_dict(policy.state_dict())
    return new.eval()


def histories(policy, demos, idx):
    w = demos.windows(obs_horizon=2, horizon=8, keys=policy.config.obs_keys)
    return {k: torch.as_tensor(v[idx]) for k, v in w["obs"].items()}


class TargetCritic(torch.nn.Module):
    """A hand-made 2-member 'critic': minus the squared distance of the action to a target (+ offsets)."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.target = target

    def forward(self, x, a):
        d = -(a - self.target).pow(2).sum(-1)
        return torch.stack([d, d + 0.1])


# ---- best-of-N -----------------------------------------------------------------------------------------

def test_score_reductions_by_hand():
    class Fixed(torch.nn.Module):
        def forward(self, x, a):  # member i scores candidate value v as (i + 1) * v - i
            v = a[:, 0]
            return torch.stack([v, 2 * v - 1, 3 * v - 2])

    cand = torch.tensor([[[0.0], [1.0], [2.0]]])  # one observation, three candidates
    x = torch.zeros(1, 3)
    np.testing.assert_allclose(score_candidates(Fixed(), x, cand, "mean"), [[-1.0, 1.0, 3.0]])
    np.testing.assert_allclose(score_candidates(Fixed(), x, cand, "min"), [[-2.0, 1.0, 2.0]])
    best, idx, _ = best_of(Fixed(), x, -cand, "min")  # negated: member 3 is lowest, picks candidate 0
    assert idx.item() == 0 and best.item() == 0.0
    # Identical candidates: the first wins (beta = 0 means edits never beat their own base sample).
    assert best_of(Fixed(), x, torch.ones(1, 4, 1))[1].item() == 0
    with pytest.raises(ValueError, match="reduce"):
        score_candidates(Fixed(), x, cand, "max")


def test_best_of_n_picks_the_argmax(base_policy, demos):
    hist = histories(base_policy, demos, [0, 5, 20, 40])
    target = torch.full((8,), 0.3)  # the executed part: 4 steps x 2 dims
    bon = BestOfN(base_policy, TargetCritic(target), n=16)
    torch.manual_seed(3)
    got = bon.predict_action_chunk(hist)
    # Redraw the same 16 samples and score them by hand.
    torch.manual_seed(3)
    obs = base_policy.normalize_obs(hist)
    chunks = sample_chunks(base_policy, obs, 16)
    scores = -(critic_action(chunks, 4) - target).pow(2).sum(-1) + 0.05  # mean of the two members
    want_idx = scores.argmax(1)
    np.testing.assert_array_equal(bon.last_index.numpy(), want_idx.numpy())
    np.testing.assert_allclose(bon.last_scores.numpy(), scores.numpy(), atol=1e-5)
    want = base_policy.normalizer.unnormalize("action", chunks[torch.arange(4), want_idx])
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert len(set(want_idx.tolist())) > 1  # not a degenerate pick
    # n = 1 is the base policy itself (same noise, same chunk).
    torch.manual_seed(4)
    one = BestOfN(base_policy, TargetCritic(target), n=1).predict_action_chunk(hist)
    torch.manual_seed(4)
    np.testing.assert_array_equal(one.numpy(), base_policy.predict_action_chunk(hist).numpy())
    # The runtime contract: evaluate runs it.
    result = evaluate(bon, ENV, episodes=2, seed=0, progress=False)
    assert result.episodes == 2


def test_dataset_chunks_by_hand(base_policy, demos):
    data = dataset_chunks(demos, base_policy, GAMMA, max_episode_steps=100)
    N = len(demos)
    assert data["action"].shape == (N, 8) and data["chunk"].shape == (N, 16)
    L = int(demos.lengths[0])
    assert demos.episode(0)["next.success"][-1]
    # From the last frame: 1 step, reward 1, terminal. From L-5: 4 steps, no reward, bootstrap gamma^4.
    assert data["reward"][L - 1] == 1 and data["discount"][L - 1] == 0 and data["return"][L - 1] == 1
    assert data["reward"][L - 3] == 1 and data["discount"][L - 3] == 0  # 2 steps left, the last succeeds
    assert data["reward"][L - 5] == 0 and data["discount"][L - 5] == pytest.approx(GAMMA**4)
    assert data["return"][L - 5] == pytest.approx(GAMMA**4)
    assert data["return"][L - 9] == pytest.approx(GAMMA**8)
    np.testing.assert_array_equal(data["next_obs"]["observation.state"][L - 5], data["obs"]["observation.state"][L - 1])
    # The executed part is the first 4 steps of the normalised chunk.
    np.testing.assert_array_equal(data["action"], data["chunk"][:, :8])


def test_fit_chunk_critic_on_rollouts(base_policy):
    torch.manual_seed(0)
    data = collect_chunks(base_policy, ENV, episodes=6, seed=0, gamma=GAMMA)
    assert len(data["success"]) == 6 and data["action"].shape[1] == 8
    ended = data["discount"] == 0
    assert torch.all(data["return"][ended] == data["reward"][ended])  # no bootstrap past a terminal
    critic, losses = fit_chunk_critic(base_policy, data, steps=300, hidden=(64, 64), batch_size=64)
    assert np.isfinite(losses).all()
    assert np.mean(losses[-30:]) < 0.5 * np.mean(losses[:10])


# ---- EXPO ----------------------------------------------------------------------------------------------

def small_config(**kw) -> EXPOConfig:
    return EXPOConfig(**{**dict(n_samples=4, n_edits=4, beta=0.1, hidden=(64, 64), batch_size=32, utd=1,
                                warmup_steps=60, critic_warmup=20, gamma=GAMMA, seed=0), **kw})


def test_beta_zero_is_best_of_n_with_the_target_critic(base_policy, demos):
    agent = EXPO(copy_of(base_policy), ENV, small_config(beta=0.0), demos=demos)
    assert agent.edit is None
    hist = histories(agent.policy, demos, [0, 7, 30])
    bon = BestOfN(agent.policy, agent.critic_target, n=4, reduce=2)
    torch.manual_seed(1)
    want = bon.predict_action_chunk(hist)
    torch.manual_seed(1)
    got = agent.on_the_fly_policy().predict_action_chunk(hist)
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    agent.train(150, eval_every=None, eval_episodes=0, progress=False)
    assert all(r["edit_win"] == 0 for r in agent.log)


def test_edits_stay_within_beta(base_policy, demos):
    agent = EXPO(copy_of(base_policy), ENV, small_config(beta=0.2, n_samples=3, n_edits=2), demos=demos)
    obs = agent.policy.normalize_obs(histories(agent.policy, demos, list(range(0, 60, 6))))
    torch.manual_seed(2)
    chunk, won = agent.on_the_fly(obs)
    torch.manual_seed(2)
    base = sample_chunks(agent.policy, obs, 3, use_ema=True)  # the same 3 base samples
    # The chosen chunk is one of the base samples, or an edit of sample 0 or 1 within +-beta on its
    # executed steps, with the rest of the chunk untouched.
    gap = (chunk[:, None] - base).abs()  # [B, 3, H, A]
    exact = (gap.flatten(2).amax(-1) == 0).any(1)
    edited = ((gap[:, :2, :4].flatten(2).amax(-1) <= 0.2 + 1e-6) & (gap[:, :2, 4:].flatten(2).amax(-1) == 0)).any(1)
    assert torch.all(exact | (won & edited))
    assert torch.all(exact == ~won)


def test_short_training(base_policy, demos):
    base = copy_of(base_policy)
    before = [p.detach().clone() for p in base.model.parameters()]
    agent = EXPO(base, ENV, small_config(), demos=demos)
    history = agent.train(400, eval_every=200, eval_episodes=2, progress=False)
    assert agent.env_steps >= 400 and len(history) == 3 and history[0]["env_steps"] == 0  # the base, 200, 400
    losses = np.array([r["critic_loss"] for r in agent.log])
    assert np.isfinite(losses).all() and len(losses) > 50
    assert losses[-20:].mean() < 0.5 * losses[:10].mean(), (losses[:10].mean(), losses[-20:].mean())
    for key in ("edit_loss", "bc_loss", "alpha", "edit_win"):
        assert np.isfinite([r[key] for r in agent.log]).all(), key
    assert 0 <= history[-1]["edit_win_acting"] <= 1 and 0 <= history[-1]["success"] <= 1
    # The base trains by imitation (its live weights moved); the critic and the edit policy are finite.
    assert any(not torch.equal(a, b) for a, b in zip(before, base.model.parameters(), strict=True))
    for p in [*agent.critic.parameters(), *agent.edit.parameters()]:
        assert torch.isfinite(p).all()


def test_bad_config(base_policy):
    with pytest.raises(ValueError, match="n_edits"):
        EXPOConfig(n_samples=4, n_edits=5)
    with pytest.raises(ValueError, match="beta"):
        EXPOConfig(beta=-0.1)
    with pytest.raises(ValueError, match="demos="):
        EXPO(base_policy, ENV, small_config())
