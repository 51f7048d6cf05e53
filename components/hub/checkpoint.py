"""Which files of a checkpoint folder go to the Hub, after checking that the checkpoint is whole.

Only a fixed list of file names is ever uploaded (weights, config, tokenizer; for an adapter its
PEFT files), never whatever else a folder holds (recipe state, optimizer state, logs). A
checkpoint missing any part (a shard its index lists, a truncated safetensors file, config.json,
the tokenizer, adapter_config.json) is refused with the list of what is missing, since a push is
public and a broken model on the Hub is worse than none.
"""

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MODEL_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "original/tokenizer.model",  # Llama 3's tiktoken file, what torchtune's tokenizer reads
)
TOKENIZER_CORE = ("tokenizer.json", "tokenizer.model", "original/tokenizer.model")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class PushError(ValueError):
    """A push that cannot go ahead; the message says which file or folder and what is wrong."""


@dataclass
class Upload:
    """One file of the commit: a file on disk, or bytes made here (the card, an edited config)."""

    path_in_repo: str
    source: Optional[Path] = None
    data: Optional[bytes] = None
    note: str = ""

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else self.source.stat().st_size


def _incomplete(folder: Path, missing: List[str]) -> PushError:
    return PushError(f"{folder} is not a complete checkpoint; missing: {'; '.join(missing)}")


def safetensors_problem(path: Path) -> Optional[str]:
    """Why `path` is not a whole safetensors file (unreadable header, truncated data), or None."""
    try:
        with open(path, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_len))
    except (OSError, struct.error, ValueError) as error:
        return f"{path.name} (unreadable safetensors header: {error})"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    expected = 8 + header_len + end
    actual = path.stat().st_size
    if actual < expected:
        return f"{path.name} (truncated: {actual} of {expected} bytes)"
    return None


def _weights(folder: Path, missing: List[str]) -> List[str]:
    """The safetensors files of a merged checkpoint: the index and every shard it names."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as error:
            raise PushError(f"{index}: not a safetensors index ({error})") from None
        files = [INDEX_FILE]
    elif (folder / SINGLE_FILE).is_file():
        shards, files = [SINGLE_FILE], []
    else:
        missing.append(f"the weights ({SINGLE_FILE}, or {INDEX_FILE} and its shards)")
        return []
    for shard in shards:
        if not (folder / shard).is_file():
            missing.append(f"{shard} (listed in {INDEX_FILE})")
        elif problem := safetensors_problem(folder / shard):
            missing.append(problem)
    return files + shards


def _tokenizer(folder: Path, missing: List[str]) -> List[str]:
    found = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not any(name in found for name in TOKENIZER_CORE):
        missing.append(f"the tokenizer ({' or '.join(TOKENIZER_CORE)})")
    return found


def merged_files(folder: Path) -> List[Upload]:
    """A Hugging Face model folder: config, safetensors weights, tokenizer files."""
    missing: List[str] = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    names = [n for n in MODEL_FILES if (folder / n).is_file()]
    names += _weights(folder, missing) + _tokenizer(folder, missing)
    if missing:
        raise _incomplete(folder, missing)
    return [Upload(name, folder / name) for name in names]


def adapter_files(folder: Path, tokenizer_folder: Path, base_model: Optional[str]) -> List[Upload]:
    """A PEFT adapter (config + safetensors) and the tokenizer files of `tokenizer_folder`.

    torchtune's adapter_config.json names no base model; where the base is a Hub model, its id is
    added as ``base_model_name_or_path`` (and ``task_type``) so that peft's ``AutoPeftModel``
    can load the repository on its own. The file on disk is left as it is.
    """
    missing: List[str] = []
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        missing.append(f"{ADAPTER_CONFIG} (peft cannot load an adapter without it)")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        missing.append(f"{ADAPTER_WEIGHTS} (the PEFT-format adapter weights)")
    elif problem := safetensors_problem(folder / ADAPTER_WEIGHTS):
        missing.append(problem)
    if missing:
        raise _incomplete(folder, missing)
    tokenizer_missing: List[str] = []
    tokenizer = _tokenizer(tokenizer_folder, tokenizer_missing)
    if tokenizer_missing:
        raise _incomplete(tokenizer_folder, tokenizer_missing)
    try:
        config = json.loads(config_path.read_text())
    except ValueError as error:
        raise PushError(f"{config_path}: not valid JSON ({error})") from None
    added = {}
    if base_model and not config.get("base_model_name_or_path"):
        added["base_model_name_or_path"] = base_model
    if not config.get("task_type"):
        added["task_type"] = "CAUSAL_LM"
    config_upload = Upload(ADAPTER_CONFIG, config_path)
    if added:
        text = json.dumps({**config, **added}, indent=2) + "\n"
        config_upload = Upload(ADAPTER_CONFIG, data=text.encode(), note=f"{', '.join(added)} added")
    return [config_upload, Upload(ADAPTER_WEIGHTS, folder / ADAPTER_WEIGHTS)] + [
        Upload(name, tokenizer_folder / name) for name in tokenizer
    ]
