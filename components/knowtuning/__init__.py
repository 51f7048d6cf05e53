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

from components.knowtuning.datasets import KCMessages, knowtuning_kc_dataset
from components.knowtuning.disturb import FALSIFIERS, delete_facts, falsify_facts, reorder_facts
from components.knowtuning.facts import join_facts, split_facts
from components.knowtuning.ka import FACT_INSTRUCTION, build_ka_records
from components.knowtuning.kc import NEGATIVE_TYPES, build_kc_pairs, length_stats, question_focus
from components.knowtuning.loss import DPOSFTLoss
from components.knowtuning.scoring import fact_perplexities, margin_report, preference_log_probs

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
