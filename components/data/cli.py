"""``medtune data {stats,export,cache}``: read a data set named by ``SPEC = <kind>:<path or hub id>``.

Kinds: ``meadow:`` (a JSON/JSONL file, a set name such as ``wikidoc`` or a Hub id), ``medquad:``
(an XML folder or Hub id), ``usmle:`` (a folder) or ``mixture:`` (a folder of ``<set>.json``, or
``hub``). ``medtune data cache`` lists the data cache and removes unused caches
(``--remove-unused-days N``, ``--clear``). ``medtune knowtuning`` reuses :func:`load_spec` and
:func:`add_selection_options`.
"""

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

KINDS = ("meadow", "medquad", "usmle", "mixture")


def parse_spec(spec: str) -> Tuple[str, str]:
    """``(kind, location)`` from ``kind:location``."""
    kind, sep, location = spec.partition(":")
    if not sep or kind not in KINDS or not location:
        raise argparse.ArgumentTypeError(
            f"invalid SPEC {spec!r}: expected <kind>:<path or hub id> with kind one of {', '.join(KINDS)}"
        )
    return kind, location


def _name_value(text: str) -> Tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _set_amount(text: str) -> Tuple[str, Any]:
    name, _, value = text.partition("=")
    if not value:
        return name, None
    try:
        return name, float(value) if "." in value else int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--set {text!r}: the amount must be a number") from None


def load_spec(kind: str, location: str, args: argparse.Namespace) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """The records a SPEC names, after the optional holdout split and decontamination."""
    import datasets

    from components.data.instruct import holdout_split, load_instruction_rows
    from components.data.medical_meadow import MEDICAL_MEADOW_SETS, hub_id
    from components.data.medquad import load_medquad
    from components.data.mixture import load_mixture
    from components.data.usmle import read_usmle

    if kind == "usmle":
        if args.holdout_fraction is not None or args.decontaminate:
            raise ValueError("--holdout-fraction and --decontaminate apply to training data, not usmle:")
        return read_usmle(location)
    if kind == "medquad":
        rows, report = load_medquad(location)
        rows = [{"instruction": r["question"], "input": "", "output": r["answer"], **r} for r in rows]
    elif kind == "mixture":
        sets = dict(args.set) if args.set else None
        data, report = load_mixture(sets, data_dir=None if location == "hub" else location)
        rows = data.to_list()
    else:
        if Path(location).is_file():
            data, source = load_instruction_rows("json", data_files=location), location
        else:
            short = location.removeprefix("medical_meadow_")
            source = hub_id(short) if short in MEDICAL_MEADOW_SETS else location
            data = load_instruction_rows(source)
        rows, report = data.to_list(), {"source": source}
    report["rows"] = len(rows)
    if args.holdout_fraction is not None:
        part = holdout_split(datasets.Dataset.from_list(rows), args.holdout_fraction, args.holdout_seed, args.holdout)
        report["holdout"] = {
            "fraction": args.holdout_fraction,
            "seed": args.holdout_seed,
            "part": args.holdout,
            args.holdout: len(part),
            "train" if args.holdout == "validation" else "validation": len(rows) - len(part),
        }
        rows = part.to_list()
    if args.decontaminate:
        from components.data.decontaminate import decontaminate_records

        rows, report["decontamination"] = decontaminate_records(rows, dict(args.decontaminate), ngram=args.ngram)
    report["final"] = len(rows)
    return rows, report


def _print_stats(kind: str, rows: List[Dict[str, Any]], report: Dict[str, Any]) -> None:
    print(f"source: {report.get('source') or report.get('path')}")
    if kind == "usmle":
        for step, n in report["questions"].items():
            print(f"step {step}: {n} questions, {report['with_image'][step]} with an image")
        print(f"total: {report['total']} questions")
        for item in report["no_options"]:
            print(f"no options: step {item['step']} no. {item['no']}")
        for item in report["answer_not_in_options"]:
            print(f"answer not among the options: step {item['step']} no. {item['no']} (answer {item['answer']})")
        return
    if kind == "medquad":
        if "files" in report:
            print(f"files: {report['files']}")
        print(f"pairs: {report['pairs']}")
        print(f"answered: {report['answered']}")
        print(f"skipped (no answer): {report['skipped_no_answer']}")
        if report.get("old_schema", {}).get("files"):
            old = report["old_schema"]
            print(f"older <doc> schema: {old['files']} files, {old['pairs']} pairs")
        print("per collection (files, pairs, answered, skipped):")
        for name, c in report["collections"].items():
            print(f"  {name}: {c.get('files', '-')}, {c['pairs']}, {c['answered']}, {c['skipped_no_answer']}")
    elif kind == "mixture":
        print("per set (taken / available; study size):")
        for name, c in report["sets"].items():
            print(f"  {name}: {c['taken']} / {c['available']}; {c['study']}")
    print(f"rows: {report['rows']}")
    if "holdout" in report:
        h = report["holdout"]
        print(f"holdout: {h['train']} train / {h['validation']} validation (fraction {h['fraction']}, seed {h['seed']}); kept {h['part']}")
    if "decontamination" in report:
        d = report["decontamination"]
        print(f"decontamination ({d['ngram']}-grams): {d['removed']} of {d['checked']} removed")
        for name, n in d["removed_per_set"].items():
            print(f"  {name}: {n}")
            for ex in d["examples"][name]:
                print(f"    row {ex['index']} ~ {ex['eval_item']}: {ex['overlap'][:80]!r}")
    print(f"final: {report['final']}")
    if kind != "medquad":
        print(f"  with empty input: {sum(1 for r in rows if not r['input'])}")
        print(f"  with empty output: {sum(1 for r in rows if not r['output'].strip())}")
        for text, n in Counter(r["instruction"] for r in rows).most_common(3):
            print(f"  instruction x{n}: {text[:70]!r}")


