"""``medtune knowtuning build-ka | build-kc | margin``: KnowTuning's data, and a check of stage 2.

``build-kc [SPEC] --out kc.jsonl`` writes the stage-2 preference pairs and prints, per negative
type, the pair count, the edits made and the chosen-vs-rejected length statistics.
``build-ka [SPEC] --config CFG --out ka.jsonl`` scores every fact by perplexity under the model
that the torchtune config ``CFG`` describes (its ``model``, ``checkpointer`` and ``tokenizer``;
stage 1's own config is the natural choice: the model before stage 1) and writes the originals
plus the hardest facts. ``margin --config CFG --pairs FILE --checkpoint DIR ...`` prints the mean
log-probability margin of chosen over rejected under each checkpoint (e.g. stage 1's, then
stage 2's).

SPEC is ``medtune data``'s ``<kind>:<path or hub id>`` (default ``medquad:lavita/MedQuAD``); a
local JSON/JSONL instruction file is ``meadow:<path>``. The data options (holdout split,
decontamination) are ``medtune data``'s.
"""

import argparse
import importlib
import json
from functools import partial
from typing import Any, Dict, List, Optional

from components.data.cli import add_selection_options, load_spec

DEFAULT_SPEC = "medquad:lavita/MedQuAD"
#: build-kc warns when the best length-only rule is right more often than this, over all pairs.
LENGTH_WARNING = 0.65


def load_rewriter(path: Optional[str]):
    """``module:attribute`` -> the callable it names (None for None)."""
    if path is None:
        return None
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"--rewriter must be module:function, got {path!r}")
    obj = getattr(importlib.import_module(module), attr)
    if not callable(obj):
        raise ValueError(f"--rewriter {path}: not callable")
    return obj


def _records(args: argparse.Namespace) -> List[Dict[str, Any]]:
    kind, location = args.spec
    if kind == "usmle":
        raise ValueError("KnowTuning needs long-answer QA records (medquad:, meadow:, mixture:), not usmle:")
    rows, report = load_spec(kind, location, args)
    print(f"source: {report.get('source') or report.get('path') or location}: {report['final']} records")
    empty = [i for i, r in enumerate(rows) if not r["output"].strip()]
    if empty:
        print(f"skipped {len(empty)} records with an empty answer")
        rows = [r for r in rows if r["output"].strip()]
    return rows


def _write(rows: List[Dict[str, Any]], out: str) -> None:
    from components.knowtuning.kc import write_jsonl

    n = write_jsonl(rows, out)
    print(f"wrote {n} rows to {out}")


def print_length_table(stats: Dict[str, Dict[str, Any]]) -> None:
    print(f"lengths in {next(iter(stats.values()))['unit'] if stats else 'words'} (chosen vs rejected):")
    print(f"  {'type':<13} {'pairs':>5} {'chosen':>8} {'rejected':>8} {'ratio':>6} {'shorter':>7} {'equal':>6} {'longer':>6} {'len-only acc':>12}")
    for name, s in stats.items():
        print(
            f"  {name:<13} {s['pairs']:>5} {s['chosen_mean']:>8.1f} {s['rejected_mean']:>8.1f} {s['ratio_mean']:>6.3f} "
            f"{s['rejected_shorter']:>7.1%} {s['rejected_equal']:>6.1%} {s['rejected_longer']:>6.1%} {s['length_only_accuracy']:>12.1%}"
        )


def build_kc(args: argparse.Namespace) -> int:
    from components.knowtuning.kc import build_kc_pairs, length_stats

    records = _records(args)
    pairs, report = build_kc_pairs(
        records,
        seed=args.seed,
        types=args.types,
        delete_ratio=args.delete_ratio,
        falsify_ratio=args.falsify_ratio,
        rewriter=load_rewriter(args.rewriter),
        falsifiers=args.falsifiers,
    )
    _write(pairs, args.out)
    report["length_chars"] = length_stats(pairs, unit="chars")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"items: {report['items']}, pairs: {report['pairs']} (seed {report['seed']})")
    for kind, n in report["pairs_per_type"].items():
        print(f"  {kind}: {n}")
    f = report["facts_per_item"]
    if f.get("n"):
        print(f"facts per answer: mean {f['mean']}, median {f['median']}, min {f['min']}, max {f['max']}")
    print("edits: " + ", ".join(f"{op} {n}" for op, n in report["edits"].items()))
    for s in report["skipped"]:
        print(f"  no {s['type']} negative for item {s['item']}: {s['reason']}")
    print_length_table(report["length"])
    print_length_table(report["length_chars"])
    overall = report["length"].get("all", {}).get("length_only_accuracy", 0.5)
    if overall > LENGTH_WARNING:
        print(
            f"warning: length alone tells rejected from chosen in {overall:.0%} of the pairs "
            f"(above {LENGTH_WARNING:.0%}); a model can learn length instead of knowledge. "
            "Lower --delete-ratio or balance the --types."
        )
    return 0


