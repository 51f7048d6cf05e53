"""The study's tables, in its layout, from the evaluations' results, with their uncertainty.

USMLE: one row per method, one column per step (accuracy, 95% bootstrap interval). MedQuAD: one
row per method, BERTScore precision / recall / F1 (plus ROUGE-L and token F1). Every non-baseline
cell also gives its difference to the baseline with a paired 95% bootstrap interval over the
same questions, marked "n.s." when that interval contains 0: with ~120 questions per step most of
the study's differences are within the noise, and the table says so. The study's published
numbers, where the study file gives them, stand beside ours.
"""

import csv
import io
import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from components.evaluation.stats import bootstrap_interval
from components.study.spec import BASELINE, StudySpec

USMLE_METRIC = "acc"
MEDQUAD_METRICS = ("bertscore_precision", "bertscore_recall", "bertscore_f1", "rougeL", "token_f1")
MEDQUAD_HEADERS = ("Precision", "Recall", "F1", "ROUGE-L", "token F1")


@dataclass
class Cell:
    """One number of a table: a method's score on a task, and its difference to the baseline."""

    table: str
    method: str
    run: str
    task: str
    metric: str
    value: Optional[float]
    n: int = 0
    ci95_low: Optional[float] = None
    ci95_high: Optional[float] = None
    diff: Optional[float] = None
    diff_low: Optional[float] = None
    diff_high: Optional[float] = None
    published: Optional[float] = None
    scorer: Optional[str] = None  # the BERTScore model of a bertscore_* cell, as results.json names it

    @property
    def significant(self) -> Optional[bool]:
        if self.diff_low is None or self.diff_high is None:
            return None
        return not (self.diff_low <= 0.0 <= self.diff_high)


@lru_cache(maxsize=None)
def _medtune_section(results_file: str) -> Dict[str, Any]:
    path = Path(results_file)
    return json.loads(path.read_text()).get("medtune", {}) if path.is_file() else {}


def per_question(eval_dir: Path, task: str, metric: str) -> Dict[str, float]:
    """`doc_id -> score` of one metric, from the `per_question` part of `results.json`."""
    section = _medtune_section(str(eval_dir / "results.json"))
    return section.get("per_question", {}).get(task, {}).get(metric, {})


def summary_of(eval_dir: Path, task: str, metric: str) -> Optional[Dict[str, float]]:
    """The medtune summary (mean, n, stderr, 95% interval) of a metric in `results.json`."""
    section = _medtune_section(str(eval_dir / "results.json"))
    return section.get("summary", {}).get(task, {}).get(metric)


def scorer_of(eval_dir: Path, task: str, metric: str) -> Optional[str]:
    """The BERTScore model behind a ``bertscore_*`` metric, with its layer, from `results.json`."""
    if not metric.startswith("bertscore"):
        return None
    model = _medtune_section(str(eval_dir / "results.json")).get("bertscore", {}).get(task)
    if not model or model["model"] == "none":  # BERTScore switched off: the cell holds NaN
        return None
    return f"{model['model']} (layer {model['num_layers']})"


def paired_difference(
    ours: Dict[Any, float], base: Dict[Any, float]
) -> Tuple[Optional[float], Optional[float], Optional[float]]:
    """Mean difference over the questions both answered, with a paired 95% bootstrap interval."""
    shared = sorted(set(ours) & set(base), key=str)
    diffs = [ours[k] - base[k] for k in shared]
    if not diffs:
        return None, None, None
    low, high = bootstrap_interval(diffs)
    return sum(diffs) / len(diffs), low, high


