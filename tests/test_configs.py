"""Every training config loads, names real components with matching arguments, and says how to run it."""

import re
from pathlib import Path
from typing import List, Tuple

import pytest
import torchtune
from omegaconf import OmegaConf
from torchtune import config as tt_config
from torchtune._recipe_registry import get_all_recipes
from torchtune.config._errors import ConfigError

from components.config_check import check_component, components
from tests.helpers import REPO_ROOT

CONFIG_DIRS = ("tiny", "llama3_2_3B", "smollm2_135m")
CONFIGS = sorted(p for d in CONFIG_DIRS for p in (REPO_ROOT / "configs" / d).glob("*.yaml"))
RUN_LINE = re.compile(r"^#\s+(tune run (?:--nproc_per_node \d+ )?(\S+) --config (\S+))\s*$")
BUILTIN_RECIPES = {recipe.name for recipe in get_all_recipes()}


def run_lines(path: Path) -> List[Tuple[str, str, str]]:
    """The `tune run` commands in a config's header: (command, recipe, config path)."""
    found = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        match = RUN_LINE.match(line)
        if match:
            found.append(match.groups())
    return found


def recipe_file(recipe: str) -> Path:
    """The source file of a `tune run` recipe: the project's `recipes/x.py`, or a torchtune built-in
    (what tests/test_config_check.py checks each config's keys against)."""
    if recipe.endswith(".py"):
        return REPO_ROOT / recipe
    return Path(torchtune.__file__).resolve().parent.parent / "recipes" / f"{recipe}.py"


def test_configs_exist():
    names = {p.relative_to(REPO_ROOT / "configs").as_posix() for p in CONFIGS}
    for method in ("full_sft", "lora", "qlora"):
        assert {f"tiny/{method}.yaml", f"llama3_2_3B/{method}.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_config_components_match_their_signatures(path):
    cfg = OmegaConf.load(path)
    OmegaConf.resolve(cfg)
    tt_config.validate(cfg)  # torchtune's own check of the top-level components
    nodes = list(components(cfg))
    training = "tasks" not in cfg  # an eval config (recipes/eleuther_eval.py) has no data/optimizer/loss
    required = {"model", "tokenizer", "checkpointer"} | ({"dataset", "optimizer", "loss"} if training else set())
    assert required <= {where for where, _ in nodes}
    problems = [problem for where, node in nodes for problem in check_component(where, node)]
    assert not problems, f"{path.name}: " + "; ".join(problems)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_config_header_gives_the_command_that_runs_it(path):
    lines = run_lines(path)
    assert lines, f"{path} has no '# tune run <recipe> --config {path}' line in its header"
    for command, recipe, config_path in lines:
        assert config_path == path.relative_to(REPO_ROOT).as_posix(), command
        if recipe.endswith(".py"):
            assert (REPO_ROOT / recipe).is_file(), f"{command}: no such recipe file"
        else:
            assert recipe in BUILTIN_RECIPES, f"{command}: not a torchtune built-in recipe"


def test_validation_catches_a_misspelled_argument(tmp_path):
    cfg = OmegaConf.load(REPO_ROOT / "configs" / "tiny" / "lora.yaml")
    cfg.model.lora_rnak = cfg.model.pop("lora_rank")
    with pytest.raises(ConfigError, match="lora_rnak"):
        tt_config.validate(cfg)
