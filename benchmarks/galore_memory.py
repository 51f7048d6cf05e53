"""Peak resident memory of one training step at the real Llama 3.2 3B shape, on CPU.

    python benchmarks/galore_memory.py --methods adamw galore galore_layerwise lora --batch-sizes 1 4 --cap-gib 14

Each (method, batch size) runs in its own subprocess, one at a time, under a hard memory cap:
RLIMIT_AS (the address space, a backstop) and a watchdog thread that reads VmRSS from
/proc/self/status every 10 ms and kills the process once it passes the cap. A method that
passes the cap is reported as "does not fit in N GiB", never allowed to take the machine.
The cap is also lowered to leave 3 GiB of the machine's MemAvailable to everyone else.

The step is what the recipes do: torchtune's `llama3_2_3b` (or `lora_llama3_2_3b`) with random
init in bf16, activation checkpointing on every transformer layer, torchtune's chunked
cross-entropy, seq 256, forward + backward + optimizer step. Peak = VmHWM (the process's peak
RSS, Python and torch included). GaLore's projection SVD is replaced by a random matrix of
the same shape and dtype (--real-svd keeps the SVD): on this CPU the 196 SVDs of the first step
take far longer than the step, and they change memory only by a transient workspace (at most
~0.3 GiB, for the largest 8192 x 3072 weight in fp32), which this measurement leaves out.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

GIB = 2**30
SEQ_LEN = 256


def read_status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM, VmSize)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise KeyError("MemAvailable")


def emit(result: dict) -> None:
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()


def start_watchdog(cap_bytes: int, result: dict) -> None:
    def watch():
        while True:
            rss = read_status("VmRSS")
            if rss > cap_bytes:
                result.update(status="over_cap", peak_rss_gib=read_status("VmHWM") / GIB)
                emit(result)
                os._exit(3)
            time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()


def analytic_bytes(method: str) -> dict:
    """Bytes of weights, gradients and optimizer state at 3B, from the model's shapes (meta device)."""
    import torch
    from torchtune.models.llama3_2 import llama3_2_3b

    from components.optim import GALORE_TARGETS

    with torch.device("meta"):
        model = llama3_2_3b()
    named = list(model.named_parameters())
    weights = sum(p.numel() for _, p in named) * 2
    out = {"weights": weights}
    if method == "adamw":
        out.update(grads=weights, optimizer=2 * weights)  # exp_avg + exp_avg_sq in bf16
    elif method.startswith("galore"):
        state = 0
        for name, p in named:
            if name.split(".")[-2] in GALORE_TARGETS and p.dim() == 2:
                m, n = p.shape
                state += 2 * 128 * max(m, n) * 2 + 128 * min(m, n) * 2  # two moments + projection
            else:
                state += 2 * p.numel() * 2
        largest = max(p.numel() for _, p in named) * 2
        out.update(grads=largest if method.endswith("layerwise") else weights, optimizer=state)
    return out


def child(method: str, batch_size: int, cap_gib: float, real_svd: bool) -> None:
    cap = int(cap_gib * GIB)
    result = {"method": method, "batch_size": batch_size, "cap_gib": cap_gib}
    resource.setrlimit(resource.RLIMIT_AS, (cap + read_status("VmSize") + 4 * GIB,) * 2)
    start_watchdog(cap, result)

    import torch
    from torchtune import modules, training
    from torchtune.models.llama3_2 import llama3_2_3b, lora_llama3_2_3b
    from torchtune.modules.loss import CEWithChunkedOutputLoss
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    from components.optim import galore_adamw

    if not real_svd:
        from galore_torch.galore_projector import GaLoreProjector

        def random_orthogonal_shape(self, weights, rank, type):
            m, n = weights.shape
            dtype = weights.dtype
            if type == "right":
                return torch.randn(rank, n, dtype=dtype) / n**0.5
            if type == "left":
                return torch.randn(m, rank, dtype=dtype) / m**0.5
            return [torch.randn(m, rank, dtype=dtype), torch.randn(rank, n, dtype=dtype)]

        GaLoreProjector.get_orthogonal_matrix = random_orthogonal_shape

    torch.manual_seed(0)
    started = time.perf_counter()
    with training.set_default_dtype(torch.bfloat16):
        if method in ("lora", "qlora"):
            builder = lora_llama3_2_3b if method == "lora" else __import__(
                "torchtune.models.llama3_2", fromlist=["qlora_llama3_2_3b"]
            ).qlora_llama3_2_3b
            model = builder(
                lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"],
                lora_rank=32, lora_alpha=32, lora_dropout=0.05,
            )
            set_trainable_params(model, get_adapter_params(model))
        else:
            model = llama3_2_3b()
    training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    loss_fn = CEWithChunkedOutputLoss()
    model.set_num_output_chunks(loss_fn.num_output_chunks)
    result["rss_after_model_gib"] = read_status("VmRSS") / GIB

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if method == "adamw" or method in ("lora", "qlora"):
        optimizer = torch.optim.AdamW([p for _, p in trainable], lr=2e-5, weight_decay=0.01, fused=True)
        in_backward = False
    else:
        optimizer = galore_adamw(
            trainable, lr=2e-5, weight_decay=0.01, rank=128, update_proj_gap=200, scale=0.25,
            proj_type="std", layerwise=method == "galore_layerwise",
        )
        in_backward = method == "galore_layerwise"

    tokens = torch.randint(0, 128_256, (batch_size, SEQ_LEN))
    step_started = time.perf_counter()
    logits = model(tokens)
    labels = torch.hstack((tokens[:, 1:], torch.full((batch_size, 1), -100)))
    loss = loss_fn(logits, labels)
    del logits
    loss.backward()
    if not in_backward:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    result.update(
        status="ok",
        loss=float(loss),
        peak_rss_gib=read_status("VmHWM") / GIB,
        step_seconds=time.perf_counter() - step_started,
        total_seconds=time.perf_counter() - started,
    )
    emit(result)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["galore_layerwise", "galore", "lora", "adamw"],
                        choices=["adamw", "galore", "galore_layerwise", "lora", "qlora"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--cap-gib", type=float, default=14.0, help="memory cap per configuration")
    parser.add_argument("--real-svd", action="store_true", help="keep GaLore's SVD (slow on CPU)")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        try:
            child(args.child[0], int(args.child[1]), args.cap_gib, args.real_svd)
        except (MemoryError, RuntimeError) as error:  # RLIMIT_AS refused an allocation
            if "alloc" not in str(error).lower() and not isinstance(error, MemoryError):
                raise
            emit({"method": args.child[0], "batch_size": int(args.child[1]), "cap_gib": args.cap_gib,
                  "status": "over_cap", "peak_rss_gib": read_status("VmHWM") / GIB, "error": str(error)[:200]})
            return 3
        return 0

    results = []
    for batch_size in args.batch_sizes:
        for method in args.methods:
            cap_gib = min(args.cap_gib, (mem_available() - 3 * GIB) / GIB)
            command = [sys.executable, __file__, "--child", method, str(batch_size), "--cap-gib", f"{cap_gib:.2f}"]
            if args.real_svd:
                command.append("--real-svd")
            print(f"==> {method} batch {batch_size} (cap {cap_gib:.1f} GiB)", flush=True)
            proc = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if lines:
                result = json.loads(lines[-1][7:])
            else:
                result = {"method": method, "batch_size": batch_size, "cap_gib": cap_gib,
                          "status": f"exit {proc.returncode}", "stderr": proc.stderr[-2000:]}
            result["analytic"] = analytic_bytes(method)
            results.append(result)
            print(json.dumps(result), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
