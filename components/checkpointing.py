"""Step checkpoints that survive a kill: atomic folders, resume discovery, pruning, RNG state.

torchtune 0.6.1 saves only at epoch ends and resumes only from file names edited into the
config. Every medtune recipe writes ``output_dir/step_<global step>/`` (and ``epoch_<n>/``)
through `write_atomically`, so a folder either holds a complete checkpoint or does not exist,
and resumes from `find_resume_dir`. The recipe state inside is loadable with
``torch.load(weights_only=True)``.
"""

import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

RECIPE_STATE_FILE = "recipe_state.pt"
GLOBAL_STEP_KEY = "global_step"
RNG_STATE_KEY = "rng_state"
STAGING_SUFFIX = ".partial"

PathLike = Union[str, Path]

# The run-folder layout every medtune recipe writes, and everything else reads through the
# helpers below: `epoch_<n>/` (the weights after epoch n, counted from 0), `step_<n>/` (a
# resumable checkpoint after global optimizer step n), a LoRA run's adapter of epoch n in
# `adapter/epoch_<n>/`, and `.<folder>.partial` while a folder is being written.
EPOCH_PREFIX = "epoch_"
STEP_PREFIX = "step_"
_NUMBERED_FOLDER = re.compile(r"(epoch|step)_(\d+)")


def epoch_folder_name(epoch: int) -> str:
    """``epoch_<epoch>``: the folder name of epoch ``epoch``'s checkpoint."""
    return f"{EPOCH_PREFIX}{epoch}"


def step_folder_name(step: int) -> str:
    """``step_<step>``: the folder name of the checkpoint after global step ``step``."""
    return f"{STEP_PREFIX}{step}"


def epoch_dir(output_dir: PathLike, epoch: int) -> Path:
    """``output_dir/epoch_<epoch>``."""
    return Path(output_dir) / epoch_folder_name(epoch)


def folder_number(folder: PathLike) -> Optional[int]:
    """N of an ``epoch_N`` or ``step_N`` folder, else None."""
    match = _NUMBERED_FOLDER.fullmatch(Path(folder).name)
    return int(match.group(2)) if match else None


def is_epoch_folder(folder: PathLike) -> bool:
    """Whether ``folder`` is named ``epoch_N``."""
    return folder_number(folder) is not None and Path(folder).name.startswith(EPOCH_PREFIX)


def is_step_folder(folder: PathLike) -> bool:
    """Whether ``folder`` is named ``step_N``."""
    return folder_number(folder) is not None and Path(folder).name.startswith(STEP_PREFIX)


def epoch_dirs(output_dir: PathLike) -> List[Path]:
    """The ``epoch_N`` folders of a run, by epoch (complete ones: staging folders are hidden)."""
    found = [p for p in Path(output_dir).glob(f"{EPOCH_PREFIX}*") if p.is_dir() and is_epoch_folder(p)]
    return sorted(found, key=folder_number)


def latest_epoch_dir(output_dir: PathLike) -> Optional[Path]:
    """The highest ``epoch_N`` folder of a run, or None."""
    found = epoch_dirs(output_dir)
    return found[-1] if found else None


def is_staging_folder(folder: PathLike) -> bool:
    """Whether ``folder`` is the staging folder of a save that has not finished."""
    return Path(folder).name.endswith(STAGING_SUFFIX)


def unfinished_epoch_saves(output_dir: PathLike) -> List[Tuple[int, Path]]:
    """``(epoch, staging folder)`` of every ``epoch_N`` save left unfinished in a run, by epoch."""
    found = []
    for staging in Path(output_dir).glob(f".{EPOCH_PREFIX}*{STAGING_SUFFIX}"):
        epoch = folder_number(staging.name[1 : -len(STAGING_SUFFIX)])
        if epoch is not None:
            found.append((epoch, staging))
    return sorted(found)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the run stops rather than save garbage."""


def write_atomically(output_dir: PathLike, folder: str, write: Callable[[Path], None]) -> Path:
    """Call ``write(staging)`` on a fresh hidden folder, then rename it to ``output_dir/folder``.

    A kill at any point leaves either the previous ``folder`` or the new one, never a mix:
    the staging folder (``.<folder>.partial``) is ignored by `resumable_checkpoints` and
    removed by the next save. Files are fsynced before the rename.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = output_dir / f".{folder}{STAGING_SUFFIX}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    write(staging)
    _fsync_tree(staging)
    target = output_dir / folder
    if target.exists():
        retired = output_dir / f".{folder}.old"
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(target, retired)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, target)
    _fsync_dir(output_dir)
    return target


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_with_checkpointer(
    checkpointer: Any, folder: PathLike, state_dict: Dict[str, Any], **save_kwargs: Any
) -> None:
    """Have a torchtune checkpointer write ``state_dict`` straight into ``folder``.

    torchtune 0.6.1's checkpointers always write ``<their output_dir>/epoch_<n>/``: point one at
    ``folder`` for this call (epoch 0, no recipe state) and move what it wrote up a level. Meant
    for the staging folder of `write_atomically`. ``save_kwargs`` go to ``save_checkpoint``
    (e.g. ``adapter_only=True``).
    """
    folder = Path(folder)
    real_output_dir = checkpointer._output_dir
    checkpointer._output_dir = folder
    try:
        checkpointer.save_checkpoint(
            state_dict, epoch=0, intermediate_checkpoint=False, **save_kwargs
        )
    finally:
        checkpointer._output_dir = real_output_dir
    written = folder / "epoch_0"
    for path in list(written.iterdir()):
        os.replace(path, folder / path.name)
    written.rmdir()


