"""Dataset builders (Medical Meadow, MedQuAD), readers (USMLE), prompt templates, mixing and
decontamination. Builders are flat functions a YAML ``_component_`` can name.

Bad input, one rule throughout: malformed files and records raise :class:`DataError` naming the
file and the record. Known gaps of the sources themselves are not errors and are never dropped
silently: MedQuAD pairs whose answer was removed upstream are skipped and counted; USMLE items
without options (or whose key is not among them) are kept and listed in the report.
"""

import importlib
from typing import Any

#: Each public name and the module that defines it; imported on first use (PEP 562), so that
#: ``components.data.cli`` (``medtune --help``) does not pull torch, torchtune and datasets.
_HOMES = {
    "Decontaminator": "decontaminate",
    "decontaminate_records": "decontaminate",
    "DataError": "errors",
    "InstructDataset": "instruct",
    **{name: "medical_meadow" for name in (
        "MEDICAL_MEADOW_SETS", "STUDY_MIX_ROWS", "medical_meadow_cord19", "medical_meadow_dataset",
        "medical_meadow_health_advice", "medical_meadow_medical_flashcards", "medical_meadow_mediqa",
        "medical_meadow_medqa", "medical_meadow_mmmlu", "medical_meadow_wikidoc",
        "medical_meadow_wikidoc_patient_information",
    )},
    "load_medquad": "medquad",
    "medquad_dataset": "medquad",
    "read_medquad_xml": "medquad",
    "load_mixture": "mixture",
    "medical_meadow_mixture": "mixture",
    "InstructToMessages": "templates",
    "PlainTextTokenizer": "templates",
    "read_usmle": "usmle",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_HOMES))


__all__ = [
    "DataError",
    "Decontaminator",
    "InstructDataset",
    "InstructToMessages",
    "MEDICAL_MEADOW_SETS",
    "PlainTextTokenizer",
    "STUDY_MIX_ROWS",
    "decontaminate_records",
    "load_medquad",
    "load_mixture",
    "medical_meadow_cord19",
    "medical_meadow_dataset",
    "medical_meadow_health_advice",
    "medical_meadow_medical_flashcards",
    "medical_meadow_mediqa",
    "medical_meadow_medqa",
    "medical_meadow_mmmlu",
    "medical_meadow_mixture",
    "medical_meadow_wikidoc",
    "medical_meadow_wikidoc_patient_information",
    "medquad_dataset",
    "read_medquad_xml",
    "read_usmle",
]
