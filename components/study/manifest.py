"""manifest.json: how every step of a study was made, enough to reproduce or audit it.

Per step: the exact command, the resolved config torchtune wrote (training), its seed, its
processes (``nproc_per_node`` x ``nnodes``, when it asked for several), the wall time, throughput
(mean tokens/s from the metric log), peak resident memory, and the checkpoint; for the whole
study: package versions and the git commit. Values that look like secrets (Hub tokens) never
reach it: only the config torchtune resolved and the command are recorded.
"""

import json
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from components.metric_logs import latest_log
from components.study.runner import Outcome, StudyRunner, latest_checkpoint

PACKAGES = ("medtune", "torch", "torchtune", "torchao", "lm_eval", "transformers", "datasets", "peft")
_TOKENS_PER_SECOND = re.compile(r"tokens_per_second_per_gpu:([0-9.eE+-]+)")
_SECRET = re.compile(r"hf_[A-Za-z0-9]{20,}")


def package_versions() -> Dict[str, Optional[str]]:
    versions: Dict[str, Optional[str]] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(repo: Path) -> Dict[str, Any]:
    """HEAD and whether the work tree had uncommitted changes; empty outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def mean_tokens_per_second(run_dir: Path) -> Optional[float]:
    try:
        values = [float(v) for v in _TOKENS_PER_SECOND.findall(latest_log(run_dir).read_text())]
    except FileNotFoundError:
        return None
    # the first steps include start-up work; report the steady state when there is one
    steady = values[len(values) // 10 :] if len(values) >= 10 else values
    return sum(steady) / len(steady) if steady else None


def _redact(text: str) -> str:
    return _SECRET.sub("hf_***", text)


def step_record(runner: StudyRunner, outcome: Outcome) -> Dict[str, Any]:
    step = outcome.step
    record: Dict[str, Any] = {
        "step": step.name,
        "status": outcome.status,
        "command": [_redact(part) for part in outcome.command],
        "output_dir": str(step.output_dir),
        "seconds": round(outcome.seconds, 2),
        "peak_rss_mb": round(outcome.peak_rss_mb, 1) if outcome.peak_rss_mb else None,
    }
    if outcome.message:
        record["message"] = outcome.message
    if step.kind == "train":
        run = runner.spec.runs[step.run]
        if run.nproc_per_node:  # how many processes trained it (also in the command)
            record["processes"] = {
                "nproc_per_node": run.nproc_per_node, "nnodes": run.nnodes, "rdzv_endpoint": run.rdzv_endpoint,
            }
        resolved = step.output_dir / "torchtune_config.yaml"
        if resolved.is_file():
            config = yaml.safe_load(_redact(resolved.read_text()))
            record["config"] = config
            record["seed"] = config.get("seed")
        record["tokens_per_second"] = mean_tokens_per_second(step.output_dir)
        try:
            record["checkpoint"] = str(latest_checkpoint(step.output_dir))
        except FileNotFoundError:
            record["checkpoint"] = None
    else:
        record["evaluated_checkpoint"] = outcome.command[2] if len(outcome.command) > 2 else None
    return record


def write_manifest(runner: StudyRunner, outcomes: List[Outcome]) -> Path:
    manifest = {
        "study": runner.spec.name,
        "study_file": str(runner.spec.path),
        "output_dir": str(runner.root),
        "packages": package_versions(),
        "git": git_commit(runner.repo),
        "steps": [step_record(runner, o) for o in outcomes],
    }
    path = runner.root / "manifest.json"
    tmp = runner.root / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path
