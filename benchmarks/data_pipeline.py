"""The full data pipeline at the study's scale: first (building) run vs cached run.

    nice -n 10 python benchmarks/data_pipeline.py                 # generate (once), then measure
    python benchmarks/data_pipeline.py --rows-scale 0.01          # a quick 1 % run
    python benchmarks/data_pipeline.py --packed --modes first cached torchtune_packed  # packing too

1. A synthetic mix of the study's size (895,753 rows) in the Medical Meadow schema
   ``{instruction, input, output}``, written as the eight set files (JSON arrays, the sample
   layout) under ``--data-dir``. Each row copies a random row of
   ``../shared/data/medical_meadow_small.json`` (the real wikidoc_patient_information sample):
   its instruction verbatim (the real sets repeat a few instructions) and, for input and output,
   the same number of words, each drawn from that file's words (whitespace kept). A few rows
   carry a 13-word window of a USMLE question, so decontamination has something to remove.
   Generated once per seed and scale; later runs reuse the files.
2. Each measured run is a fresh subprocess that calls the component the configs name,
   ``components.data.medical_meadow_mixture``, with configs/llama3_2_3B/full_sft.yaml's data
   settings (medalpaca template, train_on_input, 90/10 split seed 42, max_seq_len 256) plus
   decontamination against USMLE and the MedQuAD test split, and the project's tiny Llama 3
   tokenizer (a real torchtune Llama3Tokenizer over a 2,048-token BPE: the real 128k-vocabulary
   tokenizer cannot be downloaded here; it gives fewer tokens per row, so tokenizing is somewhat
   faster per row and the cache smaller). Then it reads every training example once.
   Runs: ``first`` (empty cache: load, check, split, decontaminate, template, tokenize, write),
   ``cached`` (same settings again: memory-map the cache), and ``uncached`` (``cache=False``,
   the builder as it was before the cache: rows in memory, tokenized lazily per item).
3. Memory: the process tree's peak resident memory, sampled every 50 ms from /proc (the builder
   forks ``num_proc`` workers), and the parent's own VmHWM. Resident memory counts pages of
   memory-mapped Arrow files that were read (clean page cache the kernel can drop), so the
   anonymous part (RssAnon, the Python heap) is reported too.
4. ``--packed``: each run then packs the training rows to 256 tokens as ``packed: True`` does,
   timed and measured on its own (``pack_*``: seconds, and the peak tree PSS / anonymous PSS
   while packing, next to the anonymous PSS when packing started), and reads packs instead of
   rows. ``first`` and ``cached`` call ``medical_meadow_mixture(..., packed=True)`` (the row cache
   then hits): packs streamed into the cache (:mod:`components.data.packing`), or memory-mapped
   from it. ``torchtune_packed`` takes the rows from the cache and packs them with torchtune's
   ``PackedDataset`` (every pack in RAM: what ``packed: True`` did before); ``uncached`` packs the
   lazily tokenized rows with it, as ``cache=False`` does.
"""

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("MEDTUNE_SHARED_DATA", REPO.parent / "shared" / "data"))
SMALL = SHARED / "medical_meadow_small.json"
GIB = 2**30
EVAL_SETS = {"usmle": str(SHARED / "usmle"), "medquad_test": str(SHARED / "knowtuning_medquad" / "medquad_test.json")}
PLANTED_PER_SET = 5
READ_ITEMS = 50_000
T_START = time.time()


# --- the synthetic mix ---------------------------------------------------------------------

