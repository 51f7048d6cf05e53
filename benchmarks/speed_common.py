"""Shared helpers of the speed benchmarks (hf_peer.py, knobs.py): the tiny data's token counts
in training order, our recipes' `tune run` commands, their metric logs, and child processes
timed with their own peak resident memory.

Real tokens are counted the same way on every side: the non-padding tokens of each training
sequence (BOS and EOS included), from the very token lists both sides train on. torchtune's
`tokens_per_second_per_gpu` counts label tokens (real tokens minus the masked BOS of each
sequence), so a step's wall time is recovered as label_tokens / tokens_per_second_per_gpu.
"""

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from components.metric_logs import latest_log, step_metrics

ROOT = Path(__file__).resolve().parent.parent
MAX_SEQ_LEN = 256
DATA_ARGS = dict(
    data_dir="components/data/sample/medical_meadow",
    template="medalpaca",
    train_on_input=True,
    holdout_fraction=0.1,
    holdout_seed=42,
    holdout="train",
    decontaminate={"usmle": "components/data/sample/usmle"},
)
IGNORE = -100

# our recipe and tiny config per method
OURS = {
    "full": ("full_finetune_single_device", "configs/tiny/full_sft.yaml"),
    "lora": ("recipes/lora_finetune_single_device.py", "configs/tiny/lora.yaml"),
    "qlora": ("recipes/lora_finetune_single_device.py", "configs/tiny/qlora.yaml"),
    "galore": ("recipes/galore_finetune_single_device.py", "configs/tiny/galore.yaml"),
    "galore_layerwise": ("recipes/galore_finetune_single_device.py", "configs/tiny/galore_layerwise.yaml"),
}


def dataset(packed: bool = False):
    """Our training set on the shipped sample (the tiny configs' dataset), in training order."""
    from components.data import medical_meadow_mixture
    from components.models import tiny_llama3_2_tokenizer

    tok = tiny_llama3_2_tokenizer(max_seq_len=MAX_SEQ_LEN)
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        ds = medical_meadow_mixture(tok, **DATA_ARGS, packed=False)
    finally:
        os.chdir(cwd)
    return tok, ds


def unit_counts(packed: bool = False) -> List[Dict[str, int]]:
    """Per training unit (a sequence, or a pack of 256 positions when packed), in order:
    real = non-padding tokens, label = tokens with a label (what torchtune's rate counts)."""
    _, ds = dataset()
    if not packed:
        out = []
        for i in range(len(ds)):
            s = ds[i]
            out.append({"real": len(s["tokens"]), "label": sum(1 for x in s["labels"] if x != IGNORE)})
        return out
    from torchtune.datasets import PackedDataset

    real: List[int] = []

    class _Recording(PackedDataset):
        def _add_pack(self, pack):
            real.append(len(pack["tokens"]))
            super()._add_pack(pack)

    pds = _Recording(ds, max_seq_len=MAX_SEQ_LEN)
    return [
        {"real": r, "label": int((p["labels"] != IGNORE).sum())} for r, p in zip(real, pds.packs)
    ]


def step_counts(units: Sequence[Dict[str, int]], batch: int, accum: int, steps: int) -> List[Dict[str, int]]:
    """Real and label tokens of each optimizer step (sequential order, no shuffle)."""
    per = batch * accum
    out = []
    for k in range(steps):
        chunk = units[k * per:(k + 1) * per]
        if len(chunk) < per:
            raise ValueError(f"only {len(units)} units: step {k + 1} of {batch} x {accum} is short")
        out.append({"real": sum(u["real"] for u in chunk), "label": sum(u["label"] for u in chunk)})
    return out


def ac_checkpointer_overrides() -> List[str]:
    """torchtune's recipes read ``cfg.checkpointer.model_type`` whenever activation checkpointing
    is on (a hint about offloading), and the tiny configs' checkpointer builder has no such key:
    ``enable_activation_checkpointing=True`` on a tiny config stops with ConfigAttributeError.
    So name the checkpointer the 3B configs use, torchtune's FullModelHFCheckpointer, on the
    same tiny checkpoint (what the tiny builder itself returns), with its model_type."""
    from components.models import tiny_checkpoint_dir

    return [
        "checkpointer._component_=torchtune.training.FullModelHFCheckpointer",
        f"checkpointer.checkpoint_dir={tiny_checkpoint_dir()}",
        "checkpointer.checkpoint_files=[model.safetensors]",
        "checkpointer.model_type=LLAMA3_2",
    ]


def ours_command(method: str, output_dir: str, overrides: Sequence[str] = ()) -> List[str]:
    recipe, config = OURS[method]
    tune = str(Path(sys.executable).parent / "tune")
    return [tune, "run", recipe, "--config", config, f"output_dir={output_dir}", *overrides]


def ours_step_times(output_dir: str, counts: Sequence[Dict[str, int]]) -> List[float]:
    """Wall time of each optimizer step of our run: its label tokens / its logged rate."""
    log = step_metrics(latest_log(Path(output_dir)))
    times = []
    for k, c in enumerate(counts, start=1):
        if k not in log or "tokens_per_second_per_gpu" not in log[k]:
            raise RuntimeError(f"step {k} missing from the metric log of {output_dir}")
        times.append(c["label"] / log[k]["tokens_per_second_per_gpu"])
    return times


def run_child(cmd: Sequence[str], env: Optional[Dict[str, str]] = None, cwd: Path = ROOT,
              log_file: Optional[Path] = None, timeout: float = 1800) -> Dict[str, float]:
    """Run a command; its wall time and its own peak RSS (os.wait4's ru_maxrss, GiB)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    # this tree's components/ and recipes/ first (a snapshot of the repository runs its own code)
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [x for x in full_env.get("PYTHONPATH", "").split(os.pathsep) if x])
    out = open(log_file, "w") if log_file else subprocess.DEVNULL
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(cmd), cwd=str(cwd), env=full_env, stdout=out, stderr=subprocess.STDOUT)
    deadline = t0 + timeout
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            pid, status, ru = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if log_file:
        out.close()
    return {"rc": proc.returncode, "wall_s": wall, "peak_rss_gib": ru.ru_maxrss / 2**20}


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if n == 0:
        return float("nan")
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def machine() -> str:
    import platform

    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.platform()}"
