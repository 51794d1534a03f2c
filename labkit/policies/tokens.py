"""Actions as tokens: a FAST-style tokenizer and an autoregressive transformer policy over its tokens.

FAST (Pertsch et al. 2025, the tokenizer of pi0-FAST) turns a normalised action chunk into a short
sequence of integers that a language-model head can predict one at a time:
    C = D a                    per action dimension, the orthonormal type-II DCT of the chunk a [H, A]
    q = round(scale * C)       quantise: fine detail in the high frequencies rounds to 0
    tokens = q[0, :], q[1, :], ...   low frequencies first, all dimensions of one frequency together
    decode: a = D^T (q / scale)      (D is orthonormal, so D^T is its inverse)
FAST then compresses the integers with byte-pair encoding; here they are not compressed (no BPE): every
chunk is exactly H * A tokens, ids are q + Q with Q = ceil(sqrt(H) * scale) (the largest |q| a chunk in
[-1, 1] can give, so no clipping on normalised data), and every sequence of that length decodes. What BPE
would save is mostly the run of zeros at the high-frequency end (`FastTokenizer.nonzero_length` measures it).

TokenPolicy: a small causal transformer (decoder-only, GPT-style) reads the observation features as
prefix tokens (plus, optionally, one token per conditioning vector, e.g. an instruction's embedding) and
predicts the chunk's tokens left to right with cross-entropy, as a VLA's action head does:
    p(tokens | obs) = prod_i p(t_i | t_<i, obs)
Decoding takes the argmax of each token (temperature = 0, the default) or draws it from its softmax
(temperature > 0). The first, lowest-frequency tokens (the chunk's mean per dimension) pick the mode of a
multimodal chunk distribution; the later ones add detail within it. Sequences are recomputed at every
step (no key-value cache): H * A forward passes of a short sequence per chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from labkit.data.keys import env_key
from labkit.language.text import check_width
from labkit.policies.base import Policy, PolicyConfig
from labkit.vision import ObsEncoder


class TokenizerError(ValueError):
    """An action chunk or token sequence the tokenizer cannot read (wrong shape, not finite)."""


def dct_matrix(n: int, dtype=torch.float32) -> torch.Tensor:
    """The orthonormal type-II DCT matrix D [n, n]: C = D x transforms along time, x = D^T C inverts it.
    D[k, t] = sqrt(2/n) c_k cos(pi (2t + 1) k / (2n)), c_0 = 1/sqrt(2), c_k = 1 otherwise (scipy's norm='ortho')."""
    if n < 1:
        raise ValueError(f"the DCT needs n >= 1, got {n}")
    k = torch.arange(n, dtype=torch.float64)[:, None]
    t = torch.arange(n, dtype=torch.float64)[None, :]
    d = math.sqrt(2.0 / n) * torch.cos(math.pi * (2 * t + 1) * k / (2 * n))
    d[0] /= math.sqrt(2.0)
    return d.to(dtype)


class FastTokenizer:
    """Normalised chunks [..., H, A] (values in [-1, 1]) <-> token ids [..., H * A] in [0, vocab)."""

    def __init__(self, horizon: int, action_dim: int, scale: float = 10.0, dct: Callable | None = None):
        if horizon < 1 or action_dim < 1:
            raise ValueError(f"horizon and action_dim must be >= 1, got {horizon}, {action_dim}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0 (quantisation step 1/scale), got {scale}")
        self.horizon, self.action_dim, self.scale = int(horizon), int(action_dim), float(scale)
        # `dct(n) -> [n, n]` is what a lesson hands in (the student's DCT matrix); labkit's by default.
        self.D = torch.as_tensor((dct or dct_matrix)(self.horizon), dtype=torch.float32)
        if tuple(self.D.shape) != (self.horizon, self.horizon):
            raise TokenizerError(f"dct({self.horizon}) must be a {self.horizon}x{self.horizon} matrix, got "
                                 f"{tuple(self.D.shape)}")
        # |C| <= ||a||_2 <= sqrt(H) for a chunk in [-1, 1]: every coefficient of normalised data fits.
        self.max_int = math.ceil(math.sqrt(self.horizon) * self.scale)
        self.vocab = 2 * self.max_int + 1
        self.length = self.horizon * self.action_dim

    def _check_chunk(self, chunk: torch.Tensor) -> torch.Tensor:
        chunk = torch.as_tensor(chunk, dtype=torch.float32)
        if chunk.ndim < 2 or tuple(chunk.shape[-2:]) != (self.horizon, self.action_dim):
            raise TokenizerError(f"action chunk has shape {tuple(chunk.shape)}; the tokenizer reads "
                                 f"[..., horizon={self.horizon}, action_dim={self.action_dim}]")
        if not torch.isfinite(chunk).all():
            raise TokenizerError("action chunk has NaN or inf values")
        return chunk

    def coefficients(self, chunk: torch.Tensor) -> torch.Tensor:
        """DCT coefficients [..., H, A] (frequency k on axis -2) of chunks [..., H, A]."""
        chunk = self._check_chunk(chunk)
        return self.D.to(chunk.device) @ chunk

    def inverse(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Chunks [..., H, A] from DCT coefficients [..., H, A]."""
        return self.D.to(coeffs.device).T @ coeffs

    def encode(self, chunk: torch.Tensor) -> torch.Tensor:
        """Token ids [..., H * A] (long): round(scale * C), low frequencies first, shifted to be >= 0.
        Values outside [-1, 1] are allowed; a coefficient beyond the vocabulary is clipped to its edge."""
        q = torch.round(self.coefficients(chunk) * self.scale).clamp(-self.max_int, self.max_int)
        return (q.long() + self.max_int).flatten(-2)  # [..., H, A] row-major: frequency 0 of every dim first

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Chunks [..., H, A] from token ids [..., L]. What is valid is decoded: ids outside [0, vocab) are
        clipped to it, a sequence longer than H * A is cut, a shorter one is padded with zero coefficients
        (the missing highest frequencies), as FAST decodes a sequence that stopped early."""
        tokens = torch.as_tensor(tokens)
        if tokens.ndim < 1 or tokens.dtype.is_floating_point:
            raise TokenizerError(f"tokens must be integer ids [..., L], got {tuple(tokens.shape)} {tokens.dtype}")
        tokens = tokens[..., : self.length].clamp(0, self.vocab - 1)
        if tokens.shape[-1] < self.length:
            pad = torch.full((*tokens.shape[:-1], self.length - tokens.shape[-1]), self.max_int,
                             dtype=tokens.dtype, device=tokens.device)  # id max_int is the coefficient 0
            tokens = torch.cat([tokens, pad], -1)
        q = (tokens - self.max_int).float().view(*tokens.shape[:-1], self.horizon, self.action_dim)
        return self.inverse(q / self.scale)

    def roundtrip_error(self, chunk: torch.Tensor) -> float:
        """Largest absolute error of decode(encode(chunk)) over all entries (normalised units)."""
        chunk = self._check_chunk(chunk)
        return float((self.decode(self.encode(chunk)) - chunk).abs().max())

    def nonzero_length(self, chunk: torch.Tensor) -> torch.Tensor:
        """Per chunk, the tokens up to the last nonzero coefficient: the length a sequence that stops after
        its last nonzero token (an end token, or what BPE mostly compresses) would have."""
        nz = self.encode(chunk) != self.max_int  # [..., L]: id max_int is the coefficient 0
        return (nz * torch.arange(1, self.length + 1, device=nz.device)).amax(-1)


@dataclass
class TokenConfig(PolicyConfig):
    """A FAST tokenizer and the causal transformer that predicts its tokens."""

    scale: float = 10.0  # quantisation: coefficients are rounded to multiples of 1/scale (FAST: 10)
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 3
    dropout: float = 0.1
    prefix_tokens: int = 2  # the observation features become this many prefix tokens
    # Observation keys (among obs_keys) that each become one prefix token of their own instead of going
    # through the observation encoder: a conditioning vector such as an instruction's text embedding.
    cond_keys: tuple[str, ...] = ()
    # Decoding: 0 = greedy (argmax each token), 1 = sample the model's distribution. Greedy is the default:
    # one sampled token off in 32 jerks the chunk (Detour, 3000 steps, 100 episodes: greedy 99% success,
    # T=0.5 84%, T=1 70%), and greedy still takes both ways round the wall, the mode set by the start state.
    temperature: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        self.cond_keys = tuple(self.cond_keys)
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {self.scale}")
        if min(self.d_model, self.n_heads, self.n_layers, self.prefix_tokens) < 1:
            raise ValueError("d_model, n_heads, n_layers and prefix_tokens must be >= 1")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        stray = [k for k in self.cond_keys if k not in self.obs_keys]
        if stray:
            raise ValueError(f"cond_keys {stray} must also be in obs_keys {list(self.obs_keys)}")
        if not set(self.obs_keys) - set(self.cond_keys):
            raise ValueError("at least one observation key must go through the observation encoder")


class TokenPolicy(Policy):
    """Observation (and conditioning) prefix -> the chunk's FAST tokens, one at a time (a causal transformer)."""

    config_class = TokenConfig

    @classmethod
    def from_dataset(cls, dataset, env: dict | None = None, dct: Callable | None = None, **config):
        """`Policy.from_dataset`, tokenizing with a lesson's `dct(n) -> [n, n]` matrix when one is given."""
        policy = super().from_dataset(dataset, env, **config)
        if dct is not None:
            c = policy.config
            policy.tokenizer = FastTokenizer(c.horizon, policy.action_dim, c.scale, dct=dct)
        return policy

    def __init__(self, config, shapes, stats, env=None):
        super().__init__(config, shapes, stats, env)
        c = self.config
        self.tokenizer = FastTokenizer(c.horizon, self.action_dim, c.scale)
        obs_keys = [k for k in c.obs_keys if k not in c.cond_keys]
        self.encoder = ObsEncoder({k: self.shapes[k] for k in obs_keys}, c.obs_horizon, c.image_dim,
                                  c.image_encoder, c.pretrained, c.pretrained_meta)
        self.prefix = nn.Linear(self.encoder.out_dim, c.prefix_tokens * c.d_model)
        self.cond = nn.ModuleDict({k.replace(".", "_"): nn.Linear(self.shapes[k][-1], c.d_model) for k in c.cond_keys})
        self.n_prefix = c.prefix_tokens + len(c.cond_keys)  # prefix tokens before the begin-of-actions token
        self.token_emb = nn.Embedding(self.tokenizer.vocab + 1, c.d_model)  # + the begin-of-actions token
        self.pos_emb = nn.Parameter(torch.zeros(self.n_prefix + self.tokenizer.length, c.d_model))
        nn.init.normal_(self.pos_emb, std=0.02)
        layer = nn.TransformerEncoderLayer(c.d_model, c.n_heads, 4 * c.d_model, c.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, c.n_layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(c.d_model), nn.Linear(c.d_model, self.tokenizer.vocab))

    def check_cond(self, obs: dict) -> None:
        """A named EmbeddingWidthError when a conditioning vector (an instruction's embedding) is not as wide
        as the one the policy was trained with, e.g. another text encoder's."""
        for k in self.config.cond_keys:
            for name in (k, env_key(k)):
                if name in obs:
                    check_width(self.shapes[k][-1], np.shape(obs[name])[-1], f"conditioning {name!r}")

    def normalize_obs(self, obs):
        self.check_cond(obs)
        return super().normalize_obs(obs)

    def observation_frame(self, obs):
        self.check_cond(obs)
        return super().observation_frame(obs)

    def context(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The prefix [B, P, d]: observation features as `prefix_tokens` tokens, then one per conditioning key
        (its newest frame)."""
        c = self.config
        feat = self.encoder({k: v for k, v in obs.items() if k not in c.cond_keys})
        parts = [self.prefix(feat).view(len(feat), c.prefix_tokens, c.d_model)]
        for k in c.cond_keys:
            x = obs[k]
            parts.append(self.cond[k.replace(".", "_")](x[:, -1] if x.ndim == 3 else x)[:, None])
        return torch.cat(parts, 1)

    def logits(self, prefix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, n + 1, vocab] after the prefix [B, P, d] and the first n tokens [B, n]:
        entry i is the distribution of token i given tokens < i."""
        bos = torch.full((len(tokens), 1), self.tokenizer.vocab, dtype=torch.long, device=tokens.device)
        x = torch.cat([prefix, self.token_emb(torch.cat([bos, tokens], 1))], 1)
        x = x + self.pos_emb[: x.shape[1]]
        n = x.shape[1]
        mask = torch.triu(torch.full((n, n), float("-inf"), device=x.device), 1)  # causal: no peeking ahead
        h = self.transformer(x, mask=mask, is_causal=True)
        return self.head(h[:, self.n_prefix:])  # from the begin-of-actions token on

    def loss(self, obs, action, is_pad):
        # The whole chunk is one token sequence (the DCT mixes all its steps), so padded steps past an
        # episode's end (the last action repeated) are trained on, as the flow and diffusion policies do.
        tokens = self.tokenizer.encode(action)
        logits = self.logits(self.context(obs), tokens[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), tokens.flatten())

    @torch.no_grad()
    def sample_tokens(self, obs: dict[str, torch.Tensor], temperature: float | None = None) -> torch.Tensor:
        """Token ids [B, H * A], decoded left to right (recomputing the short sequence at each step)."""
        temperature = self.config.temperature if temperature is None else temperature
        prefix = self.context(obs)
        tokens = torch.zeros(len(prefix), 0, dtype=torch.long, device=prefix.device)
        for _ in range(self.tokenizer.length):
            logits = self.logits(prefix, tokens)[:, -1]
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                nxt = torch.multinomial(F.softmax(logits / temperature, -1), 1)[:, 0]
            tokens = torch.cat([tokens, nxt[:, None]], 1)
        return tokens

    def predict_normalized(self, obs):
        return self.tokenizer.decode(self.sample_tokens(obs)).clamp(-1, 1)
