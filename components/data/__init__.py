"""Dataset builders (Medical Meadow, MedQuAD), readers (USMLE), prompt templates, mixing and
decontamination. Builders are flat functions a YAML ``_component_`` can name.

Bad input, one rule throughout: malformed files and records raise :class:`DataError` naming the
file and the record. Known gaps of the sources themselves are not errors and are never dropped
silently: MedQuAD pairs whose answer was removed upstream are skipped and counted; USMLE items
without options (or whose key is not among them) are kept and listed in the report.
"""

from components.data.decontaminate import Decontaminator, decontaminate_records
from components.data.errors import DataError
from components.data.instruct import InstructDataset
from components.data.medical_meadow import (
    MEDICAL_MEADOW_SETS,
    STUDY_MIX_ROWS,
    medical_meadow_cord19,
    medical_meadow_dataset,
    medical_meadow_health_advice,
    medical_meadow_medical_flashcards,
    medical_meadow_mediqa,
    medical_meadow_medqa,
    medical_meadow_mmmlu,
    medical_meadow_wikidoc,
    medical_meadow_wikidoc_patient_information,
)
from components.data.medquad import load_medquad, medquad_dataset, read_medquad_xml
from components.data.mixture import load_mixture, medical_meadow_mixture
from components.data.templates import InstructToMessages, PlainTextTokenizer
from components.data.usmle import read_usmle

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
