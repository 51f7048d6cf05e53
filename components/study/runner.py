"""Run a study: each training through the real `tune run`, then each evaluation, resumably.

Every step is a command a user could type, run in a subprocess from the repository root. A
finished step leaves `medtune_step.json` in its folder holding a key (a hash of its command, its
config and recipe files, and the keys of the steps it builds on); the next call skips a step
whose key is unchanged. A failed step is reported and the steps that need it are skipped, the
others go on. A step that is running, or failed, has a marker saying so: on the next call, a
training step whose key is unchanged and whose folder holds a resumable checkpoint (``step_N``
or ``epoch_N`` with recipe state, see ``save_every_n_steps``) continues from it with
``resume_from_checkpoint=True`` instead of starting over; any other step runs again from a
fresh folder.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import OmegaConf

from components.checkpointing import epoch_dir, latest_epoch_dir, resumable_checkpoints
from components.study.spec import BASELINE, RunSpec, StudySpec

MARKER = "medtune_step.json"
LOG = "medtune_step.log"
TAIL_LINES = 20
# Start-up chatter of every step, never the reason it failed: torchtune's INFO logging, torchao's
# notice about its C++ kernels, blank lines.
_NOISE = re.compile(r"^\s*$|^(INFO|DEBUG):|Skipping import of cpp extensions")
_PLACEHOLDER = re.compile(r"\{(checkpoint|output):([A-Za-z0-9_.-]+)\}")


@dataclass
class Step:
    """One command of the study and what it builds on."""

    name: str
    kind: str  # "train" or "eval"
    run: str
    output_dir: Path
    needs: List[str] = field(default_factory=list)
    evaluation: Optional[str] = None


@dataclass
class Outcome:
    """What happened to a step in this call."""

    step: Step
    status: str  # "done", "skipped (up to date)", "failed", "skipped (needs ...)", "not run"
    command: List[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: Optional[float] = None
    message: str = ""


def latest_checkpoint(run_dir: Path) -> Path:
    """The highest `epoch_N` folder a torchtune recipe wrote into `run_dir`."""
    latest = latest_epoch_dir(run_dir)
    if latest is None:
        raise FileNotFoundError(f"{run_dir} holds no epoch_N checkpoint folder")
    return latest


def log_tail(path: Path, lines: int = TAIL_LINES) -> List[str]:
    """The last ``lines`` lines of a step's log that can say why it failed: start-up noise left
    out, a progress bar's carriage-return rewrites reduced to their last state."""
    try:
        text = path.read_bytes().decode(errors="replace")  # bytes: read_text would turn \r into \n
    except OSError:
        return []
    kept = [line.rstrip("\r").rsplit("\r", 1)[-1].rstrip() for line in text.split("\n")]
    return [line for line in kept if not _NOISE.search(line)][-lines:]


def builtin_config(name: str) -> Path:
    """The file of one of torchtune's own configs (``tune run ... --config NAME``)."""
    from torchtune._cli.run import ROOT
    from torchtune._recipe_registry import get_all_recipes

    for recipe in get_all_recipes():
        for config in recipe.configs:
            if config.name == name:
                return Path(ROOT) / "recipes" / "configs" / config.file_path
    raise ValueError(f"config {name}: no such file, and not one of torchtune's own configs")


def launcher_options(run: RunSpec) -> List[str]:
    """torchrun's options of a training (as `tune run` takes them): none for one process; the
    rendezvous for several machines (c10d at the first machine's HOST:PORT; every machine runs
    the same command)."""
    if not run.nproc_per_node:
        return []
    options = []
    if run.nnodes > 1:
        options += ["--nnodes", str(run.nnodes)]
    options += ["--nproc_per_node", str(run.nproc_per_node)]
    if run.rdzv_endpoint:
        options += ["--rdzv_backend", "c10d", "--rdzv_endpoint", run.rdzv_endpoint]
    return options


