"""What `medtune push` knows about a run: its checkpoint folders, how it was trained, its scores.

RUN_DIR is a run's folder in a study's output, ``<study output_dir>/runs/<run>`` as `medtune
study` lays it out, or one of its checkpoint folders (``epoch_N``, ``adapter/epoch_N``) to choose
an epoch other than the last. The study's ``manifest.json`` gives the training step's command,
resolved config, seed, versions, git commit and timings; its ``results.json`` the scores. A plain
`tune run` output_dir works too: its ``torchtune_config.yaml`` says how it was trained, and the
card then has no scores.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from components.checkpointing import (
    ADAPTER_DIRNAME,
    epoch_dirs,
    folder_number,
    is_staging_folder,
    unfinished_epoch_saves,
)
from components.hub.checkpoint import ADAPTER_CONFIG, TOKENIZER_CORE, PushError
from components.study.runner import latest_checkpoint
from components.study.spec import BASELINE

FINISHED = ("done", "skipped (up to date)")


@dataclass
class RunInfo:
    """A run's checkpoint of one epoch and everything recorded about how it was made."""

    run_dir: Path
    name: str
    merged_dir: Path
    adapter_dir: Optional[Path]
    tokenizer_dir: Path  # where an adapter's tokenizer files come from
    config: Dict[str, Any]
    named_adapter: bool = False  # RUN_DIR was an adapter folder itself
    study_root: Optional[Path] = None
    study: Dict[str, Any] = field(default_factory=dict)  # manifest.json without its steps
    step: Dict[str, Any] = field(default_factory=dict)  # the manifest's record of the training
    results: List[Dict[str, Any]] = field(default_factory=list)  # results.json cells of this run
    baseline: List[Dict[str, Any]] = field(default_factory=list)  # and of the baseline
    notes: List[str] = field(default_factory=list)  # what is missing from the card, and why


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise PushError(f"{path}: cannot read it ({error})") from None


def _checkpoint_folders(path: Path) -> Tuple[Path, Path, Optional[Path], bool]:
    """``(run_dir, merged_dir, adapter_dir, named_adapter)`` for a run folder or a checkpoint folder."""
    if folder_number(path) is not None:
        in_adapter_dir = path.parent.name == ADAPTER_DIRNAME
        run_dir = path.parent.parent if in_adapter_dir else path.parent
        merged = run_dir / path.name
        # a step_N folder of a LoRA run holds the adapter alone
        named_adapter = in_adapter_dir or ((path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file())
    else:
        run_dir, named_adapter = path, False
        try:
            merged = latest_checkpoint(run_dir)
        except FileNotFoundError:
            raise PushError(
                f"{run_dir} holds no epoch_N checkpoint folder: did its training finish? "
                "(RUN_DIR is a run's folder, e.g. outputs/study/quickstart/runs/lora, or a checkpoint folder in it)"
            ) from None
        newest = folder_number(merged)
        for number, staging in unfinished_epoch_saves(run_dir):
            if number > newest:
                raise PushError(
                    f"{staging} is an unfinished save of epoch_{number} (the run was interrupted); "
                    f"resume or rerun the training, or push {merged} by naming it"
                )
    adapter = run_dir / ADAPTER_DIRNAME / merged.name
    if not adapter.is_dir():  # torchtune's own LoRA recipes write the adapter beside the weights
        adapter = merged if (merged / ADAPTER_CONFIG).is_file() else None
    return run_dir, merged, adapter, named_adapter


def _tokenizer_dir(run_dir: Path, checkpoint: Path) -> Path:
    """The checkpoint folder if it holds a tokenizer, else the run's last epoch_N (training leaves it unchanged)."""
    if any((checkpoint / name).is_file() for name in TOKENIZER_CORE):
        return checkpoint
    try:
        return latest_checkpoint(run_dir)
    except FileNotFoundError:
        return checkpoint


def _study_parts(info: RunInfo) -> None:
    """Fill in the manifest's records and the scores when the run lies in a study's output."""
    root = info.run_dir.parent.parent
    if info.run_dir.parent.name != "runs" or not (root / "manifest.json").is_file():
        info.notes.append(f"{info.run_dir} is not inside a `medtune study` output: the card has no scores")
        return
    manifest = _read_json(root / "manifest.json")
    info.study_root = root
    info.study = {k: v for k, v in manifest.items() if k != "steps"}
    steps = {s.get("step"): s for s in manifest.get("steps", [])}
    info.step = steps.get(f"train/{info.name}", {})
    if not info.step:
        info.notes.append(f"{root / 'manifest.json'} has no record of train/{info.name}")
    elif info.step.get("status") not in FINISHED:
        raise PushError(
            f"{root / 'manifest.json'} records train/{info.name} as {info.step.get('status')!r}: "
            "only a finished training is pushed"
        )
    evaluated = {
        Path(s["evaluated_checkpoint"]).name
        for name, s in steps.items()
        if name and name.startswith("eval/") and name.endswith(f"/{info.name}") and s.get("evaluated_checkpoint")
    }
    if evaluated and evaluated != {info.merged_dir.name}:
        info.notes.append(
            f"the study evaluated {', '.join(sorted(evaluated))}, not {info.merged_dir.name}: the card has no scores"
        )
        return
    results_file = root / "results.json"
    if not results_file.is_file():
        info.notes.append(f"{results_file} is missing (the study's report was not written): the card has no scores")
        return
    cells = [c for c in _read_json(results_file) if c.get("value") is not None]
    info.results = [c for c in cells if c.get("run") == info.name]
    info.baseline = [c for c in cells if c.get("run") == BASELINE]
    if not info.results:
        info.notes.append(f"{results_file} holds no scores of {info.name}")


def load_run(path: str) -> RunInfo:
    """Everything `medtune push` needs about RUN_DIR, or a `PushError` saying what is wrong."""
    folder = Path(path).resolve()
    if is_staging_folder(folder):
        raise PushError(f"{folder} is the staging folder of a checkpoint save that did not finish; it is never pushed")
    if not folder.is_dir():
        raise PushError(f"{folder}: no such folder")
    if (folder / "manifest.json").is_file() and (folder / "runs").is_dir():
        trained = sorted(p.name for p in (folder / "runs").iterdir() if epoch_dirs(p))
        raise PushError(
            f"{folder} is a study's output folder; name one of its runs: {folder / 'runs'}/<run>, "
            f"with <run> one of: {', '.join(trained) or '(none has a checkpoint yet)'}"
        )
    run_dir, merged, adapter, named_adapter = _checkpoint_folders(folder)
    info = RunInfo(run_dir, run_dir.name, merged, adapter, _tokenizer_dir(run_dir, merged), {}, named_adapter)
    _study_parts(info)
    config = info.step.get("config")
    if config is None:
        resolved = run_dir / "torchtune_config.yaml"
        if not resolved.is_file():
            raise PushError(
                f"{run_dir} has no torchtune_config.yaml and no study manifest records it: "
                "there is no record of how this checkpoint was trained"
            )
        config = yaml.safe_load(resolved.read_text())
    info.config = config
    return info
