"""Where a sharded GaLore projection update spends its time: gathering vs SVD, per process.

    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/galore_update_phases.py --svd randomized

Every process builds the 112 GaLore weights of the Llama 3.2 1B shape (16 layers x q/k/v/o/w1/w2/w3,
torchtune's [out, in] shapes, bf16), each under its own FSDP2 `fully_shard` (gloo on CPU, one
thread per process, as torchrun gives each worker), a random gradient of the same sharding per
weight, and runs `components.optim.sharded_projection.refresh_projections` once, as a GaLore step
does at an update. It prints, per rank, the total and the time inside `gather_whole` (sending
rows to the owner, and waiting there for the other ranks) and inside the SVDs
(`get_orthogonal_matrix`); the rest is the broadcasts.
"""

import argparse
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import components.optim.sharded_projection as sharded
from components.optim.galore import ShardedGaLoreProjector, ShardedRandomizedGaLoreProjector

LAYER = [(2048, 2048)] * 2 + [(512, 2048)] * 2 + [(8192, 2048)] * 2 + [(2048, 8192)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--svd", choices=("randomized", "full"), default="randomized")
    parser.add_argument("--rank", type=int, default=128)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(dist.get_rank())
    seconds = {"gather": 0.0, "svd": 0.0}

    def timed(fn, phase):
        def wrapper(*a):
            start = time.perf_counter()
            out = fn(*a)
            seconds[phase] += time.perf_counter() - start
            return out

        return wrapper

    cls = ShardedRandomizedGaLoreProjector if args.svd == "randomized" else ShardedGaLoreProjector
    due = []
    for _ in range(16):
        for out_features, in_features in LAYER:
            module = nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16)
            fully_shard(module)
            weight = module.weight
            local = torch.randn(weight.to_local().shape, generator=generator).to(torch.bfloat16)
            grad = DTensor.from_local(local, weight.device_mesh, weight.placements, shape=weight.shape, stride=weight.stride())
            projector = cls(args.rank)
            projector.get_orthogonal_matrix = timed(projector.get_orthogonal_matrix, "svd")
            due.append((projector, grad))
    sharded.gather_whole = timed(sharded.gather_whole, "gather")
    total = sharded.refresh_projections(due)
    rest = total - seconds["gather"] - seconds["svd"]
    print(f"rank {dist.get_rank()}: svd={args.svd} total {total:.1f} s = gather {seconds['gather']:.1f} + "
          f"svd {seconds['svd']:.1f} + broadcast {rest:.1f}\n", end="", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
