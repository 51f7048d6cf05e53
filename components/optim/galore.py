"""GaLore optimizer builders for torchtune configs, on top of galore-torch 1.0.

A config names one of these as its ``optimizer._component_``; the GaLore recipe
(``recipes/galore_finetune_single_device.py``) calls it with ``model.named_parameters()``:

    optimizer:
      _component_: components.optim.galore_adamw
      lr: 2e-5
      weight_decay: 0.01
      rank: 128              # the study's GaLore settings
      update_proj_gap: 200
      scale: 0.25
      proj_type: std
      layerwise: False       # True: step each parameter inside backward (see layerwise.py)

The weights of the named target modules (by default the study's q/k/v/o and the three MLP
projections: torchtune's ``q_proj k_proj v_proj output_proj w1 w2 w3``) get GaLore's low-rank
projected update; every other parameter (embeddings, norms) is in the same optimizer as a plain
group, which galore-torch steps as ordinary AdamW (or Adafactor). This is galore-torch's own
two-group layout, so the update is the reference implementation's, step for step.

What medtune adds to galore-torch: the parameter split by module name (with an error naming the
model's modules when a target matches nothing), the layer-wise mode, and optimizer state that
saves and loads with ``torch.load(weights_only=True)``: galore-torch keeps a ``GaLoreProjector``
Python object in each parameter's state, which torchtune's recipe-state loading refuses. Here
``state_dict()`` writes each projector as a plain dict (its settings and its projection matrix)
and ``load_state_dict()`` rebuilds it.
"""

import logging
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.optim import Optimizer

import galore_torch
from galore_torch.galore_projector import GaLoreProjector

from components.optim.layerwise import LayerwiseOptimizer

log = logging.getLogger(__name__)

# torchtune's names for the modules the study put under GaLore ("q_proj", "k_proj", "v_proj",
# "o_proj", "gate_proj", "up_proj", "down_proj" in Hugging Face naming).
GALORE_TARGETS: Tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3")
PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")

NamedParams = Iterable[Tuple[str, nn.Parameter]]


# --------------------------------------------------------------------------------------------
# Projector state as plain data (torch.load(weights_only=True) accepts dicts, lists, numbers,
# strings and tensors, not arbitrary Python objects).
# --------------------------------------------------------------------------------------------


def projector_to_dict(projector: GaLoreProjector) -> Dict[str, Any]:
    """A ``GaLoreProjector`` as a dict of plain values and its projection matrix (or matrices)."""
    return {
        "rank": projector.rank,
        "update_proj_gap": projector.update_proj_gap,
        "scale": projector.scale,
        "proj_type": projector.proj_type,
        "verbose": projector.verbose,
        "ortho_matrix": projector.ortho_matrix,  # a tensor, [left, right] for "full", or None
    }


def projector_from_dict(data: Dict[str, Any], device: Optional[torch.device] = None) -> GaLoreProjector:
    """The inverse of :func:`projector_to_dict`; the matrix keeps its saved dtype."""
    projector = GaLoreProjector(
        data["rank"],
        verbose=data.get("verbose", False),
        update_proj_gap=data["update_proj_gap"],
        scale=data["scale"],
        proj_type=data["proj_type"],
    )
    matrix = data["ortho_matrix"]
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.to(device) if device is not None else matrix
    elif isinstance(matrix, (list, tuple)):
        matrix = [m.to(device) if device is not None else m for m in matrix]
    projector.ortho_matrix = matrix
    return projector


class _SerializableProjectors:
    """Mixin for galore-torch optimizers: projectors in ``state_dict()`` as plain data.

    The projectors are taken out before ``torch.optim.Optimizer.load_state_dict`` sees them: it
    deep-copies state by rebuilding every iterable with ``type(value)(...)``, which would turn a
    string such as ``proj_type`` into the text of a generator.
    """

    def state_dict(self) -> Dict[str, Any]:
        state_dict = super().state_dict()
        state = {}
        for key, param_state in state_dict["state"].items():
            if isinstance(param_state.get("projector"), GaLoreProjector):
                # a new dict: torch's state_dict shares the live per-parameter dicts
                param_state = dict(param_state)
                param_state["projector"] = projector_to_dict(param_state["projector"])
            state[key] = param_state
        return {**state_dict, "state": state}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        projectors, state = {}, {}
        for key, param_state in state_dict["state"].items():
            if "projector" in param_state:
                param_state = dict(param_state)
                projectors[key] = param_state.pop("projector")
            state[key] = param_state
        super().load_state_dict({**state_dict, "state": state})
        # torch numbers the saved parameters in group order; map those ids to our parameters
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        by_id = dict(zip(saved_ids, params))
        for key, data in projectors.items():
            param = by_id[key]
            projector = data if isinstance(data, GaLoreProjector) else projector_from_dict(data, param.device)
            self.state[param]["projector"] = projector