def generate(out: Path, scale: float = 1.0, seed: int = 0) -> dict:
    """Write the eight set files under ``out`` (skipped when a finished copy is there)."""
    from components.data.medical_meadow import MEDICAL_MEADOW_SETS
    from components.data.usmle import read_usmle

    done = out / "GENERATED.json"
    if done.is_file():
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = json.loads(SMALL.read_text())
    piece = re.compile(r"\S+\s*")
    shapes = [(r["instruction"], len(piece.findall(r["input"])), len(piece.findall(r["output"]))) for r in rows]
    pool = [p for r in rows for f in ("input", "output") for p in piece.findall(r[f])]
    questions = [q["question"].split() for q in read_usmle(SHARED / "usmle")[0]]
    questions = [q for q in questions if len(q) >= 20]
    sizes, chars, t0 = {}, 0, time.time()
    for name, study_rows in MEDICAL_MEADOW_SETS.items():
        n = max(1, round(study_rows * scale))
        planted = set(rng.sample(range(n), min(PLANTED_PER_SET, n)))
        path = out / f"{name}.json"
        with open(path.with_suffix(".tmp"), "w", encoding="utf-8") as f:
            f.write("[\n")
            for i in range(n):
                instruction, n_in, n_out = shapes[rng.randrange(len(shapes))]
                text_in = "".join(rng.choices(pool, k=n_in)).strip()
                text_out = "".join(rng.choices(pool, k=n_out)).strip()
                if i in planted:
                    q = rng.choice(questions)
                    start = rng.randrange(len(q) - 13)
                    text_in = (text_in + " " + " ".join(q[start : start + 13])).strip()
                record = {"instruction": instruction, "input": text_in, "output": text_out}
                line = json.dumps(record, ensure_ascii=False)
                chars += len(line)
                f.write(line + (",\n" if i < n - 1 else "\n"))
            f.write("]\n")
        os.replace(path.with_suffix(".tmp"), path)
        sizes[name] = n
    info = {"rows": sum(sizes.values()), "sets": sizes, "seed": seed, "scale": scale,
            "bytes": sum((out / f"{n}.json").stat().st_size for n in sizes), "seconds": round(time.time() - t0, 1)}
    done.write_text(json.dumps(info, indent=1))
    return info


# --- one measured run (in its own process) -------------------------------------------------

