"""Tests of the contrastive chunk verifier (labkit.rewards.verifier) and its use in best-of-N."""

import math

import numpy as np
import pytest
import torch

import labkit  # noqa: F401  (before anything imports mujoco: picks the GL backend, registers tasks)
import labkit.data
from labkit.data import load_dataset
from labkit.eval import evaluate
from labkit.rewards.verifier import (
    ChunkVerifier,
    VerifierConfig,
    cosine_score,
    failed_chunks,
    fit_verifier,
    info_nce,
    perturb_chunks,
    random_perturbations,
    ranking_accuracy,
    shift_chunks,
    verifier_data,
)
from labkit.rl.best_of_n import BestOfN, critic_action, critic_obs, sample_chunks

ENV = "labkit/Detour-v0"


# ---- the score and the loss, by hand ---------------------------------------------------------------------

def test_cosine_score_by_hand():
    ex = torch.tensor([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    ea = torch.tensor([[5.0, 0.0], [-3.0, -4.0], [1.0, -1.0]])
    got = cosine_score(ex, ea, torch.tensor(math.log(1 / 0.07)))
    np.testing.assert_allclose(got, [1 / 0.07, -1 / 0.07, 0.0], atol=1e-4)


def test_info_nce_by_hand():
    e = torch.eye(2)
    # Without hard negatives: each row and column has the positive (cos 1) and one cos-0 negative.
    plain = -math.log(math.e / (math.e + 1))
    assert info_nce(e, e, torch.tensor(0.0)).item() == pytest.approx(plain, abs=1e-6)
    # Row 0 gets a hard negative equal to its positive; row 1's slot is masked off (no effect).
    hard = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    mask = torch.tensor([[True], [False]])
    row0 = -math.log(math.e / (2 * math.e + 1))
    want = 0.5 * ((row0 + plain) / 2 + plain)
    assert info_nce(e, e, torch.tensor(0.0), hard, mask).item() == pytest.approx(want, abs=1e-6)
    # Temperature: logit_scale = ln 10 multiplies every cosine by 10.
    sharp = -math.log(math.exp(10) / (math.exp(10) + 1))
    assert info_nce(e, e, torch.tensor(math.log(10.0))).item() == pytest.approx(sharp, abs=1e-6)
    with pytest.raises(ValueError, match="hard negatives"):
        info_nce(e, e, torch.tensor(0.0), torch.zeros(2, 3))


def test_verifier_is_an_ensemble_of_one():
    v = ChunkVerifier(6, 8, VerifierConfig(hidden=16, layers=1, embed_dim=4))
    x, a = torch.randn(5, 6), torch.randn(5, 8)
    out = v(x, a)
    assert out.shape == (1, 5)
    np.testing.assert_allclose(out[0].detach(), v.score(x, a).detach())
    # |s| <= exp(logit_scale): a cosine times the scale.
    assert out.abs().max() <= v.logit_scale.exp() + 1e-5
    with pytest.raises(ValueError, match="verifier expects"):
        v(torch.randn(5, 7), a)
    with pytest.raises(ValueError, match="unknown perturbations"):
        VerifierConfig(perturbations=("wiggle",))


# ---- negatives -------------------------------------------------------------------------------------------

def test_perturbations_by_hand():
    c = torch.arange(16.0).view(2, 4, 2) / 16
    np.testing.assert_array_equal(shift_chunks(c, 1)[0], c[0, [1, 2, 3, 3]])
    np.testing.assert_array_equal(shift_chunks(c, torch.tensor([0, 3]))[1], c[1, [3, 3, 3, 3]])
    m = perturb_chunks(c, "mirror", mirror_dim=0)
    np.testing.assert_array_equal(m[..., 0], -c[..., 0])
    np.testing.assert_array_equal(m[..., 1], c[..., 1])
    gen = torch.Generator().manual_seed(0)
    s = perturb_chunks(torch.full((200, 4, 2), 0.3), "speed", gen)
    factor = s[:, 0, 0] / 0.3
    assert torch.all(((factor >= 0.3) & (factor <= 0.6)) | ((factor >= 1.5) & (factor <= 2.0)))
    assert s.max() <= 1.0  # clipped to the normalised range
    n = perturb_chunks(torch.zeros(500, 4, 2), "noise", gen, noise=0.3)
    assert n.std().item() == pytest.approx(0.3, rel=0.1)
    shifted = perturb_chunks(c, "shift", gen)
    assert torch.equal(shifted[:, -1], c[:, -1])  # a shift keeps the last action
    assert random_perturbations(c, 5, ("mirror", "shift"), gen).shape == (2, 5, 4, 2)
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb_chunks(c, "wiggle")


def test_failed_chunks_picks_the_failing_ends():
    # Three episodes: success (returns > 0), failure of 3 chunks, failure of 1 chunk.
    ret = torch.tensor([0.8, 0.9, 1.0, 0.0, 0.0, 0.0, 0.0])
    disc = torch.tensor([0.9, 0.9, 0.0, 0.9, 0.9, 0.0, 0.0])
    data = {"obs": {"observation.state": torch.arange(7.0)[:, None, None]}, "chunk": torch.arange(7.0)[:, None],
            "return": ret, "discount": disc}
    assert failed_chunks(data)["chunk"].flatten().tolist() == [5.0, 6.0]
    # last=2: also the chunk before each failing end, but never one from the successful episode.
    assert failed_chunks(data, last=2)["chunk"].flatten().tolist() == [4.0, 5.0, 6.0]
    with pytest.raises(KeyError, match="collect_chunks"):
        failed_chunks({"obs": {}, "chunk": torch.zeros(1)})


# ---- training and use ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(base_policy, demos):
    more = load_dataset(labkit.data.DATASETS / "detour").select(range(40))
    cfg = VerifierConfig(hidden=64, embed_dim=32, steps=300, batch_size=128, seed=0)
    return fit_verifier(base_policy, more, cfg)


def test_verifier_training_ranks_held_out_demos_above_perturbations(base_policy, trained):
    verifier, losses = trained
    assert np.isfinite(losses).all()
    assert np.mean(losses[-30:]) < np.mean(losses[:10]) - 0.5  # the contrastive loss falls
    held = verifier_data(base_policy, load_dataset(labkit.data.DATASETS / "detour").select(range(190, 200)))
    E = base_policy.config.n_action_steps
    pos = critic_action(held["chunk"], E)
    gen = torch.Generator().manual_seed(1)
    acc = {k: ranking_accuracy(verifier, held["x"], pos, critic_action(perturb_chunks(held["chunk"], k, gen), E))
           for k in ("noise", "mirror", "speed")}
    # Measured 0.90 / 0.96 / 0.97 on these 10 unseen episodes; 0.5 is chance.
    assert min(acc.values()) > 0.8, acc


def test_failed_chunks_as_hard_negatives_are_learned(base_policy):
    demos = load_dataset(labkit.data.DATASETS / "detour").select(range(6))
    held = verifier_data(base_policy, demos)
    # Fake "failures": each demo chunk with its y velocity raised by 0.3 (normalised), at the demo's own
    # state. In-batch negatives alone separate these only partly; given as failures, they are rejected.
    bad = held["chunk"].clone()
    bad[..., 1] += 0.3
    failed = {"obs": {k: torch.as_tensor(v).float()
                      for k, v in demos.windows(2, 8, base_policy.config.obs_keys)["obs"].items()},
              "chunk": bad.flatten(1)}
    E = base_policy.config.n_action_steps
    pos, neg = critic_action(held["chunk"], E), critic_action(bad, E)
    acc, gap = {}, {}
    for use in (False, True):
        cfg = VerifierConfig(hidden=64, embed_dim=32, steps=600, batch_size=64, perturbations=(), failed_fraction=0.5)
        v, _ = fit_verifier(base_policy, demos, cfg, failed=failed if use else None)
        acc[use] = ranking_accuracy(v, held["x"], pos, neg)
        with torch.no_grad():
            gap[use] = float((v.score(held["x"], pos) - v.score(held["x"], neg)).mean())
    # Measured: accuracy 0.89 -> 0.98, mean score gap 3.3 -> 4.4.
    assert acc[True] > acc[False] + 0.05 and acc[True] > 0.95, acc
    assert gap[True] > gap[False], gap


def test_best_of_n_with_the_verifier_picks_its_argmax(base_policy, demos, trained):
    verifier, _ = trained
    w = demos.windows(obs_horizon=2, horizon=8, keys=base_policy.config.obs_keys)
    hist = {k: torch.as_tensor(v[[0, 7, 15, 30]]) for k, v in w["obs"].items()}
    bon = BestOfN(base_policy, verifier, n=16)
    torch.manual_seed(3)
    got = bon.predict_action_chunk(hist)
    torch.manual_seed(3)
    obs = base_policy.normalize_obs(hist)
    chunks = sample_chunks(base_policy, obs, 16)
    x = critic_obs(base_policy, obs)
    with torch.no_grad():
        s = verifier.score(x.repeat_interleave(16, 0), critic_action(chunks, 4).flatten(0, 1)).view(4, 16)
    np.testing.assert_array_equal(bon.last_index.numpy(), s.argmax(1).numpy())
    np.testing.assert_allclose(bon.last_scores.numpy(), s.numpy(), atol=1e-5)
    want = base_policy.normalizer.unnormalize("action", chunks[torch.arange(4), s.argmax(1)])
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert evaluate(bon, ENV, episodes=2, seed=0, progress=False).episodes == 2


def test_fit_verifier_trains_with_a_handed_in_step(base_policy):
    """`training_step=` replaces the loss of a batch: the same step written out trains bit-identically to the
    default, and a wrong one (hard negatives dropped, the mirror then goes unlearned) changes the verifier."""
    from labkit.rewards.verifier import verifier_loss

    demos = load_dataset(labkit.data.DATASETS / "detour").select(range(10))
    cfg = VerifierConfig(hidden=32, embed_dim=16, steps=200, batch_size=64, seed=0)
    calls = []

    def written_out(verifier, x, a, hard, mask):
        calls.append(hard.shape)
        e_hard = verifier.h(hard.flatten(0, 1)).view(len(x), hard.shape[1], -1)
        return info_nce(verifier.g(x), verifier.h(a), verifier.logit_scale, e_hard, mask)

    def no_hard_negatives(verifier, x, a, hard, mask):
        return info_nce(verifier.g(x), verifier.h(a), verifier.logit_scale)

    v0, l0 = fit_verifier(base_policy, demos, cfg)
    v1, l1 = fit_verifier(base_policy, demos, cfg, training_step=written_out)
    v2, l2 = fit_verifier(base_policy, demos, cfg, training_step=no_hard_negatives)
    assert len(calls) == cfg.steps and calls[0] == (64, cfg.negatives, 8)  # [B, K, d]: 4 executed steps x 2
    assert l1 == l0 and all(torch.equal(p, q) for p, q in zip(v0.parameters(), v1.parameters(), strict=True))
    held = verifier_data(base_policy, load_dataset(labkit.data.DATASETS / "detour").select(range(190, 200)))
    pos = critic_action(held["chunk"], 4)

    def accuracy(v):  # against noise and speed perturbations of held-out demo chunks
        gen = torch.Generator().manual_seed(1)
        return np.mean([ranking_accuracy(v, held["x"], pos, critic_action(perturb_chunks(held["chunk"], k, gen), 4))
                        for k in ("noise", "speed")])

    # Measured 0.81 with the hard negatives, 0.76 without: the wrong step trains a worse verifier.
    assert l2 != l0 and accuracy(v2) < accuracy(v0) - 0.02
    x, a = torch.randn(5, v0.obs_dim), torch.randn(5, 3, v0.action_dim)
    hard, mask = torch.randn(5, 3, v0.action_dim), torch.rand(5, 3) < 0.5
    assert torch.equal(verifier_loss(v0, x, a[:, 0], hard, mask), written_out(v0, x, a[:, 0], hard, mask))
