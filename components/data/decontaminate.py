"""Drop training records that overlap an evaluation set, by word n-grams.

The test is the one of the GPT-3 and Llama reports, at word level: texts are normalised
(Unicode NFKC, case-folded, punctuation dropped, split into words) and a training record is
contaminated when any of its fields shares an ``ngram``-word sequence (default 13) with an
evaluation text. Evaluation texts shorter than ``ngram`` words (MedQuAD's questions are ~6) match
only a training field that is the same text after normalisation. Compared evaluation texts:
questions, and for MedQuAD test also the reference answers (it is scored on generated answers).

Evaluation sets, by name -> local path:

- ``usmle``: a folder read by :func:`components.data.usmle.read_usmle` (the question text);
- ``medquad_test``: KnowTuning's ``medquad_test.json`` (``{instruction, input, output}``);
- ``medqa_test``: MedQA's test file, JSON or JSONL, with ``question`` (jind11/MedQA) or
  ``instruction``/``input`` (medalpaca/medical_meadow_medqa) fields.
"""

import re
import unicodedata
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from components.data.errors import DataError
from components.data.json_records import read_json_records
from components.data.usmle import read_usmle

EVAL_SETS = ("usmle", "medquad_test", "medqa_test")
TRAIN_FIELDS = ("instruction", "input", "output")
MAX_EXAMPLES = 3
_WORD = re.compile(r"\w+")


def words(text: str) -> List[str]:
    """Normalised words of ``text``: NFKC, case-folded, punctuation and spacing dropped."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def _texts(record: Mapping[str, Any], fields: Iterable[str]) -> List[str]:
    return [record[f] for f in fields if isinstance(record.get(f), str) and record[f].strip()]


def read_eval_set(name: str, path: str) -> List[Tuple[str, List[str], List[str]]]:
    """``(item id, question texts, answer texts)`` for each item of a named evaluation set."""
    if name == "usmle":
        records, _ = read_usmle(path)
        return [(f"step{r['step']} no {r['no']}", [r["question"]], []) for r in records]
    if name not in EVAL_SETS:
        raise ValueError(f"unknown evaluation set {name!r}; expected one of {', '.join(EVAL_SETS)}")
    items = []
    for index, record in enumerate(read_json_records(path)):
        item_id = str(record.get("id", f"#{index}"))
        if name == "medquad_test":
            questions, answers = _texts(record, ("instruction", "input")), _texts(record, ("output",))
        else:
            questions, answers = _texts(record, ("question",)) or _texts(record, ("instruction", "input")), []
        if not questions:
            raise DataError("no question text (expected 'question' or 'instruction')", file=path, record=index)
        items.append((item_id, questions, answers))
    return items


class Decontaminator:
    """An n-gram index of evaluation sets, used to find contaminated training records.

    Args:
        eval_sets (Mapping[str, str]): evaluation set name -> local path (see module docs).
        ngram (int): n-gram length in words. Default 13.
    """

    def __init__(self, eval_sets: Mapping[str, str], ngram: int = 13):
        if ngram < 1:
            raise ValueError(f"ngram must be positive, got {ngram}")
        self.ngram = ngram
        self.sets: Dict[str, Dict[str, Any]] = {}
        self._grams: Dict[str, Tuple[str, str]] = {}
        self._short: Dict[str, Tuple[str, str]] = {}
        for name, path in eval_sets.items():
            items = read_eval_set(name, str(path))
            self.sets[name] = {"path": str(path), "items": len(items)}
            for item_id, questions, answers in items:
                for text in questions + answers:
                    w = words(text)
                    if len(w) >= ngram:
                        for i in range(len(w) - ngram + 1):
                            self._grams.setdefault(" ".join(w[i : i + ngram]), (name, item_id))
                    elif w and text in questions:
                        self._short.setdefault(" ".join(w), (name, item_id))
        self._vocab = {word for gram in self._grams for word in gram.split()}

    def match(self, record: Mapping[str, Any]) -> Optional[Tuple[str, str, str]]:
        """``(eval set, eval item, overlapping text)`` for the first overlap found, else None."""
        n = self.ngram
        for text in _texts(record, TRAIN_FIELDS):
            w = words(text)
            hit = self._short.get(" ".join(w))
            if hit:
                return (*hit, " ".join(w))
            run_start = 0
            for end in range(len(w) + 1):
                # only runs of words that all occur in some evaluation n-gram can match
                if end < len(w) and w[end] in self._vocab:
                    continue
                for i in range(run_start, end - n + 1):
                    gram = " ".join(w[i : i + n])
                    hit = self._grams.get(gram)
                    if hit:
                        return (*hit, gram)
                run_start = end + 1
        return None

    def filter(self, records: Iterable[Mapping[str, Any]]) -> Tuple[List[int], Dict[str, Any]]:
        """Indices of the clean records and a report: removed in total and per evaluation set,
        with up to three examples per set (the record's position among ``records``, the
        evaluation item, the shared text)."""
        kept: List[int] = []
        removed = {name: 0 for name in self.sets}
        examples: Dict[str, List[Dict[str, Any]]] = {name: [] for name in self.sets}
        checked = 0
        for index, record in enumerate(records):
            checked += 1
            hit = self.match(record)
            if hit is None:
                kept.append(index)
                continue
            name, item_id, text = hit
            removed[name] += 1
            if len(examples[name]) < MAX_EXAMPLES:
                examples[name].append({"index": index, "eval_item": item_id, "overlap": text})
        report = {
            "ngram": self.ngram,
            "eval_sets": self.sets,
            "checked": checked,
            "removed": checked - len(kept),
            "removed_per_set": removed,
            "examples": examples,
        }
        return kept, report


def decontaminate_records(
    records: List[Mapping[str, Any]], eval_sets: Mapping[str, str], ngram: int = 13
) -> Tuple[List[Mapping[str, Any]], Dict[str, Any]]:
    """The records that overlap none of ``eval_sets``, and the report of what was removed."""
    kept, report = Decontaminator(eval_sets, ngram=ngram).filter(records)
    return [records[i] for i in kept], report
