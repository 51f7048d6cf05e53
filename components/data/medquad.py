"""MedQuAD (Ben Abacha & Demner-Fushman, 2019): the original XML collection or a Hub copy.

The XML release has 12 collection folders, one ``Document`` per file (one CDC file's root is
``DiseaseFile``), each holding ``QAPairs/QAPair/{Question(qid, qtype), Answer}`` and a ``Focus``.
Four NINDS files use an older schema (``doc/qaPairs/pair/{question, answer}``, ``doctitle-focus``); they are read too and counted
apart (16 pairs: 47,441 in the main schema + 16 = the 47,457 of MedQuAD's readme; the Hub copy
``lavita/MedQuAD`` has the 47,441). Answers were removed upstream from three MedlinePlus
collections and a few GARD pairs: such pairs are skipped and counted, per collection. Anything
else malformed raises :class:`~components.data.errors.DataError` naming the file and the qid.

Hub copies: ``lavita/MedQuAD`` (``question_id, question, answer, question_type,
question_focus, document_source, document_id, document_url``, 47,441 rows) and
``keivalya/MedQuad-MedicalQnADataset`` (``qtype, Question, Answer``, the 16,407 answered pairs).
"""

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import datasets
from torchtune.datasets import PackedDataset
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from components.data.errors import DataError
from components.data.instruct import InstructDataset, build_instruct_dataset

RECORD_FIELDS = ("qid", "question", "answer", "qtype", "focus", "source", "collection", "document_id", "url")

#: The XML ``source`` attribute of each collection folder (``corpus`` in the older schema).
COLLECTIONS = {
    "CancerGov": "1_CancerGov_QA",
    "GARD": "2_GARD_QA",
    "GHR": "3_GHR_QA",
    "MPlusHealthTopics": "4_MPlus_Health_Topics_QA",
    "NIDDK": "5_NIDDK_QA",
    "NINDS": "6_NINDS_QA",
    "NIHSeniorHealth": "7_SeniorHealth_QA",
    "NHLBI": "8_NHLBI_QA_XML",
    "CDC": "9_CDC_QA",
    "ADAM": "10_MPlus_ADAM_QA",
    "MPlusDrugs": "11_MPlusDrugs_QA",
    "MPlusHerbsSupplements": "12_MPlusHerbsSupplements_QA",
}

_SCHEMAS = {
    # root tag: (focus tag, pair path, question tag, answer tag, source attribute, id attribute)
    "Document": ("Focus", "QAPairs/QAPair", "Question", "Answer", "source", "id"),
    "DiseaseFile": ("Focus", "QAPairs/QAPair", "Question", "Answer", "source", "fid"),  # one CDC file
    "doc": ("doctitle-focus", "qaPairs/pair", "question", "answer", "corpus", "docid"),
}


def _text(element: Optional[ET.Element]) -> str:
    return "" if element is None else "".join(element.itertext()).strip()


