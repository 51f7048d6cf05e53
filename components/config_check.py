"""Check a recipe's config before any work starts: unknown keys and components, with suggestions.

torchtune reads a config lazily: a misspelled optional key (``save_every_n_step``) is silently
ignored, and a bad ``_component_`` or argument fails only when the recipe reaches it, maybe after
the model has loaded. :func:`check_recipe_config` finds every such problem at once and raises
:class:`ConfigCheckError` naming the config file, the dotted key and the closest valid name
(``difflib``); recipes call :func:`exit_on_config_problems` first thing in ``recipe_main``, which
prints them and exits before any work:

1. Top-level keys: the keys the recipe reads, found by parsing its source (``cfg.x``,
   ``cfg.get("x")``, ``cfg["x"]``, ``"x" in cfg`` on every name a ``cfg`` parameter or
   alias is bound to), plus keys the config's own ``${...}`` interpolations refer to and
   :data:`COMMON_KEYS`. Anything else is unknown.
2. Every ``_component_``, nested ones included: it must import, and its other keys must be
   parameters of the callable; when it takes ``**kwargs``, a key very close to a named
   parameter (:data:`KWARGS_CUTOFF`) is still reported as a misspelling.
"""

import ast
import difflib
import importlib
import inspect
import pkgutil
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Set, Tuple, Union

from omegaconf import DictConfig, ListConfig, OmegaConf

from components.user_errors import config_file_from_argv, relative_path_note

#: Keys a config may hold whatever its recipe reads: ``output_dir`` and ``resume_from_checkpoint``
#: appear in every torchtune config (the first is also what interpolations like
#: ``${output_dir}/logs`` refer to, the second is read by some recipes through the checkpointer).
COMMON_KEYS = frozenset({"output_dir", "resume_from_checkpoint"})
#: Methods of a ``DictConfig``: ``cfg.get(...)`` is a read through a method, not a key ``get``.
_CONFIG_METHODS = frozenset(dir(DictConfig))
#: For a callable with ``**kwargs``, an unknown argument at least this similar to a named
#: parameter (``templte`` / ``template``: 0.93) is reported; the keyword arguments that the
#: project's builders and torchtune's loggers pass on (``load_dataset``'s, ``wandb.init``'s) all
#: stay below 0.75.
KWARGS_CUTOFF = 0.8
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][\w-]*)")


class ConfigCheckError(ValueError):
    """A config that cannot run as written; ``problems`` lists each, already located."""

    def __init__(self, problems: Sequence[str], config_file: Optional[str] = None):
        self.problems = list(problems)
        self.config_file = config_file
        prefix = f"{config_file}: " if config_file else ""
        super().__init__("\n".join(prefix + problem for problem in self.problems))


