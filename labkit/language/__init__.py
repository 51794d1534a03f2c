"""Words: text encoders for instructions that work offline (text.py); commands at several levels of
abstraction labelled from expert episodes and a scripted reasoner (commands.py); language-conditioned
policies, their runtime, a learned reasoner and controllability (steer.py); CoVer's rephrase-and-verify
(cover.py); the shipped Tabletop language policy and its rebuild command (pretrained.py). Action
tokenizers live with the policy that predicts them (labkit.policies.tokens)."""

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
