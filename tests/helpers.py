"""Running the real `tune` and `medtune` executables of this environment in a subprocess."""

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run_cli(
    program: str, args: List[str], cwd: Optional[Path] = None, timeout: int = 600, check: bool = True
) -> subprocess.CompletedProcess:
    """Run `program` (e.g. "tune") from this venv with `args`; on failure show its output."""
    proc = subprocess.run(
        [str(BIN / program), *args],
        cwd=cwd or REPO_ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{program} {' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


_HEADER_RUN = re.compile(r"^#\s+tune run (\S+) --config (\S+)\s*$")


def header_command(config: Path) -> List[str]:
    """`tune run <recipe> --config <config>`: the first single-process run line of a config's header."""
    for line in Path(config).read_text().splitlines():
        if not line.startswith("#"):
            break
        match = _HEADER_RUN.match(line)
        if match:
            return ["tune", "run", match.group(1), "--config", match.group(2)]
    raise ValueError(f"{config}: no '# tune run <recipe> --config <path>' line in its header")
