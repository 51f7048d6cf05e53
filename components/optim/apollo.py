"""APOLLO optimizer builders for torchtune configs, on top of apollo-torch 1.0.3 (MLSys 2025), the
``[apollo]`` extra.

APOLLO (Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance") keeps AdamW's moments of
a gradient projected by a *random* matrix (no SVD) onto ``rank`` dimensions, and uses them only to
estimate how AdamW would rescale each channel (``scale_type: channel``) or the whole tensor
(``tensor``); the full-rank gradient is then scaled by that factor and applied. APOLLO-Mini is
the setting ``rank: 1, scale_type: tensor`` (with ``scale: 128``, the authors' value). A config
names the builder as GaLore's are named, and the GaLore recipe runs it unchanged:

    optimizer:
      _component_: components.optim.apollo_adamw
      lr: 2e-5
      rank: 128
      scale: 24             # sqrt(scale) multiplies the update; see the 3B config for the choice
      scale_type: channel   # APOLLO; tensor (with rank 1) is APOLLO-Mini
      update_proj_gap: 200  # a new random projection every this many steps
      proj: random          # or svd: GaLore's projection of the gradient
      proj_type: std
      layerwise: False      # True: step each parameter inside backward (see layerwise.py)

The update is apollo-torch's own ``APOLLOAdamW.step``: target weights in one group with the
APOLLO settings, every other parameter (embeddings, norms) in a plain group of the same optimizer,
stepped as AdamW, which is the layout apollo-torch's README uses. What medtune adds: the split by
module name (shared with GaLore), the layer-wise mode, optimizer state that loads with
``torch.load(weights_only=True)`` (apollo-torch keeps a projector object in each parameter's
state; here ``state_dict()`` writes it as plain data), and each parameter's projection seed taken
from its name instead of its position in the optimizer. apollo-torch numbers parameters 1, 2, ...
in the order the optimizer holds them, so one optimizer per parameter (layer-wise) would give every
weight the seed 1; by name, both modes draw the same projections and take the same steps.

Under FSDP2 (recipes/galore_finetune_distributed.py) each weight's projector is
:class:`ShardedGradientProjector`: the projection depends on the weight's shape and seed only, so
every rank draws the same matrix without communication; a right-side projection (``m >= n``,
``std``) runs on each rank's rows, a left-side one sums its rank x n product over the ranks.
apollo-torch's own step then runs on DTensors: the channel scaling factors of a right-side
projection are row-local, and the tensor-wise factor and the norm-growth limiter's norms are
DTensor reductions over the shards. ``proj: svd`` (GaLore's projection inside APOLLO) is refused
there. (apollo-torch computes the channel axis from the weight's shape, not the projection side,
so ``proj_type`` other than ``std`` fails inside apollo-torch's step on weights taller than wide,
on one device too.)
"""

from typing import Any, Dict, Sequence

import torch
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

try:
    import apollo_torch.apollo
    from apollo_torch.random_projector import GradientProjector
    from apollo_torch.svd_projector import GaLoreProjector as SVDProjector
except ModuleNotFoundError as error:  # an extra: apollo-torch's licence is CC-BY-NC 4.0
    raise ModuleNotFoundError(
        "APOLLO needs apollo-torch, which is not in the default install because its licence is "
        "CC-BY-NC 4.0 (non-commercial use only): pip install -e '.[apollo]'",
        name="apollo_torch",
    ) from error

from components.optim.galore import (
    GALORE_TARGETS,
    NamedParams,
    _as_named,
    _build,
    _check_unsharded,
    parameter_seed,
)
from components.optim.sharded_projection import ShardedProjection

# The same modules as GaLore's (torchtune's names for q/k/v/o and the three MLP projections).
APOLLO_TARGETS = GALORE_TARGETS
SCALE_TYPES = ("channel", "tensor")
PROJECTIONS = ("random", "svd")
# apollo-torch's random projector has no two-sided ("full") projection
PROJ_TYPES = ("std", "reverse_std", "left", "right")
_SEED_MASK = (1 << 63) - 1


