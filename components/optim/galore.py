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
      svd: full              # or randomized: top-rank vectors by a seeded randomized range finder

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
and ``load_state_dict()`` rebuilds it. And ``svd="randomized"``: the projection update (every
``update_proj_gap`` steps) finds the top-``rank`` singular vectors of the gradient with a randomized
range finder (Halko, Martinsson & Tropp 2011) instead of galore-torch's full ``torch.linalg.svd``;
see :class:`RandomizedGaLoreProjector`. ``svd="full"`` (the default) is galore-torch's own step.
"""

import functools
import logging
import zlib
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

import galore_torch
from galore_torch.galore_projector import GaLoreProjector

from components.optim.layerwise import LayerwiseOptimizer
from components.optim.sharded_projection import ShardedProjection, refresh_projections
from components.user_errors import SettingsError

log = logging.getLogger(__name__)

# torchtune's names for the modules the study put under GaLore ("q_proj", "k_proj", "v_proj",
# "o_proj", "gate_proj", "up_proj", "down_proj" in Hugging Face naming).
GALORE_TARGETS: Tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3")
PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")
SVD_MODES = ("full", "randomized")
# Base of every randomized projection's seed (mixed with the parameter's name).
SVD_SEED = 0x6A10_5E5D
_MASK64 = (1 << 64) - 1

NamedParams = Iterable[Tuple[str, nn.Parameter]]


# --------------------------------------------------------------------------------------------
# Projector state as plain data (torch.load(weights_only=True) accepts dicts, lists, numbers,
# strings and tensors, not arbitrary Python objects).
# --------------------------------------------------------------------------------------------


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def parameter_seed(name: str) -> int:
    """The randomized projector's seed for the parameter called ``name`` (stable across runs,
    processes and the layer-wise / one-optimizer modes; Python's ``hash`` of a str is not)."""
    return _splitmix64(SVD_SEED ^ zlib.crc32(name.encode("utf-8")))


def randomized_svd(
    matrix: torch.Tensor, rank: int, oversample: int, power_iters: int, generator: torch.Generator
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top singular triplets of ``matrix`` (m x n) by a randomized range finder.

    ``U`` (m x k), ``s`` (k), ``Vh`` (k x n) with ``k = min(rank + oversample, m, n)``, so their
    first ``min(rank, m, n)`` columns / rows are what ``torch.linalg.svd(matrix)``'s are, up to
    sign and the sketch's error. Halko, Martinsson & Tropp (2011), algorithms 4.4 and 5.1: an
    orthonormal basis ``Q`` of ``matrix @ omega`` (``omega`` Gaussian, n x k, drawn from
    ``generator`` only), ``power_iters`` power iterations with a QR after each product, then an
    exact SVD of the small ``Q^T @ matrix`` (k x n).
    """
    m, n = matrix.shape
    k = min(int(rank) + int(oversample), m, n)
    omega = torch.randn(n, k, generator=generator, device=matrix.device, dtype=matrix.dtype)
    q = torch.linalg.qr(matrix @ omega).Q
    for _ in range(int(power_iters)):
        z = torch.linalg.qr(matrix.mT @ q).Q
        q = torch.linalg.qr(matrix @ z).Q
    u_small, s, vh = torch.linalg.svd(q.mT @ matrix, full_matrices=False)
    return q @ u_small, s, vh


class RandomizedGaLoreProjector(GaLoreProjector):
    """galore-torch's ``GaLoreProjector`` whose projection update is a randomized SVD.

    ``get_orthogonal_matrix`` returns what galore-torch's returns for the same ``type`` (``right``:
    the top-``rank`` rows of ``Vh``; ``left``: the top-``rank`` columns of ``U``; ``full``: both;
    none scaled by the singular values; computed in fp32 and cast back to the gradient's dtype
    when that is not fp32), but from :func:`randomized_svd` with ``rank + oversample`` sketch
    columns and ``power_iters`` power iterations.

    The sketch is drawn from its own ``torch.Generator`` on the gradient's device, seeded from
    ``seed`` alone (the parameter's, see :func:`parameter_seed`): the global RNG (dropout, data
    order) is never touched, a run resumed from a checkpoint computes the same projections as one
    that was never stopped, and every update of a parameter uses the same Gaussian test matrix.
    That last point is deliberate: the result is then a deterministic, continuous function of the
    gradient, as LAPACK's SVD is, so when the top subspace moves little between updates the new
    singular vectors keep the old ones' signs. galore-torch carries Adam's moments across an
    update in the old basis's coordinates; a fresh sketch per update would flip about half the
    vectors' signs each time, negating those directions' momentum (measured on a 512 x 256
    matrix drifting by small steps, top 16 of rank 32, 9 updates: 64 of 144 flips with a fresh
    sketch, 0 to 3 with ``torch.linalg.svd``, 0 with the fixed sketch).
    """

    def __init__(
        self,
        rank: int,
        verbose: bool = False,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        proj_type: str = "std",
        oversample: int = 8,
        power_iters: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__(rank, verbose=verbose, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type)
        self.oversample = int(oversample)
        self.power_iters = int(power_iters)
        self.seed = int(seed)

    def generator(self, device: torch.device) -> torch.Generator:
        """A fresh generator for one update's sketch: a function of ``seed`` only."""
        return torch.Generator(device=device).manual_seed(_splitmix64(self.seed) & ((1 << 63) - 1))

    def get_orthogonal_matrix(self, weights, rank, type):  # noqa: A002 - galore-torch's names
        if type not in ("right", "left", "full"):
            raise ValueError("type should be left, right or full")
        # as galore-torch: computed in fp32, returned in the gradient's dtype and device
        data = weights.data
        matrix = data.float()  # the tensor itself when already fp32
        U, _, Vh = randomized_svd(matrix, rank, self.oversample, self.power_iters, self.generator(matrix.device))
        A, B = U[:, :rank], Vh[:rank, :]
        if data.dtype != torch.float:
            A, B = A.to(data.device).type(data.dtype), B.to(data.device).type(data.dtype)
        return {"right": B, "left": A, "full": [A, B]}[type]


