"""MedQuAD as an lm-eval generation task: the KnowTuning 200-item test split, the study's metrics.

Prompt: the study's baseline prompt (``study_outputs/medquad_baseline_predictions.jsonl``):
Alpaca's no-input template around the question, with the space that the split puts before the
question mark removed (``Gilbert syndrome ?`` was prompted as ``Gilbert syndrome?``). Greedy
generation, stopped at the next ``### Instruction:``.

Metrics, each the mean over the split: BERTScore precision / recall / F1 (the study's numbers;
model from :mod:`components.evaluation.bertscore`; ``bertscore_model: none`` skips them, giving
NaN), ROUGE-L and SQuAD token F1. BERTScore runs once per task, batched, in the aggregation:
each answer's ``process_results`` hands over ``(prediction, reference, model, layers)``, and the
three BERTScore aggregations share one cached computation over all of them.

Data: the task metadata ``medquad_test`` or ``$MEDTUNE_MEDQUAD_TEST`` (a local JSON list of
``{instruction, input, output}``, or a URL), else the split from the KnowTuning repository.
"""

import json
import os
import re
from functools import lru_cache
from typing import Any, Dict, List, Optional, Sequence, Tuple

from components.data.errors import DataError
from components.data.json_records import read_json
from components.data.templates import format_prompt
from components.evaluation.bertscore import bertscore, resolve_model
from components.evaluation.text_metrics import rouge_l, token_f1
from components.evaluation.usmle import DATA_REPORTS

MEDQUAD_TEST_ENV = "MEDTUNE_MEDQUAD_TEST"
KNOWTUNING_TEST_URL = "https://raw.githubusercontent.com/youganglyu/KnowTuning/main/data/meduqad/medquad_test.json"


def study_prompt(instruction: str, input: str = "") -> str:
    """The study's MedQuAD prompt (Alpaca, no input; ``' ?'`` -> ``'?'``)."""
    return format_prompt("alpaca", re.sub(r"\s+\?", "?", instruction.strip()), input)


def read_medquad_test(source: str) -> List[Dict[str, str]]:
    """Records ``{instruction, input, output}`` from a local JSON list or a URL.

    Raises:
        DataError: a missing, non-UTF-8 or invalid file, or a record that is not an object
            with text ``instruction`` and ``output`` (``input`` optional); file and index named.
    """
    if re.match(r"^https?://", source):
        import urllib.request

        try:
            with urllib.request.urlopen(source, timeout=60) as response:
                data = json.loads(response.read().decode("utf-8"))
        except Exception as e:
            raise RuntimeError(
                f"could not fetch the MedQuAD test split from {source}: {e}. "
                f"Point ${MEDQUAD_TEST_ENV} (or the task metadata medquad_test) at a local copy."
            ) from e
    else:
        data = read_json(source)
    if not isinstance(data, list):
        raise DataError(f"expected a list of records, got {type(data).__name__}", file=source)
    if not data:
        raise DataError("holds no records: an empty test split scores nothing", file=source)
    rows = []
    for index, item in enumerate(data):
        if not isinstance(item, dict) or not all(isinstance(item.get(k, ""), str) for k in ("instruction", "input", "output")):
            raise DataError("expected {instruction, input, output} text fields", file=source, record=index)
        if not item.get("instruction", "").strip() or not item.get("output", "").strip():
            raise DataError("empty instruction or output", file=source, record=index)
        rows.append({"instruction": item["instruction"], "input": item.get("input", ""), "output": item["output"]})
    return rows


def load_medquad(
    medquad_test: Optional[str] = None,
    bertscore_model: Optional[str] = None,
    bertscore_num_layers: Optional[int] = None,
    **_metadata,
):
    """lm-eval ``custom_dataset``: the test split, each document carrying the BERTScore model to use."""
    import datasets

    source = medquad_test or os.environ.get(MEDQUAD_TEST_ENV) or KNOWTUNING_TEST_URL
    model, layers = resolve_model(bertscore_model, bertscore_num_layers)
    docs = [
        {
            "index": i,
            **row,
            "prompt": study_prompt(row["instruction"], row["input"]),
            "bertscore_model": model,
            "bertscore_num_layers": layers,
        }
        for i, row in enumerate(read_medquad_test(str(source)))
    ]
    # results.json records which file was scored (the shipped sample or the real split), as for USMLE
    DATA_REPORTS["medquad"] = {"source": str(source), "questions": len(docs), "scored": len(docs)}
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def doc_to_text(doc: Dict[str, Any]) -> str:
    return doc["prompt"]


def doc_to_target(doc: Dict[str, Any]) -> str:
    return doc["output"]


BertItem = Tuple[str, str, str, int]


def process_results(doc: Dict[str, Any], results: List[str]) -> Dict[str, Any]:
    prediction = results[0].strip()
    item: BertItem = (prediction, doc["output"], doc["bertscore_model"], int(doc["bertscore_num_layers"]))
    return {
        "bertscore_precision": item,
        "bertscore_recall": item,
        "bertscore_f1": item,
        "rougeL": rouge_l(prediction, doc["output"]),
        "token_f1": token_f1(prediction, doc["output"]),
    }


@lru_cache(maxsize=4)
def _bertscore_items(items: Tuple[BertItem, ...]) -> Dict[str, Tuple[float, ...]]:
    """Per-item BERTScore of ``(prediction, reference, model, layers)`` items, batched per model."""
    out = {"precision": [float("nan")] * len(items), "recall": [float("nan")] * len(items), "f1": [float("nan")] * len(items)}
    by_model: Dict[Tuple[str, int], List[int]] = {}
    for i, (_, _, model, layers) in enumerate(items):
        by_model.setdefault((model, layers), []).append(i)
    for (model, layers), indices in by_model.items():
        if model.lower() == "none":
            continue
        scores = bertscore([items[i][0] for i in indices], [items[i][1] for i in indices], model=model, num_layers=layers)
        for key in out:
            for i, value in zip(indices, scores[key]):
                out[key][i] = value
    return {key: tuple(values) for key, values in out.items()}


def bertscore_per_item(items: Sequence[BertItem], which: str) -> List[float]:
    """``which`` (precision, recall or f1) for each item; one cached computation for all three."""
    return list(_bertscore_items(tuple(tuple(i) for i in items))[which])


def _mean(values: List[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def bertscore_precision(items: Sequence[BertItem]) -> float:
    return _mean(bertscore_per_item(items, "precision"))


def bertscore_recall(items: Sequence[BertItem]) -> float:
    return _mean(bertscore_per_item(items, "recall"))


def bertscore_f1(items: Sequence[BertItem]) -> float:
    return _mean(bertscore_per_item(items, "f1"))