def projection_seed(name: str) -> int:
    """The random projection's first seed for the parameter called ``name``: a stable function
    of the name (the same in every process, run and mode), below 2**63 as torch's generators take."""
    return parameter_seed(f"apollo:{name}") & _SEED_MASK


class ShardedGradientProjector(ShardedProjection, GradientProjector):
    """apollo-torch's random projector over FSDP2 row shards: the projection matrix is drawn from
    its seed alone, the same on every rank, so an update needs no gathering; the projection
    itself is components.optim.sharded_projection's (right side on each rank's rows, left side
    summed by one all-reduce)."""

    def project(self, full_rank_grad, iter):  # noqa: A002 - apollo-torch's names
        if isinstance(full_rank_grad, DTensor) and self.due(iter):
            self.update_ortho_matrix(full_rank_grad, self.side(full_rank_grad.shape))
            self.fresh = True
        return super().project(full_rank_grad, iter)


def projector_to_dict(projector: Any) -> Dict[str, Any]:
    """An apollo-torch projector (random or SVD) as plain values and its current matrix."""
    data = {
        "proj": "random" if isinstance(projector, GradientProjector) else "svd",
        "rank": projector.rank,
        "update_proj_gap": projector.update_proj_gap,
        "scale": projector.scale,
        "proj_type": projector.proj_type,
        "ortho_matrix": projector.ortho_matrix,  # a tensor, or None before the first step
        "svd_count": projector.svd_count,
    }
    if data["proj"] == "random":
        data["seed"] = projector.seed  # the seed of the *next* projection
    return data


def projector_from_dict(data: Dict[str, Any], device: torch.device, sharded: bool = False) -> Any:
    """The inverse of :func:`projector_to_dict`, with the matrix moved to ``device``; ``sharded``:
    the projector of an FSDP2-sharded weight."""
    settings = dict(update_proj_gap=data["update_proj_gap"], scale=data["scale"], proj_type=data["proj_type"])
    if data["proj"] == "random":
        cls = ShardedGradientProjector if sharded else GradientProjector
        projector = cls(data["rank"], seed=data["seed"], **settings)
    elif data["proj"] == "svd":
        projector = SVDProjector(data["rank"], **settings)
    else:
        raise ValueError(f"saved APOLLO projector has proj={data['proj']!r}; expected one of {PROJECTIONS}")
    matrix = data["ortho_matrix"]
    projector.ortho_matrix = matrix.to(device) if isinstance(matrix, torch.Tensor) else matrix
    projector.svd_count = data["svd_count"]
    return projector


class APOLLOAdamW(apollo_torch.apollo.AdamW):
    """apollo-torch's ``APOLLOAdamW`` with projection seeds by parameter name (where groups carry
    ``param_names``) and projector state that saves and loads as plain data."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            for param, name in zip(group["params"], group.get("param_names") or []):
                if param.requires_grad:
                    self.state[param]["seed"] = projection_seed(name)

    def step(self, closure=None):
        """apollo-torch's step; under FSDP2 each weight first gets the sharded random projector."""
        for group in self.param_groups:
            if "rank" not in group:
                continue
            for param in group["params"]:
                state = self.state[param]
                if isinstance(param, DTensor) and param.grad is not None and "projector" not in state:
                    state["projector"] = ShardedGradientProjector(
                        group["rank"], update_proj_gap=group["update_proj_gap"], scale=group["scale"],
                        proj_type=group["proj_type"], seed=state["seed"],
                    )
        return super().step(closure)

    def state_dict(self) -> Dict[str, Any]:
        state_dict = super().state_dict()
        state = {
            # new dicts: torch's state_dict shares the live per-parameter ones
            key: {**entry, "projector": projector_to_dict(entry["projector"])} if "projector" in entry else entry
            for key, entry in state_dict["state"].items()
        }
        return {**state_dict, "state": state}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        # Projectors go around torch's loader: it rebuilds every iterable it meets with
        # type(value)(...), which would turn the string proj_type into a generator's text.
        projectors = {key: entry["projector"] for key, entry in state_dict["state"].items() if "projector" in entry}
        state = {
            key: {k: v for k, v in entry.items() if k != "projector"} for key, entry in state_dict["state"].items()
        }
        super().load_state_dict({**state_dict, "state": state})
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        by_id = dict(zip(saved_ids, (p for group in self.param_groups for p in group["params"])))
        for key, data in projectors.items():
            param = by_id[key]
            self.state[param]["projector"] = projector_from_dict(data, param.device, isinstance(param, DTensor))