def parse_medquad_file(path: Union[str, Path], collection: str) -> Tuple[List[Dict[str, Any]], int, str]:
    """``(answered records, pairs without an answer, root tag)`` of one MedQuAD XML file."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:  # its message gives the line and column
        raise DataError(f"not well-formed XML: {e}", file=path) from None
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", file=path) from None
    if root.tag not in _SCHEMAS:
        raise DataError(
            f"root element is <{root.tag}>, expected one of <{'>, <'.join(_SCHEMAS)}>", file=path
        )
    focus_tag, pair_path, q_tag, a_tag, source_attr, id_attr = _SCHEMAS[root.tag]
    focus, source = _text(root.find(focus_tag)), root.get(source_attr)
    records, unanswered = [], 0
    for index, pair in enumerate(root.iterfind(pair_path)):
        question = pair.find(q_tag)
        where = f"QAPair {pair.get('pid', index)}"
        if question is None:
            raise DataError(f"no <{q_tag}>", file=path, record=where)
        qid = question.get("qid")
        if not qid:
            raise DataError("<Question> has no qid", file=path, record=where)
        text = _text(question)
        if not text:
            raise DataError("empty question", file=path, record=f"qid {qid}")
        answer = _text(pair.find(a_tag))
        if not answer:
            unanswered += 1
            continue
        records.append(
            {
                "qid": qid,
                "question": text,
                "answer": answer,
                "qtype": question.get("qtype"),
                "focus": focus,
                "source": source,
                "collection": collection,
                "document_id": root.get(id_attr),
                "url": root.get("url"),
            }
        )
    return records, unanswered, root.tag


def _collection_key(name: str) -> Tuple[int, str]:
    prefix = name.split("_", 1)[0]
    return (int(prefix) if prefix.isdigit() else 1_000, name)


def read_medquad_xml(directory: Union[str, Path]) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Answered pairs of a MedQuAD XML release, in collection then file order, and a report:
    ``files``, ``pairs``, ``answered``, ``skipped_no_answer``, ``old_schema`` (files and pairs
    in the older ``<doc>`` schema) and the same counts per collection."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError("not a folder (expected a MedQuAD XML release, e.g. 1_CancerGov_QA/*.xml)", file=directory)
    collections = sorted(
        (e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith(".")),
        key=_collection_key,
    )
    if not collections:
        raise DataError("no collection folders (expected e.g. 1_CancerGov_QA/*.xml)", file=directory)
    records: List[Dict[str, Any]] = []
    per_collection: Dict[str, Dict[str, int]] = {}
    old = {"files": 0, "pairs": 0, "answered": 0}
    for collection in collections:
        files = sorted(f for f in os.listdir(directory / collection) if f.endswith(".xml"))
        counts = {"files": len(files), "pairs": 0, "answered": 0, "skipped_no_answer": 0}
        for name in files:
            found, unanswered, tag = parse_medquad_file(directory / collection / name, collection)
            records += found
            counts["answered"] += len(found)
            counts["skipped_no_answer"] += unanswered
            counts["pairs"] += len(found) + unanswered
            if tag == "doc":
                old["files"] += 1
                old["pairs"] += len(found) + unanswered
                old["answered"] += len(found)
        per_collection[collection] = counts
    report = {"source": str(directory), "format": "xml"}
    for key in ("files", "pairs", "answered", "skipped_no_answer"):
        report[key] = sum(c[key] for c in per_collection.values())
    report["old_schema"] = old
    report["collections"] = per_collection
    return records, report


def _from_hub_rows(data: datasets.Dataset, source: str) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    columns = set(data.column_names)
    if {"question", "answer", "question_type"} <= columns:  # lavita/MedQuAD
        names = {"qid": "question_id", "question": "question", "answer": "answer", "qtype": "question_type",
                 "focus": "question_focus", "source": "document_source", "document_id": "document_id",
                 "url": "document_url"}
    elif {"Question", "Answer", "qtype"} <= columns:  # keivalya/MedQuad-MedicalQnADataset
        names = {"question": "Question", "answer": "Answer", "qtype": "qtype"}
    else:
        raise DataError(
            "unknown MedQuAD columns; expected lavita/MedQuAD's (question, answer, question_type, ...) "
            f"or keivalya/MedQuad-MedicalQnADataset's (qtype, Question, Answer); got {sorted(columns)}",
            file=source,
        )
    records, per_collection = [], {}
    for index, row in enumerate(data):
        record = {field: row.get(names[field]) if field in names else None for field in RECORD_FIELDS}
        for field in ("question", "answer", "source"):
            if record[field] is not None and not isinstance(record[field], str):
                raise DataError(f"{names[field]!r} must be text, got {type(record[field]).__name__}",
                                file=source, record=index)
        if not (record["question"] or "").strip():
            raise DataError("empty question", file=source, record=index)
        record["collection"] = COLLECTIONS.get(record["source"]) if record["source"] else None
        counts = per_collection.setdefault(record["collection"] or "unknown",
                                           {"pairs": 0, "answered": 0, "skipped_no_answer": 0})
        counts["pairs"] += 1
        if not (record["answer"] or "").strip():
            counts["skipped_no_answer"] += 1
            continue
        counts["answered"] += 1
        record["question"], record["answer"] = record["question"].strip(), record["answer"].strip()
        records.append(record)
    report = {"source": source, "format": "hub"}
    for key in ("pairs", "answered", "skipped_no_answer"):
        report[key] = sum(c[key] for c in per_collection.values())
    report["collections"] = per_collection
    return records, report


def _looks_local(source: str) -> bool:
    """Whether ``source`` is written as a local path (``./x``, ``/x``, ``~/x``, ``a/b/c``) rather
    than a Hub id (``owner/name``), so a missing folder is reported as such, not as a Hub miss."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1


