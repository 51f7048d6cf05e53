"""``medtune eval`` and ``medtune score``.

``medtune eval CHECKPOINT_DIR --tasks usmle_gen,medquad`` evaluates a Hugging Face checkpoint
directory (any of ours: ``output_dir/epoch_N``) through lm-eval's ``hf`` model with medtune's
tasks: the short form of ``lm_eval --model hf --model_args pretrained=DIR --include_path
evals/tasks ...`` plus the standard errors, bootstrap intervals and the output files of
:mod:`components.evaluation.runner`. ``--adapter DIR`` applies a PEFT adapter
(``output_dir/adapter/epoch_N``) to a base checkpoint instead. For a torchtune model in process
(LoRA/QLoRA adapters on their NF4 base included) use ``tune run recipes/eleuther_eval.py``.

``medtune score TASK FILE`` scores stored generations (the study's, an API's) with the same task
and metric code, through the ``replay`` model: e.g. ``medtune score usmle_step1_gen
stepN_Llama-3.2-3B.json --usmle-dir ../shared/data/usmle``.
"""

import argparse
import difflib
import json
from pathlib import Path
from typing import Any, Dict, List


def _metadata(args: argparse.Namespace) -> Dict[str, Any]:
    meta: Dict[str, Any] = dict(json.loads(args.metadata)) if args.metadata else {}
    if args.usmle_dir:
        meta["usmle_dir"] = str(Path(args.usmle_dir).resolve())
    if args.no_images:
        meta["include_images"] = False
    if args.medquad_test:
        meta["medquad_test"] = args.medquad_test if "://" in args.medquad_test else str(Path(args.medquad_test).resolve())
    if args.bertscore_model:
        meta["bertscore_model"] = args.bertscore_model
    if args.bertscore_num_layers is not None:
        meta["bertscore_num_layers"] = args.bertscore_num_layers
    return meta


def _report(results: Dict[str, Any], args: argparse.Namespace) -> int:
    from lm_eval.utils import make_table

    from components.evaluation.runner import format_summary

    if not results:
        return 1
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    for name, report in results["medtune"]["data_reports"].items():
        notes = []
        if report.get("excluded_no_options"):  # USMLE's reports; MedQuAD's names its file alone
            notes.append(f"left out (no options): {report['excluded_no_options']}")
        if report.get("excluded_images"):
            notes.append(f"left out (image): {len(report['excluded_images'])}")
        if report.get("repaired"):
            notes.append("repaired: " + "; ".join(f"no. {r['no']}: {r['what']}" for r in report["repaired"]))
        if notes:
            print(f"{name}: {report['scored']} of {report['questions']} questions scored; " + "; ".join(notes))
    print("Every score with its standard error and 95% bootstrap interval:")
    print(format_summary(results["medtune"]["summary"]))
    if args.output_dir:
        print(f"results: {Path(args.output_dir) / 'results.json'}; per-sample outputs: {Path(args.output_dir) / 'samples'}")
    return 0


def generation_tasks() -> List[str]:
    """medtune's tasks ``medtune score`` can replay: the generation ones."""
    from components.evaluation.runner import medtune_task_names

    return sorted(n for n in medtune_task_names() if n.endswith("_gen") or n == "medquad")


def check_tasks(tasks: str, include_path, generation_only: bool = False) -> List[str]:
    """The requested task names, or a ValueError naming an unknown one, the closest known name and
    medtune's tasks (checked before any model loads); with ``generation_only`` (``medtune score``)
    medtune's log-likelihood tasks are refused too."""
    from components.evaluation.runner import medtune_task_names, split_tasks, task_manager

    names = split_tasks(tasks)
    ours = medtune_task_names()
    unknown = [n for n in names if n not in ours]
    if unknown:
        known = set(task_manager(include_path, None, names).all_tasks)
        for name in unknown:
            if name not in known:
                close = difflib.get_close_matches(name, sorted(ours | known), n=1)
                raise ValueError(
                    f"unknown task {name!r}{f' (closest: {close[0]})' if close else ''}; medtune's tasks: "
                    f"{', '.join(sorted(ours))}; lm-eval's own: lm_eval ls tasks"
                )
    if generation_only:
        for name in names:
            if name in ours and name not in generation_tasks():
                raise ValueError(
                    f"{name!r} scores log-likelihoods (multiple choice), which need the model itself: medtune "
                    f"score replays stored generations, so it takes the generation tasks: "
                    f"{', '.join(generation_tasks())} (or run medtune eval on the checkpoint)"
                )
    return names