def _apollo_group(
    rank: int, update_proj_gap: int, scale: float, scale_type: str, proj: str, proj_type: str
) -> Dict[str, Any]:
    """The APOLLO group settings apollo-torch reads, checked; a bad value names the key."""
    for key, value in (("rank", rank), ("update_proj_gap", update_proj_gap)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"APOLLO {key} must be an integer >= 1, got {value!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
        raise ValueError(f"APOLLO scale must be > 0 (sqrt(scale) multiplies the update), got {scale!r}")
    for key, value, allowed in (
        ("scale_type", scale_type, SCALE_TYPES), ("proj", proj, PROJECTIONS), ("proj_type", proj_type, PROJ_TYPES)
    ):
        if value not in allowed:
            raise ValueError(f"APOLLO {key} must be one of {allowed}, got {value!r}")
    return {
        "rank": int(rank),
        "update_proj_gap": int(update_proj_gap),
        "scale": float(scale),
        "scale_type": str(scale_type),
        "proj": str(proj),
        "proj_type": str(proj_type),
    }


def apollo_adamw(
    params: NamedParams,
    lr: float = 1e-3,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    correct_bias: bool = True,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    scale_type: str = "channel",
    proj: str = "random",
    proj_type: str = "std",
    scale_front: bool = False,
    norm_growth_limiter: bool = True,
    target_modules: Sequence[str] = APOLLO_TARGETS,
    layerwise: bool = False,
) -> Optimizer:
    """APOLLO AdamW (apollo-torch's) over ``model.named_parameters()``; defaults are apollo-torch's
    and the Hugging Face Trainer's ``apollo_adamw``.

    Args:
        params: ``(name, parameter)`` pairs, as ``model.named_parameters()`` yields them.
        lr, betas, eps, weight_decay, correct_bias: AdamW's, for every parameter.
        rank: dimensions of the auxiliary (projected) space whose AdamW moments give the scaling.
        update_proj_gap: draw a new projection every this many steps.
        scale: the update is multiplied by ``sqrt(scale)``, to make up for the scaling factor a
            low rank underestimates (the authors: 1 for APOLLO at rank ~dim/4, 128 for APOLLO-Mini).
        scale_type: ``channel`` (one factor per row or column: APOLLO) or ``tensor`` (one per
            weight: APOLLO-Mini, with ``rank: 1``).
        proj: ``random`` (APOLLO's Gaussian projection, no SVD) or ``svd`` (GaLore's).
        proj_type: projection side: ``std`` (project the longer side away), ``reverse_std``,
            ``left`` or ``right``.
        scale_front: apply ``sqrt(scale)`` before the norm-growth limiter instead of after.
        norm_growth_limiter: Fira's limiter (each weight's scaled gradient norm may grow at most
            1.01x per step), apollo-torch's default in place of clipping.
        target_modules: module names whose 2-D ``weight`` gets APOLLO; every other parameter is
            stepped by plain AdamW in the same optimizer.
        layerwise: one optimizer per parameter, stepped in the parameter's post-accumulate-grad
            hook during backward (see :class:`components.optim.LayerwiseOptimizer`).
    """
    named = _as_named(params)
    if proj == "svd":
        _check_unsharded(named, "components.optim.apollo_adamw with proj: svd", "use proj: random")
    settings = _apollo_group(rank, update_proj_gap, scale, scale_type, proj, proj_type)
    kwargs = dict(
        lr=float(lr), betas=tuple(float(b) for b in betas), eps=float(eps), weight_decay=float(weight_decay),
        correct_bias=bool(correct_bias), scale_front=bool(scale_front), disable_nl=not norm_growth_limiter,
    )
    return _build(APOLLOAdamW, named, settings, target_modules, layerwise, kwargs, method="APOLLO")
