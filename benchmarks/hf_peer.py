"""The study's own training stack, reproduced, against our recipes: real tokens per second.

The peer is what the study ran: a Hugging Face `Trainer` with the study's settings where they
apply on a CPU (batch 4, gradient accumulation 6, lr 2e-5, weight decay 0.01, linear decay
without warmup, max_grad_norm 1.0, gradient checkpointing, AdamW "adamw_torch"; fp32 instead of
bf16), PEFT LoRA (r 32, alpha 32, dropout 0.05 on q/k/v/o), QLoRA (the same on a bitsandbytes
NF4 double-quantized base), and transformers' GaLore (`optim="galore_adamw"`, galore-torch).
Ours is the same training through our recipes: `tune run <recipe> --config configs/tiny/<m>.yaml`
with overrides that make the work identical (same optimizer steps, same sequences in the same
order, activation checkpointing on, lr 2e-5).

Same model weights (the tiny Llama 3.2 HF checkpoint, loaded by transformers on the peer's side
and by torchtune's HF checkpointer on ours), same token sequences (our medalpaca-template
builder's token lists, fed to the Trainer as input_ids/labels; BOS masked on both sides), same
padding (to the longest sequence of each micro-batch, as torchtune's collate does; `--peer-padding
max_length` pads the peer to 256 instead). Both run with one OpenMP thread.

Rates exclude start-up (imports, model load, tokenization): per optimizer step wall time, from
the Trainer's callbacks on the peer's side and from torchtune's per-step tokens_per_second_per_gpu
on ours; the first step (warm-up; GaLore's first SVD) is left out of the "steady" rate and kept in
the "all steps" rate. The whole process's wall time and peak RSS are recorded too.

    python benchmarks/hf_peer.py bench --methods full lora qlora galore --repeats 3 --out benchmarks/hf_peer_results.jsonl
    python benchmarks/hf_peer.py peer --method lora --json /tmp/peer.json      # one peer run
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

T_START = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import speed_common as sc  # noqa: E402

BATCH, ACCUM, LR = 4, 6, 2e-5
GALORE = dict(rank=16, update_proj_gap=200, scale=0.25, proj_type="std")
LORA = dict(r=32, lora_alpha=32, lora_dropout=0.05)
CHILD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TQDM_DISABLE": "1",
}


# ---------------------------------------------------------------- the peer (one process)
def config_dataset(config: str, model_dir: str, meadow_dir: str):
    """Tokenizer and training set of a 3B config exactly as `shape_check.py run` overrides it for
    our side (same tokenizer file, same local data), so both sides train on the same batches."""
    from omegaconf import OmegaConf
    from shape_check import overrides_for
    from torchtune import config as tt_config

    name = Path(config).stem
    cfg = OmegaConf.load(config)
    dotlist = overrides_for(name, Path(model_dir), Path(tempfile.mkdtemp()), "3b", "cpu", [], 1, Path(meadow_dir))
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([o for o in dotlist if o.startswith(("tokenizer.", "dataset."))]))
    tok = tt_config.instantiate(cfg.tokenizer)
    return cfg, tok, tt_config.instantiate(cfg.dataset, tok)


def run_peer(method: str, steps: int, padding: str, json_out: str, model_dir: str = None,
             device: str = "cpu", config: str = None, meadow_dir: str = None) -> None:
    """The study's Trainer stack on the tiny checkpoint (default), or on ``model_dir`` with the
    data, batch, accumulation, lr and GaLore settings of a 3B ``config`` (bf16 on CUDA)."""
    import torch

    if device == "cpu":
        torch.set_num_threads(1)
    import transformers
    from torch.utils.data import SequentialSampler
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from components.models import tiny_checkpoint_dir

    batch, accum, lr, galore, weight_decay = BATCH, ACCUM, LR, dict(GALORE), 0.01
    if model_dir is None:
        ckpt = tiny_checkpoint_dir()
        tok, ds = sc.dataset()
    else:
        ckpt = model_dir
        cfg, tok, ds = config_dataset(config, model_dir, meadow_dir)
        batch, accum = cfg.batch_size, cfg.gradient_accumulation_steps
        lr, weight_decay = float(cfg.optimizer.lr), float(cfg.optimizer.weight_decay)
        if method.startswith("galore"):
            galore.update({k: cfg.optimizer[k] for k in ("rank", "update_proj_gap", "scale", "proj_type")})
    n = steps * batch * accum
    if len(ds) < n:
        raise SystemExit(f"{steps} steps of {batch} x {accum} need {n} rows; the data has {len(ds)}")
    rows = []
    for i in range(n):
        s = ds[i]
        rows.append({
            "input_ids": [int(x) for x in s["tokens"]],
            "attention_mask": [1] * len(s["tokens"]),
            "labels": [int(x) for x in s["labels"]],
        })
    if model_dir is None:
        hf_tok = AutoTokenizer.from_pretrained(ckpt)
    else:  # `tune download`'s top-level tokenizer.json: the same package's Llama 3 BPE
        from importlib import resources

        from transformers import PreTrainedTokenizerFast

        from components.models.llama3_vocab import VOCAB_PACKAGE

        hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(resources.files(VOCAB_PACKAGE) / "tokenizer.json"))
    hf_tok.pad_token_id = tok.pad_id
    collator = DataCollatorForSeq2Seq(
        hf_tok,
        padding="max_length" if padding == "max_length" else True,
        max_length=sc.MAX_SEQ_LEN if padding == "max_length" else None,
        label_pad_token_id=-100,
        return_tensors="pt",
    )

    cuda = device.startswith("cuda")
    compute = torch.bfloat16 if cuda else torch.float32
    kwargs = {"dtype": compute}
    if cuda:
        kwargs["device_map"] = {"": device}
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(ckpt, **kwargs)
    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if method == "qlora":
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=True,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        model = get_peft_model(model, LoraConfig(
            **LORA, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            bias="none", task_type="CAUSAL_LM",
        ))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    extra = {}
    if method.startswith("galore"):
        extra = dict(
            optim="galore_adamw",
            optim_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            optim_args=", ".join(f"{k}={v}" for k, v in galore.items()),
        )
        if method == "galore_layerwise":
            extra["optim"] = "galore_adamw_layerwise"
    else:
        extra = dict(optim="adamw_torch")
    out_dir = tempfile.mkdtemp(prefix="hf_peer_")
    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1 if method == "galore_layerwise" else accum,
        learning_rate=lr,
        weight_decay=weight_decay,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=1.0,
        max_steps=steps,
        num_train_epochs=1,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=cuda,
        fp16=False,
        use_cpu=not cuda,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=42,
        **extra,
    )

    class Clock(TrainerCallback):
        def __init__(self):
            self.begin = None
            self.ends = []
            self.losses = {}

        def on_train_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses[state.global_step] = float(logs["loss"])

    class SequentialTrainer(Trainer):
        """The same sequences in the same order as our run (shuffle off on both sides)."""

        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    import datasets

    clock = Clock()
    trainer = SequentialTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
        data_collator=collator, processing_class=hf_tok, callbacks=[clock],
    )
    t_setup = time.perf_counter() - T_START
    t0 = time.perf_counter()
    trainer.train()
    t_train = time.perf_counter() - t0
    marks = [clock.begin] + clock.ends
    step_times = [b - a for a, b in zip(marks, marks[1:])]
    per_step = batch * args.gradient_accumulation_steps
    label_tokens = [sum(sum(1 for x in r["labels"] if x != -100) for r in rows[k * per_step:(k + 1) * per_step])
                    for k in range(len(step_times))]
    Path(json_out).write_text(json.dumps({
        "side": "peer", "method": method, "padding": padding, "steps": len(step_times),
        "step_times": step_times, "losses": clock.losses, "setup_s": t_setup,
        "train_call_s": t_train, "trainable_params": trainable, "label_tokens": label_tokens,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "transformers": transformers.__version__, "optim": args.optim,
    }))


# ---------------------------------------------------------------- the benchmark driver
def ours_overrides(method: str, steps: int, extra=()) -> list:
    o = sc.ac_checkpointer_overrides() + [
        "shuffle=False",
        f"batch_size={BATCH}",
        f"gradient_accumulation_steps={ACCUM}",
        f"max_steps_per_epoch={steps}",
        "enable_activation_checkpointing=True",
        f"optimizer.lr={LR}",
        "log_every_n_steps=1",
        "seed=42",
    ]
    if method.startswith("galore"):
        o += [f"optimizer.rank={GALORE['rank']}", f"optimizer.update_proj_gap={GALORE['update_proj_gap']}"]
    return o + list(extra)


def rates(step_times, counts, skip_first=1):
    real = [c["real"] for c in counts]
    steady = sum(real[skip_first:]) / sum(step_times[skip_first:])
    allr = sum(real) / sum(step_times)
    return steady, allr


def bench(a) -> None:
    counts = sc.step_counts(sc.unit_counts(packed=False), BATCH, ACCUM, a.steps)
    real_total = sum(c["real"] for c in counts)
    print(f"{a.steps} steps x {BATCH} x {ACCUM} sequences: {real_total} real tokens", flush=True)
    work = Path(tempfile.mkdtemp(prefix="peer_bench_"))
    out = open(a.out, "a") if a.out else None
    results = []
    for rep in range(a.first_repeat, a.first_repeat + a.repeats):
        for method in a.methods:
            sides = ["peer", "ours"] if rep % 2 == 0 else ["ours", "peer"]
            for side in sides:
                tag = f"{method}_{side}_{rep}"
                log = work / f"{tag}.log"
                rec = {"method": method, "side": side, "repeat": rep, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
                if side == "peer":
                    js = work / f"{tag}.json"
                    cmd = [sys.executable, __file__, "peer", "--method", method, "--steps", str(a.steps),
                           "--padding", a.peer_padding, "--json", str(js)]
                    proc = sc.run_child(cmd, CHILD_ENV, log_file=log)
                    rec.update(proc)
                    if proc["rc"] != 0 or not js.exists():
                        rec["error"] = sc.tail(log, 15)
                    else:
                        p = json.loads(js.read_text())
                        rec.update(step_times=p["step_times"], losses=p["losses"], setup_s=p["setup_s"],
                                   padding=a.peer_padding, trainable_params=p["trainable_params"])
                else:
                    od = work / tag
                    cmd = sc.ours_command(method, str(od), ours_overrides(method, a.steps))
                    proc = sc.run_child(cmd, CHILD_ENV, log_file=log)
                    rec.update(proc)
                    rec["command"] = " ".join(cmd[1:]).replace(str(od), "OUT")
                    if proc["rc"] != 0:
                        rec["error"] = sc.tail(log, 15)
                    else:
                        rec["step_times"] = sc.ours_step_times(str(od), counts)
                        rec["losses"] = {k: v.get("loss") for k, v in sc.step_metrics(sc.latest_log(Path(od))).items()}
                if "step_times" in rec:
                    if len(rec["step_times"]) != a.steps:
                        rec["error"] = f"{len(rec['step_times'])} steps, expected {a.steps}"
                    else:
                        rec["tps_steady"], rec["tps_all"] = rates(rec["step_times"], counts)
                        rec["train_s"] = sum(rec["step_times"])
                        rec["real_tokens"] = real_total
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items()
                                  if k not in ("step_times", "losses")}), flush=True)
                results.append(rec)
                if out:
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
    summarize(results, a.methods)


def summarize(results, methods) -> None:
    print("\n| method | peer tok/s (median) | ours tok/s (median) | ours / peer (median of per-repeat ratios) | "
          "peer peak RSS GiB | ours peak RSS GiB | step-1 loss peer / ours |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for m in methods:
        rows = {s: [r for r in results if r["method"] == m and r["side"] == s and "tps_steady" in r] for s in ("peer", "ours")}
        if not rows["peer"] or not rows["ours"]:
            errs = [r.get("error", "")[-300:] for r in results if r["method"] == m and "error" in r]
            print(f"| {m} | {'failed' if not rows['peer'] else ''} | {'failed' if not rows['ours'] else ''} | | | | {errs[:1]} |")
            continue
        ratios = []
        for rep in sorted({r["repeat"] for r in rows["peer"]} & {r["repeat"] for r in rows["ours"]}):
            p = next(r for r in rows["peer"] if r["repeat"] == rep)
            o = next(r for r in rows["ours"] if r["repeat"] == rep)
            ratios.append(o["tps_steady"] / p["tps_steady"])
        lp = rows["peer"][0]["losses"]
        lo = rows["ours"][0]["losses"]
        l1p = lp.get("1", lp.get(1))
        l1o = lo.get("1", lo.get(1))
        print(f"| {m} | {sc.median([r['tps_steady'] for r in rows['peer']]):.0f} | "
              f"{sc.median([r['tps_steady'] for r in rows['ours']]):.0f} | {sc.median(ratios):.2f} "
              f"({', '.join(f'{x:.2f}' for x in ratios)}) | "
              f"{sc.median([r['peak_rss_gib'] for r in rows['peer']]):.2f} | "
              f"{sc.median([r['peak_rss_gib'] for r in rows['ours']]):.2f} | {l1p} / {l1o} |")


#: gpu_check.sh's methods: (our 3B config, the peer's method; None: no peer, e.g. KnowTuning's DPO)
GPU_CHECK = {
    "full": ("full_sft", "full"),
    "lora": ("lora", "lora"),
    "qlora": ("qlora", "qlora"),
    "galore": ("galore", "galore"),
    "galore_layerwise": ("galore_layerwise", "galore_layerwise"),
    "knowtuning_kc": ("knowtuning_kc", None),
}


def peer_summary(peer: dict) -> dict:
    """Label tokens/s from step 2 on (as ours: step 1 holds warm-up), peak GPU memory, loss 1."""
    times, tokens = peer["step_times"][1:], peer["label_tokens"][1:]
    losses = peer["losses"]
    return {"tokens_per_s": sum(tokens) / sum(times) if times else None, "peak_gpu_gib": peer.get("peak_gpu_gib"),
            "loss_step1": losses.get("1", losses.get(1))}


def gpu_table(ours_jsonl: str, peer_dir: str) -> str:
    """One markdown table: per method, tokens/s and peak GPU memory of both sides, ours/peer,
    and the first step's loss on both sides (same weights, same batch: they should agree)."""
    ours = {r["config"]: r for r in (json.loads(x) for x in open(ours_jsonl) if x.strip())}
    fmt = lambda v, f="{:.1f}": "-" if v is None else f.format(v)  # noqa: E731
    lines = ["| method | config | steps | ours tok/s | peer tok/s | ours / peer | ours peak GPU GiB | peer peak GPU GiB | loss step 1 ours / peer | note |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for method, (config, peer_method) in GPU_CHECK.items():
        o = ours.get(config, {})
        peer_file = Path(peer_dir) / f"{peer_method}.json" if peer_method else None
        p = peer_summary(json.loads(peer_file.read_text())) if peer_file and peer_file.is_file() else {}
        if not o and not (peer_method and (Path(peer_dir) / f"{peer_method}.log").is_file()):
            continue  # not among the methods run
        note = o.get("error", "") if not o.get("ran", False) else ""
        if peer_method and not p:
            note += " peer failed: see its log" if (Path(peer_dir) / f"{peer_method}.log").is_file() else " peer not run"
        ratio = o["tokens_per_s"] / p["tokens_per_s"] if o.get("tokens_per_s") and p.get("tokens_per_s") else None
        lines.append(f"| {method} | {config} | {o.get('steps', '-')} | {fmt(o.get('tokens_per_s'))} | {fmt(p.get('tokens_per_s'))} | "
                     f"{fmt(ratio, '{:.2f}')} | {fmt(o.get('peak_gpu_gib'), '{:.2f}')} | {fmt(p.get('peak_gpu_gib'), '{:.2f}')} | "
                     f"{fmt(o.get('loss_step1'), '{:.4f}')} / {fmt(p.get('loss_step1'), '{:.4f}')} | {note.strip()[:200]} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench")
    b.add_argument("--methods", nargs="+", default=["full", "lora", "qlora", "galore"])
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--first-repeat", type=int, default=0, help="number of the first repeat (to add repeats to a file)")
    b.add_argument("--steps", type=int, default=11, help="optimizer steps (the sample's 285 rows hold 11 of 24)")
    b.add_argument("--peer-padding", choices=["longest", "max_length"], default="longest")
    b.add_argument("--out", default=None, help="append one JSON line per run")
    p = sub.add_parser("peer")
    p.add_argument("--method", required=True, choices=["full", "lora", "qlora", "galore", "galore_layerwise"])
    p.add_argument("--steps", type=int, default=11)
    p.add_argument("--padding", choices=["longest", "max_length"], default="longest")
    p.add_argument("--json", required=True)
    p.add_argument("--model-dir", default=None, help="an HF checkpoint (benchmarks/shape_check.py build); default: the tiny one")
    p.add_argument("--config", default=None, help="with --model-dir: the 3B config whose data and settings to use")
    p.add_argument("--meadow-dir", default=str(sc.ROOT / "components" / "data" / "sample" / "medical_meadow"))
    p.add_argument("--device", default="cpu")
    t = sub.add_parser("gpu-table", help="gpu_check.sh's table: shape_check results + peer JSONs")
    t.add_argument("ours_jsonl")
    t.add_argument("peer_dir")
    s = sub.add_parser("summarize", help="the table from a results JSONL")
    s.add_argument("jsonl")
    a = ap.parse_args()
    if a.cmd == "gpu-table":
        print(gpu_table(a.ours_jsonl, a.peer_dir))
        return
    if a.cmd == "summarize":
        rows = [json.loads(line) for line in open(a.jsonl) if line.strip()]
        summarize(rows, list(dict.fromkeys(r["method"] for r in rows)))
        for side in ("ours", "peer"):
            by = {(r["method"], r["repeat"]): r["tps_steady"] for r in rows if r["side"] == side and "tps_steady" in r}
            q = [by[("lora", k)] / by[("qlora", k)] for (m, k) in by if m == "lora" and ("qlora", k) in by]
            if q:
                print(f"{side}: QLoRA step time / LoRA step time (LoRA tok/s / QLoRA tok/s, same repeat) = "
                      f"{sc.median(q):.2f} ({', '.join(f'{x:.2f}' for x in q)})")
        return
    if a.cmd == "peer":
        run_peer(a.method, a.steps, a.padding, a.json, a.model_dir, a.device, a.config, a.meadow_dir)
    else:
        bench(a)


if __name__ == "__main__":
    main()
