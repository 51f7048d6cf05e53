"""Where medtune keeps what it builds once and reuses (the tiny checkpoint, the Llama 3 tokenizer
file, the data caches): one root, chosen by the environment."""

import os
from pathlib import Path


def cache_root() -> Path:
    """`$MEDTUNE_CACHE_DIR`, else `$XDG_CACHE_HOME/medtune`, else `~/.cache/medtune`."""
    if os.environ.get("MEDTUNE_CACHE_DIR"):
        return Path(os.environ["MEDTUNE_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "medtune"
