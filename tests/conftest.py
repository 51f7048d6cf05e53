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

    yield tiny_llama3_2_tokenizer()
    mp.undo()
