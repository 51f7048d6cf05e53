"""Our recipes' speed knobs, one at a time, on the tiny model on CPU: real tokens/s and peak RSS.

Every variant is `tune run <recipe> --config configs/tiny/<config>.yaml` plus overrides, from a
baseline that mirrors what configs/llama3_2_3B/*.yaml set today (activation checkpointing on,
chunked cross-entropy, no packing, no compile, optimizer step after backward), at batch 4 x 256,
gradient accumulation 1 (the layer-wise step allows no accumulation), shuffle off so every variant
sees the same sequences in the same order. Variants run round-robin (baseline, knob 1, knob 2, ...,
then again), so all of them see the same machine load; the table gives medians over repeats.

Real tokens are the non-padding tokens of the sequences (or packs) each step trained on; the first
`--skip` steps (warm-up, compilation) are left out of the rate. Peak RSS is the whole process's
(os.wait4's ru_maxrss), so it includes Python, torch and the data pipeline (~0.4 GiB).

    python benchmarks/knobs.py --repeats 3 --steps 12 --out benchmarks/knobs_results.jsonl
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import speed_common as sc  # noqa: E402

BATCH = 4
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
BASE = ["shuffle=False", f"batch_size={BATCH}", "gradient_accumulation_steps=1", "log_every_n_steps=1",
        "seed=42", "enable_activation_checkpointing=True"]

# name: (method, extra overrides, packed data)
VARIANTS = {
    "full: baseline (AC on, chunked CE)": ("full", [], False),
    "full: packed=True": ("full", ["dataset.packed=True"], True),
    "full: plain CrossEntropyLoss": ("full", ["loss._component_=torch.nn.CrossEntropyLoss"], False),
    "full: compile=True": ("full", ["compile=True"], False),
    "full: activation checkpointing off": ("full", ["enable_activation_checkpointing=False"], False),
    "full: optimizer_in_bwd=True": ("full", ["optimizer_in_bwd=True", "clip_grad_norm=null"], False),
    "galore: baseline (one optimizer)": ("galore", ["optimizer.rank=16", "optimizer.update_proj_gap=200"], False),
    "galore: layer-wise (galore_layerwise.yaml)": (
        "galore_layerwise", ["optimizer.rank=16", "optimizer.update_proj_gap=200"], False),
}
COMBOS = {
    "full: AC off + plain CE": ("full", ["enable_activation_checkpointing=False",
                                         "loss._component_=torch.nn.CrossEntropyLoss"], False),
    "full: AC off + packed": ("full", ["enable_activation_checkpointing=False", "dataset.packed=True"], True),
    "full: AC off + packed + compile": ("full", ["enable_activation_checkpointing=False", "dataset.packed=True",
                                                 "compile=True"], True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip", type=int, default=2, help="first steps left out of the rate")
    ap.add_argument("--only", nargs="*", default=None, help="variant names (substring match)")
    ap.add_argument("--combos", action="store_true", help="also run the combinations in COMBOS")
    ap.add_argument("--out", default=None)
    ap.add_argument("--summarize", default=None, help="print the table of a results JSONL and stop")
    a = ap.parse_args()
    if a.summarize:
        rows = [json.loads(line) for line in open(a.summarize) if line.strip()]
        summarize(rows, list(dict.fromkeys(r["variant"] for r in rows)))
        return

    variants = dict(VARIANTS)
    if a.combos:
        variants.update(COMBOS)
    if a.only:
        variants = {k: v for k, v in variants.items() if any(s in k for s in a.only)}
    counts = {p: sc.step_counts(sc.unit_counts(packed=p), BATCH, 1, a.steps) for p in (False, True)}
    work = Path(tempfile.mkdtemp(prefix="knobs_"))
    out = open(a.out, "a") if a.out else None
    results = []
    for rep in range(a.repeats):
        names = list(variants) if rep % 2 == 0 else list(reversed(variants))
        for name in names:
            method, extra, packed = variants[name]
            od = work / f"{rep}_{len(results)}"
            ov = sc.ac_checkpointer_overrides() + BASE + [f"max_steps_per_epoch={a.steps}"] + extra
            cmd = sc.ours_command(method, str(od), ov)
            log = work / f"{rep}_{len(results)}.log"
            rec = {"variant": name, "repeat": rep, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
            rec.update(sc.run_child(cmd, ENV, log_file=log))
            rec["command"] = " ".join(cmd[1:]).replace(str(od), "OUT")
            if rec["rc"] != 0:
                rec["error"] = sc.tail(log, 12)
            else:
                try:
                    c = counts[packed]
                    times = sc.ours_step_times(str(od), c)
                    real = [x["real"] for x in c]
                    rec["tps"] = sum(real[a.skip:]) / sum(times[a.skip:])
                    rec["tps_all"] = sum(real) / sum(times)
                    rec["step_times"] = times
                    lg = sc.step_metrics(sc.latest_log(Path(od)))
                    rec["loss_first"] = lg[1].get("loss")
                    rec["loss_last"] = lg[a.steps].get("loss")
                except Exception as e:  # noqa: BLE001
                    rec["error"] = f"{type(e).__name__}: {e}\n{sc.tail(log, 8)}"
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items()
                              if k not in ("step_times", "command")}), flush=True)
            results.append(rec)
            if out:
                out.write(json.dumps(rec) + "\n")
                out.flush()
    summarize(results, list(variants))


def summarize(results, names) -> None:
    base = {}
    for r in results:
        if "baseline" in r["variant"] and "tps" in r:
            base.setdefault((r["variant"].split(":")[0], r["repeat"]), r)
    print("\n| variant | real tok/s (median) | vs its baseline (median of per-repeat ratios) | peak RSS GiB (median) | "
          "loss step 1 / last |")
    print("| --- | ---: | ---: | ---: | --- |")
    for n in names:
        rows = [r for r in results if r["variant"] == n and "tps" in r]
        if not rows:
            err = next((r.get("error", "") for r in results if r["variant"] == n), "")
            print(f"| {n} | failed | | | {err.strip().splitlines()[-1] if err.strip() else ''} |")
            continue
        ratios = [r["tps"] / base[(n.split(":")[0], r["repeat"])]["tps"] for r in rows
                  if (n.split(":")[0], r["repeat"]) in base]
        print(f"| {n} | {sc.median([r['tps'] for r in rows]):.0f} | {sc.median(ratios):.2f} "
              f"({', '.join(f'{x:.2f}' for x in ratios)}) | {sc.median([r['peak_rss_gib'] for r in rows]):.2f} | "
              f"{rows[0]['loss_first']:.4f} / {rows[0]['loss_last']:.4f} |")


if __name__ == "__main__":
    main()
