"""What the data cache holds, and removing what is no longer used (``medtune data cache``).

Every complete cache folder (:mod:`components.data.pipeline`: ``<name>-<key>`` with a
``report.json``; its packed copies under ``packed/``) is listed with its size, rows, when it was
built and when a run last used it (the folder's modification time, set on every cache hit).
Temporary folders of builds are listed too: those of a live process are never touched, those of
a dead one are leftovers of a killed build. Removing a cache is always safe: the next run that
needs it builds it again, and a run that has it memory-mapped keeps reading its files.
"""

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from components.data.cache_store import folder_bytes, host_name, pid_alive

_BUILD = re.compile(r"^\.tmp-[0-9a-f]+-(\d+)-[0-9a-f]+-(.+)$")
DAY = 86_400.0


@dataclass
class CacheFolder:
    """One folder under the cache root: a complete cache or a build's temporary folder."""

    path: Path
    bytes: int
    last_used: float  # seconds since the epoch
    rows: Optional[int] = None  # complete caches: rows kept
    packed: int = 0  # complete caches: packed copies
    building: Optional[str] = None  # temporary folders: "live" or "dead"

    @property
    def removable_now(self) -> bool:
        return self.building != "live"


def _build_state(name: str) -> Optional[str]:
    """``live``/``dead`` for a temporary build folder of this host, ``None`` for anything else."""
    match = _BUILD.match(name)
    if not match:
        return None
    pid, host = int(match.group(1)), match.group(2)
    if host != host_name():
        return "live"  # another machine's build on a shared filesystem: leave it alone
    return "live" if pid_alive(pid) else "dead"


def list_cache(root: Path) -> List[CacheFolder]:
    """The complete caches and build folders under ``root``, most recently used first."""
    found = []
    if not root.is_dir():
        return found
    for path in root.iterdir():
        if not path.is_dir():
            continue
        used = path.stat().st_mtime
        if path.name.startswith(".tmp-"):
            found.append(CacheFolder(path, folder_bytes(path), used, building=_build_state(path.name) or "live"))
            continue
        report_file = path / "report.json"
        if not report_file.is_file():
            continue  # not ours: never listed, never removed
        try:
            rows = json.loads(report_file.read_text()).get("final")
        except (OSError, ValueError):
            rows = None
        packed = path / "packed"
        copies = sum(1 for p in packed.iterdir() if (p / "report.json").is_file()) if packed.is_dir() else 0
        found.append(CacheFolder(path, folder_bytes(path), used, rows=rows, packed=copies))
    return sorted(found, key=lambda f: -f.last_used)


def select_for_removal(folders: List[CacheFolder], unused_days: Optional[float], everything: bool) -> List[CacheFolder]:
    """Complete caches unused for ``unused_days`` days (or all, with ``everything``), and with
    either, the folders of killed builds; nothing when neither is given."""
    if unused_days is None and not everything:
        return []
    now = time.time()
    chosen = []
    for folder in folders:
        if folder.building == "dead":
            chosen.append(folder)
        elif folder.building is None and (everything or now - folder.last_used > unused_days * DAY):
            chosen.append(folder)
    return chosen


def remove(folders: List[CacheFolder]) -> int:
    """Remove the folders; the bytes freed."""
    freed = 0
    for folder in folders:
        if not folder.removable_now:
            raise ValueError(f"{folder.path}: a live build, not removed")
        shutil.rmtree(folder.path)
        freed += folder.bytes
    return freed