def collect(spec: StudySpec, root: Path) -> List[Cell]:
    """Every cell of every table, from the evaluation folders under `root/evals`."""
    _medtune_section.cache_clear()  # the files may have been rewritten since the last call
    cells: List[Cell] = []
    labels = {BASELINE: spec.baseline.get("label", "Baseline")}
    labels.update({name: run.label for name, run in spec.runs.items()})
    published = spec.published
    for evaluation in spec.evaluations.values():
        metrics = MEDQUAD_METRICS if evaluation.table == "medquad" else (USMLE_METRIC,)
        for task in evaluation.tasks:
            for metric in metrics:
                base_dir = root / "evals" / evaluation.name / BASELINE
                base_scores = per_question(base_dir, task, metric) if BASELINE in evaluation.runs else {}
                for run in evaluation.runs:
                    eval_dir = root / "evals" / evaluation.name / run
                    summary = summary_of(eval_dir, task, metric)
                    cell = Cell(evaluation.table, labels[run], run, task, metric, None)
                    cell.published = published.get(run, {}).get(task, {}).get(metric)
                    cell.scorer = scorer_of(eval_dir, task, metric)
                    if summary and summary.get("n"):
                        cell.value, cell.n = summary["acc"], int(summary["n"])
                        cell.ci95_low, cell.ci95_high = summary["ci95_low"], summary["ci95_high"]
                    if run != BASELINE and base_scores and cell.value is not None:
                        ours = per_question(eval_dir, task, metric)
                        if ours:
                            cell.diff, cell.diff_low, cell.diff_high = paired_difference(ours, base_scores)
                    cells.append(cell)
    return cells


def _fmt(cell: Optional[Cell]) -> str:
    if cell is None or cell.value is None:
        return "n/a"
    text = f"{cell.value:.3f} [{cell.ci95_low:.3f}, {cell.ci95_high:.3f}]"
    if cell.diff is not None:
        mark = "" if cell.significant else " n.s."
        text += f" ({cell.diff:+.3f}{mark})"
    if cell.published is not None:
        text += f"; study {cell.published:.2f}"
    return text


def _table(cells: List[Cell], columns: List[Tuple[str, str, str]]) -> str:
    """Rows are methods in first-seen order; columns are (header, task, metric)."""
    methods: List[str] = []
    for cell in cells:
        if cell.method not in methods:
            methods.append(cell.method)
    index = {(c.method, c.task, c.metric): c for c in cells}
    lines = ["| Method | " + " | ".join(h for h, _, _ in columns) + " |"]
    lines.append("| --- |" + " --- |" * len(columns))
    for method in methods:
        row = [_fmt(index.get((method, task, metric))) for _, task, metric in columns]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def render_markdown(spec: StudySpec, cells: List[Cell]) -> str:
    """results.md: the study's two tables (and any other evaluation) with a legend."""
    parts = [f"# {spec.name}: results", ""]
    if spec.description:
        parts += [spec.description.strip(), ""]
    parts += [
        "Each cell: score [95% bootstrap interval] (difference to the baseline; n.s. = its paired "
        "95% bootstrap interval contains 0); `study x` = the study's published number.",
        "",
    ]
    for table, title in (("usmle", "USMLE self-assessment (accuracy)"), ("medquad", "MedQuAD (BERTScore)")):
        chosen = [c for c in cells if c.table == table]
        if not chosen:
            continue
        tasks = list(dict.fromkeys(c.task for c in chosen))
        if table == "usmle":
            columns = [(_step_header(t), t, USMLE_METRIC) for t in tasks]
        else:
            columns = [(h, t, m) for t in tasks for h, m in zip(MEDQUAD_HEADERS, MEDQUAD_METRICS)]
        parts += [f"## {title}", "", _table(chosen, columns), ""]
    other = [c for c in cells if c.table == "other"]
    if other:
        columns = list(dict.fromkeys((f"{c.task} {c.metric}", c.task, c.metric) for c in other))
        parts += ["## Other evaluations", "", _table(other, columns), ""]
    return "\n".join(parts)


def _step_header(task: str) -> str:
    for step in ("1", "2", "3"):
        if f"step{step}" in task:
            return f"Step {step}"
    return task


def render_csv(cells: List[Cell]) -> str:
    """results.csv: one row per cell."""
    out = io.StringIO()
    fields = list(asdict(cells[0]).keys()) + ["significant"] if cells else []
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    for cell in cells:
        writer.writerow({**asdict(cell), "significant": cell.significant})
    return out.getvalue()


def write_report(spec: StudySpec, root: Path, cells: List[Cell]) -> List[Path]:
    """Write results.md/json/csv under `root` (each written whole, then renamed into place)."""
    files = {
        "results.md": render_markdown(spec, cells),
        "results.json": json.dumps(
            [{**asdict(c), "significant": c.significant} for c in cells], indent=2
        ) + "\n",
        "results.csv": render_csv(cells),
    }
    written = []
    for name, text in files.items():
        tmp = root / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(root / name)
        written.append(root / name)
    return written
