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
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

RECIPE_STATE_FILE = "recipe_state.pt"
GLOBAL_STEP_KEY = "global_step"
RNG_STATE_KEY = "rng_state"
STAGING_SUFFIX = ".partial"

PathLike = Union[str, Path]


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
        if folder.name.startswith(("step_", "epoch_")):
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
        (int(folder.name[len("step_"):]), folder)
        for folder in Path(output_dir).glob("step_*")
        if folder.is_dir() and folder.name[len("step_"):].isdigit()
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
ADAPTER_FILES = (
    "adapter_model.pt",
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


def adapter_folder(checkpoint: Path) -> Path:
    """Where a resumable folder's adapter is: in ``step_N/`` itself; beside the merged
    weights of ``epoch_N/``, in ``adapter/epoch_N/``."""
    if checkpoint.name.startswith("epoch_"):
        return checkpoint.parent / ADAPTER_DIRNAME / checkpoint.name
    return checkpoint


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
