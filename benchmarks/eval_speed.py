"""Evaluation speed: our eval recipe (torchtune model in process) vs `lm_eval --model hf`, on the
same checkpoint, the same USMLE questions, the same limit and batch size: examples per second.

The checkpoint is the tiny Llama 3.2 HF directory (`components.models.tiny_checkpoint_dir()`),
which torchtune's HF checkpointer and transformers both load. Two tasks, timed apart:
`usmle_step1` (log-likelihood of the option letters) and `usmle_step1_gen` (the study's protocol:
greedy generation of up to 128 tokens; the untrained tiny model never writes the stop string, so
every question generates all 128 tokens on both sides). Questions: the real USMLE Step 1 set in
../shared/data/usmle (or `--usmle-dir`).

Timed: ours, the recipe's own "Eval completed in X seconds" (task building + evaluation, model
load excluded); lm_eval, lm-eval's `simple_evaluate(model="hf", ...)` (what `lm_eval --model hf`
calls: the tiny model's load, well under a second, task building and evaluation), with lm-eval's
TaskManager, which indexes its own task folders as the CLI does, built before the clock starts. Each process's wall time (start-up included) is recorded too. Runs
alternate (ours, lm_eval, then lm_eval, ours) with one OpenMP thread each.

    python benchmarks/eval_speed.py --repeats 3 --limit-ll 40 --limit-gen 16 --out benchmarks/eval_speed_results.jsonl
"""

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import speed_common as sc  # noqa: E402

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
_EVAL_TIME = re.compile(r"Eval completed in ([0-9.]+) seconds")


def ours_cmd(task, limit, batch, usmle_dir, out, ckpt):
    tune = str(Path(sys.executable).parent / "tune")
    return [tune, "run", "recipes/eleuther_eval.py", "--config", "configs/tiny/eval.yaml",
            f"output_dir={out}", f"checkpointer.checkpoint_dir={ckpt}",
            "checkpointer.checkpoint_files=[model.safetensors]", f"tasks=[{task}]", f"limit={limit}",
            f"batch_size={batch}", f"metadata.usmle_dir={usmle_dir}"]


def hf_cmd(task, limit, batch, usmle_dir, out, ckpt):
    """What `lm_eval --model hf --model_args pretrained=CKPT,dtype=float32 --include_path evals/tasks
    --tasks TASK --limit N --metadata {"usmle_dir": ...} --device cpu --batch_size B` runs, through
    lm-eval's own Python entry (simple_evaluate with model="hf"), so that lm-eval's indexing of its
    thousands of task files (over a minute on a loaded 2-core machine; our runner skips it) is
    timed apart from the evaluation."""
    return [sys.executable, __file__, "hf-child", task, str(limit), str(batch), usmle_dir, str(out), ckpt]


