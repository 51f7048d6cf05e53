"""Shared fixtures: the paths of the real data in ../shared/data and a real tiny tokenizer."""

import os
from pathlib import Path

import pytest

# tests read local files only; the Hub is never contacted
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``: the real data sets the tests check counts against."""
    assert SHARED_DATA.is_dir(), f"the real test data is missing: {SHARED_DATA}"
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """The project's tiny Llama 3 tokenizer (a real torchtune ``Llama3Tokenizer``), built in a
    temporary cache so tests neither read nor write the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDTUNE_CACHE_DIR", str(tmp_path_factory.mktemp("medtune_cache")))
    mp.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken_cache")))
    from components.models import tiny_llama3_2_tokenizer

    try:
        yield tiny_llama3_2_tokenizer()
    except FileNotFoundError:  # TODO(data): drop once components/data/sample/ is committed
        yield _throwaway_tokenizer(tmp_path_factory.mktemp("tok"))
    mp.undo()


def _throwaway_tokenizer(out: Path):
    import json

    from torchtune.models.llama3 import llama3_tokenizer

    from components.models.tokenizer import special_tokens_for, train_byte_level_bpe, write_tiktoken_file

    records = json.loads((SHARED_DATA / "medical_meadow_small.json").read_text())[:300]
    corpus = [r[f] for r in records for f in ("instruction", "input", "output")]
    ranks = train_byte_level_bpe(corpus, 1024)
    write_tiktoken_file(ranks, out / "tokenizer.model")
    specials = special_tokens_for(len(ranks))
    (out / "special.json").write_text(json.dumps({"added_tokens": [{"id": i, "content": c} for c, i in specials.items()]}))
    return llama3_tokenizer(str(out / "tokenizer.model"), special_tokens_path=str(out / "special.json"))
