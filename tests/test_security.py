"""Security rules, checked on the code and on a real run.

- Checkpoints load only from safetensors or with ``weights_only=True``: every ``torch.load`` in
  components/ and recipes/ passes ``weights_only=True``, no call passes ``weights_only`` anything
  but True, and nothing unpickles with ``pickle``/``dill``/``joblib`` (an AST scan, so a comment
  or docstring mentioning ``torch.load`` neither hides nor fakes a call).
- ``trust_remote_code`` is never switched on in components/, recipes/, evals/ or configs/.
- A Hugging Face token in the environment never reaches anything a run writes or prints: a
  training, its study manifest and an evaluation run with a fake token, then every file written
  and everything printed is searched for it.
"""

import ast
import os
import re
import subprocess
import uuid
from pathlib import Path
from typing import Iterator, List, Tuple

from tests.helpers import BIN, REPO_ROOT

CODE_DIRS = ("components", "recipes")
REMOTE_CODE_DIRS = ("components", "recipes", "evals", "configs")
#: Modules whose load functions unpickle arbitrary objects.
PICKLE_MODULES = {"pickle", "dill", "joblib", "cloudpickle"}
_REMOTE_CODE_TEXT = re.compile(r"trust_remote_code\s*[:=]\s*[\"']?(true|yes|on|1)\b", re.IGNORECASE)


def python_files(*dirs: str) -> List[Path]:
    return sorted(p for d in dirs for p in (REPO_ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)


def _where(path: Path, node: ast.AST) -> str:
    try:
        path = path.relative_to(REPO_ROOT)
    except ValueError:
        pass
    return f"{path}:{node.lineno}"


def _module_aliases(tree: ast.AST, module: str) -> Tuple[set, set]:
    """Names bound to ``module`` (``import torch as t``) and to its ``load`` (``from torch import load``)."""
    modules, loads = {module}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name == module}
        elif isinstance(node, ast.ImportFrom) and node.module == module:
            loads |= {a.asname or a.name for a in node.names if a.name in ("load", "loads")}
    return modules, loads


def unsafe_loads(path: Path) -> Iterator[str]:
    """Each call in ``path`` that may unpickle arbitrary objects, as ``file:line: what``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    torch_names, torch_loads = _module_aliases(tree, "torch")
    pickle_names = set()
    for module in PICKLE_MODULES:
        names, loads = _module_aliases(tree, module)
        pickle_names |= {(n, None) for n in names} | {(None, n) for n in loads}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        is_torch_load = (
            isinstance(func, ast.Attribute) and func.attr == "load" and isinstance(func.value, ast.Name) and func.value.id in torch_names
        ) or (isinstance(func, ast.Name) and func.id in torch_loads)
        weights_only = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
        safe = isinstance(weights_only, ast.Constant) and weights_only.value is True
        if is_torch_load and not safe:
            yield f"{_where(path, node)}: torch.load without weights_only=True"
        elif weights_only is not None and not safe:
            yield f"{_where(path, node)}: weights_only={ast.unparse(weights_only)}"
        if isinstance(func, ast.Attribute) and func.attr in ("load", "loads") and isinstance(func.value, ast.Name):
            if (func.value.id, None) in pickle_names:
                yield f"{_where(path, node)}: {func.value.id}.{func.attr} unpickles"
        elif isinstance(func, ast.Name) and (None, func.id) in pickle_names:
            yield f"{_where(path, node)}: {func.id} unpickles"


def remote_code(path: Path) -> Iterator[str]:
    """Each place in ``path`` that sets ``trust_remote_code`` to anything but False."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".py":
        tree = ast.parse(text, filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                if not (isinstance(node.value, ast.Constant) and node.value.value is False):
                    yield f"{_where(path, node)}: trust_remote_code={ast.unparse(node.value)}"
            elif isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values):
                    if isinstance(key, ast.Constant) and key.value == "trust_remote_code":
                        if not (isinstance(value, ast.Constant) and value.value is False):
                            yield f"{_where(path, key)}: 'trust_remote_code': {ast.unparse(value)}"
    for number, line in enumerate(text.splitlines(), start=1):  # YAML, and strings like model_args
        if _REMOTE_CODE_TEXT.search(line):
            yield f"{_where(path, ast.Pass(lineno=number))}: {line.strip()}"


def lines(problems: Iterator[str]) -> set:
    """The line numbers of ``file:line: what`` reports."""
    return {int(problem.split(":")[1]) for problem in problems}