def build_ka(args: argparse.Namespace) -> int:
    from components.knowtuning.ka import build_ka_records
    from components.knowtuning.scoring import fact_perplexities, load_config, load_model

    records = _records(args)
    cfg = load_config(args.config, args.override or ())
    template = args.template or cfg.get("dataset", {}).get("template", "medalpaca")
    model, tokenizer = load_model(cfg, device=args.device, dtype=args.dtype)
    scorer = partial(fact_perplexities, model, tokenizer, template=template, batch_size=args.batch_size, device=args.device)
    rows, report = build_ka_records(
        records,
        scorer,
        top_fraction=args.top_fraction,
        include_original=not args.no_original,
        rewriter=load_rewriter(args.rewriter),
    )
    _write(rows, args.out)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"scored {report['candidate_facts']} facts of {report['items']} answers under {args.config} (template {template})")
    print(f"kept {report['hard_facts']} hard facts (top {args.top_fraction:.0%} by perplexity per answer) + {report['original_records']} original records = {report['rows']} rows")
    for name in ("perplexity_all", "perplexity_kept"):
        p = report[name]
        if p.get("n"):
            print(f"{name.replace('_', ' ')}: mean {p['mean']}, median {p['median']}, min {p['min']}, max {p['max']}")
    return 0


def margin(args: argparse.Namespace) -> int:
    from components.knowtuning.datasets import read_pairs
    from components.knowtuning.scoring import load_config, load_model, margin_report, preference_log_probs

    cfg = load_config(args.config, args.override or ())
    template = args.template or cfg.get("dataset", {}).get("template", "medalpaca")
    pairs = read_pairs(args.pairs)
    results = {}
    for checkpoint in args.checkpoint:
        model, tokenizer = load_model(cfg, checkpoint_dir=checkpoint, device=args.device, dtype=args.dtype)
        logps = preference_log_probs(model, tokenizer, pairs, template=template, batch_size=args.batch_size, device=args.device)
        results[checkpoint] = margin_report(pairs, logps)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"mean log p(chosen) - log p(rejected) on {len(pairs)} pairs of {args.pairs}:")
    for checkpoint, report in results.items():
        print(f"  {checkpoint}")
        for name, r in report.items():
            print(f"    {name:<13} {r['mean_margin']:>9.4f}  (chosen preferred in {r['chosen_preferred']:.0%} of {r['pairs']})")
    return 0


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    add_selection_options(parser, DEFAULT_SPEC)
    parser.add_argument("--out", required=True, metavar="FILE.jsonl", help="output file")
    parser.add_argument("--rewriter", metavar="MODULE:FUNCTION", help="a callable rewriter(task, text, context) -> str or None")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="torchtune YAML whose model, checkpointer and tokenizer to use")
    parser.add_argument("--override", "-O", action="append", metavar="KEY=VALUE", help="config override; repeatable")
    parser.add_argument("--template", help="prompt template (default: the config's dataset.template, else medalpaca)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="model precision (default fp32)")


def add_knowtuning_command(subparsers: argparse._SubParsersAction) -> None:
    """``medtune knowtuning {build-ka,build-kc,margin}``."""
    from components.knowtuning.disturb import FALSIFIERS
    from components.knowtuning.kc import NEGATIVE_TYPES

    parser = subparsers.add_parser("knowtuning", help="KnowTuning data (KA, KC) and margin check")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    kc = actions.add_parser("build-kc", help="stage-2 preference pairs (completeness, factuality, logicality)")
    _add_data_options(kc)
    kc.add_argument("--seed", type=int, default=42, help="seed of every random choice (default 42)")
    kc.add_argument("--types", nargs="+", choices=NEGATIVE_TYPES, default=list(NEGATIVE_TYPES), help="negatives to make (default all)")
    kc.add_argument("--delete-ratio", type=float, default=0.3, help="share of facts a completeness negative drops (default 0.3)")
    kc.add_argument("--falsify-ratio", type=float, default=0.3, help="share of facts a factuality negative changes (default 0.3)")
    kc.add_argument("--falsifiers", nargs="+", choices=sorted(FALSIFIERS), help="rule falsifiers to use (default all)")
    kc.set_defaults(func=build_kc)

    ka = actions.add_parser("build-ka", help="stage-1 records: originals + the hardest facts by perplexity")
    _add_data_options(ka)
    _add_model_options(ka)
    ka.add_argument("--top-fraction", type=float, default=0.5, help="share of each answer's facts kept (default 0.5)")
    ka.add_argument("--no-original", action="store_true", help="write only the fact records")
    ka.set_defaults(func=build_ka)

    mg = actions.add_parser("margin", help="mean log-prob margin of chosen over rejected under checkpoints")
    _add_model_options(mg)
    mg.add_argument("--pairs", required=True, help="a build-kc JSONL file")
    mg.add_argument("--checkpoint", action="append", required=True, metavar="DIR", help="HF checkpoint dir; repeatable")
    mg.add_argument("--json", action="store_true", help="print the results as JSON")
    mg.set_defaults(func=margin)