def hf_child(task, limit, batch, usmle_dir, out, ckpt) -> None:
    import torch

    torch.set_num_threads(1)
    import lm_eval
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    tm = TaskManager(include_path="evals/tasks", metadata={"usmle_dir": usmle_dir})
    t_index = time.perf_counter() - t0
    t1 = time.perf_counter()
    res = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={ckpt},dtype=float32", tasks=[task], limit=int(limit),
        batch_size=int(batch), device="cpu", task_manager=tm,
    )
    t_eval = time.perf_counter() - t1
    body = {"results": res["results"], "n-samples": res.get("n-samples", {}),
            "total_evaluation_time_seconds": t_eval, "task_index_s": t_index}
    Path(out, "results_hf.json").write_text(json.dumps(body, default=str))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "hf-child":
        return hf_child(*sys.argv[2:9])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit-ll", type=int, default=40)
    ap.add_argument("--limit-gen", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--usmle-dir", default="../shared/data/usmle")
    ap.add_argument("--out", default=None)
    ap.add_argument("--summarize", default=None, help="print the table of a results JSONL and stop")
    a = ap.parse_args()
    if a.summarize:
        rows = [json.loads(line) for line in open(a.summarize) if line.strip()]
        return table(rows, list(dict.fromkeys(r["task"] for r in rows)))
    from components.models import tiny_checkpoint_dir

    ckpt = tiny_checkpoint_dir()
    usmle_dir = str(Path(a.usmle_dir).resolve())
    work = Path(tempfile.mkdtemp(prefix="eval_speed_"))
    out = open(a.out, "a") if a.out else None
    results = []
    tasks = [("usmle_step1", a.limit_ll), ("usmle_step1_gen", a.limit_gen)]
    for rep in range(a.repeats):
        for task, limit in tasks:
            sides = ["ours", "lm_eval_hf"] if rep % 2 == 0 else ["lm_eval_hf", "ours"]
            for side in sides:
                od = work / f"{task}_{side}_{rep}"
                od.mkdir()
                log = work / f"{task}_{side}_{rep}.log"
                cmd = (ours_cmd if side == "ours" else hf_cmd)(task, limit, a.batch_size, usmle_dir, od, ckpt)
                rec = {"task": task, "side": side, "repeat": rep, "limit": limit, "batch_size": a.batch_size,
                       "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
                rec.update(sc.run_child(cmd, ENV, log_file=log))
                rec["command"] = " ".join(Path(cmd[0]).name if i == 0 else c for i, c in enumerate(cmd)).replace(str(od), "OUT")
                try:
                    if side == "ours":
                        m = _EVAL_TIME.findall(Path(log).read_text(errors="replace"))
                        rec["eval_s"] = float(m[-1])
                        body = json.loads((od / "results.json").read_text())
                    else:
                        (rf,) = od.rglob("results_*.json")
                        body = json.loads(rf.read_text())
                        rec["eval_s"] = float(body["total_evaluation_time_seconds"])
                        rec["task_index_s"] = body.get("task_index_s")
                    res = body["results"][task]
                    rec["acc"] = res.get("acc,none")
                    rec["n"] = body.get("n-samples", {}).get(task, {}).get("effective", limit)
                    rec["examples_per_s"] = rec["n"] / rec["eval_s"]
                    rec["examples_per_s_process"] = rec["n"] / rec["wall_s"]
                except Exception as e:  # noqa: BLE001
                    rec["error"] = f"{type(e).__name__}: {e}\n{sc.tail(log, 10)}"
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items()
                                  if k != "command"}), flush=True)
                results.append(rec)
                if out:
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
    table(results, [t for t, _ in tasks])


def table(results, tasks) -> None:
    print("\n| task | n | ours examples/s | lm_eval hf examples/s | ours / lm_eval (median of per-repeat ratios) | "
          "with start-up: ours / lm_eval examples/s | acc ours / lm_eval |")
    print("| --- | ---: | ---: | ---: | ---: | --- | --- |")
    for task in tasks:
        rows = {s: [r for r in results if r["task"] == task and r["side"] == s and "examples_per_s" in r]
                for s in ("ours", "lm_eval_hf")}
        if not rows["ours"] or not rows["lm_eval_hf"]:
            print(f"| {task} | failed | | | | | |")
            continue
        reps = sorted({r["repeat"] for r in rows["ours"]} & {r["repeat"] for r in rows["lm_eval_hf"]})
        ratios = [next(r for r in rows["ours"] if r["repeat"] == k)["examples_per_s"]
                  / next(r for r in rows["lm_eval_hf"] if r["repeat"] == k)["examples_per_s"] for k in reps]
        med = {s: sc.median([r["examples_per_s"] for r in rows[s]]) for s in rows}
        medp = {s: sc.median([r["examples_per_s_process"] for r in rows[s]]) for s in rows}
        print(f"| {task} | {rows['ours'][0]['n']} | {med['ours']:.2f} | {med['lm_eval_hf']:.2f} | "
              f"{sc.median(ratios):.2f} ({', '.join(f'{x:.2f}' for x in ratios)}) | "
              f"{medp['ours']:.2f} / {medp['lm_eval_hf']:.2f} | {rows['ours'][0]['acc']} / {rows['lm_eval_hf'][0]['acc']} |")


if __name__ == "__main__":
    main()
