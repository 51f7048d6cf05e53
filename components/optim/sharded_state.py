"""One rank's optimizer state under FSDP2, as plain data, and back.

GaLore's low-rank moments are not shaped like their weights (m x rank, or rank x n replicated),
so torch's full-state-dict gathering, which reshards every state tensor like its parameter,
cannot place them. The GaLore distributed recipe keeps each rank's state as it is instead:
every DTensor in ``optimizer.state_dict()`` becomes its local tensor (on the CPU) with its
placements and global shape, which ``torch.load(weights_only=True)`` accepts, and loading turns
them back into DTensors on the same mesh. A run resumes with the number of processes that saved
it.
"""

from typing import Any, Optional

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.optim import Optimizer

LOCAL_KEY = "dtensor_local"


def _placement_to_data(placement) -> list:
    if isinstance(placement, Shard):
        return ["shard", placement.dim]
    if isinstance(placement, Replicate):
        return ["replicate"]
    raise ValueError(f"cannot save optimizer state with placement {placement}")


def _placement_from_data(data: list):
    return Shard(int(data[1])) if data[0] == "shard" else Replicate()


def _encode(value: Any) -> Any:
    if isinstance(value, DTensor):
        return {
            LOCAL_KEY: value.to_local().detach().cpu().clone(),
            "placements": [_placement_to_data(p) for p in value.placements],
            "shape": list(value.shape),
            "stride": list(value.stride()),
        }
    if isinstance(value, dict):
        return {key: _encode(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_encode(item) for item in value)
    return value


def _decode(value: Any, mesh: DeviceMesh, device: torch.device) -> Any:
    if isinstance(value, dict) and LOCAL_KEY in value:
        return DTensor.from_local(
            value[LOCAL_KEY].to(device),
            mesh,
            [_placement_from_data(p) for p in value["placements"]],
            run_check=False,
            shape=torch.Size(value["shape"]),
            stride=tuple(value["stride"]),
        )
    if isinstance(value, dict):
        return {key: _decode(item, mesh, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_decode(item, mesh, device) for item in value)
    return value


def local_optimizer_state(optimizer: Optimizer) -> dict:
    """This rank's ``optimizer.state_dict()`` with every DTensor as plain data (CPU tensors)."""
    return _encode(optimizer.state_dict())


def load_local_optimizer_state(optimizer: Optimizer, state: dict, mesh: Optional[DeviceMesh]) -> None:
    """Load what :func:`local_optimizer_state` gave on this rank, DTensors rebuilt on ``mesh``
    (None: an unsharded model, whose state has no DTensors)."""
    if mesh is None:
        optimizer.load_state_dict(state)
        return
    device = torch.device(mesh.device_type)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    optimizer.load_state_dict(_decode(state, mesh, device))
