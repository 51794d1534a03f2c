"""CoVer's language half in miniature: rephrase the instruction K ways, sample N action chunks per
rephrasing, and run the chunk a contrastive verifier scores highest against the ORIGINAL instruction.

    (k*, n*) = argmax_{k, n} s((o, l), a_{k,n}),   a_{k,n} ~ pi(. | o, l_k),   l_1 = l

The verifier is lesson 08's `ChunkVerifier` trained on the language policy's own observations (state +
instruction embedding), so it scores (observation, instruction, action) triples. The rephraser is the
stand-in for a VLM asked for paraphrases: it finds the block's colour and the corner in the words (with
a few synonyms) and writes them in other templates; an instruction it cannot read is a named error.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from labkit.envs.tabletop import COLOURS, ZONES
from labkit.language.commands import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES
from labkit.language.steer import TEXT_KEY, LanguageRuntime
from labkit.language.text import InstructionError
from labkit.rl.best_of_n import critic_action, critic_obs, sample_chunks

# How people name the corners; the rephraser maps each to the task's own name.
CORNER_WORDS = {
    "top-left": ("top-left", "top left", "upper left", "upper-left"),
    "top-right": ("top-right", "top right", "upper right", "upper-right"),
    "bottom-left": ("bottom-left", "bottom left", "lower left", "lower-left"),
    "bottom-right": ("bottom-right", "bottom right", "lower right", "lower-right"),
}
REPHRASINGS = TRAIN_TEMPLATES + HELD_OUT_TEMPLATES


def read_instruction(text: str) -> tuple[str, str]:
    """(colour, corner) named by an instruction, or an InstructionError naming what is missing."""
    low = text.lower()
    colours = [c for c in COLOURS if re.search(rf"\b{c}\b", low)]
    corners = [z for z, names in CORNER_WORDS.items() if any(n in low for n in names)]
    if len(colours) != 1 or len(corners) != 1:
        raise InstructionError(f"cannot rephrase {text!r}: it must name one block colour ({', '.join(COLOURS)}) "
                               f"and one corner ({', '.join(ZONES)}); found colours {colours}, corners {corners}")
    return colours[0], corners[0]


def rephrase(text: str, k: int, seed: int = 0) -> list[str]:
    """The instruction itself, then k - 1 rephrasings in other templates (drawn without repeats)."""
    if not 1 <= k <= len(REPHRASINGS) + 1:
        raise ValueError(f"k must lie in 1-{len(REPHRASINGS) + 1}, got {k}")
    colour, corner = read_instruction(text)
    others = [t.format(colour=colour, corner=corner) for t in REPHRASINGS]
    others = [o for o in others if o != text]
    pick = np.random.default_rng(seed).permutation(len(others))[: k - 1]
    return [text] + [others[i] for i in pick]


class CoverRuntime(LanguageRuntime):
    """A LanguageRuntime whose every chunk is CoVer's pick among K rephrasings x N samples. The commander
    says the original instruction; `last_choice` holds the (rephrasing, sample) index of each env's pick."""

    def __init__(self, policy, encoder, commander, verifier, k: int = 4, n: int = 4, seed: int = 0):
        super().__init__(policy, encoder, commander)
        if not hasattr(policy, "sample"):
            raise TypeError(f"CoVer samples chunks: it needs a generative policy, got {type(policy).__name__}")
        if k < 1 or n < 1:
            raise ValueError(f"k and n must be >= 1, got {k}, {n}")
        self.verifier, self.k, self.n, self.seed = verifier, int(k), int(n), seed
        self.last_choice: list[tuple[int, int]] = []

    @torch.no_grad()
    def predict_action_chunk(self, history):
        policy = self.policy
        obs = policy.normalize_obs({k: torch.as_tensor(v).float() for k, v in history.items()})
        said = [log[-1][1] for log in self._batch]  # this chunk's original instruction, per env
        x = critic_obs(policy, obs)  # the verifier reads the original instruction
        best, choice = [], []
        for b, text in enumerate(said):
            prompts = rephrase(text, self.k, self.seed + self._step)
            emb = self.encoder.embed(prompts).float()  # [K, width]
            rep = {key: torch.as_tensor(v[b:b + 1]).float().repeat_interleave(len(prompts), 0)
                   for key, v in history.items()}
            rep[TEXT_KEY] = emb[:, None].expand_as(rep[TEXT_KEY]).clone()  # every frame of the history
            rep = policy.normalize_obs(rep)
            chunks = sample_chunks(policy, rep, self.n).flatten(0, 1)  # [K*N, H, A]
            cand = critic_action(chunks, policy.config.n_action_steps)
            scores = self.verifier.score(x[b:b + 1].expand(len(cand), -1), cand)
            i = int(scores.argmax())
            best.append(chunks[i])
            choice.append((i // self.n, i % self.n))
        self.last_choice = choice
        return policy.normalizer.unnormalize("action", torch.stack(best))


__all__ = ["CORNER_WORDS", "REPHRASINGS", "CoverRuntime", "read_instruction", "rephrase"]
