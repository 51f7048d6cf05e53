"""Shared test set-up: no network, and every cache (tiny checkpoint, tiktoken) in a fresh folder."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def isolated_caches(tmp_path_factory):
    """Point medtune's and tiktoken's caches at session folders; forbid Hub access."""
    cache = tmp_path_factory.mktemp("cache")
    env = {
        "MEDTUNE_CACHE_DIR": str(cache / "medtune"),
        "TIKTOKEN_CACHE_DIR": str(cache / "tiktoken"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(cache / "hf"),
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
    """The real public data sets beside the repository (../shared/data)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real data folder {SHARED_DATA} is missing: tests need ../shared/data")
    return SHARED_DATA