def _tree_memory(root: int) -> tuple:
    """(PSS, anonymous PSS) in bytes, summed over ``root`` and its descendants.

    PSS (proportional set size, /proc/PID/smaps_rollup) splits pages shared between processes
    (the forked workers share the parent's pages) among them, so the sum is the tree's real
    footprint; RSS would count shared pages once per process."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    pss = anon = 0
    todo = [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                elif line.startswith("Pss_Anon:"):
                    anon += int(line.split()[1]) * 1024
        except OSError:
            continue
    return pss, anon


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def measure(mode: str, data_dir: str, num_proc, packed: bool = False) -> dict:
    peak = {"rss": 0, "anon": 0}
    phase = {"name": "rows", "pack_rss": 0, "pack_anon": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            rss, anon = _tree_memory(os.getpid())
            peak["rss"], peak["anon"] = max(peak["rss"], rss), max(peak["anon"], anon)
            if phase["name"] == "pack":
                phase["pack_rss"], phase["pack_anon"] = max(phase["pack_rss"], rss), max(phase["pack_anon"], anon)
            stop.wait(0.05)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.time()
    from components.data import medical_meadow_mixture
    from components.data import pipeline
    from components.models import tiny_llama3_2_tokenizer

    tokenizer = tiny_llama3_2_tokenizer(max_seq_len=256)
    t_import = time.time() - t0
    t1 = time.time()
    settings = dict(
        data_dir=data_dir, template="medalpaca", train_on_input=True,
        holdout_fraction=0.1, holdout_seed=42, holdout="train", decontaminate=EVAL_SETS,
        cache=(mode != "uncached"), num_proc=num_proc,
    )
    ds = medical_meadow_mixture(tokenizer, **settings)
    t_build = time.time() - t1
    rows = ds
    pack = {}
    if packed:
        anon_before = _tree_memory(os.getpid())[1]
        phase["name"] = "pack"
        t3 = time.time()
        if mode in ("torchtune_packed", "uncached"):
            from torchtune.datasets import PackedDataset

            ds = PackedDataset(rows, max_seq_len=tokenizer.max_seq_len)
        else:
            ds = medical_meadow_mixture(tokenizer, packed=True, **settings)
        t_pack = time.time() - t3
        time.sleep(0.1)  # one more memory sample
        phase["name"] = "read"
        info = getattr(ds, "report", {}).get("packing", {})
        pack = {
            "packs": len(ds),
            "pack_s": round(t_pack, 2),
            "pack_anon_before_gib": round(anon_before / GIB, 3),
            "pack_peak_pss_gib": round(phase["pack_rss"] / GIB, 3),
            "pack_peak_pss_anon_gib": round(phase["pack_anon"] / GIB, 3),
            "pack_cache_hit": info.get("cache", {}).get("hit"),
            "pack_cache_gib": round(info.get("cache", {}).get("bytes", 0) / GIB, 3),
            "pack_fill": info.get("fill"),
        }
    # read items as a shuffled sampler would: READ_ITEMS random indices
    indices = random.Random(0).sample(range(len(ds)), min(READ_ITEMS, len(ds)))
    t2 = time.time()
    n_tokens = 0
    for i in indices:
        n_tokens += len(ds[i]["tokens"])
    t_read = time.time() - t2
    stop.set()
    import resource

    children_maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    report = rows.report
    return {
        "mode": mode,
        "packed": packed,
        "rows_in": report["rows"],
        "rows_out": len(rows),
        "build_s": round(t_build, 2),
        "import_s": round(t_import, 2),
        "process_s": round(time.time() - T_START, 2),
        "rows_per_s_build": round(report["rows"] / t_build),
        "read_items": len(indices),
        "items_per_s_read": round(len(indices) / t_read),
        "tokens_per_item": round(n_tokens / max(1, len(indices)), 1),
        "peak_tree_pss_gib": round(peak["rss"] / GIB, 3),
        "peak_tree_pss_anon_gib": round(peak["anon"] / GIB, 3),
        "parent_vmhwm_gib": round(_status("VmHWM") / GIB, 3),
        "largest_worker_maxrss_gib": round(children_maxrss / GIB, 3),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "cache_hit": report.get("cache", {}).get("hit"),
        "cache_dir": report.get("cache", {}).get("dir"),
        "cache_gib": round(report.get("cache", {}).get("bytes", 0) / GIB, 3),
        "skipped": report.get("skipped"),
        "decontamination_removed": report.get("decontamination", {}).get("removed"),
        "pipeline_version": pipeline.PIPELINE_VERSION,
        **pack,
    }


def run_child(mode: str, data_dir: str, cache_dir: str, num_proc, packed: bool = False) -> dict:
    env = {**os.environ, "MEDTUNE_CACHE_DIR": cache_dir, "OMP_NUM_THREADS": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env.setdefault("TIKTOKEN_CACHE_DIR", str(Path(cache_dir) / "tiktoken"))
    cmd = [sys.executable, __file__, "--child", mode, "--data-dir", data_dir]
    if num_proc is not None:
        cmd += ["--num-proc", str(num_proc)]
    if packed:
        cmd.append("--packed")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{mode} run failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="where the synthetic set files are (generated if missing)")
    parser.add_argument("--cache-dir", default=None, help="MEDTUNE_CACHE_DIR for the runs (default: a fresh temp dir)")
    parser.add_argument("--rows-scale", type=float, default=1.0, help="fraction of the study's 895,753 rows")
    parser.add_argument("--modes", nargs="+", default=["first", "cached"], choices=["first", "cached", "uncached", "torchtune_packed"])
    parser.add_argument("--num-proc", type=int, default=None)
    parser.add_argument("--packed", action="store_true", help="also pack to 256 tokens and measure that (see 4.)")
    parser.add_argument("--out", default=None, help="append results as JSON lines here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if "torchtune_packed" in args.modes and not args.packed:
        parser.error("mode torchtune_packed needs --packed")
    if args.child:
        result = measure(args.child, args.data_dir, args.num_proc, packed=args.packed)
        print("RESULT " + json.dumps(result), flush=True)
        return
    data_dir = Path(args.data_dir or Path(tempfile.gettempdir()) / f"medtune-bench-mix-{args.rows_scale:g}")
    t0 = time.time()
    info = generate(data_dir, scale=args.rows_scale)
    print(f"synthetic mix: {info['rows']:,} rows, {info['bytes'] / 2**20:,.0f} MiB in {data_dir} "
          f"({time.time() - t0:.0f} s; generated in {info['seconds']} s)", flush=True)
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="medtune-bench-cache-")
    print(f"cache: {cache_dir}; load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs", flush=True)
    results = []
    for mode in args.modes:
        result = run_child(mode, str(data_dir), cache_dir, args.num_proc, packed=args.packed)
        result["load_avg_after"] = round(os.getloadavg()[0], 2)
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **result}) + "\n")
    print("\n| run | rows in | rows out | build s | rows/s (build) | process s | items/s read | peak PSS GiB | peak anon GiB | load |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['mode']} | {r['rows_in']:,} | {r['rows_out']:,} | {r['build_s']} | {r['rows_per_s_build']:,} | "
              f"{r['process_s']} | {r['items_per_s_read']:,} | {r['peak_tree_pss_gib']} | "
              f"{r['peak_tree_pss_anon_gib']} | {r['load_avg_1m']} |")
    if args.packed:
        print("\n| run | rows packed | packs | pack s | peak PSS GiB (packing) | peak anon GiB (packing) | anon GiB before | packed cache GiB |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in results:
            print(f"| {r['mode']} | {r['rows_out']:,} | {r['packs']:,} | {r['pack_s']} | {r['pack_peak_pss_gib']} | "
                  f"{r['pack_peak_pss_anon_gib']} | {r['pack_anon_before_gib']} | {r['pack_cache_gib']} |")


if __name__ == "__main__":
    main()