def cli_value(value: Any) -> str:
    """A YAML value as torchtune's `key=value` override syntax takes it."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(cli_value(v) for v in value) + "]"
    return str(value)


class StudyRunner:
    """Plans and runs the steps of a study under one output folder."""

    def __init__(self, spec: StudySpec, output_dir: Optional[str] = None, only: Optional[List[str]] = None,
                 max_steps: Optional[int] = None):
        self.spec = spec
        # every training stops after this many optimizer steps of one epoch (a check of the study)
        self.max_steps = max_steps
        self.root = Path(output_dir or spec.output_dir).resolve()
        self.repo = Path.cwd()
        self.only = set(only or [])
        unknown = self.only - set(spec.runs) - {BASELINE}
        if unknown:
            raise ValueError(f"--only: no run named {', '.join(sorted(unknown))} in {spec.path}")
        self.steps = self._plan()
        for step in self.steps:  # a run that asks for processes its recipe cannot use: refused now
            if step.kind == "train" and not self.spec.runs[step.run].command:
                self.recipe_of(step.run)

    # ---- planning -------------------------------------------------------------------------
    def run_dir(self, run: str) -> Path:
        return self.root / "runs" / run

    def eval_dir(self, evaluation: str, run: str) -> Path:
        return self.root / "evals" / evaluation / run

    def _wanted(self, run: str) -> bool:
        return not self.only or run in self.only

    def _plan(self) -> List[Step]:
        steps: List[Step] = []
        for run in self.spec.order():
            if self._wanted(run) or any(self._wanted(d) for d in self.spec.dependants(run)):
                needs = [f"train/{d}" for d in self.spec.runs[run].depends_on]
                steps.append(Step(f"train/{run}", "train", run, self.run_dir(run), needs))
        planned = {s.run for s in steps}
        for evaluation in self.spec.evaluations.values():
            for run in evaluation.runs:
                if run != BASELINE and (run not in planned or not self._wanted(run)):
                    continue
                if run == BASELINE and self.only and BASELINE not in self.only:
                    continue
                needs = [] if run == BASELINE else [f"train/{run}"]
                steps.append(
                    Step(
                        f"eval/{evaluation.name}/{run}", "eval", run,
                        self.eval_dir(evaluation.name, run), needs, evaluation.name,
                    )
                )
        return steps

    def checkpoint_of(self, run: str, dry_run: bool = False) -> str:
        """The checkpoint folder a run's evaluation reads (and a later stage starts from): the
        last epoch's folder, named from the run's config (`epochs`, after its overrides), so a
        dry run prints the very path the real call uses; outside a dry run it must exist."""
        if run == BASELINE:
            return self._baseline_checkpoint(dry_run)
        spec = self.spec.runs[run]
        if spec.command:
            raise ValueError(
                f"{self.spec.path}: {{checkpoint:{run}}}: {run} runs a command, which writes no checkpoint; "
                f"use {{output:{run}}} for its folder"
            )
        folder = epoch_dir(self.run_dir(run), self.epochs_of(run) - 1)
        if not dry_run and not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} is missing: {run}'s config trains {self.epochs_of(run)} epoch(s) and its last "
                "epoch's checkpoint was not written (did the training finish?)"
            )
        return str(folder)

    def epochs_of(self, run: str) -> int:
        """How many epochs a training run's config sets, with the run's overrides applied."""
        spec = self.spec.runs[run]
        path = self.repo / spec.config
        if not path.is_file():
            path = builtin_config(spec.config)
        overrides = [f"{k}={self.resolve(cli_value(v), dry_run=True)}" for k, v in spec.overrides.items()]
        try:
            config = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(overrides))
            epochs = config.get("epochs")
        except Exception as error:  # OmegaConf's parse and interpolation errors
            raise ValueError(f"{self.spec.path}: runs.{run}: cannot read epochs from {spec.config}: {error}") from None
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
            raise ValueError(f"{self.spec.path}: runs.{run}: {spec.config} sets epochs: {epochs!r}, not a whole number >= 1")
        return 1 if self.max_steps else epochs

    def _baseline_checkpoint(self, dry_run: bool) -> str:
        """`tiny` names the embedded model's checkpoint, `smollm2` the offline SmolLM2-135M-Instruct
        (components/models/smollm2_checkpoint.py); each built on first use, not by a dry run."""
        where = self.spec.baseline["checkpoint"]
        if where == "smollm2":
            from components.models.smollm2_checkpoint import smollm2_checkpoint_dir, smollm2_checkpoint_path

            return str(smollm2_checkpoint_path()) if dry_run else smollm2_checkpoint_dir()
        if where != "tiny":
            return where
        from components.models.tiny import tiny_checkpoint_dir, tiny_checkpoint_path

        return str(tiny_checkpoint_path()) if dry_run else tiny_checkpoint_dir()

    def resolve(self, text: str, dry_run: bool = False) -> str:
        """Replace `{output:RUN}` (a run's folder) and `{checkpoint:RUN}` (its last epoch_N)."""

        def replace(match: "re.Match[str]") -> str:
            kind, run = match.groups()
            if run not in self.spec.runs and run != BASELINE:
                raise ValueError(f"{self.spec.path}: {match.group(0)} names no run")
            return str(self.run_dir(run)) if kind == "output" else self.checkpoint_of(run, dry_run)

        return _PLACEHOLDER.sub(replace, text)

    def recipe_of(self, run: str) -> str:
        """The recipe a training launches: its own, or with ``nproc_per_node`` its distributed
        counterpart (``x_single_device.py`` -> ``x_distributed.py``, same config); a run whose
        recipe has none is refused, naming the file that would be needed."""
        spec = self.spec.runs[run]
        if not spec.nproc_per_node:
            return spec.recipe
        wanted = re.sub(r"_single_device(\.py)?$", r"_distributed\1", spec.recipe)
        if re.search(r"_distributed(\.py)?$", wanted) and (self.repo / wanted).is_file():
            return wanted
        missing = f" ({wanted} does not exist)" if wanted != spec.recipe else ""
        raise ValueError(
            f"{self.spec.path}: runs.{run}: nproc_per_node: {spec.nproc_per_node} needs a distributed recipe "
            f"and {spec.recipe} has none{missing}; drop nproc_per_node to run it on one device"
        )

    def command(self, step: Step, dry_run: bool = False) -> List[str]:
        """The exact command line of a step, with `{output:RUN}`/`{checkpoint:RUN}` resolved."""
        if step.kind == "train":
            run = self.spec.runs[step.run]
            if run.command:
                here = str(step.output_dir)
                return [self.resolve(part, dry_run).replace("{output_dir}", here) for part in run.command]
            command = ["tune", "run", *launcher_options(run), self.recipe_of(step.run), "--config", run.config]
            for key, value in run.overrides.items():
                command.append(f"{key}={self.resolve(cli_value(value), dry_run)}")
            if self.max_steps:
                command += [f"max_steps_per_epoch={self.max_steps}", "epochs=1"]
            return command + [f"output_dir={step.output_dir}"]
        evaluation = self.spec.evaluations[step.evaluation]
        return [
            "medtune", "eval", self.checkpoint_of(step.run, dry_run),
            "--tasks", ",".join(evaluation.tasks),
            "--output-dir", str(step.output_dir),
            *evaluation.options,
        ]

    # ---- keys and markers ----------------------------------------------------------------
    def _key(self, step: Step, command: List[str], keys: Dict[str, str]) -> str:
        parts: List[str] = [json.dumps(command), json.dumps(self.spec.env, sort_keys=True)]
        if step.kind == "train":
            run = self.spec.runs[step.run]
            for local in filter(None, (run.config, self.recipe_of(step.run))):
                path = self.repo / local
                parts.append(path.read_text() if path.is_file() else local)
        parts += [keys.get(n, "") for n in step.needs]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    @staticmethod
    def read_marker(step: Step) -> Optional[Dict[str, Any]]:
        path = step.output_dir / MARKER
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    @staticmethod
    def _write_marker(step: Step, record: Dict[str, Any]) -> None:
        tmp = step.output_dir / f".{MARKER}.tmp"
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, step.output_dir / MARKER)

    # ---- execution -------------------------------------------------------------------------
    def prepare(self, step: Step, keys: Dict[str, str], dry_run: bool = False) -> Tuple[List[str], str, Optional[Dict[str, Any]], Optional[Path]]:
        """``(command, key, marker, resume)`` of a step as the next call sees it: ``marker`` is
        its record when it is up to date (to skip), ``resume`` the checkpoint it would continue
        from (its command then ends in ``resume_from_checkpoint=True``)."""
        command = self.command(step, dry_run)
        key = keys[step.name] = self._key(step, command, keys)
        marker = self.read_marker(step)
        if marker and marker.get("key") == key and marker.get("status") == "done":
            return command, key, marker, None
        resume = self.resume_point(step, key, marker)
        if resume is not None:
            command = [*command, "resume_from_checkpoint=True"]
        return command, key, None, resume

    def dry_run(self) -> List[str]:
        """Every command the next call would run, in order, exactly as it runs them; a step that
        is up to date is listed as a comment."""
        keys: Dict[str, str] = {}
        lines = []
        for step in self.steps:
            command, _, done, _ = self.prepare(step, keys, dry_run=True)
            lines.append(("# up to date, skipped: " if done else "") + " ".join(command))
        return lines

    def run(self, echo=print) -> List[Outcome]:
        """Run every step that is not up to date; return what happened to each."""
        self.root.mkdir(parents=True, exist_ok=True)
        keys: Dict[str, str] = {}
        failed: List[str] = []
        outcomes: List[Outcome] = []
        total = len(self.steps)
        for index, step in enumerate(self.steps, 1):
            prefix = f"[{index}/{total}] {step.name}"
            blocked = [n for n in step.needs if n in failed]
            if blocked:
                failed.append(step.name)
                outcomes.append(Outcome(step, f"skipped (needs {', '.join(blocked)})"))
                echo(f"{prefix}: skipped, needs {', '.join(blocked)}")
                continue
            try:
                command, key, done, resume = self.prepare(step, keys)
            except (FileNotFoundError, ValueError) as error:
                failed.append(step.name)
                outcomes.append(Outcome(step, "failed", message=str(error)))
                echo(f"{prefix}: failed: {error}")
                continue
            if done:
                outcomes.append(Outcome(step, "skipped (up to date)", command, done.get("seconds", 0.0), done.get("peak_rss_mb")))
                echo(f"{prefix}: up to date, skipped")
                continue
            if resume is not None:
                echo(f"{prefix}: resuming the interrupted run from {resume}")
            echo(f"{prefix}: {' '.join(command)}")
            outcome = self._execute(step, command, key, fresh=resume is None)
            outcomes.append(outcome)
            record = {"key": key, "status": outcome.status, "command": command,
                      "seconds": outcome.seconds, "peak_rss_mb": outcome.peak_rss_mb}
            if resume is not None:
                record["resumed_from"] = str(resume)
            self._write_marker(step, record)
            if outcome.status == "done":
                echo(f"{prefix}: done in {outcome.seconds:.0f} s")
            else:
                failed.append(step.name)
                log = step.output_dir / LOG
                echo(f"{prefix}: FAILED ({outcome.message}); log: {log}")
                tail = log_tail(log)
                if tail:
                    echo("  last lines of the log:\n" + "\n".join(f"  | {line}" for line in tail))
        return outcomes

    def resume_point(self, step: Step, key: str, marker: Optional[Dict[str, Any]]) -> Optional[Path]:
        """The checkpoint an interrupted or failed run of this very step (same key) left, if any:
        training steps run through ``tune run`` only (a custom command's flags are unknown)."""
        if step.kind != "train" or self.spec.runs[step.run].command:
            return None
        if not marker or marker.get("key") != key or marker.get("status") not in ("running", "failed"):
            return None
        found = resumable_checkpoints(step.output_dir)
        return found[-1][1] if found else None

    def _execute(self, step: Step, command: List[str], key: str, fresh: bool = True) -> Outcome:
        """Run one command, in a fresh folder unless it resumes one, logging its output (appended
        when resuming); mark the step running meanwhile; record time and peak RSS."""
        if fresh and step.output_dir.exists():
            shutil.rmtree(step.output_dir)
        step.output_dir.mkdir(parents=True, exist_ok=True)
        self._write_marker(step, {"key": key, "status": "running", "command": command})
        executable = Path(sys.executable).parent / command[0]
        argv = [str(executable) if executable.exists() else command[0], *command[1:]]
        started = time.perf_counter()
        with open(step.output_dir / LOG, "w" if fresh else "a") as log:
            env = {**os.environ, **self.spec.env}
            proc = subprocess.Popen(argv, cwd=self.repo, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            except KeyboardInterrupt:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        peak = usage.ru_maxrss / 1024  # KiB on Linux
        if proc.returncode != 0:
            return Outcome(step, "failed", command, seconds, peak, f"exit code {proc.returncode}")
        return Outcome(step, "done", command, seconds, peak)
