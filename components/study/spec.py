"""The study file: which trainings and evaluations make up a study, read and checked up front.

A study YAML has a `name`, an `output_dir`, `env` (variables every step runs with, e.g. where
the evaluation data lives), a `baseline` (the untrained model's checkpoint
directory, evaluated like any run), `runs` (each a `tune run` recipe + config + overrides, with
`depends_on` for chained stages and `nproc_per_node` / `nnodes` / `rdzv_endpoint` for several
processes or machines; or a `command` that prepares data) and `evaluations` (tasks, and the runs
they apply to). Every mistake (an unknown key, a run that does not exist, a dependency cycle) is reported before any
work starts, naming the file, the entry and, for a misspelled key, the closest valid one.
"""

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import yaml

BASELINE = "baseline"
TOP_KEYS = {"name", "description", "output_dir", "env", "baseline", "runs", "evaluations", "published"}
RUN_KEYS = {
    "label", "recipe", "config", "command", "overrides", "depends_on", "nproc_per_node", "nnodes", "rdzv_endpoint",
}
EVAL_KEYS = {"label", "tasks", "runs", "table", "options"}
TABLES = ("usmle", "medquad", "other")


class StudyError(ValueError):
    """A study file that cannot run as written; the message names the file and the entry."""


@dataclass
class RunSpec:
    """One step of work: a training (`tune run <recipe> --config <config> key=value ...`) or,
    with `command`, any other command (e.g. `medtune knowtuning build-ka ...`) that makes data."""

    name: str
    recipe: Optional[str]
    config: Optional[str]
    label: str
    command: List[str] = field(default_factory=list)
    overrides: Dict[str, Any] = field(default_factory=dict)
    depends_on: List[str] = field(default_factory=list)
    nproc_per_node: Optional[int] = None
    nnodes: int = 1
    rdzv_endpoint: Optional[str] = None


@dataclass
class EvalSpec:
    """One evaluation: lm-eval tasks applied to some runs (and possibly the baseline)."""

    name: str
    label: str
    tasks: List[str]
    runs: List[str]
    table: str
    options: List[str] = field(default_factory=list)


@dataclass
class StudySpec:
    """A whole study, checked: runs in an order where every dependency comes first."""

    path: Path
    name: str
    description: str
    output_dir: str
    baseline: Dict[str, str]
    runs: Dict[str, RunSpec]
    evaluations: Dict[str, EvalSpec]
    published: Dict[str, Any]
    env: Dict[str, str] = field(default_factory=dict)

    def order(self) -> List[str]:
        """Run names, dependencies first, otherwise in file order."""
        done: List[str] = []

        def visit(name: str, stack: List[str]) -> None:
            if name in done:
                return
            if name in stack:
                cycle = " -> ".join(stack[stack.index(name) :] + [name])
                raise StudyError(f"{self.path}: runs depend on each other in a cycle: {cycle}")
            for dep in self.runs[name].depends_on:
                visit(dep, stack + [name])
            done.append(name)

        for name in self.runs:
            visit(name, [])
        return done

    def dependants(self, name: str) -> List[str]:
        """Every run that needs `name`, directly or through another run."""
        found: List[str] = []
        for other in self.order():
            deps = self.runs[other].depends_on
            if name in deps or any(d in found for d in deps):
                found.append(other)
        return found