class ShardedGaLoreProjector(ShardedProjection, GaLoreProjector):
    """galore-torch's projector over FSDP2 row shards (see components.optim.sharded_projection)."""


class ShardedRandomizedGaLoreProjector(ShardedProjection, RandomizedGaLoreProjector):
    """:class:`RandomizedGaLoreProjector` over FSDP2 row shards: the same seeded sketch of the
    whole gradient, on the rank that owns its update."""


def projector_to_dict(projector: GaLoreProjector) -> Dict[str, Any]:
    """A ``GaLoreProjector`` as a dict of plain values and its projection matrix (or matrices)."""
    data = {
        "rank": projector.rank,
        "update_proj_gap": projector.update_proj_gap,
        "scale": projector.scale,
        "proj_type": projector.proj_type,
        "verbose": projector.verbose,
        "ortho_matrix": projector.ortho_matrix,  # a tensor, [left, right] for "full", or None
        "svd": "full",
    }
    if isinstance(projector, RandomizedGaLoreProjector):
        data.update(
            svd="randomized",
            svd_oversample=projector.oversample,
            svd_power_iters=projector.power_iters,
            svd_seed=projector.seed,
        )
    return data


def projector_from_dict(
    data: Dict[str, Any], device: Optional[torch.device] = None, sharded: bool = False
) -> GaLoreProjector:
    """The inverse of :func:`projector_to_dict`; the matrix keeps its saved dtype. A dict without
    ``svd`` (saved before medtune had the option) is galore-torch's full-SVD projector.
    ``sharded``: the projector of an FSDP2-sharded weight (the same dict either way)."""
    svd = data.get("svd", "full")
    settings = dict(
        verbose=data.get("verbose", False),
        update_proj_gap=data["update_proj_gap"],
        scale=data["scale"],
        proj_type=data["proj_type"],
    )
    if svd == "full":
        projector = (ShardedGaLoreProjector if sharded else GaLoreProjector)(data["rank"], **settings)
    elif svd == "randomized":
        projector = (ShardedRandomizedGaLoreProjector if sharded else RandomizedGaLoreProjector)(
            data["rank"], oversample=data["svd_oversample"], power_iters=data["svd_power_iters"],
            seed=data["svd_seed"], **settings,
        )
    else:
        raise ValueError(f"saved projector has svd={svd!r}; expected one of {SVD_MODES}")
    matrix = data["ortho_matrix"]
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.to(device) if device is not None else matrix
    elif isinstance(matrix, (list, tuple)):
        matrix = [m.to(device) if device is not None else m for m in matrix]
    projector.ortho_matrix = matrix
    return projector