def load_medquad(
    source: str = "lavita/MedQuAD", *, split: str = "train", **load_dataset_kwargs: Any
) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Answered MedQuAD pairs ``{qid, question, answer, qtype, focus, source, collection,
    document_id, url}`` (None where the source lacks a field) and a count report.

    ``source`` is an XML release folder or a Hub id (``lavita/MedQuAD``,
    ``keivalya/MedQuad-MedicalQnADataset``).
    """
    if Path(source).is_dir():
        return read_medquad_xml(source)
    if Path(source).exists() or _looks_local(source):
        raise DataError("not a folder (expected a MedQuAD XML release, or a Hub id such as lavita/MedQuAD)", file=source)
    data = datasets.load_dataset(source, split=split, **load_dataset_kwargs)
    return _from_hub_rows(data, source)


def medquad_dataset(
    tokenizer: ModelTokenizer,
    *,
    source: str = "lavita/MedQuAD",
    template: str = "medalpaca",
    train_on_input: bool = True,
    system_prompt: Optional[str] = None,
    holdout_fraction: Optional[float] = None,
    holdout_seed: int = 42,
    holdout: str = "train",
    decontaminate: Optional[Mapping[str, str]] = None,
    decontaminate_ngram: int = 13,
    packed: bool = False,
    filter_fn: Optional[Callable] = None,
    split: str = "train",
    **load_dataset_kwargs: Dict[str, Any],
) -> Union[InstructDataset, PackedDataset]:
    """MedQuAD's answered pairs for SFT: the question is the instruction, the input is empty
    (the layout of KnowTuning's MedQuAD splits), the answer is the output.

    Args:
        tokenizer (ModelTokenizer): the model's tokenizer.
        source (str): an XML release folder, or a Hub id. Default ``"lavita/MedQuAD"``.
        filter_fn (Optional[Callable]): applied to the records, which keep ``qid, qtype, focus,
            source, collection``, so e.g. ``lambda r: r["collection"] != "2_GARD_QA"`` works.
        template, train_on_input, system_prompt, holdout_fraction, holdout_seed, holdout,
        decontaminate, decontaminate_ngram, packed, split, **load_dataset_kwargs: as in
            :func:`components.data.medical_meadow.medical_meadow_dataset`.

    Returns:
        Union[InstructDataset, PackedDataset]: an ``SFTDataset`` whose ``report`` holds the
        pair counts (total, answered, skipped for want of an answer, per collection).
    """
    records, report = load_medquad(source, split=split, **load_dataset_kwargs)
    rows = [{"instruction": r["question"], "input": "", "output": r["answer"], **r} for r in records]
    data = datasets.Dataset.from_list(rows)
    return build_instruct_dataset(
        tokenizer,
        data,
        report={"name": "medquad", **report},
        template=template,
        train_on_input=train_on_input,
        system_prompt=system_prompt,
        filter_fn=filter_fn,
        holdout_fraction=holdout_fraction,
        holdout_seed=holdout_seed,
        holdout=holdout,
        decontaminate=decontaminate,
        decontaminate_ngram=decontaminate_ngram,
        packed=packed,
    )
