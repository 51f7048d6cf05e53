"""Optimizer builders: GaLore (galore-torch) over named parameters, and layer-wise stepping."""

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
    "GALORE_TARGETS",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "LayerwiseOptimizer",
    "galore_adafactor",
    "galore_adamw",
    "galore_adamw8bit",
    "projector_from_dict",
    "projector_to_dict",
    "split_galore_params",
]