def save_recipe_state(folder: PathLike, state: Dict[str, Any]) -> Path:
    """``torch.save`` the recipe state (plain data and tensors only) into ``folder``."""
    path = Path(folder) / RECIPE_STATE_FILE
    torch.save(state, path)
    return path


def load_recipe_state(folder: PathLike) -> Dict[str, Any]:
    """The recipe state of a checkpoint folder, loaded with ``weights_only=True``."""
    path = Path(folder) / RECIPE_STATE_FILE
    if not path.is_file():
        raise ValueError(f"{folder}: no {RECIPE_STATE_FILE}, so it is not a resumable checkpoint")
    return torch.load(path, map_location="cpu", weights_only=True)


def resumable_checkpoints(output_dir: PathLike) -> List[Tuple[int, Path]]:
    """``(global step, folder)`` of every complete ``step_N``/``epoch_N`` folder, oldest first."""
    found = []
    for state_file in Path(output_dir).glob(f"*/{RECIPE_STATE_FILE}"):
        folder = state_file.parent
        if folder_number(folder) is not None:
            # mmap: only the step count is read, not the optimizer state
            state = torch.load(state_file, map_location="cpu", weights_only=True, mmap=True)
            found.append((int(state[GLOBAL_STEP_KEY]), state_file.stat().st_mtime, folder))
    return [(step, folder) for step, _, folder in sorted(found)]


def find_resume_dir(output_dir: PathLike, resume_from: Optional[PathLike] = None) -> Path:
    """``resume_from`` (absolute, or relative to ``output_dir``), else the newest resumable folder."""
    if resume_from:
        folder = Path(resume_from)
        if not folder.is_absolute() and not folder.exists():
            folder = Path(output_dir) / folder
        if not (folder / RECIPE_STATE_FILE).is_file():
            raise ValueError(f"resume_from={resume_from}: no {RECIPE_STATE_FILE} in {folder}")
        return folder
    found = resumable_checkpoints(output_dir)
    if not found:
        raise ValueError(
            f"resume_from_checkpoint=True but {output_dir} holds no step_N/ or epoch_N/ folder "
            f"with a {RECIPE_STATE_FILE} (written every save_every_n_steps steps, and at the end "
            "of every epoch but the last)"
        )
    return found[-1][1]


def prune_step_checkpoints(output_dir: PathLike, keep_last_n: Optional[int]) -> List[Path]:
    """Delete all but the newest ``keep_last_n`` ``step_N`` folders; ``epoch_N`` ones stay.

    Returns the deleted folders. ``None`` keeps everything.
    """
    if keep_last_n is None:
        return []
    keep_last_n = check_positive("keep_last_n_checkpoints", keep_last_n)
    steps = sorted(
        (folder_number(folder), folder)
        for folder in Path(output_dir).glob(f"{STEP_PREFIX}*")
        if folder.is_dir() and is_step_folder(folder)
    )
    doomed = [folder for _, folder in steps[: max(0, len(steps) - keep_last_n)]]
    for folder in doomed:
        shutil.rmtree(folder)
    return doomed


def check_positive(name: str, value: Any) -> Optional[int]:
    """A config's positive integer setting (or None), with an error naming it otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive whole number or null, got {value!r}")
    return value


def rng_state() -> Dict[str, Any]:
    """Torch (CPU and every CUDA device) and Python RNG states, weights_only-loadable."""
    state = {"torch": torch.get_rng_state(), "python": _python_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Undo `rng_state`: the next random draws equal those of the run that saved it."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def check_finite_loss(loss: float, step: int, output_dir: PathLike) -> None:
    """Stop with a clear message when the loss of ``step`` is NaN or infinite."""
    if math.isfinite(loss):
        return
    found = resumable_checkpoints(output_dir)
    kept = (
        f"the last good checkpoint is {found[-1][1]} (step {found[-1][0]})"
        if found
        else f"no resumable checkpoint was written to {output_dir} before it"
    )
    raise NonFiniteLossError(
        f"the training loss is {loss} at step {step}; stopping without saving this step: {kept}. "
        "Lower the learning rate or check the data of this step, then resume."
    )


# The LoRA recipes' adapter folder, `<output_dir>/adapter/epoch_N/`, apart from the merged weights.
ADAPTER_DIRNAME = "adapter"
# Everything torchtune's checkpointers write for an adapter (PEFT files and torchtune's .pt).
ADAPTER_CHECKPOINT_FILE = "adapter_model.pt"
ADAPTER_FILES = (
    ADAPTER_CHECKPOINT_FILE,
    "adapter_model.safetensors",
    "adapter_model.bin",
    "adapter_config.json",
)


def move_adapter_files(src: Path, dst: Path) -> None:
    """Move the adapter files the checkpointer wrote in ``src`` to ``dst``."""
    for name in ADAPTER_FILES:
        if (src / name).is_file():
            os.replace(src / name, dst / name)


def keep_only_adapter_files(folder: Path) -> None:
    """Drop the config and tokenizer files the checkpointer copies next to an adapter."""
    for path in folder.iterdir():
        if path.name in ADAPTER_FILES:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def adapter_dir(output_dir: PathLike, epoch: int) -> Path:
    """``output_dir/adapter/epoch_<epoch>``: a LoRA run's adapter of that epoch."""
    return Path(output_dir) / ADAPTER_DIRNAME / epoch_folder_name(epoch)


