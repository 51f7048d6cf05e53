"""Make `tune run recipes/<name>.py` import this project's recipes, not torchtune's placeholder.

`tune run recipes/x.py` runs `runpy.run_module("recipes.x")` after *appending* the current
directory to `sys.path`. The torchtune wheel installs a top-level `recipes` package in
site-packages whose `__init__` only raises, and site-packages comes first, so custom recipes in a
`recipes/` folder can never be found. The `medtune_recipes.pth` file that this package installs
calls `install()` at interpreter start-up: a `sys.meta_path` finder that resolves the top-level
`recipes` package to `./recipes` whenever the current directory has a `recipes/__init__.py`.
Nothing else is affected; outside such a directory the import falls through as before.
"""

import importlib.util
import os
import sys
from importlib.machinery import ModuleSpec
from typing import Optional, Sequence


class LocalRecipesFinder:
    """Resolves `recipes` to the current directory's `recipes/` package, if there is one."""

    @staticmethod
    def find_spec(
        fullname: str, path: Optional[Sequence[str]] = None, target: object = None
    ) -> Optional[ModuleSpec]:
        if fullname != "recipes":
            return None
        package_dir = os.path.join(os.getcwd(), "recipes")
        init = os.path.join(package_dir, "__init__.py")
        if not os.path.isfile(init):
            return None
        return importlib.util.spec_from_file_location(
            "recipes", init, submodule_search_locations=[package_dir]
        )


def install() -> None:
    """Put the finder first on `sys.meta_path` (idempotent)."""
    if not any(isinstance(f, LocalRecipesFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, LocalRecipesFinder())
