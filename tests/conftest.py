"""Shared test set-up: no network, every cache in a fresh folder, the real data, a real tokenizer."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
#: Read by datasets, huggingface_hub and transformers when they are imported, which happens while
#: the test modules are collected: so set in pytest_configure, before collection, not in a fixture.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
_HF_HOME: list = []


def pytest_configure(config):
    """No Hub access and a fresh HF_HOME for the whole session, in process and in subprocesses."""
    os.environ.update(OFFLINE)
    _HF_HOME.append(tempfile.mkdtemp(prefix="medtune-tests-hf-"))
    os.environ["HF_HOME"] = _HF_HOME[0]


def pytest_unconfigure(config):
    for folder in _HF_HOME:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def isolated_caches(tmp_path_factory):
    """Point medtune's and tiktoken's caches at session folders (Hub access is already off:
    :func:`pytest_configure`).

    Subprocesses (`tune run`, `medtune`) inherit these, so the whole session builds the tiny
    checkpoint once, from scratch, and never reads or writes the user's caches.
    """
    cache = tmp_path_factory.mktemp("cache")
    env = {
        "MEDTUNE_CACHE_DIR": str(cache / "medtune"),
        "TIKTOKEN_CACHE_DIR": str(cache / "tiktoken"),
        # One OpenMP thread per subprocess: on a small shared machine, threads of several
        # processes spin against each other (a GaLore SVD or a train step up to 30x slower);
        # the pinned losses were measured this way.
        "OMP_NUM_THREADS": "1",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``: the real data sets the tests check counts against."""
    assert SHARED_DATA.is_dir(), f"the real test data is missing: {SHARED_DATA}"
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer():
    """The project's tiny Llama 3 tokenizer (a real torchtune ``Llama3Tokenizer``)."""
    from components.models import tiny_llama3_2_tokenizer

    return tiny_llama3_2_tokenizer()
