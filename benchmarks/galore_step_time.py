"""Mean training-step time of GaLore against AdamW full fine-tuning, same model, same run.

    python benchmarks/galore_step_time.py --steps 200 --threads 1

Three copies of the same small model (the tiny Llama 3.2: 4 layers, width 256, fp32, as the
tiny configs train it) take turns, one step each, on the same random batch (4 x 256 tokens):
AdamW (torch.optim.AdamW, the full_sft config), GaLore AdamW (components.optim.galore_adamw,
rank 16 as configs/tiny/galore.yaml, update_proj_gap = --steps) and the same layer-wise.
Interleaving puts every method under the same load, which matters on a shared machine.
Step 0 (first SVDs, allocator warm-up) is not timed; the timed steps 1..N contain exactly one
projection update (at step N = update_proj_gap), so the mean is over one full period.
A step is forward + backward + optimizer step + zero_grad.
"""

import argparse
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="timed steps = update_proj_gap")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from components.models import tiny_llama3_2
    from components.optim import galore_adamw

    def model():
        torch.manual_seed(0)
        return tiny_llama3_2()

    galore = dict(lr=1e-3, weight_decay=0.01, rank=args.rank, update_proj_gap=args.steps, scale=0.25)
    runs = {}
    m = model()
    runs["adamw"] = (m, torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01), False)
    m = model()
    runs["galore"] = (m, galore_adamw(m.named_parameters(), **galore), False)
    m = model()
    runs["galore_layerwise"] = (m, galore_adamw(m.named_parameters(), layerwise=True, **galore), True)

    tokens = torch.randint(0, 2000, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    times = {name: [] for name in runs}
    for step in range(args.steps + 1):
        for name, (net, optimizer, in_backward) in runs.items():
            started = time.perf_counter()
            logits = net(tokens)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))
            loss.backward()
            if not in_backward:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if step > 0:
                times[name].append(time.perf_counter() - started)

    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}",
        "timed_steps": args.steps,
        "batch": f"{args.batch_size}x{args.seq_len}",
    }
    for name, values in times.items():
        summary[name] = {"mean_s": statistics.mean(values), "median_s": statistics.median(values),
                         "max_s": max(values)}
    for name in ("galore", "galore_layerwise"):
        summary[f"{name}_over_adamw_mean"] = summary[name]["mean_s"] / summary["adamw"]["mean_s"]
        summary[f"{name}_over_adamw_median"] = summary[name]["median_s"] / summary["adamw"]["median_s"]
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
