"""Optimizer builders: GaLore (galore-torch) and APOLLO (apollo-torch) over named parameters, and
layer-wise stepping."""

from components.optim.apollo import APOLLOAdamW, apollo_adamw
from components.optim.galore import (
    GALORE_TARGETS,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    galore_adafactor,
    galore_adamw,
    galore_adamw8bit,
    projector_from_dict,
    projector_to_dict,
    split_galore_params,
)
from components.optim.layerwise import LayerwiseOptimizer

__all__ = [
    "APOLLOAdamW",
    "GALORE_TARGETS",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "LayerwiseOptimizer",
    "apollo_adamw",
    "galore_adafactor",
    "galore_adamw",
    "galore_adamw8bit",
    "projector_from_dict",
    "projector_to_dict",
    "split_galore_params",
]
