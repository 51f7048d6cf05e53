"""`tune run recipes/<name>.py` finds the current directory's recipes, not torchtune's placeholder."""

import subprocess
import sys

from tests.helpers import REPO_ROOT, run_cli


def _make_project(root, marker):
    (root / "recipes").mkdir()
    (root / "recipes" / "__init__.py").write_text("")
    (root / "recipes" / "probe.py").write_text(
        "import sys\nprint('probe ran', %r, sys.argv[1:])\n" % marker
    )
    (root / "probe.yaml").write_text("seed: 1\n")


def test_tune_run_finds_a_recipe_in_the_current_directory(tmp_path):
    _make_project(tmp_path, "here")
    proc = run_cli("tune", ["run", "recipes/probe.py", "--config", "probe.yaml"], cwd=tmp_path)
    assert "probe ran here ['--config', 'probe.yaml']" in proc.stdout


def test_the_repository_recipes_package_is_ours():
    code = "import recipes; print(recipes.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == str(REPO_ROOT / "recipes" / "__init__.py")


def test_elsewhere_torchtune_behaviour_is_unchanged(tmp_path):
    # No recipes/ here: the import reaches torchtune's placeholder, which refuses as it always did.
    proc = subprocess.run(
        [sys.executable, "-c", "import recipes"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "torchtune recipes directory isn't a package" in proc.stderr
