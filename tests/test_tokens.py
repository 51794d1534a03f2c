"""FAST-style action tokens and the autoregressive token policy: the DCT is exact and orthonormal, the
quantisation error is bounded by the scale, tokens come low frequency first, a token policy learns both
modes of a bimodal target, runs behind the Policy contract, and bad input gets named errors."""

import gymnasium as gym
import numpy as np
import pytest
import torch

import labkit
from labkit.language import EmbeddingWidthError
from labkit.policies import fit
from labkit.policies.tokens import FastTokenizer, TokenizerError, TokenPolicy, dct_matrix

TOY_SHAPES = {"observation.state": [1], "action": [2]}
TOY_STATS = {"observation.state": {"mean": [0.0], "std": [1.0], "min": [-1.0], "max": [1.0]},
             "action": {"mean": [0.0, 0.0], "std": [1.0, 1.0], "min": [-1.0, -1.0], "max": [1.0, 1.0]}}
TINY = dict(d_model=32, n_heads=2, n_layers=1, dropout=0.0, prefix_tokens=1)


def smooth_chunks(n, horizon=16, dims=2, seed=0):
    """Smooth random chunks in [-1, 1]: a few random sines per dimension (like demonstrations)."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, horizon)[None, :, None]
    amp, freq, phase = (torch.rand(n, 1, dims, 3, generator=gen) for _ in range(3))
    x = (amp * torch.sin(6.28 * (0.5 + 1.5 * freq) * t[..., None] + 6.28 * phase)).sum(-1)
    return x / x.abs().amax(dim=(1, 2), keepdim=True).clamp(min=1.0)


def test_dct_is_orthonormal_and_matches_the_textbook_formula():
    d = dct_matrix(8, torch.float64)
    torch.testing.assert_close(d @ d.T, torch.eye(8, dtype=torch.float64))
    # DCT-II, norm="ortho", written out: C_k = s_k sum_t x_t cos(pi (2t + 1) k / 16)
    x = torch.randn(8, dtype=torch.float64)
    k, t = torch.arange(8.0, dtype=torch.float64)[:, None], torch.arange(8.0, dtype=torch.float64)[None]
    s = torch.full((8, 1), (2 / 8) ** 0.5, dtype=torch.float64)
    s[0] = (1 / 8) ** 0.5
    torch.testing.assert_close(d @ x, (s * torch.cos(torch.pi * (2 * t + 1) * k / 16) * x).sum(1))
    assert abs(float(d[0, 0]) - 8 ** -0.5) < 1e-12  # frequency 0 is the chunk's mean times sqrt(H)


def test_roundtrip_is_exact_without_quantisation_and_bounded_with_it():
    a = smooth_chunks(200)
    tok = FastTokenizer(16, 2, scale=10.0)
    torch.testing.assert_close(tok.inverse(tok.coefficients(a)), a, atol=1e-5, rtol=0)  # the DCT alone: exact
    errors = []
    for scale in (2.0, 10.0, 50.0):
        tok = FastTokenizer(16, 2, scale)
        err = (tok.decode(tok.encode(a)) - a).abs()
        # each coefficient is off by <= 1/(2 scale); through the orthonormal inverse, an entry by <= sqrt(H)/(2 scale)
        assert err.max() <= 16 ** 0.5 / (2 * scale) + 1e-5
        errors.append(float(err.mean()))
    assert errors[0] > 3 * errors[1] > 9 * errors[2]  # finer scale, smaller error (~1/scale)
    assert tok.roundtrip_error(a) == pytest.approx(float((tok.decode(tok.encode(a)) - a).abs().max()))


def test_tokens_are_low_frequency_first_and_in_the_vocabulary():
    tok = FastTokenizer(4, 3, scale=10.0)
    coeffs = torch.zeros(4, 3)
    coeffs[0] = torch.tensor([0.5, -0.3, 0.1])  # frequency 0 of each dimension
    coeffs[2, 1] = 0.2  # frequency 2 of dimension 1
    ids = tok.encode(tok.inverse(coeffs))
    assert ids.shape == (12,) and ids.dtype == torch.long
    assert (ids - tok.max_int).tolist() == [5, -3, 1, 0, 0, 0, 0, 2, 0, 0, 0, 0]
    assert tok.vocab == 2 * tok.max_int + 1 and tok.max_int == 20  # ceil(sqrt(4) * 10)
    extreme = torch.ones(5, 4, 3) * torch.tensor([1.0, -1.0, 1.0])  # a chunk at the edge of [-1, 1]
    e = tok.encode(extreme)
    assert e.min() >= 0 and e.max() < tok.vocab and tok.roundtrip_error(extreme) < 0.05
    # what an end token (or BPE) could save: here everything after the 8th token is zero
    assert tok.nonzero_length(tok.inverse(coeffs)).item() == 8


def test_decode_reads_what_is_valid():
    tok = FastTokenizer(4, 2, scale=10.0)
    a = smooth_chunks(3, horizon=4)
    ids = tok.encode(a)
    torch.testing.assert_close(tok.decode(torch.cat([ids, ids[:, :3]], 1)), tok.decode(ids))  # too long: cut
    short = tok.decode(ids[:, :2])  # too short: missing high frequencies are zero
    torch.testing.assert_close(short, tok.inverse(torch.cat([(ids[:, :2] - tok.max_int).float() / 10,
                                                            torch.zeros(3, 6)], 1).view(3, 4, 2)))
    out_of_range = ids.clone()
    out_of_range[:, 0] = 10_000
    assert torch.isfinite(tok.decode(out_of_range)).all()  # clipped to the vocabulary's edge


def test_bad_tokenizer_input_gets_named_errors():
    tok = FastTokenizer(4, 2)
    with pytest.raises(TokenizerError, match="horizon=4, action_dim=2"):
        tok.encode(torch.zeros(5, 2))
    with pytest.raises(TokenizerError, match="NaN"):
        tok.encode(torch.full((4, 2), float("nan")))
    with pytest.raises(TokenizerError, match="integer ids"):
        tok.decode(torch.zeros(8))
    with pytest.raises(ValueError, match="scale"):
        FastTokenizer(4, 2, scale=0.0)


def toy_chunk(n, gen):
    """Bimodal demonstrations: the whole chunk at (+0.6, +0.6) or at (-0.6, -0.6), with a little noise."""
    side = torch.randint(0, 2, (n, 1, 1), generator=gen).float() * 2 - 1
    return 0.6 * side.expand(n, 4, 2) + 0.03 * torch.randn(n, 4, 2, generator=gen)


def test_token_policy_learns_both_modes_not_their_mean():
    torch.manual_seed(0)
    policy = TokenPolicy({"obs_horizon": 1, "horizon": 4, "n_action_steps": 2, **TINY}, TOY_SHAPES, TOY_STATS)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    gen, losses = torch.Generator().manual_seed(0), []
    obs, pad = {"observation.state": torch.zeros(128, 1, 1)}, torch.zeros(128, 4, dtype=torch.bool)
    for _ in range(150):
        loss = policy.loss(obs, toy_chunk(128, gen), pad)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    policy.eval()
    policy.config.temperature = 1.0  # sampled: the model's own distribution over chunks
    a = policy.predict_normalized({"observation.state": torch.zeros(300, 1, 1)}).mean(dim=(1, 2))
    near_plus, near_minus = ((a - 0.6).abs() < 0.2).float().mean(), ((a + 0.6).abs() < 0.2).float().mean()
    assert near_plus > 0.25 and near_minus > 0.25, (near_plus, near_minus)
    assert (a.abs() < 0.3).float().mean() < 0.1  # little at the modes' mean, where MSE would put it all
    policy.config.temperature = 0.0  # greedy (the default): one mode, the same every time
    g = policy.predict_normalized({"observation.state": torch.zeros(5, 1, 1)})
    assert torch.equal(g, g[:1].expand_as(g)) and (g.mean().abs() - 0.6).abs() < 0.2


def test_fit_select_action_and_checkpoint_on_detour(detour_ds, tmp_path):
    policy = TokenPolicy.from_dataset(detour_ds, horizon=8, n_action_steps=4, **TINY)
    fit(policy, detour_ds, steps=30, batch_size=32, progress=False)
    losses = policy.losses()
    assert losses.shape == (30,) and losses[-5:].mean() < losses[:5].mean()  # cross-entropy falls
    env = gym.make("labkit/Detour-v0")
    obs, _ = env.reset(seed=0)
    policy.reset()
    for _ in range(5):
        a = policy.select_action(obs)
        assert a.shape == (2,) and a.dtype == np.float32 and np.isfinite(a).all()
        assert (a >= env.action_space.low - 1e-5).all() and (a <= env.action_space.high + 1e-5).all()
        obs = env.step(a)[0]
    policy.reset()
    assert policy.select_action({k: np.stack([v] * 3) for k, v in obs.items()}).shape == (3, 2)
    loaded = labkit.load_policy(policy.save(tmp_path / "tok.ckpt"))
    assert isinstance(loaded, TokenPolicy) and loaded.config == policy.config
    o = loaded.normalize_obs({"observation.state": torch.randn(4, 2, 6)})
    assert loaded.config.temperature == 0.0  # greedy: the same chunk from the same weights
    policy.eval()
    torch.testing.assert_close(loaded.predict_normalized(o), policy.predict_normalized(o))


def test_a_conditioning_vector_gets_its_own_token_and_is_read():
    shapes = {**TOY_SHAPES, "observation.text": [3]}
    stats = {**TOY_STATS, "observation.text": {"mean": [0.0] * 3, "std": [1.0] * 3, "min": [-1.0] * 3, "max": [1.0] * 3}}
    torch.manual_seed(0)
    policy = TokenPolicy({"obs_keys": ("observation.state", "observation.text"), "cond_keys": ("observation.text",),
                          "obs_horizon": 1, "horizon": 4, "n_action_steps": 2, **TINY}, shapes, stats)
    assert policy.n_prefix == 2 and policy.encoder.out_dim == 1  # the text is not in the obs encoder
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    text = torch.eye(3)[torch.arange(128) % 2][:, None]  # two "instructions": go up, go down
    target = torch.where(text[:, :, :1] > 0, 0.6, -0.6).expand(128, 4, 2)
    obs = {"observation.state": torch.zeros(128, 1, 1), "observation.text": text}
    for _ in range(80):
        loss = policy.loss(obs, target, torch.zeros(128, 4, dtype=torch.bool))
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.eval()
    out = policy.predict_normalized({"observation.state": torch.zeros(2, 1, 1), "observation.text": text[:2]})
    assert out[0].mean() > 0.4 and out[1].mean() < -0.4  # the instruction decides the chunk
    # another text encoder's width (a 384-d embedding where 3-d was trained): named, not a shape crash
    with pytest.raises(EmbeddingWidthError, match="built for 3"):
        policy.predict_action_chunk({"observation.state": torch.zeros(2, 1, 1), "observation.text": torch.zeros(2, 1, 384)})
    with pytest.raises(EmbeddingWidthError, match="'text'"):
        policy.select_action({"state": np.zeros(1, np.float32), "text": np.zeros(384, np.float32)})


def test_bad_token_configs():
    with pytest.raises(ValueError, match="multiple of n_heads"):
        TokenPolicy({"d_model": 30, "n_heads": 4}, TOY_SHAPES, TOY_STATS)
    with pytest.raises(ValueError, match="temperature"):
        TokenPolicy({"temperature": -1.0}, TOY_SHAPES, TOY_STATS)
    with pytest.raises(ValueError, match="cond_keys"):
        TokenPolicy({"cond_keys": ("observation.text",)}, TOY_SHAPES, TOY_STATS)
    with pytest.raises(ValueError, match="scale"):
        TokenPolicy({"scale": float("nan")}, TOY_SHAPES, TOY_STATS)
