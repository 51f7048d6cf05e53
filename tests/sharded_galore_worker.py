"""Worker of tests/test_galore_sharded.py, started by torchrun with 2 CPU processes (gloo).

Each rank trains two copies of one small model from the same seed with
``components.optim.galore_adamw`` (and ``apollo_adamw``): one sharded by FSDP2 over both ranks (each rank sees half of
every batch), one whole in this process (the reference, on the whole batch). The weights are
chosen so that every projection side meets uneven row shards (an odd number of rows). Rank 0
writes what it measured to the JSON file named by argv[1].
"""

import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from components.optim import galore_adamw
from components.optim.sharded_state import load_local_optimizer_state, local_optimizer_state

STEPS, GAP, BATCH = 7, 3, 8


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(6, 9, bias=False)  # 9 x 6: right side, rows 5 + 4
        self.k_proj = nn.Linear(9, 5, bias=False)  # 5 x 9: left side, rows 3 + 2
        self.w1 = nn.Linear(5, 7, bias=False)  # 7 x 5: right (std) or full
        self.norm = nn.LayerNorm(7)  # not a GaLore target: plain AdamW on its shards

    def forward(self, x):
        return self.norm(self.w1(torch.tanh(self.k_proj(torch.tanh(self.q_proj(x))))))


def build(proj_type: str, svd: str, model: nn.Module):
    """galore_adamw with ``svd`` full or randomized; ``svd`` channel or tensor: APOLLO's scaling."""
    named, targets = list(model.named_parameters()), ["q_proj", "k_proj", "w1"]
    if svd in ("channel", "tensor"):
        from components.optim import apollo_adamw

        return apollo_adamw(
            named, lr=0.05, weight_decay=0.01, rank=2, update_proj_gap=GAP, scale=4.0,
            scale_type=svd, proj_type=proj_type, target_modules=targets,
        )
    return galore_adamw(
        named, lr=0.05, weight_decay=0.01, rank=2, update_proj_gap=GAP, scale=0.5,
        proj_type=proj_type, target_modules=targets, svd=svd,
    )


def whole(tensor):
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def train(proj_type: str, svd: str):
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    reference = Block()
    sharded = Block()
    sharded.load_state_dict(reference.state_dict())
    for module in (sharded.q_proj, sharded.k_proj, sharded.w1, sharded):
        fully_shard(module)
    opt_ref, opt_sharded = build(proj_type, svd, reference), build(proj_type, svd, sharded)
    data = torch.Generator().manual_seed(1)
    losses, refresh = [], []
    for _ in range(STEPS):
        x, y = torch.randn(BATCH, 6, generator=data), torch.randn(BATCH, 7, generator=data)
        mine = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        for model, opt, rows in ((reference, opt_ref, slice(None)), (sharded, opt_sharded, mine)):
            loss = ((model(x[rows]) - y[rows]) ** 2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if model is reference:
                losses.append(loss.item())
        refresh.append(getattr(opt_sharded, "last_refresh_seconds", 0.0))  # APOLLO: no SVD to share
    weight_diff = max(
        (whole(p) - q).abs().max().item()
        for p, q in zip(sharded.parameters(), reference.parameters())
    )
    state = opt_sharded.state[sharded.q_proj.weight]
    local_rows = {name: state[name].to_local().shape[0] for name in ("exp_avg", "exp_avg_sq")}
    left_state = opt_sharded.state[sharded.k_proj.weight]["exp_avg"]
    # the per-rank optimizer state survives a save and a load into a fresh optimizer
    saved = local_optimizer_state(opt_sharded)
    again = build(proj_type, svd, sharded)
    load_local_optimizer_state(again, saved, sharded.q_proj.weight.device_mesh)
    reloaded = again.state[sharded.q_proj.weight]
    matrices = [reloaded["projector"].ortho_matrix, state["projector"].ortho_matrix]
    same_after_reload = bool(
        torch.equal(reloaded["exp_avg"].to_local(), state["exp_avg"].to_local())
        and all(torch.equal(a, b) for a, b in zip(*[m if isinstance(m, list) else [m] for m in matrices]))
        and type(reloaded["projector"]) is type(state["projector"])
    )
    return {
        "weight_diff": weight_diff,
        "losses": losses,
        "refresh_steps": [i for i, seconds in enumerate(refresh) if seconds > 0],
        "q_moment_local_rows": local_rows,
        "k_moment_placement": str(left_state.placements[0]) if isinstance(left_state, DTensor) else None,
        "same_after_reload": same_after_reload,
    }


def main() -> None:
    dist.init_process_group("gloo")
    results = {
        f"{proj_type}/{svd}": train(proj_type, svd)
        for proj_type in ("std", "reverse_std", "full")
        for svd in ("full", "randomized")
    }
    results.update({f"apollo/{proj_type}/{scale}": train(proj_type, scale) for proj_type in ("std",) for scale in ("channel", "tensor")})
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
