"""lm-eval hooks for the USMLE tasks; the logic lives in components.evaluation (pip install -e .)."""

from components.evaluation.stats import ci95_high, ci95_low  # noqa: F401
from components.evaluation.usmle import (  # noqa: F401
    doc_to_choice,
    doc_to_target,
    doc_to_text,
    load_usmle,
    process_results_gen,
    process_results_mc,
)
