"""KnowTuning (Lyu et al., EMNLP 2024) on torchtune, offline by default.

Stage 1, fine-grained knowledge augmentation (KA): :func:`build_ka_records` splits answers into
facts (:func:`split_facts`), scores them by perplexity under the model
(:func:`fact_perplexities`) and adds the hardest as extra SFT records; train with the LoRA SFT
recipe. Stage 2, coarse-grained knowledge comparison (KC): :func:`build_kc_pairs` makes a
completeness, a factuality and a logicality negative per answer by rule
(:mod:`components.knowtuning.disturb`), written in torchtune's preference format and read by
:func:`knowtuning_kc_dataset`; train with ``recipes/knowtuning_dpo_single_device.py`` and
:class:`DPOSFTLoss` (DPO + gamma x SFT), the stage-1 model as the reference.

``medtune knowtuning build-ka | build-kc | margin`` run these from the command line.
"""

import importlib
from typing import Any

# Exported names -> the module defining them. Loaded on first use (PEP 562), so that the
# `medtune` command, which registers `medtune knowtuning`, does not import torchtune at start.
_EXPORTS = {
    "KCMessages": "datasets",
    "knowtuning_kc_dataset": "datasets",
    "FALSIFIERS": "disturb",
    "delete_facts": "disturb",
    "falsify_facts": "disturb",
    "reorder_facts": "disturb",
    "join_facts": "facts",
    "split_facts": "facts",
    "FACT_INSTRUCTION": "ka",
    "build_ka_records": "ka",
    "NEGATIVE_TYPES": "kc",
    "build_kc_pairs": "kc",
    "length_stats": "kc",
    "question_focus": "kc",
    "DPOSFTLoss": "loss",
    "fact_perplexities": "scoring",
    "margin_report": "scoring",
    "preference_log_probs": "scoring",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"components.knowtuning.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'components.knowtuning' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = [
    "DPOSFTLoss",
    "FACT_INSTRUCTION",
    "FALSIFIERS",
    "KCMessages",
    "NEGATIVE_TYPES",
    "build_ka_records",
    "build_kc_pairs",
    "delete_facts",
    "fact_perplexities",
    "falsify_facts",
    "join_facts",
    "knowtuning_kc_dataset",
    "length_stats",
    "margin_report",
    "preference_log_probs",
    "question_focus",
    "reorder_facts",
    "split_facts",
]