class _SerializableProjectors:
    """Mixin for galore-torch optimizers: projectors in ``state_dict()`` as plain data, and the
    randomized projector for groups with ``svd="randomized"``.

    The projectors are taken out before ``torch.optim.Optimizer.load_state_dict`` sees them: it
    deep-copies state by rebuilding every iterable with ``type(value)(...)``, which would turn a
    string such as ``proj_type`` into the text of a generator.

    galore-torch's ``step()`` creates a ``GaLoreProjector`` for a parameter only when its state
    has none yet; ``step()`` here first puts a :class:`RandomizedGaLoreProjector` there for every
    parameter (with a gradient) of a ``svd="randomized"`` group, then runs galore-torch's step
    unchanged. A group without an ``svd`` key (built or saved before the option) is ``full``.

    Under FSDP2 (DTensor parameters) every GaLore parameter gets the sharded projector of its
    ``svd`` mode, and the projection updates due at this step are computed before galore-torch's
    step, shared among the ranks (:func:`refresh_projections`); ``last_refresh_seconds`` is what
    that took (0.0 at steps without an update).
    """

    last_refresh_seconds = 0.0
    owner_offset = 0  # layer-wise: the parameter's position, so the ranks share the SVDs

    def step(self, closure=None):
        self._add_projectors()
        self.last_refresh_seconds = refresh_projections(self._due_sharded_projections(), self.owner_offset)
        return super().step(closure)

    def _add_projectors(self) -> None:
        position = 0
        for group in self.param_groups:
            params = group["params"]
            randomized = "rank" in group and group.get("svd", "full") == "randomized"
            if "rank" in group:
                names = group.get("param_names") or [None] * len(params)
                for index, (param, name) in enumerate(zip(params, names)):
                    if param.grad is None or "projector" in self.state.get(param, {}):
                        continue
                    sharded = isinstance(param, DTensor)
                    if not randomized:
                        if sharded:  # else galore-torch makes its own in step()
                            self.state[param]["projector"] = ShardedGaLoreProjector(
                                group["rank"], update_proj_gap=group["update_proj_gap"],
                                scale=group["scale"], proj_type=group["proj_type"],
                            )
                        continue
                    cls = ShardedRandomizedGaLoreProjector if sharded else RandomizedGaLoreProjector
                    self.state[param]["projector"] = cls(
                        group["rank"],
                        update_proj_gap=group["update_proj_gap"],
                        scale=group["scale"],
                        proj_type=group["proj_type"],
                        oversample=group.get("svd_oversample", 8),
                        power_iters=group.get("svd_power_iters", 2),
                        # by name where the group has names (the same in both modes), else position
                        seed=parameter_seed(name if name is not None else f"#{position + index}"),
                    )
            position += len(params)

    def _due_sharded_projections(self) -> List[Tuple[ShardedProjection, DTensor]]:
        """(projector, gradient) of every sharded GaLore parameter whose projection updates in
        this step, in parameter order (the same on every rank)."""
        due = []
        for group in self.param_groups:
            for param in group["params"] if "rank" in group else ():
                projector = self.state.get(param, {}).get("projector")
                if isinstance(projector, ShardedProjection) and param.grad is not None:
                    if projector.due(self.state[param].get("step", 0)):
                        due.append((projector, param.grad))
        return due

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
        asked = [group.get("svd", "full") for group in self.param_groups]
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
            projector = (
                data
                if isinstance(data, GaLoreProjector)
                else projector_from_dict(data, param.device, sharded=isinstance(param, DTensor))
            )
            self.state[param]["projector"] = projector
        # torch takes the group settings from the saved state (as for lr, rank, ...)
        for group, wanted in zip(self.param_groups, asked):
            if "rank" not in group:
                continue
            if "svd" not in group:  # saved before the option: galore-torch's full SVD
                group.update(svd="full", svd_oversample=8, svd_power_iters=2)
            if group["svd"] != wanted:
                _warn_svd_mismatch(group["svd"], wanted)


