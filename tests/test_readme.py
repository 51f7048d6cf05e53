"""The README's two set-up commands and its recipe/config table stay true to the repository."""

import re
import subprocess

from tests.helpers import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def first_code_block(heading: str) -> str:
    section = README.split(f"\n{heading}\n", 1)[1]
    return re.search(r"```[a-z]*\n(.*?)```", section, re.S).group(1)


def test_quickstart_and_tests_are_single_lines():
    for heading in ("## Quickstart", "## Tests"):
        block = first_code_block(heading)
        assert block.count("\n") == 1, f"{heading}: the first code block must be one line"
    assert first_code_block("## Quickstart").strip().endswith("medtune study configs/studies/quickstart.yaml")
    assert first_code_block("## Tests").strip().endswith("pytest")


def test_ci_runs_the_tests_command_exactly():
    script = (REPO_ROOT / ".ci" / "run").read_text()
    extractor = re.search(r"command=\$\((awk .*)\)\n", script).group(1)
    extracted = subprocess.run(
        ["bash", "-c", extractor], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert extracted == first_code_block("## Tests")


def test_every_recipe_and_config_is_in_the_table():
    for recipe in sorted((REPO_ROOT / "recipes").glob("[!_]*.py")):
        assert f"`recipes/{recipe.name}`" in README, recipe.name
    for config in sorted((REPO_ROOT / "configs").glob("*/*.yaml")):
        folder, stem = config.parent.name, config.stem
        assert f"configs/{folder}/{stem}.yaml" in README or re.search(
            rf"configs/{folder}/\{{[^}}]*\b{stem}\b[^}}]*\}}\.yaml", README
        ), config
