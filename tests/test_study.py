"""`medtune study`: checked study files, resumable steps, failures contained, reports written."""

import json
import textwrap
from pathlib import Path

import pytest

from components.cli import main as medtune
from components.study.report import Cell, paired_difference, render_markdown
from components.study.runner import StudyRunner
from components.study.spec import StudyError, load_study
from tests.helpers import REPO_ROOT, kill_once_written, run_cli

WRITE = "import pathlib, sys; p = pathlib.Path(sys.argv[1]); p.write_text(str(p.stat().st_ino if p.exists() else 'new'))"
FAIL = "import sys; sys.exit(3)"


def write_study(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def command_study(tmp_path: Path, second: str = WRITE) -> Path:
    """Three command steps: a -> b (depends on a), and c on its own."""
    return write_study(
        tmp_path,
        f"""
        name: t
        output_dir: {tmp_path / 'out'}
        runs:
          a: {{command: [python, -c, "{WRITE}", "{{output_dir}}/a.txt"]}}
          b: {{command: [python, -c, "{second}", "{{output:a}}/from_b.txt"], depends_on: [a]}}
          c: {{command: [python, -c, "{WRITE}", "{{output_dir}}/c.txt"]}}
        """,
    )


def test_unknown_key_names_the_file_and_the_closest_valid_key(tmp_path):
    path = write_study(tmp_path, "name: t\nruns:\n  a: {recipe: r, config: c, overide: {}}\n")
    with pytest.raises(StudyError, match=r"study.yaml: runs.a: unknown key 'overide'; did you mean 'overrides'"):
        load_study(str(path))


def test_dependency_cycles_and_missing_runs_fail_before_any_work(tmp_path):
    cycle = write_study(
        tmp_path,
        "name: t\nruns:\n  a: {recipe: r, config: c, depends_on: [b]}\n  b: {recipe: r, config: c, depends_on: [a]}\n",
    )
    with pytest.raises(StudyError, match="cycle: a -> b -> a"):
        load_study(str(cycle))
    missing = write_study(tmp_path, "name: t\nruns:\n  a: {recipe: r, config: c}\nevaluations:\n  e: {tasks: [x], runs: [zz]}\n")
    with pytest.raises(StudyError, match="evaluations.e.runs: no run named 'zz'"):
        load_study(str(missing))


def test_the_shipped_study_files_load_and_dry_run(tmp_path):
    for path in sorted((REPO_ROOT / "configs" / "studies").glob("*.yaml")):
        spec = load_study(str(path))
        for run in spec.runs.values():
            if run.config:
                assert (REPO_ROOT / run.config).is_file(), f"{path.name}: {run.name}: {run.config}"
    proc = run_cli("medtune", ["study", "configs/studies/quickstart.yaml", "--dry-run", "--output-dir", str(tmp_path)])
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == f"tune run recipes/full_finetune_single_device.py --config configs/tiny/full_sft.yaml output_dir={tmp_path}/runs/full_sft"
    # stage 2 of KnowTuning starts from stage 1's folder
    assert any(f"checkpointer.checkpoint_dir={tmp_path}/runs/knowtuning_ka/epoch_2" in line for line in lines)
    # every evaluation names the very checkpoint folder it will read: the config's last epoch
    assert not [line for line in lines if "<" in line or ">" in line], "placeholders in a dry run"
    assert f"medtune eval {tmp_path}/runs/full_sft/epoch_0 --tasks usmle_step1," in proc.stdout
    assert f"medtune eval {tmp_path}/runs/knowtuning/epoch_2 --tasks medquad" in proc.stdout  # epochs: 3 override
    assert not (tmp_path / "runs").exists(), "a dry run must not run anything"
    paper = run_cli("medtune", ["study", "configs/studies/paper.yaml", "--dry-run", "--output-dir", str(tmp_path)]).stdout
    assert f"medtune eval {tmp_path}/runs/galore/epoch_0 --tasks usmle_step1_gen," in paper and "<" not in paper


def test_max_steps_stops_every_training_after_n_steps_of_one_epoch(tmp_path, capsys):
    """`--max-steps N` (a check of a study): each `tune run` gets max_steps_per_epoch=N epochs=1,
    so every later stage and evaluation reads epoch_0, KnowTuning's stage 2 included."""
    lines = StudyRunner(load_study("configs/studies/quickstart.yaml"), str(tmp_path), max_steps=1).dry_run()
    trainings = [line for line in lines if line.startswith("tune run")]
    assert len(trainings) == 6
    assert all(line.endswith(f"max_steps_per_epoch=1 epochs=1 output_dir={tmp_path}/runs/{line.split('/')[-1]}")
               for line in trainings)
    assert any(f"checkpointer.checkpoint_dir={tmp_path}/runs/knowtuning_ka/epoch_0 " in line for line in trainings)
    assert f"medtune eval {tmp_path}/runs/knowtuning/epoch_0 --tasks medquad" in lines[-1]
    with pytest.raises(SystemExit) as refused:
        medtune(["study", "configs/studies/quickstart.yaml", "--max-steps", "0", "--dry-run"])
    assert refused.value.code == 2 and "--max-steps: invalid positive value: '0'" in capsys.readouterr().err


@pytest.mark.slow
def test_quickstart_study_with_max_steps_runs_one_step_of_each_method(tmp_path):
    """The quickstart for real with `--max-steps 1`: every training logs exactly one step, every
    evaluation ran (the plumbing medtune study --max-steps gives a 3B check, benchmarks/shape_check.py)."""
    run_cli("medtune", ["study", "configs/studies/quickstart.yaml", "--max-steps", "1", "--output-dir", str(tmp_path)],
            timeout=1800)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert {step["status"] for step in manifest["steps"]} == {"done"}
    for step in manifest["steps"]:
        if step["step"].startswith("train/") and step.get("config"):
            assert step["config"]["max_steps_per_epoch"] == 1 and step["checkpoint"].endswith("epoch_0"), step["step"]


def test_dry_run_names_the_last_epoch_after_overrides(tmp_path):
    """`epochs` from the config (3 for KnowTuning's stage 1) or from the run's overrides gives the
    folder a later stage reads, `{checkpoint:RUN}` included."""
    path = write_study(
        tmp_path,
        f"""
        name: t
        output_dir: {tmp_path / 'out'}
        runs:
          ka: {{recipe: recipes/lora_finetune_single_device.py, config: configs/tiny/knowtuning_ka.yaml}}
          sft:
            recipe: recipes/full_finetune_single_device.py
            config: configs/tiny/full_sft.yaml
            overrides: {{epochs: 4}}
          next:
            command: [python, -c, "pass", "{{checkpoint:ka}}", "{{checkpoint:sft}}"]
            depends_on: [ka, sft]
        """,
    )
    lines = StudyRunner(load_study(str(path))).dry_run()
    out = tmp_path / "out" / "runs"
    assert lines[-1] == f"python -c pass {out / 'ka' / 'epoch_2'} {out / 'sft' / 'epoch_3'}"
    bad = write_study(tmp_path, path.read_text().replace("{epochs: 4}", "{epochs: many}"))
    with pytest.raises(ValueError, match=r"runs.sft: configs/tiny/full_sft.yaml sets epochs: 'many'"):
        StudyRunner(load_study(str(bad))).dry_run()
    proc = run_cli("medtune", ["study", str(bad), "--dry-run"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "epochs: 'many'" in proc.stderr


def test_finished_steps_are_skipped_and_changed_ones_rerun(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_study(str(command_study(tmp_path)))
    first = StudyRunner(spec).run(echo=lambda _: None)
    assert [o.status for o in first] == ["done", "done", "done"]
    again = StudyRunner(spec).run(echo=lambda _: None)
    assert [o.status for o in again] == ["skipped (up to date)"] * 3
    # changing a's command makes a new key for a and for b, which builds on it; c stays
    changed = load_study(str(command_study(tmp_path)))
    changed.runs["a"].command.append("--extra")
    statuses = {o.step.name: o.status for o in StudyRunner(changed).run(echo=lambda _: None)}
    assert statuses == {"train/a": "done", "train/b": "done", "train/c": "skipped (up to date)"}


def test_a_failed_step_skips_its_dependants_and_the_rest_go_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = command_study(tmp_path)
    path.write_text(path.read_text().replace(f'"{WRITE}", "{{output_dir}}/a.txt"', f'"{FAIL}"'))
    outcomes = StudyRunner(load_study(str(path))).run(echo=lambda _: None)
    statuses = {o.step.name: o.status for o in outcomes}
    assert statuses == {"train/a": "failed", "train/b": "skipped (needs train/a)", "train/c": "done"}
    assert json.loads((tmp_path / "out" / "runs" / "a" / "medtune_step.json").read_text())["status"] == "failed"
    again = {o.step.name: o.status for o in StudyRunner(load_study(str(path))).run(echo=lambda _: None)}
    assert again == {"train/a": "failed", "train/b": "skipped (needs train/a)", "train/c": "skipped (up to date)"}


NOISY_FAILURE = (
    "import sys\n"
    "print('Skipping import of cpp extensions due to incompatible torch version')\n"
    "for i in range(40): print(f'INFO:torchtune.utils._logging:setting up {i}')\n"
    "print('Traceback (most recent call last):')\n"
    "print('  File recipe.py, line 9, in <module>')\n"
    "print('ValueError: dataset.data_files: no such file x.jsonl')\n"
    "for i in range(30): print()\n"
    "sys.exit(2)\n"
)


def test_a_failed_step_prints_the_end_of_its_log_without_start_up_noise(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fail.py").write_text(NOISY_FAILURE)
    path = write_study(tmp_path, f"name: t\noutput_dir: {tmp_path / 'out'}\nruns:\n  a: {{command: [python, {tmp_path / 'fail.py'}]}}\n")
    printed: list = []
    outcomes = StudyRunner(load_study(str(path))).run(echo=printed.append)
    assert outcomes[0].status == "failed"
    text = "\n".join(printed)
    assert f"FAILED (exit code 2); log: {tmp_path / 'out' / 'runs' / 'a' / 'medtune_step.log'}" in text
    tail = [line for line in text.splitlines() if line.startswith("  | ")]
    assert tail[-1] == "  | ValueError: dataset.data_files: no such file x.jsonl"
    assert tail[0] == "  | Traceback (most recent call last):"
    assert not [line for line in tail if "INFO:" in line or "Skipping import" in line or not line[4:].strip()]


def test_log_tail_keeps_the_last_state_of_a_progress_bar_and_at_most_20_lines(tmp_path):
    from components.study.runner import log_tail

    log = tmp_path / "medtune_step.log"
    log.write_text("".join(f"line {i}\n" for i in range(50)) + "1|1|Loss: 7.9\r1|2|Loss: 7.5\r1|3|Loss: nan\n")
    assert log_tail(log) == [f"line {i}" for i in range(31, 50)] + ["1|3|Loss: nan"]
    assert log_tail(tmp_path / "missing.log") == []


def test_loss_plot_gives_dpo_its_own_panel_and_every_method_its_own_style(tmp_path):
    """Logs written by torchtune's own DiskLogger: three supervised methods (LoRA and QLoRA with
    the same losses, as on the tiny model) and KnowTuning's DPO stage."""
    from torchtune.training.metric_logging import DiskLogger

    from components.study.plots import loss_figure

    runs = {"Full SFT": [3.0, 2.5, 2.0], "LoRA": [3.0, 2.9, 2.8], "QLoRA": [3.0, 2.9, 2.8]}
    dirs = {}
    for label, losses in runs.items():
        dirs[label] = tmp_path / label
        logger = DiskLogger(log_dir=str(dirs[label] / "logs"))
        for step, loss in enumerate(losses, 1):
            logger.log_dict({"loss": loss, "lr": 1e-3}, step=step)
        logger.close()
    dirs["KnowTuning"] = tmp_path / "kt"
    logger = DiskLogger(log_dir=str(dirs["KnowTuning"] / "logs"))
    for step in (1, 2, 3):
        logger.log_dict({"loss": 2.1 - 0.1 * step, "loss/dpo": 0.69 - 0.05 * step, "loss/sft": 7.0}, step=step)
    logger.close()
    dirs["No log yet"] = tmp_path / "empty"

    fig = loss_figure(dirs)
    assert len(fig.axes) == 2
    sft_axis, dpo_axis = fig.axes
    sft_lines = {line.get_label(): line for line in sft_axis.get_lines()}
    labels = ["Full SFT", "LoRA", "QLoRA", "KnowTuning: SFT term (chosen answers)"]
    assert list(sft_lines) == labels
    styles = {(line.get_linestyle(), line.get_marker()) for line in sft_lines.values()}
    assert len(styles) == 4, "two curves share a line style and marker"
    assert list(sft_lines["LoRA"].get_ydata()) == list(sft_lines["QLoRA"].get_ydata())
    assert list(sft_lines[labels[-1]].get_ydata()) == [7.0] * 3  # the SFT term, not the total loss
    assert [t.get_text() for t in sft_axis.get_legend().get_texts()] == labels
    dpo_lines = {line.get_label(): line for line in dpo_axis.get_lines()}
    assert list(dpo_lines) == ["KnowTuning: DPO term", "ln 2 (policy = reference)"]
    assert list(dpo_lines["KnowTuning: DPO term"].get_ydata()) == pytest.approx([0.64, 0.59, 0.54])
    assert "Preference" in dpo_axis.get_title() and "Supervised" in sft_axis.get_title()

    only_sft = loss_figure({k: v for k, v in dirs.items() if k != "KnowTuning"})
    assert len(only_sft.axes) == 1 and len(only_sft.axes[0].get_lines()) == 3


def _sft_study(tmp_path: Path, name: str) -> Path:
    """One tiny full-SFT training of 8 steps with a step checkpoint every 2 steps."""
    folder = tmp_path / name
    folder.mkdir()
    return write_study(
        folder,
        f"""
        name: {name}
        output_dir: {folder / 'out'}
        runs:
          sft:
            recipe: recipes/full_finetune_single_device.py
            config: configs/tiny/full_sft.yaml
            overrides: {{max_steps_per_epoch: 8, save_every_n_steps: 2, keep_last_n_checkpoints: 2,
                         tokenizer.max_seq_len: 128}}
        """,
    )


def test_a_killed_study_resumes_its_training_from_the_last_step_checkpoint(tmp_path):
    """`medtune study` SIGKILLed (with its `tune run`) after a step checkpoint: the next call
    continues that training from the checkpoint, with the uninterrupted run's losses."""
    import subprocess

    from components.checkpointing import RECIPE_STATE_FILE
    from components.metric_logs import latest_log, step_losses
    from tests.helpers import BIN

    reference = _sft_study(tmp_path, "reference")
    run_cli("medtune", ["study", str(reference)])
    expected = step_losses(latest_log(tmp_path / "reference" / "out" / "runs" / "sft"))
    assert sorted(expected) == list(range(1, 9))

    study = _sft_study(tmp_path, "killed")
    run_dir = tmp_path / "killed" / "out" / "runs" / "sft"
    proc = subprocess.Popen([str(BIN / "medtune"), "study", str(study)], cwd=REPO_ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_once_written(proc, run_dir / "step_4" / RECIPE_STATE_FILE, "the study")
    marker = json.loads((run_dir / "medtune_step.json").read_text())
    assert marker["status"] == "running"
    newest = max(int(p.name[5:]) for p in run_dir.glob("step_*") if (p / RECIPE_STATE_FILE).is_file())
    assert newest < 8, "the training was not stopped before its end"

    planned = run_cli("medtune", ["study", str(study), "--dry-run"]).stdout.splitlines()
    assert planned[0].endswith(f"output_dir={run_dir} resume_from_checkpoint=True")  # as it will run
    out = run_cli("medtune", ["study", str(study)]).stdout
    assert f"train/sft: resuming the interrupted run from {run_dir / f'step_{newest}'}" in out
    assert f"train/sft: {planned[0]}" in out
    resumed = step_losses(latest_log(run_dir))
    assert sorted(resumed) == list(range(newest + 1, 9))
    for step, loss in resumed.items():
        assert loss == pytest.approx(expected[step], abs=1e-6), (step, resumed, expected)
    marker = json.loads((run_dir / "medtune_step.json").read_text())
    assert marker["status"] == "done" and marker["resumed_from"] == str(run_dir / f"step_{newest}")
    assert marker["command"][-1] == "resume_from_checkpoint=True"
    assert "up to date, skipped" in run_cli("medtune", ["study", str(study)]).stdout


def test_paired_difference_marks_noise_as_not_significant():
    base = {i: float(i % 2) for i in range(120)}
    same_but_one = {**base, 0: 1.0}
    diff, low, high = paired_difference(same_but_one, base)
    assert diff == pytest.approx(1 / 120) and low <= 0 <= high
    cell = Cell("usmle", "X", "x", "usmle_step1_gen", "acc", 0.5, 120, 0.4, 0.6, diff, low, high)
    assert cell.significant is False
    everything = {i: 1.0 for i in range(120)}
    assert Cell("usmle", "X", "x", "t", "acc", 1, 120, 1, 1, *paired_difference(everything, base)).significant


def test_report_layout_has_the_studys_tables(tmp_path):
    spec = load_study(str(REPO_ROOT / "configs" / "studies" / "quickstart.yaml"))
    cells = [
        Cell("usmle", "Baseline (untrained)", "baseline", "usmle_step1_gen", "acc", 0.25, 12, 0.0, 0.5),
        Cell("usmle", "Full SFT", "full_sft", "usmle_step1_gen", "acc", 0.5, 12, 0.25, 0.75, 0.25, -0.1, 0.6, 0.39),
    ]
    text = render_markdown(spec, cells)
    assert "| Method | Step 1 |" in text
    assert "| Full SFT | 0.500 [0.250, 0.750] (+0.250 n.s.); study 0.39 |" in text


def test_a_small_study_end_to_end_through_tune_and_lm_eval(tmp_path):
    """One real training and its evaluation beside the baseline's, then the report; a second
    call finds everything up to date."""
    out = tmp_path / "out"
    path = write_study(
        tmp_path,
        f"""
        name: small
        output_dir: {out}
        env:
          MEDTUNE_USMLE_DIR: components/data/sample/usmle
        baseline: {{checkpoint: tiny}}
        runs:
          full_sft:
            label: Full SFT
            recipe: full_finetune_single_device
            config: configs/tiny/full_sft.yaml
            overrides: {{max_steps_per_epoch: 4}}
        evaluations:
          usmle:
            table: usmle
            tasks: [usmle_step1, usmle_step3]
            runs: [baseline, full_sft]
        published:
          baseline: {{usmle_step1: {{acc: 0.39}}}}
        """,
    )
    planned = run_cli("medtune", ["study", str(path), "--dry-run"]).stdout.splitlines()
    first = run_cli("medtune", ["study", str(path)])
    assert "[3/3] eval/usmle/full_sft: done" in first.stdout
    table = (out / "results.md").read_text()
    assert "| Method | Step 1 | Step 3 |" in table
    baseline_row = next(line for line in table.splitlines() if line.startswith("| Baseline |"))
    assert "; study 0.39" in baseline_row
    sft_row = next(line for line in table.splitlines() if line.startswith("| Full SFT |"))
    assert sft_row.count("(") == 2, sft_row  # a difference to the baseline in each cell
    cells = json.loads((out / "results.json").read_text())
    assert {(c["run"], c["task"]) for c in cells} == {
        (r, t) for r in ("baseline", "full_sft") for t in ("usmle_step1", "usmle_step3")
    }
    assert all(c["n"] == 12 for c in cells)
    manifest = json.loads((out / "manifest.json").read_text())
    train = manifest["steps"][0]
    assert train["command"][:3] == ["tune", "run", "full_finetune_single_device"]
    assert train["seed"] == 42 and train["config"]["max_steps_per_epoch"] == 4
    assert train["peak_rss_mb"] > 100 and train["tokens_per_second"] > 0
    assert train["checkpoint"].endswith("runs/full_sft/epoch_0")
    assert manifest["packages"]["torchtune"] == "0.6.1"
    for name in ("loss.png", "usmle.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    # the model card names the data the evaluation recorded scoring: the shipped sample
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    pushed = run_cli("medtune", ["push", str(out / "runs" / "full_sft"), "--repo-id", "someone/x", "--dry-run"]).stdout
    (tmp_path / "README.md").write_text(pushed.split("----- README.md -----\n", 1)[1])
    _, scored = model_index_to_eval_results(ModelCard.load(tmp_path / "README.md").data.to_dict()["model-index"])
    assert {r.dataset_type for r in scored} == {"medtune-sample-usmle"}, [r.dataset_type for r in scored]
    # the dry run printed exactly the commands that ran; now it lists them as up to date
    assert planned == [" ".join(step["command"]) for step in manifest["steps"]]
    again = run_cli("medtune", ["study", str(path), "--dry-run"]).stdout.splitlines()
    assert again == [f"# up to date, skipped: {line}" for line in planned]
    second = run_cli("medtune", ["study", str(path)])
    assert second.stdout.count("up to date, skipped") == 3
