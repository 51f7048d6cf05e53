"""The stage-2 dataset: KC preference pairs (torchtune's preference format) under a medtune template.

torchtune's own ``preference_dataset`` reads the same JSONL, but always renders it with the
tokenizer's chat format. KnowTuning's stages must see the same prompt format as each other (and
as the study's SFT runs: the medAlpaca template as plain text), so :func:`knowtuning_kc_dataset`
renders the user turn with a medtune template (``medalpaca``, ``alpaca`` or ``llama3_chat``) and
tokenizes as stage 1 does; the rows are read and checked up front, and a malformed row raises a
:class:`~components.data.errors.DataError` naming the file and the line.
"""

from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import datasets
from torchtune.data import Message
from torchtune.datasets import PreferenceDataset
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from components.data.errors import DataError
from components.data.json_records import read_json_records
from components.data.templates import (
    TEXT_TEMPLATES,
    chat_user_text,
    check_template,
    format_prompt,
    model_transform_for,
)


class KCMessages(Transform):
    """``{chosen, rejected}`` message lists (plus optional ``instruction``/``input``) -> Messages.

    The user turn becomes the template's prompt (from ``instruction``/``input`` when the row has
    them, else from the user message's text); the assistant turn is the answer. The prompt is
    masked unless ``train_on_input``.
    """

    def __init__(self, template: str = "medalpaca", train_on_input: bool = False):
        self.template = check_template(template)
        self.train_on_input = train_on_input

    def _prompt(self, sample: Mapping[str, Any], user: str) -> str:
        instruction = sample.get("instruction")
        inp = sample.get("input") or ""
        if instruction is None:
            instruction, inp = user, ""
        if self.template in TEXT_TEMPLATES:
            return format_prompt(self.template, instruction, inp)
        return chat_user_text(instruction, inp)

    def __call__(self, sample: Mapping[str, Any]) -> Dict[str, List[Message]]:
        out = {}
        for side in ("chosen", "rejected"):
            turns = sample[side]
            user = next(m["content"] for m in turns if m["role"] == "user")
            answer = answer_of(turns)
            out[side] = [
                Message(role="user", content=self._prompt(sample, user), masked=not self.train_on_input),
                Message(role="assistant", content=answer, masked=False),
            ]
        return out


#: Message roles torchtune's ``Message`` accepts.
ROLES = ("system", "user", "assistant", "ipython", "tool")
#: Optional text fields of a pair (``input`` may also be null).
TEXT_FIELDS = ("instruction", "input", "type")


def check_pair(row: Mapping[str, Any], index: int, file: Any) -> None:
    """Raise :class:`DataError` unless ``row`` has chosen/rejected lists of ``{role, content}``
    messages (roles torchtune knows, text content) with a user turn and a non-empty assistant
    answer each, and text (if any) in ``instruction``, ``input`` and ``type``: what the dataset,
    the margin report and the Arrow table built from the rows rely on."""
    if not isinstance(row, Mapping):
        raise DataError(f"expected an object, got {type(row).__name__}", file=file, record=index)
    for field in TEXT_FIELDS:
        value = row.get(field)
        if value is not None and not isinstance(value, str):
            raise DataError(f"{field!r} must be text, got {type(value).__name__}", file=file, record=index)
    if row.get("instruction") is None and row.get("input"):
        raise DataError("'input' without 'instruction' (the prompt would leave it out)", file=file, record=index)
    for side in ("chosen", "rejected"):
        turns = row.get(side)
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{side!r} must be a non-empty list of messages", file=file, record=index)
        for turn in turns:
            if not isinstance(turn, Mapping) or not isinstance(turn.get("content"), str) or turn.get("role") not in ROLES:
                raise DataError(
                    f"{side!r}: every message needs a 'role' (one of {', '.join(ROLES)}) and text 'content', "
                    f"got {turn!r:.80}",
                    file=file,
                    record=index,
                )
        roles = [t["role"] for t in turns]
        if "user" not in roles or "assistant" not in roles:
            raise DataError(f"{side!r} needs a user and an assistant message, has {roles}", file=file, record=index)
        if not answer_of(turns).strip():
            raise DataError(f"{side!r}: the assistant answer is empty", file=file, record=index)


