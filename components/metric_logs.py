"""Reading torchtune's metric logs: the DiskLogger files a recipe writes under output_dir/logs."""

import re
from pathlib import Path
from typing import Dict, List

_LOSS = re.compile(r"Step (\d+) \| .*?\bloss:([-+0-9.eE]+)")
_STEP = re.compile(r"^Step (\d+) \| (.*)$", re.MULTILINE)


def latest_log(output_dir: Path) -> Path:
    """The newest DiskLogger file under `output_dir/logs`."""
    logs = sorted((Path(output_dir) / "logs").glob("log_*.txt"), key=lambda p: p.stat().st_mtime)
    if not logs:
        raise FileNotFoundError(f"no metric log under {Path(output_dir) / 'logs'}")
    return logs[-1]


def step_losses(log_file: Path) -> Dict[int, float]:
    """Step -> loss from a DiskLogger file (`Step N | loss:x ...` lines); a resumed run that
    appended to the same file keeps the last value logged for each step."""
    return {int(m.group(1)): float(m.group(2)) for m in _LOSS.finditer(Path(log_file).read_text())}


def step_metrics(log_file: Path) -> Dict[int, Dict[str, float]]:
    """Step -> {metric: value} of every numeric `name:value` a DiskLogger line holds."""
    steps: Dict[int, Dict[str, float]] = {}
    for match in _STEP.finditer(Path(log_file).read_text()):
        record = steps.setdefault(int(match.group(1)), {})
        for item in match.group(2).split():
            name, _, value = item.partition(":")
            try:
                record[name] = float(value)
            except ValueError:
                continue
    return steps


def read_losses(log_file: Path) -> List[float]:
    """The losses of a DiskLogger file in step order."""
    return [loss for _, loss in sorted(step_losses(log_file).items())]
