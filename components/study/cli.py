"""`medtune study FILE [--output-dir DIR] [--only RUN ...] [--max-steps N] [--dry-run]`."""

import sys


def study(path: str, output_dir: str = None, only=None, dry_run: bool = False, max_steps: int = None) -> int:
    """Run (or with `dry_run`, list) every step of a study, then write its report."""
    # here, not at the top: the runner and plots import torch and matplotlib (medtune --help stays fast)
    from components.study.manifest import write_manifest
    from components.study.plots import plot_losses, plot_table
    from components.study.report import collect, write_report
    from components.study.runner import StudyRunner
    from components.study.spec import StudyError, load_study

    try:
        spec = load_study(path)
        runner = StudyRunner(spec, output_dir, only, max_steps)
    except (StudyError, ValueError) as error:
        print(f"medtune study: {error}", file=sys.stderr)
        return 2
    if dry_run:
        try:
            print("\n".join(runner.dry_run()))
        except ValueError as error:
            print(f"medtune study: {error}", file=sys.stderr)
            return 2
        return 0
    print(f"study {spec.name}: {len(runner.steps)} steps into {runner.root}", flush=True)
    try:
        outcomes = runner.run(echo=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print("\ninterrupted: finished steps are kept and will be skipped next time", file=sys.stderr)
        return 130
    write_manifest(runner, outcomes)
    cells = collect(spec, runner.root)
    files = write_report(spec, runner.root, cells)
    plots = runner.root / "plots"
    plots.mkdir(exist_ok=True)
    trained = {spec.runs[o.step.run].label: o.step.output_dir for o in outcomes if o.step.kind == "train"}
    plot_losses(trained, plots / "loss.png")
    for table, title in (("usmle", "USMLE accuracy"), ("medquad", "MedQuAD")):
        chosen = [c for c in cells if c.table == table and c.value is not None]
        if chosen:
            plot_table(chosen, title, plots / f"{table}.png")
    failed = [o for o in outcomes if o.status == "failed" or o.status.startswith("skipped (needs")]
    print("\n" + files[0].read_text())
    print(f"written: {', '.join(str(f) for f in files)}, {runner.root / 'manifest.json'}, {plots}/")
    if failed:
        print(f"{len(failed)} step(s) failed or were skipped: "
              + ", ".join(f"{o.step.name} ({o.status})" for o in failed), file=sys.stderr)
        return 1
    return 0


def add_study_command(subparsers) -> None:
    parser = subparsers.add_parser("study", help="run a whole study from one YAML file")
    parser.add_argument("file", help="the study file, e.g. configs/studies/quickstart.yaml")
    parser.add_argument("--output-dir", help="where everything goes (default: the file's output_dir)")
    parser.add_argument("--only", nargs="+", metavar="RUN", help="run only these runs (and what they need)")
    parser.add_argument("--max-steps", type=positive, metavar="N",
                        help="a check of the study: every training stops after N optimizer steps of one epoch")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.set_defaults(func=lambda a: study(a.file, a.output_dir, a.only, a.dry_run, a.max_steps))


def positive(text: str) -> int:
    """A whole number >= 1, for argparse (which turns the ValueError into one usage line)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value