def _check_keys(given: Mapping[str, Any], allowed: set, where: str) -> None:
    for key in given:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; expected one of {sorted(allowed)}"
            raise StudyError(f"{where}: unknown key {key!r}{hint}")


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise StudyError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _names(value: Any, where: str) -> List[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise StudyError(f"{where}: expected a list of names")
    return list(value)


def _whole(value: Any, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StudyError(f"{where}.{key}: {value!r} is not a whole number >= 1")
    return value


def _processes(entry: Mapping[str, Any], is_command: bool, where: str) -> Dict[str, Any]:
    """A training's processes: `nproc_per_node` per machine on `nnodes` machines that meet at
    `rdzv_endpoint` (torchrun's c10d rendezvous, HOST:PORT of the first machine)."""
    given = [k for k in ("nproc_per_node", "nnodes", "rdzv_endpoint") if entry.get(k) is not None]
    if not given:
        return {}
    if is_command:
        raise StudyError(f"{where}: {given[0]} is for trainings (recipe + config), not a command")
    if "nproc_per_node" not in given:
        raise StudyError(f"{where}: {given[0]} needs nproc_per_node (processes on each machine)")
    nproc = _whole(entry["nproc_per_node"], "nproc_per_node", where)
    nnodes = _whole(entry.get("nnodes", 1), "nnodes", where)
    endpoint = entry.get("rdzv_endpoint")
    if (nnodes > 1) != (endpoint is not None):
        raise StudyError(
            f"{where}: nnodes: {nnodes} and rdzv_endpoint go together: several machines meet at "
            "rdzv_endpoint: HOST:PORT (the first machine's), one machine needs neither"
        )
    if endpoint is not None:
        host, _, port = str(endpoint).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise StudyError(f"{where}.rdzv_endpoint: {endpoint!r} is not HOST:PORT (e.g. node0.example.org:29400)")
    return {"nproc_per_node": nproc, "nnodes": nnodes, "rdzv_endpoint": None if endpoint is None else str(endpoint)}


def load_study(path: str) -> StudySpec:
    """Read and check a study file; raise StudyError naming what is wrong and where."""
    file = Path(path)
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StudyError(f"{file}: no such study file") from None
    except yaml.YAMLError as error:
        raise StudyError(f"{file}: not valid YAML: {error}") from None
    top = _mapping(raw, str(file))
    _check_keys(top, TOP_KEYS, str(file))
    for key in ("name", "runs"):
        if key not in top:
            raise StudyError(f"{file}: missing required key {key!r}")

    runs: Dict[str, RunSpec] = {}
    for name, entry in _mapping(top["runs"], f"{file}: runs").items():
        where = f"{file}: runs.{name}"
        if name == BASELINE:
            raise StudyError(f"{where}: {BASELINE!r} is reserved for the untrained model")
        entry = _mapping(entry, where)
        _check_keys(entry, RUN_KEYS, where)
        command = _names(entry.get("command"), f"{where}.command")
        if command and (entry.get("recipe") or entry.get("config") or entry.get("overrides")):
            raise StudyError(f"{where}: give either command, or recipe + config (+ overrides)")
        for key in () if command else ("recipe", "config"):
            if not entry.get(key):
                raise StudyError(f"{where}: missing required key {key!r} (or a command)")
        runs[name] = RunSpec(
            name=name,
            recipe=str(entry["recipe"]) if not command else None,
            config=str(entry["config"]) if not command else None,
            label=str(entry.get("label", name)),
            command=command,
            overrides=dict(_mapping(entry.get("overrides"), f"{where}.overrides")),
            depends_on=_names(entry.get("depends_on"), f"{where}.depends_on"),
            **_processes(entry, bool(command), where),
        )
    for run in runs.values():
        for dep in run.depends_on:
            if dep not in runs:
                raise StudyError(f"{file}: runs.{run.name}.depends_on: no run named {dep!r}")

    baseline = {k: str(v) for k, v in _mapping(top.get("baseline"), f"{file}: baseline").items()}
    _check_keys(baseline, {"label", "checkpoint"}, f"{file}: baseline")
    evaluations: Dict[str, EvalSpec] = {}
    for name, entry in _mapping(top.get("evaluations"), f"{file}: evaluations").items():
        where = f"{file}: evaluations.{name}"
        entry = _mapping(entry, where)
        _check_keys(entry, EVAL_KEYS, where)
        tasks = _names(entry.get("tasks"), f"{where}.tasks")
        if not tasks:
            raise StudyError(f"{where}: no tasks")
        targets = _names(entry.get("runs"), f"{where}.runs") or [BASELINE, *runs]
        for target in targets:
            if target == BASELINE and "checkpoint" not in baseline:
                raise StudyError(f"{where}.runs: 'baseline' needs baseline.checkpoint in the study")
            if target != BASELINE and target not in runs:
                raise StudyError(f"{where}.runs: no run named {target!r}")
        table = str(entry.get("table", "other"))
        if table not in TABLES:
            raise StudyError(f"{where}.table: {table!r} is not one of {TABLES}")
        evaluations[name] = EvalSpec(
            name=name,
            label=str(entry.get("label", name)),
            tasks=tasks,
            runs=targets,
            table=table,
            options=[str(o) for o in entry.get("options") or []],
        )
    spec = StudySpec(
        path=file,
        name=str(top["name"]),
        description=str(top.get("description", "")),
        output_dir=str(top.get("output_dir", f"outputs/study/{top['name']}")),
        baseline=baseline,
        runs=runs,
        evaluations=evaluations,
        published=dict(_mapping(top.get("published"), f"{file}: published")),
        env={str(k): str(v) for k, v in _mapping(top.get("env"), f"{file}: env").items()},
    )
    spec.order()  # raises on a dependency cycle
    return spec
