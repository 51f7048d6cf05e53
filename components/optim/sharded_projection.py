"""GaLore's gradient projection on FSDP2 row shards, so no rank holds a whole gradient or moment.

FSDP2 (``fully_shard``) keeps every weight and its gradient as a DTensor split by rows over a
1-D mesh (``Shard(0)``, ``torch.chunk`` sizes). For a gradient ``G`` (m x n) whose rows are
split over the ranks, galore-torch's projection sides become:

- right (``G @ P^T``, P is rank x n): each rank multiplies its own rows; the low-rank gradient
  (m x rank) and its Adam moments stay row-sharded, and the update projected back
  (``low @ P``) is exactly this rank's rows. No communication.
- left (``Q^T @ G``, Q is m x rank): each rank multiplies its rows of Q with its rows of G and
  one all-reduce (rank x n values) sums them; the low-rank gradient and its moments (rank x n)
  are the same on every rank, and ``Q_rows @ low`` gives this rank's rows of the update.
- full (``Q^T @ G @ P^T``): as left, one all-reduce of rank x rank values.

A projection update (every ``update_proj_gap`` steps) needs the top singular vectors of the
whole ``G``. :func:`refresh_projections` does them all before the optimizer step, in rounds
of one weight per rank, weights of the same shape together: each gradient is gathered whole on
its owner only (a rank holds at most one whole gradient at a time), the owners run their SVDs
at the same time
(full or randomized: the projector's own ``get_orthogonal_matrix``, the very computation of one
device), and each projection matrix (rank x n or m x rank) is broadcast from its owner. The
projection matrices are replicated: each is rank/min(m, n) of its weight's size.
"""

import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

