"""``medtune validate CONFIG [RECIPE] [key=value ...]``: the check every recipe runs first, as a command.

torchtune's ``tune validate`` only instantiates what it can and passes a misspelled optional key
(``batch_szie``). This runs :mod:`components.config_check` for the recipe (given, or read from the
``tune run`` lines of the config's header) plus the data-path check, without loading anything:
"ok" and exit 0, or every problem, one a line, and exit 2.
"""

import argparse
import re
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from components.user_errors import REPO_ROOT, relative_path_note

#: A ``tune run`` line of a config's header: ``# tune run [--nproc_per_node N] RECIPE --config ...``.
RUN_LINE = re.compile(r"^#\s+tune run (?:--nproc_per_node \d+ )?(\S+) --config \S+")


def header_recipes(config_file: Path) -> List[str]:
    """The recipes the ``tune run`` lines of the config's leading comment name, in order, once each."""
    recipes: List[str] = []
    for line in config_file.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        match = RUN_LINE.match(line)
        if match and match.group(1) not in recipes:
            recipes.append(match.group(1))
    return recipes


def recipe_source(recipe: str) -> Optional[Path]:
    """The source file of a recipe: a path (from the current directory, else the repository
    root), or a torchtune built-in name; None when neither exists."""
    if recipe.endswith(".py"):
        for candidate in (Path(recipe), REPO_ROOT / recipe):
            if candidate.is_file():
                return candidate
        return None
    import torchtune

    builtin = Path(torchtune.__file__).resolve().parent.parent / "recipes" / f"{recipe}.py"
    return builtin if builtin.is_file() else None


def validate_problems(config_file: str, recipe: Optional[str] = None, overrides: Sequence[str] = ()) -> List[str]:
    """Every problem of ``config_file`` (with ``key=value`` overrides, as ``tune run`` takes them)
    for ``recipe``, or for each recipe its header names; each line starts with where it is."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from components.config_check import config_problems, missing_data_paths

    path = Path(config_file)
    if not path.is_file():
        return [f"{config_file}: no such file{relative_path_note(config_file)}"]
    try:
        file_cfg = OmegaConf.load(path)
        cfg = OmegaConf.merge(file_cfg, OmegaConf.from_dotlist(list(overrides)))
    except (OmegaConfBaseException, ValueError) as error:
        return [f"{config_file}: cannot read: {str(error).splitlines()[0]}"]
    recipes = [recipe] if recipe else header_recipes(path)
    if not recipes:
        return [f"{config_file}: no recipe given and no '# tune run RECIPE --config ...' line in its header"]
    problems = []
    for name in recipes:
        source = recipe_source(name)
        if source is None:
            problems.append(f"{name}: no such recipe (a recipes/<name>.py file or a torchtune recipe name)")
            continue
        problems += [f"{config_file}: {problem}" for problem in config_problems(cfg, source, file_cfg)]
    problems += [f"{config_file}: {problem}" for problem in missing_data_paths(cfg)]
    return list(dict.fromkeys(problems))


def validate(args: argparse.Namespace) -> int:
    """Print "ok" (exit 0) or every problem of the config (exit 2)."""
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe:  # no recipe, only overrides
        recipe, overrides = None, [recipe] + overrides
    problems = validate_problems(args.config, recipe, overrides)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    recipes = recipe or ", ".join(header_recipes(Path(args.config)))
    print(f"ok: {args.config} for {recipes}")
    return 0


def add_validate_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``medtune validate``."""
    parser = subparsers.add_parser(
        "validate",
        help="check a config for a recipe before running it (unknown keys, components, templates, data paths)",
        description="Check a config as every recipe does first: unknown keys and components with the closest "
        "valid name, prompt templates, data paths. Exit 0 with 'ok', or 2 with every problem.",
    )
    parser.add_argument("config", help="the YAML config, as for tune run --config")
    parser.add_argument(
        "recipe", nargs="?", help="recipes/<name>.py or a torchtune recipe (default: the header's tune run lines)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, as tune run takes them")
    parser.set_defaults(func=validate)