def answer_of(turns: Sequence[Mapping[str, Any]]) -> str:
    """The last assistant turn's text."""
    return [t["content"] for t in turns if t["role"] == "assistant"][-1]


def read_pairs(data_files: Union[str, Path, Sequence[Union[str, Path]]]) -> List[Dict[str, Any]]:
    """Every pair of one or more JSON/JSONL files, checked with :func:`check_pair`.

    Raises:
        DataError: a missing, malformed or empty file, or a malformed pair (file and index named).
    """
    files = [data_files] if isinstance(data_files, (str, Path)) else list(data_files)
    rows: List[Dict[str, Any]] = []
    for file in files:
        records = read_json_records(file)
        if not records:
            raise DataError("holds no pairs", file=file)
        for index, row in enumerate(records):
            check_pair(row, index, file)
        rows.extend(records)
    return rows


class KCPreferenceDataset(PreferenceDataset):
    """torchtune's :class:`~torchtune.datasets.PreferenceDataset` over rows already read and checked."""

    def __init__(self, data: datasets.Dataset, *, message_transform: Transform, tokenizer: Any, report: Dict[str, Any]):
        self._data = data
        self._message_transform = message_transform
        self._tokenizer = tokenizer
        self.report = report


def knowtuning_kc_dataset(
    tokenizer: ModelTokenizer,
    *,
    data_files: Union[str, Sequence[str]],
    template: str = "medalpaca",
    train_on_input: bool = False,
    types: Optional[Sequence[str]] = None,
    filter_fn: Optional[Callable] = None,
) -> KCPreferenceDataset:
    """KnowTuning's stage-2 pairs from JSON/JSONL in torchtune's preference format.

    Args:
        tokenizer (ModelTokenizer): the model's tokenizer (its ``max_seq_len`` truncates).
        data_files (Union[str, Sequence[str]]): files written by ``medtune knowtuning build-kc``
            (or any rows with ``chosen``/``rejected`` message lists).
        template (str): prompt template, as in stage 1: ``"medalpaca"`` (default), ``"alpaca"``
            or ``"llama3_chat"``.
        train_on_input (bool): put the prompt in the loss too. Default False (DPO compares answers).
        types (Optional[Sequence[str]]): keep only these negative types (rows' ``type``), e.g.
            ``[factuality]`` for an ablation. Default all.
        filter_fn (Optional[Callable]): keep rows for which it returns True.

    Raises:
        DataError: a missing or malformed file or row (file and row index named).
    """
    files = [data_files] if isinstance(data_files, (str, Path)) else list(data_files)
    rows = read_pairs(files)
    report: Dict[str, Any] = {"files": [str(f) for f in files], "rows": len(rows)}
    if types is not None:
        rows = [r for r in rows if r.get("type") in set(types)]
        report["after_types"] = len(rows)
    if filter_fn is not None:
        rows = [r for r in rows if filter_fn(r)]
        report["after_filter"] = len(rows)
    # Only the fields the transform reads, and only role/content of each message: extra keys of
    # varying types would make Arrow refuse the table.
    keep = ("instruction", "input", "type")
    data = datasets.Dataset.from_list(
        [
            {
                **{side: [{"role": m["role"], "content": m["content"]} for m in r[side]] for side in ("chosen", "rejected")},
                **{k: r[k] for k in keep if k in r},
            }
            for r in rows
        ]
    )
    return KCPreferenceDataset(
        data,
        message_transform=KCMessages(template=template, train_on_input=train_on_input),
        tokenizer=model_transform_for(template, tokenizer),
        report=report,
    )
