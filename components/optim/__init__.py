"""Optimizer builders: GaLore (galore-torch) and APOLLO (apollo-torch, the ``[apollo]`` extra) over
named parameters, and layer-wise stepping."""

from typing import Any

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


def __getattr__(name: str) -> Any:
    """APOLLO's names import apollo-torch (an extra) only when a config or caller asks for them."""
    if name in ("APOLLOAdamW", "apollo_adamw"):
        from components.optim import apollo

        return getattr(apollo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The lazy APOLLO names too, so a misspelled ``_component_`` gets its closest-name hint."""
    return sorted(set(globals()) | set(__all__))
