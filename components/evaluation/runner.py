"""Run lm-eval tasks on a model object and write what a study needs to keep.

Shared by ``recipes/eleuther_eval.py`` (a torchtune model in process), ``medtune eval`` (a Hugging
Face checkpoint directory through lm-eval's ``hf`` model) and ``medtune score`` (stored
generations through the ``replay`` model). Each run writes, into its output directory:

- ``results.json``: lm-eval's results dictionary (metrics with ``_stderr``, task configs, versions,
  sample counts) plus a ``medtune`` section: per task and per group, for every per-question
  metric, ``n``, the mean, its standard error and a 95% bootstrap interval (groups pooled over
  their questions), every per-question score by ``doc_id`` (``per_question``: what a paired
  comparison of two models on the same questions needs), and the data reports (questions left
  out or repaired, and why);
- ``samples/<task>.jsonl``: one line per question: the document, the prompt, the raw and
  filtered model output, the metric values.
"""

import json
import logging
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

from components.evaluation.stats import summarize

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
TASKS_DIR = REPO_ROOT / "evals" / "tasks"
# Per-sample values that feed the bootstrap aggregations: no summary of their own.
_SKIP_METRICS = {"acc_ci95_low", "acc_ci95_high"}


def medtune_task_names() -> set:
    """Every task and group name defined under ``evals/tasks``."""
    import yaml

    names = set()
    for path in TASKS_DIR.rglob("*.yaml"):
        text = path.read_text(encoding="utf-8")
        for key in ("task", "group"):
            for line in text.splitlines():
                if line.startswith(f"{key}:") and line.split(":", 1)[1].strip():
                    names.add(yaml.safe_load(line)[key])
    return {n for n in names if isinstance(n, str)}


def task_manager(
    include_path: Optional[Union[str, Sequence[str]]] = None,
    metadata: Optional[Dict[str, Any]] = None,
    tasks: Optional[Iterable[str]] = None,
):
    """lm-eval's ``TaskManager`` with ``evals/tasks`` (and any extra folders) included.

    lm-eval's own task folders (thousands of YAML files, seconds to index) are left out when
    every requested task is one of ours.
    """
    from lm_eval.tasks import TaskManager

    paths: List[str] = [str(TASKS_DIR)]
    if include_path:
        extra = [include_path] if isinstance(include_path, str) else list(include_path)
        paths += [str(Path(p).resolve()) for p in extra if Path(p).resolve() != TASKS_DIR]
    ours_only = tasks is not None and len(paths) == 1 and set(tasks) <= medtune_task_names()
    return TaskManager(include_path=paths, include_defaults=not ours_only, metadata=metadata or {})


def split_tasks(tasks: Union[str, Iterable[str]]) -> List[str]:
    items = [tasks] if isinstance(tasks, str) else list(tasks)
    return [t.strip() for item in items for t in str(item).split(",") if t.strip()]


def _numeric_metrics(samples: List[Dict[str, Any]]) -> Dict[str, Dict[Any, float]]:
    """Per-question values of each metric, by ``doc_id``; MedQuAD's BERTScore items are scored
    (cached) here."""
    from components.evaluation.medquad import bertscore_per_item

    values: Dict[str, Dict[Any, float]] = {}
    bert_items: Dict[str, List[Any]] = {}
    bert_ids: Dict[str, List[Any]] = {}
    for sample in samples:
        doc_id = sample.get("doc_id")
        for name in sample.get("metrics", []):
            value = sample.get(name)
            if name.startswith("bertscore_") and isinstance(value, (tuple, list)) and len(value) == 4:
                bert_items.setdefault(name, []).append(tuple(value))
                bert_ids.setdefault(name, []).append(doc_id)
            elif name in _SKIP_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            else:
                values.setdefault(name, {})[doc_id] = float(value)
    for name, items in bert_items.items():
        scores = bertscore_per_item(items, name.removeprefix("bertscore_"))
        if not all(x != x for x in scores):  # all NaN: BERTScore was switched off
            values[name] = dict(zip(bert_ids[name], scores))
    return values


def per_question_scores(results: Dict[str, Any]) -> Dict[str, Dict[str, Dict[Any, float]]]:
    """``{task: {metric: {doc_id: score}}}``: what paired comparisons between models need."""
    return {task: _numeric_metrics(s) for task, s in results.get("samples", {}).items()}


