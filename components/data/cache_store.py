"""The data caches' generic machinery: where they live, their keys, and building a cache folder
once (under a lock, into a temporary folder renamed when complete) so that concurrent runs share
it. :mod:`components.data.pipeline` (tokenized records) and :mod:`components.data.packing` (packs)
build on it; :mod:`components.data.cache_folders` lists and removes what it built.
"""

import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, List, Mapping, Optional, Union

from torchtune.utils import get_logger

from components.cache_root import cache_root as medtune_cache_root

log = get_logger("INFO")


def data_cache_root(cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """``cache_dir``, else ``<medtune cache>/data`` (see :func:`components.cache_root.cache_root`)."""
    if cache_dir is not None:
        return Path(cache_dir)
    return medtune_cache_root() / "data"


def cache_key(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def host_name() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40]


def remove_stale_builds(root: Path) -> List[Path]:
    """Remove temporary build folders (``.tmp-<key>-<pid>-<random>-<host>``) of this host whose
    process is gone (killed builds); return them. Other hosts' folders (a shared cache
    filesystem) are left alone."""
    removed = []
    if not root.is_dir():
        return removed
    for tmp in root.glob(".tmp-*"):
        parts = tmp.name.split("-", 4)
        try:
            pid, host = int(parts[2]), parts[4]
        except (IndexError, ValueError):
            continue
        if host == host_name() and not pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


@contextmanager
def build_lock(root: Path, key: str) -> Iterator[None]:
    """Hold an exclusive lock on ``root/.lock-<key>`` while building a cache: a second process
    after the same cache (another rank of a distributed run, a parallel study step) waits for the
    first and then reuses its result instead of building it again. The lock is advisory
    (``flock``); where the filesystem has none, both build and the rename keeps one."""
    with open(root / f".lock-{key[:20]}", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info(f"waiting for another process building the cache {key[:20]} in {root}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # no locks on this filesystem
            pass
        yield  # closing the file releases the lock


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def mark_used(folder: Path) -> None:
    """Set the folder's modification time to now: ``medtune data cache`` reports it as the last
    use, and ``--remove-unused-days`` goes by it. A read-only cache stays as it is."""
    try:
        os.utime(folder)
    except OSError:
        pass


def build_once(root: Path, key: str, folder: Path, build: Callable[[Path], None]) -> bool:
    """Build the cache ``folder`` unless it is complete: under the key's :func:`build_lock`,
    ``build(tmp)`` fills a fresh temporary folder (``report.json`` last), which is then renamed
    to ``folder``; anything raised (a kill leaves it to :func:`remove_stale_builds`) removes it.
    False when another process completed ``folder`` while this one waited for the lock."""
    root.mkdir(parents=True, exist_ok=True)
    with build_lock(root, key):
        if (folder / "report.json").is_file():
            return False
        remove_stale_builds(root)
        tmp = root / f".tmp-{key[:12]}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{host_name()}"
        tmp.mkdir()
        try:
            build(tmp)
            try:
                os.rename(tmp, folder)
            except OSError:
                if not (folder / "report.json").is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another host finished the same build first
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return True


def write_report(folder: Path, report: Mapping[str, Any]) -> None:
    """The report, written last: a folder with ``report.json`` is a complete cache."""
    part = folder / "report.json.part"
    part.write_text(json.dumps(report, indent=1, default=str))
    os.replace(part, folder / "report.json")