def adapter_folder(checkpoint: Path) -> Path:
    """Where a resumable folder's adapter is: in ``step_N/`` itself; beside the merged
    weights of ``epoch_N/``, in ``adapter/epoch_N/``."""
    if is_epoch_folder(checkpoint):
        return checkpoint.parent / ADAPTER_DIRNAME / checkpoint.name
    return checkpoint


def adapter_checkpoint_file(checkpoint: Path) -> Path:
    """The adapter a resume loads (torchtune keys, ``adapter_model.pt``): in the checkpoint
    folder itself, else in `adapter_folder`; a ValueError naming both when neither has it."""
    for folder in (checkpoint, adapter_folder(checkpoint)):
        if (folder / ADAPTER_CHECKPOINT_FILE).is_file():
            return folder / ADAPTER_CHECKPOINT_FILE
    raise ValueError(
        f"cannot resume from {checkpoint}: no {ADAPTER_CHECKPOINT_FILE} in it"
        + (f" or in {adapter_folder(checkpoint)}" if adapter_folder(checkpoint) != checkpoint else "")
    )


def write_lora_checkpoint(
    checkpointer: Any,
    staging: Path,
    folder: str,
    output_dir: PathLike,
    state_dict: Dict[str, Any],
    adapter_only: bool,
) -> None:
    """The LoRA recipes' layout, written into ``staging`` (of `write_atomically`) with a
    torchtune checkpointer: an ``epoch_N`` folder stays a plain merged HF model (unless
    ``adapter_only``) and its adapter goes to ``adapter/epoch_N/``, complete before
    ``epoch_N/`` appears; a step folder holds the adapter files alone."""
    write_with_checkpointer(checkpointer, staging, state_dict, adapter_only=adapter_only)
    if is_epoch_folder(folder):
        write_atomically(
            Path(output_dir) / ADAPTER_DIRNAME,
            folder,
            lambda adapter_staging: move_adapter_files(staging, adapter_staging),
        )
    else:
        keep_only_adapter_files(staging)


def copy_weights_merged_in_place(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """Copy the base weights that torchtune's get_merged_lora_ckpt adds LoRA into in place.

    On CPU, `tensor.cpu()` (and an all-gather of a single shard) returns the live parameter
    itself, so torchtune's in-place merge wrote the LoRA delta into the weights still being
    trained (in KnowTuning's DPO also the reference model's): every later epoch trained on, and
    saved, a base holding an earlier delta.
    """
    for key in [k for k in state_dict if k.endswith(".lora_a.weight")]:
        weight_key = key[: -len("lora_a.weight")] + "weight"
        state_dict[weight_key] = state_dict[weight_key].clone()
    return state_dict


def lora_checkpoint_dict(
    state_dict: Dict[str, Any],
    rank: int,
    alpha: float,
    target_modules: List[str],
    merge: bool,
    copy_base: bool,
) -> Dict[str, Any]:
    """What the LoRA recipes hand their checkpointer: the adapter, its PEFT config and, with
    ``merge``, the weights with the adapter merged in (on CPU). ``copy_base``: ``state_dict``
    holds the live weights (CPU training), which the merge must not touch."""
    from torchtune.modules.peft import get_adapter_state_dict, get_merged_lora_ckpt
    from torchtune.training import ADAPTER_CONFIG, ADAPTER_KEY, MODEL_KEY

    checkpoint = {
        ADAPTER_KEY: get_adapter_state_dict(state_dict),
        ADAPTER_CONFIG: {
            "r": rank,
            "lora_alpha": alpha,
            "target_modules": target_modules,
            "peft_type": "LORA",
        },
    }
    if merge:
        # Move to CPU to avoid a copy on GPU
        merged = {k: v.cpu() for k, v in state_dict.items()}
        if copy_base:
            merged = copy_weights_merged_in_place(merged)
        checkpoint[MODEL_KEY] = get_merged_lora_ckpt(merged, rank=rank, alpha=alpha)
    return checkpoint

