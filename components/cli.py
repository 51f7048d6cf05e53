"""The ``medtune`` command.

Each subcommand is registered by a function in :data:`COMMANDS` that adds its parser and sets
``func`` (called with the parsed arguments, returning an exit code); to add one, write such a
function and append it. Registering imports nothing heavy: torch, torchtune, datasets,
transformers and lm-eval are imported inside the subcommands, so ``medtune --help`` and
``medtune --version`` answer at once (tests/test_cli_usability.py checks it).

``medtune data ...`` is :mod:`components.data.cli`.
"""

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Callable, List, Optional, Sequence

from components.data.cli import add_data_command
from components.knowtuning.cli import add_knowtuning_command
from components.evaluation.cli import add_eval_command, add_score_command
from components.hub.push import add_push_command
from components.study.cli import add_study_command
from components.validate import add_validate_command

COMMANDS: List[Callable[[argparse._SubParsersAction], None]] = [
    add_data_command,
    add_knowtuning_command,
    add_study_command,
    add_eval_command,
    add_score_command,
    add_push_command,
    add_validate_command,
]


def _version() -> str:
    """The installed package's version (``pip install -e .`` registers it)."""
    try:
        return version("medtune")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medtune", description="Fine-tune and evaluate LLMs on medical QA.")
    parser.add_argument("--version", action="version", version=f"medtune {_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``medtune``; data errors, unreachable hubs and bad arguments print one line and exit 2,
    not a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConnectionError as e:  # datasets' "Couldn't reach 'owner/name' on the Hub"
        print(f"medtune: error: {e}; offline, name a local copy instead (a path after the kind:)", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # DataError is a ValueError; missing or unreadable files
        print(f"medtune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
