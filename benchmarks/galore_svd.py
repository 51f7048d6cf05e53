"""One GaLore projection update at the Llama 3.2 3B shapes: full SVD vs randomized range finder.

    python benchmarks/galore_svd.py --threads 1 2 --repeats 3 --out benchmarks/galore_svd_results.jsonl

What is timed is exactly what an optimizer step calls when a projection is due:
``get_orthogonal_matrix(G, rank, type)`` of galore-torch's ``GaLoreProjector`` (``svd: full``,
a ``torch.linalg.svd`` of the whole gradient) and of medtune's ``RandomizedGaLoreProjector``
(``svd: randomized``: rank + oversample sketch columns, power iterations, a small exact SVD), on
one fp32 gradient-shaped matrix per target module: q/o 3072x3072, k/v 1024x3072, w1/w3
8192x3072, w2 3072x8192 (torchtune's [out, in] weights), with the ``type`` that ``proj_type: std``
picks for that shape ('right' when rows >= columns, else 'left'). The matrices are random with a
decaying spectrum: ``G = U diag(s) V^T``, U and V random orthonormal, s_i = (1 + i)^-decay.

Per shape and thread count: the median of ``--repeats`` timings of each method (one untimed
warm-up call first), their ratio, and how far the randomized subspace is from the exact
top-``rank`` one: the largest principal angle's sine (``||P_exact - P_rand||_2``), the RMS sine
(``||P_exact - P_rand||_F / sqrt(2 rank)``), the largest sine between the exact top ``rank/2``
directions and the randomized subspace, and the share of the exact rank-``rank`` projection's
energy ``||G P||_F^2`` that the randomized one keeps (and the exact one's share of ``||G||_F^2``).
Without a gap at ``rank`` (s_128 / s_129 = 1.008 at decay 1) the exact 128th vector is itself
ill-determined, so the largest angle is large for any approximation; the energy is what GaLore
keeps of the gradient. A summary line per thread count gives the
total of one projection update of all 28 layers x 7 matrices (2 q/o + 2 k/v + 2 w1/w3 + 1 w2 per
layer). JSON lines go to stdout and, with ``--out``, are appended to a file.
"""

import argparse
import json
import platform
import statistics
import sys
import time

import torch

LAYERS = 28
# (rows, cols) of the weight, matrices of that shape per layer, which modules
SHAPES = [((3072, 3072), 2, "q_proj/output_proj"), ((1024, 3072), 2, "k_proj/v_proj"),
          ((8192, 3072), 2, "w1/w3"), ((3072, 8192), 1, "w2")]


def gradient_like(m: int, n: int, decay: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=generator)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=generator)).Q
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -decay
    return (u * s) @ v.T


def as_rows(basis: torch.Tensor, kind: str) -> torch.Tensor:
    """The basis vectors as orthonormal rows (rank x dim)."""
    return basis if kind == "right" else basis.T


def compare(matrix: torch.Tensor, exact: torch.Tensor, randomized: torch.Tensor, kind: str, rank: int):
    e, r = as_rows(exact, kind).double(), as_rows(randomized, kind).double()
    cosines = torch.linalg.svdvals(e @ r.T).clamp(max=1.0)  # cosines of the principal angles
    sin_max = float(torch.sqrt(1 - cosines.min() ** 2))
    sin_rms = float(torch.sqrt(((1 - cosines**2).sum() / rank).clamp(min=0)))
    # the exact top rank/2 directions: how far from the randomized rank-dimensional subspace
    half = torch.linalg.svdvals(e[: rank // 2] @ r.T).clamp(max=1.0)
    g = matrix.double()

    def energy(rows):
        return float(((g @ rows.T) if kind == "right" else (rows @ g)).square().sum())

    return {
        "sin_max": sin_max, "sin_rms": sin_rms, "sin_max_top_half": float(torch.sqrt(1 - half.min() ** 2)),
        "energy_kept": energy(r) / energy(e), "exact_energy_share": energy(e) / float(g.square().sum()),
    }


def timed(fn, repeats: int):
    fn()  # warm-up (allocations, LAPACK workspace queries)
    times, out = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method and shape (median)")
    parser.add_argument("--full-repeats", type=int, default=None,
                        help="timed full SVDs per shape, if fewer than --repeats (they are slow)")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--oversample", type=int, default=8)
    parser.add_argument("--power-iters", type=int, default=2)
    parser.add_argument("--decay", type=float, default=1.0, help="singular values s_i = (1 + i)^-decay")
    parser.add_argument("--out", default=None, help="append the JSON lines to this file too")
    args = parser.parse_args()

    from galore_torch.galore_projector import GaLoreProjector

    from components.optim.galore import RandomizedGaLoreProjector, parameter_seed

    full_repeats = args.full_repeats or args.repeats
    lines = []

    def emit(record):
        print(json.dumps(record), flush=True)
        lines.append(record)

    matrices = {shape: gradient_like(*shape, args.decay, seed=i) for i, (shape, _, _) in enumerate(SHAPES)}
    for threads in args.threads:
        torch.set_num_threads(threads)
        machine = f"{platform.processor() or platform.machine()}, {threads} thread(s), torch {torch.__version__}"
        totals = {"full": 0.0, "randomized": 0.0}
        for (m, n), per_layer, modules in SHAPES:
            matrix, kind = matrices[(m, n)], "right" if m >= n else "left"
            full = GaLoreProjector(args.rank, proj_type="std")
            randomized = RandomizedGaLoreProjector(
                args.rank, proj_type="std", oversample=args.oversample, power_iters=args.power_iters,
                seed=parameter_seed(f"layers.0.{modules}"),
            )
            full_s, full_all, exact = timed(lambda: full.get_orthogonal_matrix(matrix, args.rank, kind), full_repeats)
            rand_s, rand_all, approx = timed(
                lambda: randomized.get_orthogonal_matrix(matrix, args.rank, kind), args.repeats
            )
            totals["full"] += LAYERS * per_layer * full_s
            totals["randomized"] += LAYERS * per_layer * rand_s
            emit({
                "machine": machine, "threads": threads, "shape": [m, n], "modules": modules,
                "type": kind, "rank": args.rank, "oversample": args.oversample,
                "power_iters": args.power_iters, "decay": args.decay,
                "full_s": full_s, "randomized_s": rand_s, "full_over_randomized": full_s / rand_s,
                "full_all_s": full_all, "randomized_all_s": rand_all,
                **compare(matrix, exact, approx, kind, args.rank),
            })
        emit({
            "machine": machine, "threads": threads, "summary": "one projection update, 28 layers x 7 matrices",
            "rank": args.rank, "oversample": args.oversample, "power_iters": args.power_iters,
            "full_s": totals["full"], "randomized_s": totals["randomized"],
            "full_over_randomized": totals["full"] / totals["randomized"],
        })
    if args.out:
        with open(args.out, "a") as f:
            for record in lines:
                f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
