"""The README's two set-up commands, its recipe/config table, and every command and path that the
README and the config headers mention stay true to the repository."""

import re
import shlex
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


# ---- every command and path the README and the config headers mention -------------------------

# Where a documented path may point without being in the repository: what a command writes, the
# user's own files and folders, and the tests' real data beside the checkout.
OUTPUT_OR_USER = ("outputs/", "/tmp/", "~/", "$", "/path/to/", "/data/", "out/", "plots/", ".venv/", "../shared/data")
# Names standing for a value the user gives: `RUN_DIR`, `epoch_N`, `<output_dir>`, `ORG/NAME`.
PLACEHOLDER = re.compile(r"<[^>]*>|(^|/)([A-Z][A-Z_]*|out|output_dir)(/|$)|\b(epoch|step)_N\b|\$")
HUB_ID = re.compile(r"[\w.-]+/[\w.*-]+")  # two parts: a Hub model or data set id (meta-llama/Llama-3.2-3B)
FILE = re.compile(r"\.(py|ya?ml|jsonl?|md|txt|sh|xml|toml|safetensors|pt)$")
TOP_LEVEL = {p.name for p in REPO_ROOT.iterdir() if not p.name.startswith(".git")}


def config_headers() -> dict:
    """Each config's leading comment block, without the `#`s."""
    headers = {}
    for config in sorted((REPO_ROOT / "configs").glob("*/*.yaml")):
        lines = []
        for line in config.read_text().splitlines():
            if not line.startswith("#"):
                break
            lines.append(line.lstrip("#").strip())
        headers[str(config.relative_to(REPO_ROOT))] = "\n".join(lines)
    return headers


def readme_code() -> list:
    """Every code block (fenced or indented) and inline code span of the README."""
    fenced = re.findall(r"```[a-z]*\n(.*?)```", README, re.S)
    rest = re.sub(r"```[a-z]*\n.*?```", "", README, flags=re.S)
    indented = ["\n".join(m) for m in re.findall(r"((?:\n {4}\S[^\n]*)+)", rest)]
    inline = re.findall(r"`([^`\n]+)`", rest)
    return fenced + indented + inline


def commands(text: str) -> list:
    """The `tune run ...` and `medtune ...` commands in a text, one per shell command."""
    found = []
    for line in text.splitlines():
        line = re.sub(r"\s+#.*$", "", line.strip())
        for part in re.split(r"\s*(?:&&|;|\|)\s*", line):
            if re.match(r"(tune run|medtune)( |$)", part):
                found.append(part)
    return found


def mentioned_paths(text: str) -> set:
    """Words of a text that name a file or folder (they hold a `/`), without the punctuation or
    the `key=`/`source:` prefix around them; URLs and option values in braces are expanded."""
    paths = set()
    for word in re.split(r"[\s`'\"();]+", re.sub(r"<[^<>\n]*>", "<placeholder>", text)):
        word = re.sub(r"^(?:[\w.]+=|[a-z_]+:(?!//))", "", word).rstrip(".:,")
        parts = word.strip("/").split("/")
        if "/" not in word or "://" in word or word.startswith(("-", "@")) or all(len(p) <= 1 or p.isdigit() for p in parts):
            continue  # not a path: a URL, an option, `q/k/v/o`, `Step 1/2/3`
        paths.update(_expand_braces(word))
    return paths


def _expand_braces(word: str) -> list:
    match = re.search(r"\{([^{}]*,[^{}]*)\}", word)
    if not match:
        return [word]
    return [w for option in match.group(1).split(",")
            for w in _expand_braces(word[: match.start()] + option + word[match.end():])]


def path_problem(path: str) -> str:
    """Why a mentioned path is wrong, or '' when it exists here or is an output, user path or Hub id."""
    if path.startswith(OUTPUT_OR_USER) or PLACEHOLDER.search(path):
        return ""
    if path.startswith("../"):
        return "points outside the repository, where users have nothing"
    first = path.lstrip("./").split("/")[0]
    if path.endswith("/") and path.count("/") == 1:  # a folder named inside a list of folders
        return "" if first in TOP_LEVEL or list(REPO_ROOT.glob(f"*/{first}")) else "names no folder of the repository"
    if first not in TOP_LEVEL:
        if not path.startswith("/") and (HUB_ID.fullmatch(path) or not FILE.search(path)):
            return ""  # a Hub id (meta-llama/Llama-3.2-3B) or a list of names (instruction/input/output)
        return "is neither in the repository nor an output or user path"
    if "*" in path:
        return "" if list(REPO_ROOT.glob(path)) else "matches no file"
    return "" if (REPO_ROOT / path).exists() else "does not exist"


def test_every_path_the_readme_and_config_headers_name_exists():
    sources = {"README.md": "\n".join(readme_code()), **config_headers()}
    problems = [
        f"{where}: {path} {problem}"
        for where, text in sources.items()
        for path in sorted(mentioned_paths(text))
        if (problem := path_problem(path))
    ]
    assert not problems, "\n".join(problems)


def _tune_run_problems(command: str) -> list:
    words = shlex.split(command)[2:]
    while words and words[0].startswith("--") and words[0] != "--config":
        words = words[2:]  # --nproc_per_node 8
    recipe = words[0] if words else ""
    if not recipe or "..." in words or PLACEHOLDER.search(recipe):
        return []  # prose naming the command (`tune run`, `tune run ... key=value`), not one to type
    problems = [] if (REPO_ROOT / recipe).is_file() else [f"recipe {recipe!r} is not a file of the repository"]
    if "--config" not in words:
        return problems + ["no --config"]
    config = words[words.index("--config") + 1]
    if not PLACEHOLDER.search(config) and not (REPO_ROOT / config).is_file():
        problems.append(f"config {config!r} is not a file of the repository")
    return problems


def _medtune_help(subcommand: tuple) -> int:
    from components.cli import main

    try:
        return main([*subcommand, "--help"]) or 0
    except SystemExit as exit:
        return exit.code or 0


def test_every_documented_command_names_a_real_recipe_config_and_subcommand(capsys):
    sources = {"README.md": "\n".join(readme_code()), **config_headers()}
    found = [(where, command) for where, text in sources.items() for command in commands(text)]
    assert len([c for _, c in found if c.startswith("tune run")]) > 20
    problems, subcommands = [], {}
    for where, command in found:
        if command.startswith("tune run"):
            problems += [f"{where}: `{command}`: {p}" for p in _tune_run_problems(command)]
        else:
            words = shlex.split(command)[1:]
            # the subcommand (and a sub-subcommand): the leading plain lowercase words
            names = tuple(next(iter([w for w in [words[:2], words[:1]] if all(re.fullmatch(r"[a-z]+(-[a-z]+)*", x) for x in w)]), []))
            subcommands.setdefault(names, []).append(f"{where}: `{command}`")
    for names, places in subcommands.items():
        code = _medtune_help(names)
        capsys.readouterr()
        if not names or code != 0:
            problems.append(f"`medtune {' '.join(names)} --help` exits {code}: " + "; ".join(places))
    assert {("study",), ("push",), ("eval",), ("knowtuning", "build-ka")} <= set(subcommands)
    assert not problems, "\n".join(problems)
