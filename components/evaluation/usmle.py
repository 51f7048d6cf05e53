"""The USMLE self-assessment as lm-eval tasks: data, the study's prompt, scoring.

Two protocols share one prompt, the study's (medAlpaca's ``eval_usmle.py``): the medAlpaca
template with the instruction ``Answer this multiple choice question.``, the question followed
by one ``X: option`` line per option as the input, and the response opened with
``The Answer to the question is:``.

- ``usmle_stepN_gen`` (the study's protocol): greedy generation; the answer is the first option
  letter of the generation (:func:`~components.evaluation.parsing.first_option_letter`); every
  question counts, including the one without options and those with images. An answer without a
  letter is wrong.
- ``usmle_stepN`` (log-likelihood): the model's choice is the option letter (`` A``, `` B``, ...)
  with the highest log-likelihood after the prompt. A question that lists no options cannot be
  asked this way (Step 2 no. 119): it is left out and reported. In Step 2 nos. 104, 115 and 118
  the last option swallowed the next one (``Pyelonephritis\\n\\nAnswer E: Tubo-ovarian abscess``;
  no. 115's key is that E): the multiple-choice task splits them back apart and reports the
  repair. (No. 91's option B holds a second "Answer C" although a C exists: left as published.)

Data: from the Hub (``medalpaca/medical_meadow_usmle_self_assessment``, the raw JSON files), or
a local folder in the same layout named by the task metadata ``usmle_dir`` or the environment
variable ``MEDTUNE_USMLE_DIR``. Image questions (``question_with_images.json``) are kept by
default, as the study did; the task metadata ``include_images: false`` leaves them out
(``lm_eval ... --metadata '{"include_images": false}'``).
"""

import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from components.data.templates import MEDALPACA_PROMPT
from components.data.usmle import IMAGES_FILE, read_usmle
from components.evaluation.parsing import DEFAULT_LETTERS, first_option_letter

logger = logging.getLogger(__name__)

HUB_ID = "medalpaca/medical_meadow_usmle_self_assessment"
USMLE_DIR_ENV = "MEDTUNE_USMLE_DIR"
INSTRUCTION = "Answer this multiple choice question."
RESPONSE_OPENING = "The Answer to the question is:"
MODES = ("mc", "gen")
_GLUED_OPTION = re.compile(r"\n\s*\n\s*(?:Answer\s+)?([A-I])\s*[:.]\s*(.+)\s*$", re.DOTALL)

#: What the last dataset load per (step, mode) left out or repaired, for reports.
DATA_REPORTS: Dict[str, Dict[str, Any]] = {}


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        if value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if value.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    return bool(value)


def resolve_usmle_dir(usmle_dir: Optional[Union[str, Path]] = None) -> Path:
    """The folder with ``step{1,2,3}.json`` etc.: the argument, ``$MEDTUNE_USMLE_DIR``, else the Hub."""
    local = usmle_dir or os.environ.get(USMLE_DIR_ENV)
    if local:
        return Path(local)
    from huggingface_hub import hf_hub_download

    files = [IMAGES_FILE] + [f"step{s}{suffix}.json" for s in (1, 2, 3) for suffix in ("", "_solutions")]
    try:
        paths = [hf_hub_download(HUB_ID, f, repo_type="dataset") for f in files]
    except Exception as e:  # offline, no access, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        # OSError: medtune eval/score print it as one line; lm_eval prints its traceback, this last
        raise OSError(
            f"no local USMLE questions and the Hub copy ({HUB_ID}) is unreachable ({reason}): set "
            f"{USMLE_DIR_ENV}=/path/to/usmle (a folder with step1.json ...), or pass lm_eval "
            f"--metadata '{{\"usmle_dir\": \"/path/to/usmle\"}}' (medtune eval/score: --usmle-dir)"
        ) from None
    return Path(paths[0]).parent


def format_question(question: str, options: Dict[str, str]) -> str:
    """The study's input text: the question, then one ``X: text`` line per option."""
    return question + "".join(f"\n{letter}: {text}" for letter, text in options.items())


def study_prompt(question: str, options: Dict[str, str]) -> str:
    """The whole prompt, ending in ``The Answer to the question is:`` (no trailing space)."""
    return MEDALPACA_PROMPT.format(instruction=INSTRUCTION, input=format_question(question, options)) + RESPONSE_OPENING