def check_device(device: str) -> None:
    """Refuse a CUDA device on a machine without one, in words (lm-eval would assert)."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA GPU is visible to torch here; use --device cpu")


def eval_command(args: argparse.Namespace) -> int:
    check_tasks(args.tasks, args.include_path)
    check_device(args.device)

    from lm_eval.models.huggingface import HFLM

    from components.evaluation.runner import run_tasks

    ckpt = Path(args.checkpoint_dir)
    if not (ckpt / "config.json").is_file():
        raise FileNotFoundError(f"{ckpt}: not a Hugging Face checkpoint directory (no config.json)")
    if (ckpt / "adapter_config.json").is_file() and any(ckpt.glob("*.safetensors")) and not args.adapter:
        raise ValueError(
            f"{ckpt} holds merged weights and adapter_* files: transformers would apply the adapter on "
            "top of weights that already contain it. Move the adapter_* files to their own folder "
            "(medtune's LoRA recipe writes them to output_dir/adapter/epoch_N)."
        )
    lm = HFLM(
        pretrained=str(ckpt),
        peft=args.adapter,
        device=args.device,
        batch_size=args.batch_size,
        dtype=args.dtype,
        max_length=args.max_length,
    )
    results = run_tasks(
        lm, args.tasks, output_dir=args.output_dir, limit=args.limit, metadata=_metadata(args),
        include_path=args.include_path, gen_kwargs=args.gen_kwargs,
    )
    return _report(results, args)


def score_command(args: argparse.Namespace) -> int:
    check_tasks(args.task, args.include_path, generation_only=True)

    from components.evaluation.replay import ReplayLM
    from components.evaluation.runner import run_tasks

    lm = ReplayLM(path=args.file, missing="empty" if args.allow_missing else "error")
    try:
        results = run_tasks(
            lm, args.task, output_dir=args.output_dir, limit=args.limit, metadata=_metadata(args),
            include_path=args.include_path,
        )
    except NotImplementedError as e:  # a log-likelihood task from another --include-path folder
        raise ValueError(f"{args.task}: {e}") from None
    return _report(results, args)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", help="write results.json and samples/<task>.jsonl here")
    parser.add_argument("--limit", type=float, help="only the first N documents per task (or a fraction < 1)")
    parser.add_argument("--usmle-dir", help="local USMLE folder (step1.json, ...); default $MEDTUNE_USMLE_DIR, else the Hub")
    parser.add_argument("--no-images", action="store_true", help="leave out the USMLE questions that refer to an image")
    parser.add_argument("--medquad-test", help="local KnowTuning medquad_test.json (or URL); default $MEDTUNE_MEDQUAD_TEST")
    parser.add_argument("--bertscore-model", help="BERTScore model id or local folder (default microsoft/deberta-xlarge-mnli; 'none' skips it)")
    parser.add_argument("--bertscore-num-layers", type=int, help="BERTScore layer, needed for models bert_score does not list")
    parser.add_argument("--metadata", help="more task arguments as JSON, as lm_eval --metadata")
    parser.add_argument("--include-path", action="append", help="more lm-eval task folders (evals/tasks is always included)")


def add_eval_command(subparsers: argparse._SubParsersAction) -> None:
    """``medtune eval CHECKPOINT_DIR --tasks ...``."""
    p = subparsers.add_parser("eval", help="evaluate a Hugging Face checkpoint directory on lm-eval tasks")
    p.add_argument("checkpoint_dir", metavar="CHECKPOINT_DIR")
    p.add_argument("--tasks", required=True, help="comma-separated tasks or groups (usmle, usmle_gen, medquad, medical_study, ...)")
    p.add_argument("--adapter", help="a PEFT adapter folder to apply to CHECKPOINT_DIR")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0 ... (default cpu)")
    p.add_argument("--dtype", default="auto", help="model dtype (default: the checkpoint's)")
    p.add_argument("--batch-size", default="8", help="batch size or 'auto' (default 8)")
    p.add_argument("--max-length", type=int, help="context length (default: the model's)")
    p.add_argument("--gen-kwargs", help="override generation settings, e.g. max_gen_toks=64")
    _add_common(p)
    p.set_defaults(func=eval_command)


def add_score_command(subparsers: argparse._SubParsersAction) -> None:
    """``medtune score TASK FILE``."""
    p = subparsers.add_parser("score", help="score stored generations with a generation task (replay)")
    p.add_argument("task", metavar="TASK", help="a generation task or group: usmle_step1_gen, usmle_gen, medquad, ...")
    p.add_argument("file", metavar="FILE", help="stored generations (JSON list or JSON Lines)")
    p.add_argument("--allow-missing", action="store_true", help="score documents without a stored generation as unanswered")
    _add_common(p)
    p.set_defaults(func=score_command)