def data_stats(args: argparse.Namespace) -> int:
    rows, report = load_spec(*args.spec, args)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print_stats(args.spec[0], rows, report)
    return 0


def data_export(args: argparse.Namespace) -> int:
    from components.data.templates import check_template, render_example

    kind, _ = args.spec
    if args.template is not None:
        check_template(args.template)
        if kind == "usmle":
            raise ValueError("--template applies to instruction data (meadow:, medquad:, mixture:), not usmle:")
    rows, report = load_spec(*args.spec, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            if args.template is not None:
                row = {**row, **render_example(args.template, row)}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} records to {out}")
    return 0


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def data_cache(args: argparse.Namespace) -> int:
    import time

    from components.data.cache_folders import list_cache, remove, select_for_removal
    from components.data.cache_store import data_cache_root

    if args.remove_unused_days is not None and args.remove_unused_days < 0:
        raise ValueError(f"--remove-unused-days must be 0 or more, got {args.remove_unused_days}")
    root = data_cache_root(args.cache_dir)
    folders = list_cache(root)
    print(f"cache: {root} ({len(folders)} folders, {_size(sum(f.bytes for f in folders))})")
    now = time.time()
    for f in folders:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(f.last_used))
        if f.building is not None:
            what = "build in progress" if f.building == "live" else "left by a killed build"
        else:
            rows = f"{f.rows:,} rows" if isinstance(f.rows, int) else "rows unknown"
            what = f"{rows}, {f.packed} packed; last used {used} ({(now - f.last_used) / 86400:.1f} days ago)"
        print(f"  {f.path.name}  {_size(f.bytes)}  {what}")
    chosen = select_for_removal(folders, args.remove_unused_days, args.clear)
    if not chosen:
        return 0
    if args.dry_run:
        for f in chosen:
            print(f"would remove {f.path.name} ({_size(f.bytes)})")
        print(f"would free {_size(sum(f.bytes for f in chosen))} (dry run: nothing removed)")
        return 0
    freed = remove(chosen)
    for f in chosen:
        print(f"removed {f.path.name} ({_size(f.bytes)})")
    print(f"freed {_size(freed)}; a run that needs a removed cache builds it again")
    return 0


def add_selection_options(parser: argparse.ArgumentParser, default_spec: Optional[str] = None) -> None:
    """SPEC and the options that choose records from it (also used by ``medtune knowtuning``)."""
    kinds = "<kind>:<path or hub id>, kind one of " + ", ".join(KINDS)
    if default_spec is None:
        parser.add_argument("spec", metavar="SPEC", type=parse_spec, help=kinds)
    else:
        parser.add_argument("spec", metavar="SPEC", nargs="?", type=parse_spec, default=parse_spec(default_spec),
                            help=f"{kinds} (default {default_spec}); a local JSON/JSONL file is meadow:<path>")
    parser.add_argument("--set", action="append", type=_set_amount, metavar="NAME[=AMOUNT]",
                        help="mixture: a set to include, with an optional row cap (int) or fraction (float); repeatable")
    parser.add_argument("--holdout-fraction", type=float, help="split off this fraction as validation (study: 0.1)")
    parser.add_argument("--holdout-seed", type=int, default=42, help="seed of the split (default 42)")
    parser.add_argument("--holdout", choices=("train", "validation"), default="train", help="side to keep (default train)")
    parser.add_argument("--decontaminate", action="append", type=_name_value, metavar="NAME=PATH",
                        help="remove overlaps with an evaluation set (usmle, medquad_test, medqa_test); repeatable")
    parser.add_argument("--ngram", type=int, default=13, help="n-gram length for --decontaminate (default 13)")


def add_data_command(subparsers: argparse._SubParsersAction) -> None:
    """``medtune data {stats,export,cache}``."""
    data = subparsers.add_parser("data", help="inspect and export data sets")
    actions = data.add_subparsers(dest="action", required=True, metavar="ACTION")
    stats = actions.add_parser("stats", help="print counts for a data set")
    add_selection_options(stats)
    stats.add_argument("--json", action="store_true", help="print the full report as JSON")
    stats.set_defaults(func=data_stats)
    export = actions.add_parser("export", help="write a data set as JSON Lines")
    add_selection_options(export)
    export.add_argument("--out", required=True, metavar="FILE.jsonl", help="output file")
    export.add_argument("--template", help="add the prompt rendered with medalpaca, alpaca or llama3_chat")
    export.set_defaults(func=data_export)
    cache = actions.add_parser(
        "cache", help="list the data cache (size, rows, last use) and remove what is unused",
        description="Lists the cached data sets (dataset: cache: True) and leftovers of killed builds; "
                    "--remove-unused-days or --clear also removes the leftovers. A removed cache is built "
                    "again by the next run that needs it.",
    )
    cache.add_argument("--cache-dir", help="the cache's root (default: $MEDTUNE_CACHE_DIR/data, else ~/.cache/medtune/data)")
    which = cache.add_mutually_exclusive_group()
    which.add_argument("--remove-unused-days", type=float, metavar="N", help="remove caches no run used in N days")
    which.add_argument("--clear", action="store_true", help="remove every cache")
    cache.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    cache.set_defaults(func=data_cache)
