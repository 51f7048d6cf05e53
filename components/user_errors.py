"""One line and exit status 2 for a user's mistake in ``tune run``, never a traceback.

Every recipe wraps its ``recipe_main`` in :func:`one_line_errors` (outside torchtune's
``@config.parse``, which is where a missing ``--config`` file fails): a nonexistent ``--config``,
a :class:`~components.data.errors.DataError` (file, record, what is wrong), a
:class:`SettingsError` and a missing file end the run with that one line on stderr. A relative
path that does not exist, seen from outside the repository root, is explained: the shipped configs name sample data by paths relative to that root.
"""

import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

#: The repository root: the shipped configs' relative paths (sample data, recipes) start here.
REPO_ROOT = Path(__file__).resolve().parents[1]


class SettingsError(ValueError):
    """Settings a recipe cannot run together; the message names them and what to change."""


def relative_path_note(path: Optional[Union[str, Path]]) -> str:
    """For a relative ``path`` that does not exist while the current directory is not the
    repository root: where it was looked for and where to run from; else nothing."""
    if path is None or Path(path).is_absolute() or Path(path).exists():
        return ""
    cwd = Path.cwd().resolve()
    if cwd == REPO_ROOT:
        return ""
    return (
        f" (relative paths are read from the current directory {cwd}; the shipped configs' paths "
        f"are relative to the repository root {REPO_ROOT}: run from there, or give absolute paths)"
    )


def config_file_from_argv(argv: Optional[Sequence[str]] = None) -> Optional[str]:
    """The ``--config`` value of a ``tune run`` command line (``sys.argv`` inside the recipe)."""
    argv = list(sys.argv if argv is None else argv)
    for index, arg in enumerate(argv):
        if arg == "--config" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def exit_with(message: str) -> None:
    """Print ``error: message`` on stderr and exit with status 2 (a user's mistake)."""
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
    print(f"{prefix}error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def one_line_errors(main: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate ``recipe_main`` (above ``@config.parse``): a bad ``--config`` path, a
    ``DataError`` or a missing file ends the run with one line and exit status 2."""

    from components.data.errors import DataError  # here: `medtune --help` stays light

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        config_file = config_file_from_argv()
        if config_file is not None and not Path(config_file).is_file():
            what = "is a directory, expected a YAML file" if Path(config_file).is_dir() else "no such file"
            exit_with(f"--config {config_file}: {what}{relative_path_note(config_file)}")
        try:
            return main(*args, **kwargs)
        except DataError as error:
            exit_with(f"{error}{relative_path_note(error.file)}")
        except SettingsError as error:
            exit_with(str(error))
        except FileNotFoundError as error:
            exit_with(f"{error.filename}: {error.strerror or 'no such file'}{relative_path_note(error.filename)}")

    return wrapper