class GaLoreAdamW(_SerializableProjectors, galore_torch.GaLoreAdamW):
    """galore-torch's ``GaLoreAdamW``, with weights_only-loadable state and no deprecation warning."""

    def __init__(self, params, **kwargs):
        kwargs.setdefault("no_deprecation_warning", True)
        super().__init__(params, **kwargs)


class GaLoreAdafactor(_SerializableProjectors, galore_torch.GaLoreAdafactor):
    """galore-torch's ``GaLoreAdafactor``, with weights_only-loadable state."""


class GaLoreAdamW8bit(_SerializableProjectors, galore_torch.GaLoreAdamW8bit):
    """galore-torch's ``GaLoreAdamW8bit`` (bitsandbytes, CUDA only), with weights_only-loadable state."""


# --------------------------------------------------------------------------------------------
# Splitting the model's parameters
# --------------------------------------------------------------------------------------------


def split_galore_params(
    named_params: NamedParams, target_modules: Sequence[str] = GALORE_TARGETS
) -> Tuple[List[Tuple[str, nn.Parameter]], List[Tuple[str, nn.Parameter]]]:
    """(GaLore parameters, other parameters), each as (name, parameter), in model order.

    A parameter is a GaLore parameter when it is the 2-D ``weight`` of a module whose own name
    (the last dotted component, e.g. ``q_proj`` in ``layers.0.attn.q_proj.weight``) is in
    ``target_modules``. Frozen parameters are left out.
    """
    named = _as_named(named_params)
    targets = [str(t) for t in ([target_modules] if isinstance(target_modules, str) else target_modules)]
    if not targets:
        raise ValueError("target_modules is empty: name at least one module for GaLore")
    galore, other, matched = [], [], set()
    for name, param in named:
        if not param.requires_grad:
            continue
        module, _, leaf = name.rpartition(".")
        module_name = module.rpartition(".")[2]
        if module_name in targets and leaf == "weight":
            if param.dim() != 2:
                raise ValueError(f"GaLore needs 2-D weights; {name} has shape {tuple(param.shape)}")
            galore.append((name, param))
            matched.add(module_name)
        else:
            other.append((name, param))
    missing = [t for t in targets if t not in matched]
    if missing:
        seen = sorted({n.rpartition(".")[0].rpartition(".")[2] for n, p in named if p.dim() == 2})
        raise ValueError(
            f"GaLore target_modules {missing} match no 2-D weight of this model. "
            f"Module names with 2-D weights here: {seen}"
        )
    return galore, other


def _as_named(named_params: NamedParams) -> List[Tuple[str, nn.Parameter]]:
    named = list(named_params)
    if not named:
        raise ValueError("the optimizer was given no parameters")
    if not all(isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) for item in named):
        raise TypeError(
            "GaLore builders need model.named_parameters() (names pick the target modules), but "
            "got bare parameters. torchtune's own recipes hand the optimizer model.parameters(): "
            "run recipes/galore_finetune_single_device.py instead."
        )
    return named


def _galore_group(rank: int, update_proj_gap: int, scale: float, proj_type: str) -> Dict[str, Any]:
    if int(rank) < 1:
        raise ValueError(f"GaLore rank must be at least 1, got {rank}")
    if int(update_proj_gap) < 1:
        raise ValueError(f"update_proj_gap must be at least 1, got {update_proj_gap}")
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")
    return {
        "rank": int(rank),
        "update_proj_gap": int(update_proj_gap),
        "scale": float(scale),
        "proj_type": str(proj_type),
    }


def _build(
    optimizer_cls,
    named_params: NamedParams,
    galore_settings: Dict[str, Any],
    target_modules: Sequence[str],
    layerwise: bool,
    kwargs: Dict[str, Any],
) -> Optimizer:
    named = _as_named(named_params)
    galore, other = split_galore_params(named, target_modules)
    small = [f"{n} {tuple(p.shape)}" for n, p in galore if min(p.shape) <= galore_settings["rank"]]
    if small:
        log.warning(
            "GaLore rank %d is not below the smaller side of %d weight(s) (e.g. %s): their "
            "projected state is as large as the full one",
            galore_settings["rank"], len(small), small[0],
        )
    if not layerwise:
        groups = []
        if other:
            groups.append({"params": [p for _, p in other], "param_names": [n for n, _ in other]})
        groups.append(
            {"params": [p for _, p in galore], "param_names": [n for n, _ in galore], **galore_settings}
        )
        return optimizer_cls(groups, **kwargs)
    galore_names = {n for n, _ in galore}
    per_param = {}
    for name, param in named:  # model order
        if not param.requires_grad:
            continue
        group = {"params": [param], "param_names": [name]}
        if name in galore_names:
            group.update(galore_settings)
        per_param[name] = optimizer_cls([group], **kwargs)
    return LayerwiseOptimizer(per_param)


