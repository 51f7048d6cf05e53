"""Running the real `tune` and `medtune` executables of this environment in a subprocess."""

import os
import re
import signal
import subprocess
import sys
import time
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


def kill_once_written(
    proc: subprocess.Popen, path: Path, what: str = "the run", timeout: float = 300, sig: int = signal.SIGKILL
) -> None:
    """SIGKILL (or ``sig``, e.g. SIGINT: a Ctrl-C) the process group of ``proc`` (started with
    ``start_new_session=True``) as soon as ``path`` exists: a kill from outside at a known point.
    Fails if ``proc`` exits first or nothing appears within ``timeout`` seconds."""
    try:
        deadline = time.monotonic() + timeout
        while not path.is_file():
            assert proc.poll() is None, f"{what} exited ({proc.returncode}) before {path} was written"
            assert time.monotonic() < deadline, f"no {path} after {timeout:.0f} s"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        proc.wait()
