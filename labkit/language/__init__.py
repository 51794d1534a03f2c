"""Words: text encoders for instructions that work offline (text.py); action tokenizers live with the
policy that predicts them (labkit.policies.tokens)."""

from labkit.language.text import (
    EXTRA,
    MODEL_PACKAGE,
    EmbeddingWidthError,
    EmptyInstructionError,
    InstructionError,
    InstructionTooLongError,
    MissingTextModelError,
    PretrainedTextEncoder,
    TextEncoder,
    UnknownWordError,
    VocabEncoder,
    check_instruction,
    check_width,
    cosine_matrix,
    similarity,
    words,
)

__all__ = ["EXTRA", "MODEL_PACKAGE", "EmbeddingWidthError", "EmptyInstructionError", "InstructionError",
           "InstructionTooLongError", "MissingTextModelError", "PretrainedTextEncoder", "TextEncoder",
           "UnknownWordError", "VocabEncoder", "check_instruction", "check_width", "cosine_matrix", "similarity",
           "words"]
