"""``replay``: an lm-eval model that answers generation requests with text saved earlier.

Saved generations (the study's, an API's, another harness's) are scored by the very task and
metric code that scores a live model: lm-eval builds the same documents and prompts, asks this
model for each generation, and the task's ``process_results`` reads the stored text.

Formats read (JSON list or JSON Lines):

- the study's USMLE files (``stepN_<model>.json``): ``{no, question, options, answer}``, the
  generation in ``answer``; matched by question number (and checked against the question text);
- LLaMA-Factory predictions (``generated_predictions.jsonl``, the study's MedQuAD baseline):
  ``{prompt, label, predict}``; matched by prompt, else by reference answer (``label``);
- lm-eval's own ``samples_<task>.jsonl`` (``--log_samples``): ``{doc_id, resps, ...}``; matched
  by document id;
- anything with ``{doc_id | no | prompt | label, generation | response | prediction | predict | answer}``.

A document with no stored generation is an error (``missing="error"``) unless
``missing="empty"`` (it then gets an empty answer, which the tasks score as wrong). Replay has no
log-likelihoods: multiple-choice tasks need a live model.
"""

import logging
import re
from typing import Any, Dict, List, Optional, Tuple

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from components.data.errors import DataError
from components.data.json_records import read_json_records

logger = logging.getLogger(__name__)

TEXT_FIELDS = ("generation", "response", "prediction", "predict", "resps", "filtered_resps", "answer")


def _norm(text: str) -> str:
    return " ".join(str(text).split())


def _text_of(record: Dict[str, Any], file: str, index: int) -> str:
    for field in TEXT_FIELDS:
        if field in record:
            value = record[field]
            while isinstance(value, list):  # lm-eval samples: resps = [[text]]
                if not value:
                    raise DataError(f"empty {field!r}", file=file, record=index)
                value = value[0]
            if not isinstance(value, str):
                raise DataError(f"{field!r} is not text", file=file, record=index)
            return value
    raise DataError(f"no generation field (one of {', '.join(TEXT_FIELDS)})", file=file, record=index)


def read_generations(path: str) -> List[Dict[str, Any]]:
    """The records of a JSON list or JSON Lines file of objects.

    Raises:
        DataError: a missing, non-UTF-8 or invalid file, or a record that is not an object
            (see :func:`~components.data.json_records.read_json_records`); file and record named.
    """
    return read_json_records(path)


def _number(value: Any) -> Optional[int]:
    """``value`` as a non-negative int (an int, or a string of ASCII digits), else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return None


class GenerationIndex:
    """Stored generations, looked up by question number, prompt, reference answer or doc id."""

    def __init__(self, path: str):
        self.path = str(path)
        self.records = read_generations(self.path)
        if not self.records:
            raise DataError("holds no generations", file=self.path)
        self.by_key: Dict[Tuple[str, Any], List[int]] = {}
        for i, r in enumerate(self.records):
            _text_of(r, self.path, i)  # fail early on a record without text
            if "doc_id" in r:
                if _number(r["doc_id"]) is None:
                    raise DataError(f"'doc_id' must be a document number, got {r['doc_id']!r:.60}", file=self.path, record=i)
                self._add(("doc_id", _number(r["doc_id"])), i)
            if _number(r.get("no")) is not None:
                self._add(("no", _number(r["no"])), i)
            if isinstance(r.get("prompt"), str):
                self._add(("prompt", _norm(r["prompt"])), i)
            if isinstance(r.get("label"), str):
                self._add(("label", _norm(r["label"])), i)
        self.used: set = set()

    def _add(self, key, index: int) -> None:
        self.by_key.setdefault(key, []).append(index)

    def _unique(self, key) -> Optional[int]:
        hits = [i for i in self.by_key.get(key, []) if i not in self.used] or self.by_key.get(key, [])
        return hits[0] if hits else None

    def lookup(self, context: str, doc: Dict[str, Any], doc_id: Optional[int]) -> Optional[str]:
        index = None
        if "no" in doc and ("no", int(doc["no"])) in self.by_key:
            index = self._unique(("no", int(doc["no"])))
            stored_q = self.records[index].get("question")
            if isinstance(stored_q, str) and _norm(stored_q) != _norm(doc.get("question", stored_q)):
                raise ValueError(
                    f"{self.path}: question {doc['no']} does not match the task's question text: "
                    "are these generations for another step or version of the set?"
                )
        if index is None:
            index = self._unique(("prompt", _norm(context)))
        if index is None and isinstance(doc.get("output"), str):
            index = self._unique(("label", _norm(doc["output"])))
        if index is None and doc_id is not None:
            index = self._unique(("doc_id", int(doc_id)))
        if index is None:
            return None
        self.used.add(index)
        return _text_of(self.records[index], self.path, index)


@register_model("replay")
class ReplayLM(LM):
    """lm-eval model serving stored generations: ``--model replay --model_args path=FILE``."""

    def __init__(self, path: str, missing: str = "error", strip_stop_tokens: bool = False, **_kwargs) -> None:
        super().__init__()
        if missing not in ("error", "empty"):
            raise ValueError(f"missing must be 'error' or 'empty', got {missing!r}")
        self.index = GenerationIndex(path)
        self.missing = missing
        self.strip_stop_tokens = strip_stop_tokens in (True, "true", "True", "1")
        self.missing_docs: List[Any] = []

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "ReplayLM":
        from lm_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        return cls(**args)

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        out = []
        for request in requests:
            context = request.args[0]
            text = self.index.lookup(context, request.doc or {}, getattr(request, "doc_id", None))
            if text is None:
                self.missing_docs.append(request.doc_id)
                if self.missing == "error":
                    raise ValueError(
                        f"{self.index.path}: no stored generation for {request.task_name} document "
                        f"{request.doc_id} ({_norm(context)[-80:]!r}); pass missing=empty to score it as no answer"
                    )
                text = ""
            if self.strip_stop_tokens:
                text = re.split(r"<\|(?:end_of_text|eot_id)\|?>?", text)[0]
            out.append(text)
        if self.missing_docs:
            logger.warning("replay: %d documents had no stored generation (scored as empty)", len(self.missing_docs))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(
            "replay serves stored generations only: log-likelihood (multiple-choice) tasks need a live model; "
            "score the *_gen tasks or medquad"
        )

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("replay serves stored generations only")