@functools.lru_cache(maxsize=None)
def _warn_svd_mismatch(saved: str, wanted: str) -> None:  # once per process, not per parameter
    log.warning(
        "the loaded optimizer state was saved with svd=%r and continues with it (this "
        "optimizer was built with svd=%r; torch keeps a checkpoint's group settings)", saved, wanted,
    )


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
    named_params: NamedParams, target_modules: Sequence[str] = GALORE_TARGETS, method: str = "GaLore"
) -> Tuple[List[Tuple[str, nn.Parameter]], List[Tuple[str, nn.Parameter]]]:
    """(GaLore parameters, other parameters), each as (name, parameter), in model order.

    A parameter is a GaLore parameter when it is the 2-D ``weight`` of a module whose own name
    (the last dotted component, e.g. ``q_proj`` in ``layers.0.attn.q_proj.weight``) is in
    ``target_modules``. Frozen parameters are left out. ``method`` names the optimizer in errors
    (APOLLO splits the same way).
    """
    named = _as_named(named_params)
    targets = [str(t) for t in ([target_modules] if isinstance(target_modules, str) else target_modules)]
    if not targets:
        raise ValueError(f"target_modules is empty: name at least one module for {method}")
    galore, other, matched = [], [], set()
    for name, param in named:
        if not param.requires_grad:
            continue
        module, _, leaf = name.rpartition(".")
        module_name = module.rpartition(".")[2]
        if module_name in targets and leaf == "weight":
            if param.dim() != 2:
                raise ValueError(f"{method} needs 2-D weights; {name} has shape {tuple(param.shape)}")
            galore.append((name, param))
            matched.add(module_name)
        else:
            other.append((name, param))
    missing = [t for t in targets if t not in matched]
    if missing:
        seen = sorted({n.rpartition(".")[0].rpartition(".")[2] for n, p in named if p.dim() == 2})
        raise ValueError(
            f"{method} target_modules {missing} match no 2-D weight of this model. "
            f"Module names with 2-D weights here: {seen}"
        )
    return galore, other


def _as_named(named_params: NamedParams) -> List[Tuple[str, nn.Parameter]]:
    named = list(named_params)
    if not named:
        raise ValueError("the optimizer was given no parameters")
    if not all(isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) for item in named):
        raise TypeError(
            "GaLore and APOLLO builders need model.named_parameters() (names pick the target modules), but "
            "got bare parameters. torchtune's own recipes hand the optimizer model.parameters(): "
            "run recipes/galore_finetune_single_device.py instead."
        )
    return named


def _galore_group(
    rank: int,
    update_proj_gap: int,
    scale: float,
    proj_type: str,
    svd: str = "full",
    svd_oversample: int = 8,
    svd_power_iters: int = 2,
) -> Dict[str, Any]:
    if int(rank) < 1:
        raise ValueError(f"GaLore rank must be at least 1, got {rank}")
    if int(update_proj_gap) < 1:
        raise ValueError(f"update_proj_gap must be at least 1, got {update_proj_gap}")
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")
    if svd not in SVD_MODES:
        raise ValueError(f"svd must be 'full' or 'randomized', got {svd!r}")
    for name, value in (("svd_oversample", svd_oversample), ("svd_power_iters", svd_power_iters)):
        try:
            valid = not isinstance(value, bool) and int(value) == value and value >= 0
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return {
        "rank": int(rank),
        "update_proj_gap": int(update_proj_gap),
        "scale": float(scale),
        "proj_type": str(proj_type),
        "svd": str(svd),
        "svd_oversample": int(svd_oversample),
        "svd_power_iters": int(svd_power_iters),
    }


