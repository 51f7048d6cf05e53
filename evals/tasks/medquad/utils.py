"""lm-eval hooks for the MedQuAD task; the logic lives in components.evaluation (pip install -e .)."""

from components.evaluation.medquad import (  # noqa: F401
    bertscore_f1,
    bertscore_precision,
    bertscore_recall,
    doc_to_target,
    doc_to_text,
    load_medquad,
    process_results,
)