def test_the_scans_find_what_they_look_for(tmp_path):
    """The scans themselves: each unsafe form is reported, the safe ones are not."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import torch, pickle\n"
        "import torch as T\n"
        "from torch import load as tload\n"
        "torch.load('a')\n"  # 4
        "T.load('b', weights_only=False)\n"  # 5
        "tload('c', mmap=True)\n"  # 6
        "torch.load('ok', weights_only=True)\n"
        "checkpointer.load_checkpoint(weights_only=False)\n"  # 8
        "pickle.loads(b'')\n"  # 9
        "AutoModel.from_pretrained('x', trust_remote_code=True)\n"  # 10
        "kwargs = {'trust_remote_code': flag}\n"  # 11
        "AutoModel.from_pretrained('x', trust_remote_code=False)\n"
        "args = 'pretrained=x,trust_remote_code=True'\n"  # 13
    )
    assert lines(unsafe_loads(probe)) == {4, 5, 6, 8, 9}
    assert lines(remote_code(probe)) == {10, 11, 13}
    config = tmp_path / "task.yaml"
    config.write_text("dataset_kwargs:\n  trust_remote_code: true\nother: false\n")
    assert lines(remote_code(config)) == {2}


def test_every_checkpoint_load_is_weights_only():
    offenders = [problem for path in python_files(*CODE_DIRS) for problem in unsafe_loads(path)]
    assert not offenders, "unsafe loads:\n" + "\n".join(offenders)


def test_trust_remote_code_is_never_set():
    files = python_files(*REMOTE_CODE_DIRS) + sorted(
        p for d in REMOTE_CODE_DIRS for ext in ("*.yaml", "*.yml", "*.json") for p in (REPO_ROOT / d).rglob(ext)
    )
    assert files
    offenders = [problem for path in files for problem in remote_code(path)]
    assert not offenders, "trust_remote_code switched on:\n" + "\n".join(offenders)


STUDY = """\
name: token_probe
output_dir: {output_dir}
env:
  HF_HUB_OFFLINE: "1"
  HF_DATASETS_OFFLINE: "1"
  MEDTUNE_USMLE_DIR: components/data/sample/usmle
runs:
  lora:
    recipe: recipes/lora_finetune_single_device.py
    config: configs/tiny/lora.yaml
    overrides:
      max_steps_per_epoch: 2
      dataset.decontaminate: null
evaluations:
  usmle:
    tasks: [usmle_step1]
    runs: [lora]
    table: usmle
    options: [--limit, "2", --batch-size, "2"]
"""


def test_a_hub_token_in_the_environment_never_reaches_outputs(tmp_path):
    """A study (one short LoRA training through ``tune run`` and an lm-eval evaluation through
    ``medtune eval``) run with a fake token in every variable the Hub libraries read: the token is
    in no file written (logs, manifest, configs, metrics, results, checkpoints) and not printed."""
    token = f"hf_FAKEtoken{uuid.uuid4().hex}"
    output_dir = tmp_path / "study"
    study = tmp_path / "study.yaml"
    study.write_text(STUDY.format(output_dir=output_dir))
    env = {**os.environ, "HF_TOKEN": token, "HUGGING_FACE_HUB_TOKEN": token, "HUGGINGFACEHUB_API_TOKEN": token}
    proc = subprocess.run(
        [str(BIN / "medtune"), "study", str(study)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    written = [p for p in output_dir.rglob("*") if p.is_file()]
    names = {p.name for p in written}
    assert {"manifest.json", "results.json"} <= names, sorted(names)
    assert any(p.suffix == ".safetensors" for p in written) and any(p.suffix == ".log" or "log" in p.name for p in written)
    leaks = [str(p.relative_to(output_dir)) for p in written if token.encode() in p.read_bytes()]
    assert not leaks, f"the token was written to {leaks}"
    assert token not in proc.stdout and token not in proc.stderr


def test_a_failed_hub_lookup_does_not_print_the_token(monkeypatch):
    """Offline, a Hub data set or file that cannot be fetched fails with a message that does not
    carry the token (through the CLI: one line, no traceback)."""
    from components.data.medquad import load_medquad
    from components.evaluation.usmle import resolve_usmle_dir

    token = f"hf_FAKEtoken{uuid.uuid4().hex}"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.delenv("MEDTUNE_USMLE_DIR", raising=False)
    for fetch in (lambda: resolve_usmle_dir(None), lambda: load_medquad("lavita/MedQuAD")):
        try:
            fetch()
        except Exception as error:  # offline: each fails, how does not matter here
            assert token not in f"{error!r} {error.__cause__!r}"
        else:
            raise AssertionError("fetched from the Hub although offline")
    proc = subprocess.run(
        [str(BIN / "medtune"), "data", "stats", "medquad:lavita/MedQuAD"],
        cwd=REPO_ROOT, env={**os.environ, "HF_TOKEN": token}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2 and token not in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Couldn't reach 'lavita/MedQuAD'" in proc.stderr