def _build(
    optimizer_cls,
    named_params: NamedParams,
    galore_settings: Dict[str, Any],
    target_modules: Sequence[str],
    layerwise: bool,
    kwargs: Dict[str, Any],
    method: str = "GaLore",
) -> Optimizer:
    named = _as_named(named_params)
    galore, other = split_galore_params(named, target_modules, method)
    small = [f"{n} {tuple(p.shape)}" for n, p in galore if min(p.shape) <= galore_settings["rank"]]
    if small:
        log.warning(
            "%s rank %d is not below the smaller side of %d weight(s) (e.g. %s): their "
            "projected state is as large as the full one",
            method, galore_settings["rank"], len(small), small[0],
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
        per_param[name].owner_offset = len(per_param) - 1
    return LayerwiseOptimizer(per_param)


def _check_cuda(named_params: List[Tuple[str, nn.Parameter]], what: str) -> None:
    devices = sorted({p.device.type for _, p in named_params})
    if devices != ["cuda"] or not torch.cuda.is_available():
        raise RuntimeError(
            f"{what} runs on CUDA only (bitsandbytes' 8-bit optimizer kernels need a GPU), but "
            f"the parameters are on {', '.join(devices)}. On this device use "
            "components.optim.galore_adamw or components.optim.galore_adafactor."
        )


def _check_unsharded(named_params: List[Tuple[str, nn.Parameter]], what: str, why: str) -> None:
    if any(isinstance(p, DTensor) for _, p in named_params):
        raise SettingsError(
            f"{what} does not run under FSDP2 ({why}); use components.optim.galore_adamw in "
            "recipes/galore_finetune_distributed.py, or this optimizer on one device"
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
    svd: str = "full",
    svd_oversample: int = 8,
    svd_power_iters: int = 2,
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
        svd: how a projection update finds the gradient's top-``rank`` singular vectors:
            ``full`` (galore-torch's ``torch.linalg.svd`` of the whole gradient, the study's) or
            ``randomized`` (:class:`RandomizedGaLoreProjector`: a seeded randomized range
            finder, a fraction of the FLOPs; the same subspace up to the sketch's error).
        svd_oversample: extra sketch columns beyond ``rank`` (``randomized`` only).
        svd_power_iters: power iterations of the range finder (``randomized`` only); more
            sharpen the subspace when the spectrum decays slowly.
    """
    settings = _galore_group(rank, update_proj_gap, scale, proj_type, svd, svd_oversample, svd_power_iters)
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
    svd: str = "full",
    svd_oversample: int = 8,
    svd_power_iters: int = 2,
) -> Optimizer:
    """GaLore Adafactor (galore-torch's) over ``model.named_parameters()``.

    ``scale_parameter`` and ``relative_step`` default to False, with an explicit ``lr``, as the
    Hugging Face Trainer sets them for ``galore_adafactor``. Other arguments as
    :func:`galore_adamw`.
    """
    named = _as_named(params)
    _check_unsharded(
        named, "components.optim.galore_adafactor",
        "its factored second moment averages gradients over rows that FSDP2 splits across ranks",
    )
    settings = _galore_group(rank, update_proj_gap, scale, proj_type, svd, svd_oversample, svd_power_iters)
    kwargs = dict(
        lr=float(lr), eps=tuple(float(e) for e in eps), clip_threshold=float(clip_threshold),
        decay_rate=float(decay_rate), beta1=None if beta1 is None else float(beta1),
        weight_decay=float(weight_decay), scale_parameter=bool(scale_parameter),
        relative_step=bool(relative_step), warmup_init=bool(warmup_init),
    )
    return _build(GaLoreAdafactor, named, settings, target_modules, layerwise, kwargs)


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
    svd: str = "full",
    svd_oversample: int = 8,
    svd_power_iters: int = 2,
) -> Optimizer:
    """GaLore AdamW with 8-bit states (galore-torch's, on bitsandbytes): CUDA only.

    On any other device this raises at once with what to use instead, rather than failing
    inside bitsandbytes at the first step. Other arguments as :func:`galore_adamw`.
    """
    named = _as_named(params)
    _check_unsharded(named, "components.optim.galore_adamw8bit", "bitsandbytes' 8-bit states take whole tensors")
    _check_cuda(named, "components.optim.galore_adamw8bit")
    settings = _galore_group(rank, update_proj_gap, scale, proj_type, svd, svd_oversample, svd_power_iters)
    kwargs = dict(
        lr=float(lr), betas=tuple(float(b) for b in betas), eps=float(eps),
        weight_decay=float(weight_decay),
    )
    return _build(GaLoreAdamW8bit, named, settings, target_modules, layerwise, kwargs)
