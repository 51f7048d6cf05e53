"""Layer-wise (in-backward) optimizer stepping: the memory result of the GaLore paper.

With one optimizer per parameter, each parameter can be stepped in its post-accumulate-grad hook
the moment backward has produced its gradient, and its gradient freed right after. The model's
full gradient then never exists at once: peak memory holds the weights, the optimizer state and
about one parameter's gradient, instead of weights + state + a whole gradient.

Two things cannot work that way, and the recipe refuses them up front rather than doing
something else silently: gradient accumulation (every backward steps) and gradient-norm clipping
(the norm of the whole gradient is never known before parameters are already stepped).
"""

from typing import Any, Dict, Mapping

import torch
from torch.optim import Optimizer


class LayerwiseOptimizer(Optimizer):
    """Per-parameter optimizers stepped during backward, presented as one ``Optimizer``.

    Args:
        optimizers: ``{parameter name: optimizer over exactly that parameter}``, e.g. as
            :func:`components.optim.galore_adamw` builds them with ``layerwise=True``.

    ``param_groups`` is the list of the per-parameter optimizers' own group dicts (the same
    objects), so an LR scheduler built on this optimizer sets every parameter's learning rate.
    ``step()`` does nothing (the parameters were stepped in backward) and is there so a training
    loop and a scheduler can treat this like any optimizer. ``state_dict()`` is keyed by
    parameter name: ``{name: that optimizer's state_dict()}``.
    """

    steps_in_backward = True

    def __init__(self, optimizers: Mapping[str, Optimizer]) -> None:
        self._optimizers: Dict[str, Optimizer] = dict(optimizers)
        if not self._optimizers:
            raise ValueError("LayerwiseOptimizer needs at least one parameter")
        params = []
        for name, optimizer in self._optimizers.items():
            owned = [p for group in optimizer.param_groups for p in group["params"]]
            if len(owned) != 1:
                raise ValueError(f"{name}: a layer-wise optimizer must own exactly one parameter")
            params.append(owned[0])
        super().__init__(params, defaults={})
        self.param_groups = [g for o in self._optimizers.values() for g in o.param_groups]
        self._handles = [
            param.register_post_accumulate_grad_hook(_stepper(optimizer))
            for param, optimizer in zip(params, self._optimizers.values())
        ]

    @property
    def optimizers(self) -> Dict[str, Optimizer]:
        return self._optimizers

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - see class docstring
        """No-op: every parameter was already stepped in backward."""
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self._optimizers.values():
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> Dict[str, Any]:
        return {name: optimizer.state_dict() for name, optimizer in self._optimizers.items()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        missing = sorted(set(self._optimizers) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(self._optimizers))
        if missing or unexpected:
            raise ValueError(
                "the saved optimizer state does not match this layer-wise optimizer (was it saved "
                f"by a run with layerwise=False, or another model?): missing {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                f"{' ...' if len(unexpected) > 5 else ''}"
            )
        for name, optimizer in self._optimizers.items():
            optimizer.load_state_dict(state_dict[name])
        # load_state_dict replaced each optimizer's group dicts: share the new ones
        self.param_groups = [g for o in self._optimizers.values() for g in o.param_groups]

    def remove_hooks(self) -> None:
        """Detach from the model: later backward passes no longer step anything."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _stepper(optimizer: Optimizer):
    def step_and_free(param: torch.Tensor) -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step_and_free
