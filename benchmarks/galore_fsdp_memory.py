"""GaLore under FSDP2 on CPU processes: peak memory per process and projection-update time, 1 vs 2.

    python benchmarks/shape_check.py build --shape 1b --out /tmp/Llama-3.2-1B-random
    python benchmarks/galore_fsdp_memory.py --model-dir /tmp/Llama-3.2-1B-random --nproc 1 2 \\
        --svd randomized full --out benchmarks/galore_fsdp_memory_results.jsonl

Each run is `tune run --nproc_per_node N recipes/galore_finetune_distributed.py --config
configs/llama3_2_3B/galore.yaml` at the Llama 3.2 1B shape (bf16, random weights in `tune
download`'s layout; benchmarks/shape_check.py's overrides: checkpoint, tokenizer, local sample
data, the 1B builder) for `--steps` optimizer steps, with the same per-process batch (`batch_size`
1, no accumulation: the global batch grows with the processes, as it does on GPUs), activation
checkpointing on and compile off. The study's GaLore settings otherwise (rank 128, q/k/v/o/w1/w2/w3,
a projection update at step 1). `--layerwise`: the same with `optimizer.layerwise=True`.

Measured per run: every worker's peak RSS (polled every 0.2 s; the whole run, so rank 0's
includes gathering the full weights for the final checkpoint), rank 0's peak RSS at each logged
step (`peak_rss_gib`, before any checkpoint), and `projection_update_secs` of step 1 (the new
projections of all 112 GaLore weights: all-gathers, SVDs shared round-robin, broadcasts). The
whole process tree is killed past `--cap-gib`.

One process trains unsharded (torchtune applies FSDP2 only from 2 processes on), so its projection
update runs inside galore-torch's step and is not logged; `--single-update` times it apart, in
this process with one thread (as torchrun gives each worker): `get_orthogonal_matrix` of every
GaLore weight of the 1B shape (16 layers x 7, gradient-shaped random bf16 matrices), which is what
the one-process step computes at an update.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shape_check import GIB, overrides_for  # noqa: E402 - benchmarks/ is on sys.path when run as a script

RECIPE = "recipes/galore_finetune_distributed.py"
CONFIG = "configs/llama3_2_3B/galore.yaml"
FIXED = ["batch_size=1", "gradient_accumulation_steps=1", "compile=False",
         "enable_activation_checkpointing=True", "log_peak_memory_stats=True", "clip_grad_norm=null"]


def worker_peaks(proc: subprocess.Popen, cap_gib: float, peaks: Dict[int, int], killed: List[str]) -> None:
    """Poll the RSS of every process under ``proc``; kill the tree past ``cap_gib`` in total."""
    import psutil

    while proc.poll() is None:
        total = 0
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for child in children:
            try:
                rss = child.memory_info().rss
            except psutil.NoSuchProcess:
                continue
            total += rss
            if "python" in child.name() and any("galore_finetune_distributed" in a for a in child.cmdline()):
                peaks[child.pid] = max(peaks.get(child.pid, 0), rss)
        if total > cap_gib * GIB:
            killed.append(f"process tree passed {cap_gib} GiB")
            os.killpg(proc.pid, signal.SIGKILL)
            return
        time.sleep(0.2)


def run(model_dir: Path, work: Path, nproc: int, svd: str, steps: int, cap_gib: float, layerwise: bool) -> Dict[str, Any]:
    from components.metric_logs import latest_log, step_metrics

    name = f"nproc{nproc}_{svd}" + ("_layerwise" if layerwise else "")
    out = work / name
    extra = [*FIXED, f"optimizer.svd={svd}", f"optimizer.layerwise={layerwise}"]
    overrides = overrides_for("galore", model_dir, out, "1b", "cpu", extra, steps)
    tune = str(Path(sys.executable).parent / "tune")
    argv = [tune, "run", "--nproc_per_node", str(nproc), RECIPE, "--config", CONFIG, *overrides]
    peaks: Dict[int, int] = {}
    killed: List[str] = []
    start = time.perf_counter()
    with open(work / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        watcher = threading.Thread(target=worker_peaks, args=(proc, cap_gib, peaks, killed), daemon=True)
        watcher.start()
        proc.wait()
        watcher.join()
    result: Dict[str, Any] = {
        "nproc": nproc, "svd": svd, "layerwise": layerwise, "shape": "1b", "steps": steps, "rc": proc.returncode,
        "wall_s": round(time.perf_counter() - start, 1), "command": " ".join(argv[1:]),
        "worker_peak_rss_gib": sorted(round(p / GIB, 2) for p in peaks.values()),
    }
    if killed:
        result["killed"] = killed[0]
    try:
        metrics = step_metrics(latest_log(out))
    except (OSError, ValueError, IndexError):
        metrics = {}
    result["rank0_step_peak_rss_gib"] = [round(m["peak_rss_gib"], 2) for _, m in sorted(metrics.items()) if "peak_rss_gib" in m]
    result["projection_update_secs"] = {step: round(m["projection_update_secs"], 1) for step, m in metrics.items() if "projection_update_secs" in m}
    result["loss"] = [round(m["loss"], 4) for _, m in sorted(metrics.items()) if "loss" in m]
    return result


def single_process_update(svd: str, rank: int = 128) -> Dict[str, Any]:
    """Seconds of one projection update of all 1B GaLore weights in one process, one thread."""
    import torch
    from galore_torch.galore_projector import GaLoreProjector

    from components.optim.galore import RandomizedGaLoreProjector
    from components.optim.sharded_projection import projection_side

    torch.set_num_threads(1)
    # torchtune's [out, in] weights of one 1B layer: q/o, k/v, w1/w3, w2
    layer = [(2048, 2048)] * 2 + [(512, 2048)] * 2 + [(8192, 2048)] * 2 + [(2048, 8192)]
    projector = (RandomizedGaLoreProjector if svd == "randomized" else GaLoreProjector)(rank)
    generator = torch.Generator().manual_seed(0)
    seconds = 0.0
    for _ in range(16):
        for shape in layer:
            grad = torch.randn(shape, generator=generator).to(torch.bfloat16)
            start = time.perf_counter()
            projector.get_orthogonal_matrix(grad, rank, projection_side("std", shape))
            seconds += time.perf_counter() - start
    return {"single_process_update_secs": round(seconds, 1), "svd": svd, "shape": "1b", "threads": 1}


def emit(result: Dict[str, Any], out: Optional[Path]) -> None:
    """One JSON line on stdout, and appended to ``out``."""
    print(json.dumps(result), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(result) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="shape_check.py build --shape 1b")
    parser.add_argument("--nproc", type=int, nargs="*", default=[1, 2], help="process counts (none: only --single-update)")
    parser.add_argument("--svd", nargs="+", default=["randomized"], choices=["randomized", "full"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--cap-gib", type=float, default=18.0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/medtune-galore-fsdp"))
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per run")
    parser.add_argument("--single-update", action="store_true", help="also time one process's update")
    parser.add_argument("--layerwise", action="store_true", help="optimizer.layerwise=True (step inside backward)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    for svd in args.svd if args.single_update else []:
        emit(single_process_update(svd), args.out)
    for svd in args.svd:
        for nproc in args.nproc:
            emit(run(args.model_dir, args.work, nproc, svd, args.steps, args.cap_gib, args.layerwise), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