def repair_glued_option(options: Dict[str, str]) -> Tuple[Dict[str, str], Optional[str]]:
    """Split an option that swallowed the next one (``...\\n\\nAnswer E: text``); else unchanged."""
    if not options:
        return options, None
    letters = list(options)
    last = letters[-1]
    match = _GLUED_OPTION.search(options[last])
    if not match or match.group(1) in options or ord(match.group(1)) != ord(last) + 1:
        return options, None
    fixed = dict(options)
    fixed[last] = options[last][: match.start()].rstrip()
    fixed[match.group(1)] = match.group(2).strip()
    return fixed, f"option {match.group(1)} split out of option {last}"


def usmle_docs(
    directory: Union[str, Path], step: int, mode: str, include_images: bool = True
) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Task documents for one step and protocol, and a report of what was left out or repaired."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    records, _ = read_usmle(directory, steps=[step])
    report: Dict[str, Any] = {
        "step": step,
        "mode": mode,
        "source": str(directory),
        "questions": len(records),
        "include_images": include_images,
        "excluded_images": [],
        "excluded_no_options": [],
        "repaired": [],
        "answer_not_in_options": [],
    }
    docs = []
    for r in records:
        if r["has_image"] and not include_images:
            report["excluded_images"].append(r["no"])
            continue
        options = r["options"]
        if mode == "mc":
            if not options:
                report["excluded_no_options"].append(r["no"])
                continue
            options, note = repair_glued_option(options)
            if note:
                report["repaired"].append({"no": r["no"], "what": note})
            if r["answer"] not in options:
                report["answer_not_in_options"].append({"no": r["no"], "answer": r["answer"]})
                continue
        docs.append(
            {
                "step": step,
                "no": r["no"],
                "question": r["question"],
                "letters": list(options),
                "option_texts": list(options.values()),
                "answer": r["answer"],
                "answer_index": list(options).index(r["answer"]) if r["answer"] in options else -1,
                "has_image": r["has_image"],
                # The study's prompt is built from the data as published (option 115 unrepaired).
                "prompt": study_prompt(r["question"], r["options"] if mode == "gen" else options),
            }
        )
    report["scored"] = len(docs)
    for key, what in (
        ("excluded_no_options", "listed no options, left out of the log-likelihood task"),
        ("excluded_images", "refer to an image, left out (include_images: false)"),
        ("answer_not_in_options", "have an answer key that is not among their options, left out"),
    ):
        if report[key]:
            logger.warning("USMLE step %d (%s): questions %s %s", step, mode, report[key], what)
    for item in report["repaired"]:
        logger.warning("USMLE step %d (%s): question %d: %s", step, mode, item["no"], item["what"])
    DATA_REPORTS[f"usmle_step{step}{'_gen' if mode == 'gen' else ''}"] = report
    return docs, report


def load_usmle(step: int, mode: str = "mc", include_images: Any = True, usmle_dir: Optional[str] = None, **_metadata):
    """lm-eval ``custom_dataset``: ``DatasetDict({"test": ...})`` for one step and protocol.

    ``_metadata`` swallows the rest of lm-eval's task metadata (version, model arguments, ...).
    """
    import datasets

    docs, _ = usmle_docs(resolve_usmle_dir(usmle_dir), int(step), mode, _as_bool(include_images))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def doc_to_text(doc: Dict[str, Any]) -> str:
    return doc["prompt"]


def doc_to_choice(doc: Dict[str, Any]) -> List[str]:
    return list(doc["letters"])


def doc_to_target(doc: Dict[str, Any]) -> int:
    return int(doc["answer_index"])


def _scores(correct: float) -> Dict[str, float]:
    # The same 0/1 value feeds the mean (acc, with lm-eval's stderr) and the two bootstrap ends.
    return {"acc": correct, "acc_ci95_low": correct, "acc_ci95_high": correct}


def process_results_mc(doc: Dict[str, Any], results: List[Tuple[float, bool]]) -> Dict[str, float]:
    """Log-likelihood choice: the option letter the model finds most likely."""
    lls = [ll for ll, _ in results]
    choice = max(range(len(lls)), key=lls.__getitem__)
    return _scores(float(choice == doc["answer_index"]))


def process_results_gen(doc: Dict[str, Any], results: List[str]) -> Dict[str, float]:
    """The study's rule: the first option letter of the generation; no letter is wrong."""
    letter = first_option_letter(results[0], DEFAULT_LETTERS)
    return {**_scores(float(letter == doc["answer"])), "answered": float(letter is not None)}