def summarize_results(
    results: Dict[str, Any], per_question: Optional[Dict[str, Dict[str, Dict[Any, float]]]] = None
) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Per task and group: ``{metric: {n, correct, acc (the mean), stderr, ci95_low, ci95_high}}``."""
    per_task = {
        task: {m: list(v.values()) for m, v in metrics.items()}
        for task, metrics in (per_question or per_question_scores(results)).items()
    }
    summary = {task: {m: summarize(v) for m, v in metrics.items()} for task, metrics in per_task.items()}

    def leaves(name: str) -> List[str]:
        children = results.get("group_subtasks", {}).get(name)
        if children is None:
            return [name] if name in per_task else []
        return [leaf for child in children for leaf in leaves(child)]

    for group, children in results.get("group_subtasks", {}).items():
        if not children or group in per_task:  # lm-eval lists plain tasks with no children
            continue
        tasks = leaves(group)
        pooled: Dict[str, List[float]] = {}
        for task in tasks:
            for metric, values in per_task[task].items():
                pooled.setdefault(metric, []).append(values)
        # Pool a metric only where every task of the group has it (acc over usmle_mc + usmle_gen
        # would mix two protocols: the usmle container has no pooled numbers of its own).
        same_protocol = len({tuple(sorted(per_task[t])) for t in tasks}) == 1
        summary[group] = {
            metric: summarize([x for v in lists for x in v])
            for metric, lists in pooled.items()
            if same_protocol and len(lists) == len(tasks)
        }
    return summary


def format_summary(summary: Dict[str, Dict[str, Dict[str, float]]], order: Optional[Iterable[str]] = None) -> str:
    """One line per task/group and metric: value, exact fraction for 0/1 scores, stderr, 95% CI."""
    lines = []
    for name in order or summary:
        for metric, s in summary.get(name, {}).items():
            if not s.get("n"):
                continue
            fraction = f"{int(s['correct'])}/{s['n']} = " if metric in ("acc", "answered") else ""
            lines.append(
                f"{name:<18} {metric:<20} {fraction}{s['acc']:.4f}  stderr {s['stderr']:.4f}  "
                f"95% CI [{s['ci95_low']:.4f}, {s['ci95_high']:.4f}]"
            )
    return "\n".join(lines)


def _data_reports() -> Dict[str, Any]:
    from components.evaluation.usmle import DATA_REPORTS

    return dict(DATA_REPORTS)


def bertscore_models(results: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """``{task: {"model", "num_layers"}}`` for each task whose documents name the BERTScore model
    that scored them (the ``medquad`` task's do): scores differ by model, so results record it."""
    from components.evaluation.bertscore import recorded_name

    found: Dict[str, Dict[str, Any]] = {}
    for task, rows in results.get("samples", {}).items():
        models = {(row["doc"]["bertscore_model"], row["doc"]["bertscore_num_layers"])
                  for row in rows if "bertscore_model" in row.get("doc", {})}
        if len(models) == 1:
            (model, layers), = models
            found[task] = {"model": recorded_name(model), "num_layers": int(layers)}
        elif models:
            raise ValueError(f"task {task}: documents name different BERTScore models {sorted(models)}")
    return found


def write_outputs(results: Dict[str, Any], output_dir: Union[str, Path]) -> Path:
    """``results.json`` and ``samples/<task>.jsonl`` under ``output_dir``; returns the results path."""
    from lm_eval.utils import handle_non_serializable

    out = Path(output_dir)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    samples = results.get("samples", {})
    for task, rows in samples.items():
        with (out / "samples" / f"{task}.jsonl").open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, default=handle_non_serializable, ensure_ascii=False) + "\n")
    body = {k: v for k, v in results.items() if k != "samples"}
    path = out / "results.json"
    path.write_text(json.dumps(body, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    return path


def run_tasks(
    lm,
    tasks: Union[str, Iterable[str]],
    *,
    output_dir: Optional[Union[str, Path]] = None,
    limit: Optional[Union[int, float]] = None,
    metadata: Optional[Dict[str, Any]] = None,
    include_path: Optional[Union[str, Sequence[str]]] = None,
    gen_kwargs: Optional[Union[str, Dict[str, Any]]] = None,
    seed: int = 1234,
) -> Dict[str, Any]:
    """Evaluate ``lm`` (an lm-eval ``LM``) on ``tasks``; add the medtune summary; write outputs."""
    from lm_eval.evaluator import simple_evaluate

    from components.evaluation.usmle import DATA_REPORTS

    DATA_REPORTS.clear()
    tasks = split_tasks(tasks)
    results = simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=task_manager(include_path, metadata, tasks),
        limit=limit,
        log_samples=True,
        gen_kwargs=gen_kwargs,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if results is None:  # a non-zero rank in a distributed run
        return {}
    per_question = per_question_scores(results)
    results["medtune"] = {
        "summary": summarize_results(results, per_question),
        "per_question": per_question,
        "data_reports": _data_reports(),
        "bertscore": bertscore_models(results),
    }
    if output_dir is not None:
        path = write_outputs(results, output_dir)
        logger.info("wrote %s and %s", path, Path(output_dir) / "samples")
    return results