def _check_cuda(named_params: List[Tuple[str, nn.Parameter]], what: str) -> None:
    devices = sorted({p.device.type for _, p in named_params})
    if devices != ["cuda"] or not torch.cuda.is_available():
        raise RuntimeError(
            f"{what} runs on CUDA only (bitsandbytes' 8-bit optimizer kernels need a GPU), but "
            f"the parameters are on {', '.join(devices)}. On this device use "
            "components.optim.galore_adamw or components.optim.galore_adafactor."
        )


# --------------------------------------------------------------------------------------------
# Builders (flat arguments, for YAML)
# --------------------------------------------------------------------------------------------


def galore_adamw(
    params: NamedParams,
    lr: float = 1e-3,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    correct_bias: bool = True,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    target_modules: Sequence[str] = GALORE_TARGETS,
    layerwise: bool = False,
) -> Optimizer:
    """GaLore AdamW (galore-torch's) over ``model.named_parameters()``.

    Args:
        params: ``(name, parameter)`` pairs, as ``model.named_parameters()`` yields them.
        lr, betas, eps, weight_decay, correct_bias: AdamW's, for every parameter. The defaults
            for ``eps`` (1e-8) and ``rank``/``update_proj_gap``/``scale``/``proj_type`` are what
            the study ran through the Hugging Face Trainer.
        rank: rank of the gradient projection.
        update_proj_gap: recompute each projection (an SVD of the gradient) every this many steps.
        scale: factor on the projected-back update (GaLore's alpha).
        proj_type: galore-torch's projection side: ``std`` (project the longer side away),
            ``reverse_std``, ``left``, ``right`` or ``full``.
        target_modules: module names whose 2-D ``weight`` gets GaLore; every other parameter is
            stepped by plain AdamW in the same optimizer.
        layerwise: one optimizer per parameter, stepped in the parameter's post-accumulate-grad
            hook during backward (see :class:`components.optim.LayerwiseOptimizer`).
    """
    settings = _galore_group(rank, update_proj_gap, scale, proj_type)
    kwargs = dict(
        lr=float(lr), betas=tuple(float(b) for b in betas), eps=float(eps),
        weight_decay=float(weight_decay), correct_bias=bool(correct_bias),
    )
    return _build(GaLoreAdamW, params, settings, target_modules, layerwise, kwargs)


def galore_adafactor(
    params: NamedParams,
    lr: float = 1e-3,
    eps: Sequence[float] = (1e-30, 1e-3),
    clip_threshold: float = 1.0,
    decay_rate: float = -0.8,
    beta1: Optional[float] = None,
    weight_decay: float = 0.0,
    scale_parameter: bool = False,
    relative_step: bool = False,
    warmup_init: bool = False,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    target_modules: Sequence[str] = GALORE_TARGETS,
    layerwise: bool = False,
) -> Optimizer:
    """GaLore Adafactor (galore-torch's) over ``model.named_parameters()``.

    ``scale_parameter`` and ``relative_step`` default to False, with an explicit ``lr``, as the
    Hugging Face Trainer sets them for ``galore_adafactor``. Other arguments as
    :func:`galore_adamw`.
    """
    settings = _galore_group(rank, update_proj_gap, scale, proj_type)
    kwargs = dict(
        lr=float(lr), eps=tuple(float(e) for e in eps), clip_threshold=float(clip_threshold),
        decay_rate=float(decay_rate), beta1=None if beta1 is None else float(beta1),
        weight_decay=float(weight_decay), scale_parameter=bool(scale_parameter),
        relative_step=bool(relative_step), warmup_init=bool(warmup_init),
    )
    return _build(GaLoreAdafactor, params, settings, target_modules, layerwise, kwargs)


def galore_adamw8bit(
    params: NamedParams,
    lr: float = 1e-3,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    target_modules: Sequence[str] = GALORE_TARGETS,
    layerwise: bool = False,
) -> Optimizer:
    """GaLore AdamW with 8-bit states (galore-torch's, on bitsandbytes): CUDA only.

    On any other device this raises at once with what to use instead, rather than failing
    inside bitsandbytes at the first step. Other arguments as :func:`galore_adamw`.
    """
    named = _as_named(params)
    _check_cuda(named, "components.optim.galore_adamw8bit")
    settings = _galore_group(rank, update_proj_gap, scale, proj_type)
    kwargs = dict(
        lr=float(lr), betas=tuple(float(b) for b in betas), eps=float(eps),
        weight_decay=float(weight_decay),
    )
    return _build(GaLoreAdamW8bit, named, settings, target_modules, layerwise, kwargs)
