"""`medtune quickstart`: the three tiny trainings (full SFT, LoRA, QLoRA) on CPU, through `tune run`.

Each training runs exactly the command in its config's header, as a user would type it, in a
subprocess; then the losses are read back from torchtune's metric log and summarised.
"""

import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

METHODS = ("full_sft", "lora", "qlora")
_HEADER_RUN = re.compile(r"^#\s+tune run (\S+) --config (\S+)\s*$")
_LOSS = re.compile(r"Step (\d+) \| .*?\bloss:([-+0-9.eE]+)")


@dataclass
class TrainingRun:
    """One finished tiny training: where it wrote, what its loss did, how long it took."""

    method: str
    command: List[str]
    output_dir: Path
    losses: List[float]
    seconds: float

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "epoch_0"

    @property
    def adapter_dir(self) -> Optional[Path]:
        path = self.output_dir / "adapter" / "epoch_0"
        return path if path.is_dir() else None

    @property
    def log_file(self) -> Path:
        return latest_log(self.output_dir)


def header_command(config: Path) -> List[str]:
    """`tune run <recipe> --config <config>` as the config's header comment gives it."""
    for line in config.read_text().splitlines():
        if not line.startswith("#"):
            break
        match = _HEADER_RUN.match(line)
        if match:
            return ["tune", "run", match.group(1), "--config", match.group(2)]
    raise ValueError(f"{config}: no '# tune run <recipe> --config <path>' line in its header")


def latest_log(output_dir: Path) -> Path:
    """The newest torchtune DiskLogger file under `output_dir/logs`."""
    logs = sorted((output_dir / "logs").glob("log_*.txt"), key=lambda p: p.stat().st_mtime)
    if not logs:
        raise FileNotFoundError(f"no metric log under {output_dir / 'logs'}")
    return logs[-1]


def read_losses(log_file: Path) -> List[float]:
    """Per-step losses from a torchtune DiskLogger file (`Step N | loss:x ...` lines)."""
    return [float(m.group(2)) for m in _LOSS.finditer(log_file.read_text())]


def run_training(method: str, repo_root: Path, output_root: Path) -> TrainingRun:
    """Run one tiny config by its header command, with output_dir moved under `output_root`."""
    config = repo_root / "configs" / "tiny" / f"{method}.yaml"
    output_dir = (output_root / method).resolve()
    command = header_command(config) + [f"output_dir={output_dir}"]
    print(f"\n==> {method}: {' '.join(command)}", flush=True)
    tune = Path(sys.executable).parent / "tune"
    started = time.perf_counter()
    subprocess.run([str(tune), *command[1:]], cwd=repo_root, check=True)
    seconds = time.perf_counter() - started
    return TrainingRun(method, command, output_dir, read_losses(latest_log(output_dir)), seconds)


def summary_table(runs: List[TrainingRun]) -> str:
    """A Markdown table: method, steps, first and last loss, time, checkpoint."""
    rows = [
        "| method | steps | first loss | last loss | seconds | checkpoint |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for run in runs:
        rows.append(
            f"| {run.method} | {len(run.losses)} | {run.losses[0]:.3f} | {run.losses[-1]:.3f} "
            f"| {run.seconds:.0f} | {run.checkpoint_dir} |"
        )
    return "\n".join(rows)


def quickstart(output_dir: str = "outputs/quickstart", methods: Optional[List[str]] = None) -> int:
    """Run the tiny trainings from the repository root and print where everything went."""
    repo_root = Path.cwd()
    if not (repo_root / "configs" / "tiny").is_dir() or not (repo_root / "recipes").is_dir():
        print(
            "medtune quickstart runs from the repository root (it needs configs/ and recipes/)",
            file=sys.stderr,
        )
        return 2
    try:
        runs = [run_training(m, repo_root, Path(output_dir)) for m in methods or METHODS]
    except subprocess.CalledProcessError as error:
        print(f"\nquickstart: a training failed: {' '.join(error.cmd)}", file=sys.stderr)
        return 1
    print("\nTiny trainings finished:\n")
    print(summary_table(runs))
    for run in runs:
        print(f"\n{run.method}:")
        print(f"  checkpoint (Hugging Face format): {run.checkpoint_dir}")
        if run.adapter_dir:
            print(f"  LoRA adapter (PEFT format):       {run.adapter_dir}")
        print(f"  metric log:                       {run.log_file}")
    return 0


def add_quickstart_command(subparsers) -> None:
    """`medtune quickstart [--output-dir DIR] [--only METHOD ...]`."""
    parser = subparsers.add_parser(
        "quickstart", help="train the tiny model with full SFT, LoRA and QLoRA on CPU"
    )
    parser.add_argument("--output-dir", default="outputs/quickstart", help="where runs are written")
    parser.add_argument("--only", nargs="+", choices=METHODS, help="run only these methods")
    parser.set_defaults(func=lambda args: quickstart(args.output_dir, args.only))