def _hint(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to ``name``, or nothing."""
    close = difflib.get_close_matches(name, sorted(set(choices)), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------------------- keys a recipe reads


def _string_value(node: ast.AST, constants: dict) -> Optional[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return constants.get(node.id)
    return None


@lru_cache(maxsize=32)
def recipe_keys(recipe_file: Union[str, Path]) -> frozenset:
    """The top-level config keys a recipe file reads, from its source.

    The config is whatever a parameter named ``cfg`` holds, and any name assigned from one
    (``c = cfg``); reads are ``c.key``, ``c.get("key")``, ``c.pop("key")``, ``c["key"]`` and
    ``"key" in c``, with the key a string literal or a module-level string constant
    (``cfg.get(PROFILER_KEY)``), whether defined in the file or imported from a module.
    """
    tree = ast.parse(Path(recipe_file).read_text(encoding="utf-8"), filename=str(recipe_file))
    constants = _string_constants(tree)
    names = {"cfg"}
    for node in ast.walk(tree):  # aliases: c = cfg
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Name) and node.value.id in names:
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    keys: Set[str] = set()
    calls = {id(n.func): n for n in ast.walk(tree) if isinstance(n, ast.Call)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in names:
            call = calls.get(id(node))
            if call is None and node.attr not in _CONFIG_METHODS:
                keys.add(node.attr)
            elif call is not None and node.attr in ("get", "pop", "select") and call.args:
                key = _string_value(call.args[0], constants)  # cfg.get("key", default)
                if key is not None:
                    keys.add(key.split(".")[0])
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in names:
            key = _string_value(node.slice, constants)
            if key is not None:
                keys.add(key)
        elif isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], (ast.In, ast.NotIn)):
            target = node.comparators[0]
            key = _string_value(node.left, constants)
            if isinstance(target, ast.Name) and target.id in names and key is not None:
                keys.add(key)
    return frozenset(keys)


def _string_constants(tree: ast.Module) -> dict:
    """Module-level ``NAME = "text"`` assignments, and string constants imported by name."""
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            constants.update({t.id: node.value.value for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                if alias.name.isupper():
                    try:
                        value = getattr(importlib.import_module(node.module), alias.name)
                    except (ImportError, AttributeError):
                        continue
                    if isinstance(value, str):
                        constants[alias.asname or alias.name] = value
    return constants


def _interpolated_keys(cfg: DictConfig) -> Set[str]:
    """Top-level keys the config's own ``${...}`` interpolations refer to."""
    text = OmegaConf.to_yaml(cfg, resolve=False)
    return {match.group(1) for match in _INTERPOLATION.finditer(text) if not match.group(1).startswith("oc.")}


# ---------------------------------------------------------------------------- components


def components(node: Any, where: str = "") -> Iterator[Tuple[str, DictConfig]]:
    """``(dotted key, node)`` for every ``_component_`` node of a config, nested ones included."""
    if isinstance(node, DictConfig):
        if "_component_" in node:
            yield where, node
        for key, child in node.items_ex(resolve=False):
            yield from components(child, f"{where}.{key}" if where else str(key))
    elif isinstance(node, ListConfig):
        for index, child in enumerate(node._iter_ex(resolve=False)):
            yield from components(child, f"{where}[{index}]")


def resolve_component(path: str) -> Tuple[Any, Optional[str]]:
    """``(callable, None)`` for a dotted path, or ``(None, what is wrong)``: the first segment
    that does not exist, with the closest name that does."""
    parts = path.split(".") if isinstance(path, str) else []
    if not parts or not all(p.isidentifier() for p in parts):
        return None, f"{path!r} is not a dotted Python path"
    obj = None
    for found in range(len(parts), 0, -1):  # the longest prefix that is a module
        name = ".".join(parts[:found])
        try:
            obj = importlib.import_module(name)
            break
        except ModuleNotFoundError as error:
            if error.name is None or not (name == error.name or name.startswith(error.name + ".")):
                return None, f"importing {name!r} fails: {error}"  # a module whose own import fails
        except ImportError as error:
            return None, f"importing {name!r} fails: {error}"
    if obj is None:
        choices = [m.name for m in pkgutil.iter_modules()]
        return None, f"{path!r} does not exist: no module {parts[0]!r}{_hint(parts[0], choices)}"
    for index in range(found, len(parts)):
        try:
            present = hasattr(obj, parts[index])
        except ImportError as error:  # a package's lazy attribute whose optional package is missing
            return None, f"importing {path!r} fails: {error}"
        if not present:
            where = ".".join(parts[:index])
            return None, f"{path!r} does not exist: no {parts[index]!r} in {where}{_hint(parts[index], _attributes(obj))}"
        obj = getattr(obj, parts[index])
    if not callable(obj):
        return None, f"{path!r} is not callable"
    return obj, None


def _attributes(obj: Any) -> List[str]:
    names = [n for n in dir(obj) if not n.startswith("_")]
    if inspect.ismodule(obj) and hasattr(obj, "__path__"):
        names += [m.name for m in pkgutil.iter_modules(obj.__path__)]
    return names


def check_component(where: str, node: DictConfig) -> List[str]:
    """Problems of one ``_component_`` node: an unimportable path or arguments its callable lacks."""
    path = node["_component_"]
    if not isinstance(path, str):
        return [f"{where}._component_: expected a dotted path, got {path!r}"]
    component, problem = resolve_component(path)
    if problem:
        return [f"{where}._component_: {problem}"]
    try:
        parameters = inspect.signature(component).parameters
    except (TypeError, ValueError):  # a builtin without a signature: nothing to compare
        return []
    accepted = [n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    var_keyword = next((n for n, p in parameters.items() if p.kind is p.VAR_KEYWORD), None)
    problems = []
    for key in node.keys():
        if key == "_component_" or key in accepted:
            continue
        if var_keyword is None:
            problems.append(f"{where}.{key}: {path} has no argument {key!r}{_hint(str(key), accepted)}")
            continue
        # **kwargs takes any name, but one this close to a named parameter is a misspelling.
        close = difflib.get_close_matches(str(key), accepted, n=1, cutoff=KWARGS_CUTOFF)
        if close:
            problems.append(
                f"{where}.{key}: {path} has no argument {key!r} (did you mean {close[0]!r}?); "
                f"it would go to **{var_keyword}"
            )
    return problems


# ---------------------------------------------------------------------------- the check


def config_problems(
    cfg: DictConfig, recipe_file: Union[str, Path], file_cfg: Optional[DictConfig] = None
) -> List[str]:
    """Every problem of ``cfg`` for the recipe in ``recipe_file`` (see the module docstring).

    ``file_cfg`` is the config file as written: a key its interpolations refer to stays known
    when a command-line override replaces the interpolation (``checkpointer.checkpoint_dir=...``
    over ``${stage1_dir}/epoch_2``), and an unknown key not in it is marked as set on the
    command line.
    """
    known = set(recipe_keys(str(recipe_file))) | COMMON_KEYS | _interpolated_keys(cfg)
    if file_cfg is not None:
        known |= _interpolated_keys(file_cfg)
    problems = []
    for key in cfg.keys():
        if key not in known:
            origin = ", set on the command line" if file_cfg is not None and key not in file_cfg else ""
            problems.append(f"unknown key {key!r}{_hint(str(key), known)}: {Path(recipe_file).name} does not read it{origin}")
    for where, node in components(cfg):
        problems += check_component(where, node)
        problems += template_problems(where, node)
    return problems


def template_problems(where: str, node: DictConfig) -> List[str]:
    """An unknown prompt template named by a ``components.data`` builder's ``template`` key,
    with the templates there are and the closest one."""
    path = node.get("_component_")
    template = OmegaConf.select(node, "template", throw_on_resolution_failure=False)
    if not (isinstance(path, str) and path.startswith("components.data.") and isinstance(template, str)):
        return []
    from components.data.templates import TEMPLATES

    if template in TEMPLATES:
        return []
    return [f"{where}.template: unknown template {template!r}{_hint(template, TEMPLATES)}; the templates are {', '.join(TEMPLATES)}"]


#: Keys of a ``dataset`` builder that name local files or folders (``decontaminate`` maps
#: benchmark names to files); ``data_files`` only when ``source`` is a local format.
_PATH_KEYS = ("data_dir", "data_files")
_LOCAL_SOURCES = frozenset({None, "json", "csv", "parquet", "text", "arrow"})


def missing_data_paths(cfg: DictConfig) -> List[str]:
    """Data files and folders the ``dataset`` section names that do not exist, each located;
    a relative one seen from outside the repository root says where paths start."""

    problems = []
    for where, node in components(cfg.get("dataset")) if "dataset" in cfg else []:
        where = f"dataset.{where}" if where else "dataset"
        named = []
        for key in _PATH_KEYS:
            if key == "data_files" and OmegaConf.select(node, "source", throw_on_resolution_failure=False) not in _LOCAL_SOURCES:
                continue
            value = OmegaConf.select(node, key, throw_on_resolution_failure=False)
            values = [value] if isinstance(value, str) else list(value) if isinstance(value, ListConfig) else []
            named += [(f"{where}.{key}", v) for v in values if isinstance(v, str)]
        decontaminate = OmegaConf.select(node, "decontaminate", throw_on_resolution_failure=False)
        if isinstance(decontaminate, DictConfig):
            named += [(f"{where}.decontaminate.{k}", v) for k, v in decontaminate.items() if isinstance(v, str)]
        for key, path in named:
            if not Path(path).exists():
                problems.append(f"{key}: {path}: no such file or folder{relative_path_note(path)}")
    return problems


def check_recipe_config(cfg: DictConfig, recipe_file: Union[str, Path], config_file: Optional[str] = None) -> None:
    """Raise :class:`ConfigCheckError` listing every unknown key and bad component of ``cfg``;
    without ``config_file``, the config file is the ``--config`` argument of ``tune run``."""
    config_file = config_file or config_file_from_argv()
    file_cfg = OmegaConf.load(config_file) if config_file and Path(config_file).is_file() else None
    problems = config_problems(cfg, recipe_file, file_cfg)
    if problems:
        raise ConfigCheckError(problems, config_file)


def exit_on_config_problems(cfg: DictConfig, recipe_file: Union[str, Path]) -> None:
    """First thing in ``recipe_main``: :func:`check_recipe_config`, and on problems print them
    and exit with status 2 before any work, without a traceback through torchtune's wrapper.
    Data files the ``dataset`` section names must exist too (:func:`missing_data_paths`)."""
    try:
        check_recipe_config(cfg, recipe_file)
        missing = missing_data_paths(cfg)
        if missing:
            raise ConfigCheckError(missing, config_file_from_argv())
    except ConfigCheckError as error:
        print(f"{error}\nNothing was run: fix the config or the command line.", file=sys.stderr)
        raise SystemExit(2) from None
