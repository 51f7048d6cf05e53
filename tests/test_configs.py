"""Every training config loads, names real components with matching arguments, and says how to run it."""

import inspect
import re
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchtune import config as tt_config
from torchtune._recipe_registry import get_all_recipes
from torchtune.config._errors import ConfigError

from tests.helpers import REPO_ROOT

CONFIG_DIRS = ("tiny", "llama3_2_3B")
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


def components(node, where: str = "") -> Iterator[Tuple[str, DictConfig]]:
    """Every `_component_` node of a config, nested ones included."""
    if isinstance(node, DictConfig):
        if "_component_" in node:
            yield where, node
        for key, child in node.items():
            yield from components(child, f"{where}.{key}" if where else str(key))
    elif isinstance(node, ListConfig):
        for index, child in enumerate(node):
            yield from components(child, f"{where}[{index}]")


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
    for where, node in nodes:
        component = tt_config._utils._get_component_from_path(node["_component_"])
        kwargs = {k: v for k, v in node.items() if k != "_component_"}
        try:
            inspect.signature(component).bind_partial(**kwargs)
        except TypeError as error:
            pytest.fail(f"{path.name}: {where} ({node['_component_']}): {error}")


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
