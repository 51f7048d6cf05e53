"""USMLE self-assessment questions (medAlpaca's ``medical_meadow_usmle_self_assessment`` layout).

A folder holds ``step{1,2,3}.json`` (a list of ``{no, question, options: {A: ...}}``),
``step{N}_solutions.json`` (``{"1": "B", ...}``) and ``question_with_images.json``
(``{"step1": [4, 7, ...], ...}``). :func:`read_usmle` joins them into one record per question:
``{step, no, question, options, answer, has_image}``. Malformed files raise
:class:`~components.data.errors.DataError`. Flaws of the source itself are kept, since the
study counted every question, and listed in the report: questions without options
(``no_options``: Step 2 no. 119) and answers missing from the options (``answer_not_in_options``:
Step 2 no. 115, whose key is E but whose options stop at D).
"""

from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Union

from components.data.errors import DataError
from components.data.json_records import read_json

STEPS = (1, 2, 3)
IMAGES_FILE = "question_with_images.json"


#: Question numbers are small positive integers; a larger one is a corrupt file, not a question.
MAX_QUESTION_NUMBER = 1_000_000


def _question_number(value: Any, file: Path, index: Union[int, str], what: str = "'no'") -> int:
    """``value`` as a question number: an int or a string of ASCII digits, at most
    :data:`MAX_QUESTION_NUMBER` (``str.isdigit`` alone accepts ``"²"``, which ``int`` refuses)."""
    text = str(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else ""
    if not (text.isascii() and text.isdigit()) or int(text) > MAX_QUESTION_NUMBER:
        raise DataError(f"{what} must be a question number, got {value!r:.60}", file=file, record=index)
    return int(text)


def _read_step(directory: Path, step: int) -> List[Dict[str, Any]]:
    file = directory / f"step{step}.json"
    items = read_json(file)
    if not isinstance(items, list):
        raise DataError(f"expected a list of questions, got {type(items).__name__}", file=file)
    questions = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(f"expected an object, got {type(item).__name__}", file=file, record=index)
        no = _question_number(item.get("no"), file, index)
        question, options = item.get("question"), item.get("options", {})
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"question {no}: 'question' must be non-empty text", file=file, record=index)
        if not isinstance(options, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in options.items()
        ):
            raise DataError(
                f"question {no}: 'options' must map letters to text, got {options!r:.80}",
                file=file,
                record=index,
            )
        questions.append({"step": step, "no": no, "question": question, "options": options})
    return questions


def read_usmle(
    path: Union[str, Path], steps: Sequence[int] = STEPS
) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Records ``{step, no, question, options, answer, has_image}`` and a report.

    The report holds ``questions`` and ``with_image`` per step, ``no_options`` (``{step, no}``)
    and ``answer_not_in_options`` (``{step, no, answer}``).

    Raises:
        DataError: a missing or malformed file, a duplicate question number, a question with no
            answer, or an answer for no question.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise DataError("not a directory (expected step1.json, step1_solutions.json, ...)", file=directory)
    images_file = directory / IMAGES_FILE
    images = read_json(images_file)
    if not isinstance(images, dict):
        raise DataError(f"expected {{'step1': [numbers], ...}}, got {type(images).__name__}", file=images_file)
    records: List[Dict[str, Any]] = []
    report: Dict[str, Any] = {"path": str(directory), "questions": {}, "with_image": {}, "no_options": [], "answer_not_in_options": []}
    for step in steps:
        questions = _read_step(directory, step)
        solutions_file = directory / f"step{step}_solutions.json"
        solutions = read_json(solutions_file)
        if not isinstance(solutions, dict):
            raise DataError(f"expected {{number: letter}}, got {type(solutions).__name__}", file=solutions_file)
        with_image = images.get(f"step{step}", [])
        if not isinstance(with_image, list):
            raise DataError(f"'step{step}' must be a list of question numbers", file=images_file)
        with_image = {
            _question_number(n, images_file, f"step{step}[{i}]", "an image question")
            for i, n in enumerate(with_image)
        }
        seen = set()
        for index, q in enumerate(questions):
            no = q["no"]
            if no in seen:
                raise DataError(
                    f"question number {no} appears twice", file=directory / f"step{step}.json", record=index
                )
            seen.add(no)
            answer = solutions.get(str(no))
            if not isinstance(answer, str) or not answer.strip():
                raise DataError(f"no answer for question {no}", file=solutions_file, record=f"key {no!r}")
            answer = answer.strip()
            if q["options"] and answer not in q["options"]:
                report["answer_not_in_options"].append({"step": step, "no": no, "answer": answer})
            if not q["options"]:
                report["no_options"].append({"step": step, "no": no})
            records.append({**q, "answer": answer, "has_image": no in with_image})
        extra = sorted(set(solutions) - {str(n) for n in seen}, key=str)
        if extra:
            raise DataError(f"answers for questions that do not exist: {extra[:10]}", file=solutions_file)
        unknown = sorted(with_image - seen)
        if unknown:
            raise DataError(f"step{step} lists image questions that do not exist: {unknown}", file=images_file)
        report["questions"][step] = len(questions)
        report["with_image"][step] = len(with_image)
    report["total"] = len(records)
    return records, report