def projection_side(proj_type: str, shape: Sequence[int]) -> str:
    """galore-torch's choice of side for a gradient of ``shape`` (m, n): ``std`` projects the
    longer side away (right when m >= n), ``reverse_std`` the shorter one."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


class RowLayout:
    """Where this rank's rows of a row-sharded DTensor lie in the whole matrix."""

    def __init__(self, tensor: DTensor) -> None:
        mesh = tensor.device_mesh
        if mesh.ndim != 1 or tuple(tensor.placements) != (Shard(0),):
            raise ValueError(
                "GaLore under FSDP2 needs weights sharded by rows over a 1-D mesh (fully_shard's "
                f"default); got placements {tuple(tensor.placements)} on a {mesh.ndim}-D mesh "
                "(tensor parallelism and HSDP are not supported with GaLore)"
            )
        self.mesh = mesh
        self.group = mesh.get_group()
        self.shape = tuple(tensor.shape)
        rows = tensor.to_local().shape[0]
        world, rank = mesh.size(), mesh.get_local_rank()
        self.chunk = -(-self.shape[0] // world)  # torch.chunk's split: ceil(m / world) rows each
        self.start = min(rank * self.chunk, self.shape[0])
        self.stop = self.start + rows
        if self.stop > self.shape[0] or rows != max(0, min(self.chunk, self.shape[0] - self.start)):
            raise ValueError(f"unexpected row shard {self.start}:{self.stop} of a {self.shape} weight")

    def rows(self, matrix: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a whole (m x k) matrix."""
        return matrix[self.start : self.stop]

    def sharded(self, local: torch.Tensor, columns: int) -> DTensor:
        """A row-sharded DTensor (m x columns) from this rank's rows."""
        return DTensor.from_local(
            local, self.mesh, [Shard(0)], run_check=False,
            shape=torch.Size((self.shape[0], columns)), stride=(columns, 1),
        )

    def summed(self, part: torch.Tensor) -> DTensor:
        """The sum of every rank's ``part``, replicated."""
        dist.all_reduce(part, group=self.group)
        return DTensor.from_local(part, self.mesh, [Replicate()], run_check=False)


class ShardedProjection:
    """Mixin over a galore-torch projector: ``project``/``project_back`` of row-sharded DTensor
    gradients as the module docstring says; plain tensors take galore-torch's own path.

    The projection matrix must have been set by :func:`refresh_projections` for every step
    that updates it (the GaLore optimizers of components.optim do this in ``step``).
    """

    fresh = False  # set by refresh_projections for this step's project()

    def side(self, shape: Sequence[int]) -> str:
        return projection_side(self.proj_type, shape)

    def due(self, step: int) -> bool:
        """Whether ``project(grad, step)`` computes a new projection matrix (galore-torch's rule)."""
        return self.ortho_matrix is None or step % self.update_proj_gap == 0

    def project(self, full_rank_grad, iter):  # noqa: A002 - galore-torch's names
        if not isinstance(full_rank_grad, DTensor):
            return super().project(full_rank_grad, iter)
        if self.due(iter) and not self.fresh:
            raise RuntimeError(
                "a sharded GaLore projection is due but was not refreshed: call "
                "components.optim.sharded_projection.refresh_projections before the step"
            )
        self.fresh = False
        self.layout = layout = RowLayout(full_rank_grad)
        self.current_side = side = self.side(full_rank_grad.shape)
        local = full_rank_grad.to_local()
        if side == "right":
            return layout.sharded(local @ self.ortho_matrix.t(), self.ortho_matrix.shape[0])
        if side == "left":
            return layout.summed(layout.rows(self.ortho_matrix).t() @ local)
        left, right = self.ortho_matrix
        return layout.summed(layout.rows(left).t() @ local @ right.t())

    def project_back(self, low_rank_grad):
        if not isinstance(low_rank_grad, DTensor):
            return super().project_back(low_rank_grad)
        layout, low = self.layout, low_rank_grad.to_local()
        if self.current_side == "right":
            local = low @ self.ortho_matrix
        elif self.current_side == "left":
            local = layout.rows(self.ortho_matrix) @ low
        else:
            left, right = self.ortho_matrix
            local = layout.rows(left) @ low @ right
        return layout.sharded(local * self.scale, layout.shape[1])


def _matrix_shapes(side: str, shape: Tuple[int, int], rank: int) -> List[Tuple[int, int]]:
    """Shapes of the projection matrix (or [left, right] for ``full``) of an m x n gradient."""
    m, n = shape
    k = min(rank, m, n)
    return {"right": [(k, n)], "left": [(m, k)], "full": [(m, k), (k, n)]}[side]


def gather_whole(grad: DTensor, owner: int) -> Optional[torch.Tensor]:
    """The whole of a row-sharded ``grad`` on rank ``owner`` of its mesh (None elsewhere): each
    rank sends its rows, padded to ``torch.chunk``'s row count, to that rank only. Collective."""
    layout = RowLayout(grad)
    world, me = dist.get_world_size(layout.group), dist.get_rank(layout.group)
    local = grad.to_local()
    padded = local.new_zeros((layout.chunk, layout.shape[1]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)] if me == owner else None
    dist.gather(padded, parts, dst=dist.get_global_rank(layout.group, owner), group=layout.group)
    return torch.cat(parts)[: layout.shape[0]] if parts is not None else None


def svd_cost(projector: ShardedProjection, shape: Sequence[int]) -> float:
    """Relative cost of one projection update of an m x n gradient: m n min(m, n) for a full SVD,
    m n for the randomized range finder (its sketch width is fixed)."""
    m, n = shape
    return float(m * n * (1 if hasattr(projector, "oversample") else min(m, n)))


def deal_out(due: Sequence[Tuple[ShardedProjection, DTensor]], world: int, first_owner: int = 0) -> List[Dict[int, int]]:
    """The rounds of an update, each ``{rank: item index}`` with at most one item per rank.

    Items go costliest first, ``world`` to a round, so that a round's SVDs take about as long as
    each other (the round waits for its slowest; equal shapes share rounds); the ranks take a
    round's items in turn, the direction reversed every round so that no rank always gets the
    heavier one, starting at ``first_owner``. The same on every rank.
    """
    costs = [svd_cost(projector, grad.shape) for projector, grad in due]
    order = sorted(range(len(due)), key=lambda i: (-costs[i], tuple(due[i][1].shape), i))
    rounds = []
    for number, first in enumerate(range(0, len(order), world)):
        ranks = [(first_owner + k) % world for k in range(world)]
        if number % 2:
            ranks.reverse()
        rounds.append(dict(zip(ranks, order[first : first + world])))
    return rounds


def refresh_projections(due: Sequence[Tuple[ShardedProjection, DTensor]], first_owner: int = 0) -> float:
    """New projection matrices for every ``(projector, gradient)`` in ``due`` (the same list,
    in the same order, on every rank); the seconds it took. Collective.

    The SVDs run in rounds of one item per rank, of about equal cost (:func:`deal_out`): each
    gradient is gathered whole on its owner only, then every rank runs the SVD of its item, all
    at the same time; a rank holds at most one whole gradient matrix. Once all SVDs are done each
    projection matrix is broadcast from its owner.
    (Layer-wise, each parameter's own optimizer passes its position as ``first_owner``.)
    """
    if not due:
        return 0.0
    start = time.perf_counter()
    group = RowLayout(due[0][1]).group
    world, me = dist.get_world_size(group), dist.get_rank(group)
    rounds = deal_out(due, world, first_owner)
    owner = {index: rank for items in rounds for rank, index in items.items()}
    owned = {}
    for items in rounds:
        mine = None
        for rank, index in sorted(items.items()):
            whole = gather_whole(due[index][1], rank)
            if whole is not None:
                mine = whole
        if me in items:
            projector, grad = due[items[me]]
            matrix = projector.get_orthogonal_matrix(mine, projector.rank, projector.side(grad.shape))
            owned[items[me]] = [m.contiguous() for m in (matrix if isinstance(matrix, list) else [matrix])]
    for index, (projector, grad) in enumerate(due):
        side = projector.side(grad.shape)
        local = grad.to_local()
        matrices = owned.pop(index, None) or [
            torch.empty(shape, dtype=local.dtype, device=local.device)
            for shape in _matrix_shapes(side, tuple(grad.shape), projector.rank)
        ]
        for matrix in matrices:
            dist.broadcast(matrix, src=dist.get_global_rank(group, owner[index]), group=group)
        projector.ortho_matrix = matrices if side == "full" else matrices[0]
        projector.fresh = True
    return time.perf_counter() - start
