"""A user's mistake in ``tune run recipes/<x>.py --config ...`` ends in one line and exit status 2,
never a traceback; ``medtune validate`` runs the same check as a command. Through the real ``tune``
and ``medtune`` CLIs, failing before the model is built wherever the mistake can be seen there."""

import json
import shutil
from pathlib import Path

from tests.helpers import REPO_ROOT, run_cli

SINGLE = "recipes/full_finetune_single_device.py"
CONFIG = "configs/tiny/full_sft.yaml"
SAMPLE = REPO_ROOT / "components" / "data" / "sample" / "medical_meadow"
#: A line torchtune's recipes log once the model is built: absent when the check stops the run first.
MODEL_BUILT = "Model is initialized"


def tune_run(args, tmp_path, cwd=None):
    proc = run_cli("tune", ["run", *args, f"output_dir={tmp_path / 'out'}"], cwd=cwd, check=False)
    return proc, proc.stdout + proc.stderr


def assert_one_line_error(proc, output, expected: str) -> str:
    """Exit status 2, no traceback, and a stderr line holding ``expected``; returns that line."""
    assert proc.returncode == 2, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    lines = [line for line in proc.stderr.splitlines() if expected in line]
    assert len(lines) == 1, proc.stderr[-4000:]
    return lines[0]


def test_a_missing_config_file_is_one_line(tmp_path):
    proc, output = tune_run([SINGLE, "--config", "configs/tiny/no_such.yaml"], tmp_path)
    line = assert_one_line_error(proc, output, "configs/tiny/no_such.yaml")
    assert line == "error: --config configs/tiny/no_such.yaml: no such file"


def test_a_bad_record_in_a_data_file_is_one_line_naming_file_and_record(tmp_path):
    data_dir = tmp_path / "medical_meadow"
    shutil.copytree(SAMPLE, data_dir)
    records = json.loads((data_dir / "cord19.json").read_text())
    records[3]["instruction"] = 5
    (data_dir / "cord19.json").write_text(json.dumps(records))
    proc, output = tune_run([SINGLE, "--config", CONFIG, f"dataset.data_dir={data_dir}"], tmp_path)
    line = assert_one_line_error(proc, output, "cord19.json")
    assert line == f"error: {data_dir / 'cord19.json'}: record 3: field 'instruction' must be a string, got int: 5"


def test_a_missing_data_folder_stops_the_run_before_the_model_is_built(tmp_path):
    missing = tmp_path / "absent"
    proc, output = tune_run([SINGLE, "--config", CONFIG, f"dataset.data_dir={missing}"], tmp_path)
    line = assert_one_line_error(proc, output, "dataset.data_dir")
    assert line == f"{CONFIG}: dataset.data_dir: {missing}: no such file or folder"
    assert MODEL_BUILT not in output


def test_an_unknown_template_names_the_templates_and_the_closest_before_start_up(tmp_path):
    proc, output = tune_run([SINGLE, "--config", CONFIG, "dataset.template=medalpacca"], tmp_path)
    line = assert_one_line_error(proc, output, "medalpacca")
    assert line == (
        f"{CONFIG}: dataset.template: unknown template 'medalpacca' (did you mean 'medalpaca'?); "
        "the templates are medalpaca, alpaca, llama3_chat"
    )
    assert MODEL_BUILT not in output


def test_outside_the_repository_root_the_error_says_paths_are_relative_to_it(tmp_path):
    """A folder with the project's recipes/ and configs/ (what `tune run recipes/x.py` needs to
    find them), but not its sample data: the shipped config's data paths do not resolve there."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("recipes", "configs"):
        (elsewhere / name).symlink_to(REPO_ROOT / name)
    proc, output = tune_run([SINGLE, "--config", CONFIG], tmp_path, cwd=elsewhere)
    line = assert_one_line_error(proc, output, "dataset.data_dir")
    assert "components/data/sample/medical_meadow: no such file or folder" in line
    assert f"current directory {elsewhere.resolve()}" in line
    assert f"relative to the repository root {REPO_ROOT}" in line
    assert MODEL_BUILT not in output


def test_a_data_error_on_distributed_workers_ends_with_the_line_and_a_failed_exit(tmp_path):
    """Under torchrun every rank prints the line (rank 0 plain, others prefixed); torchrun's launcher
    then adds its own ChildFailedError report, which medtune does not control."""
    data_dir = tmp_path / "medical_meadow"
    shutil.copytree(SAMPLE, data_dir)
    (data_dir / "mmmlu.json").write_text('[{"instruction": "q", "input": "", "output": "a"},\n{"instruction": ')
    proc, output = tune_run(
        ["--nproc_per_node", "2", "recipes/full_finetune_distributed.py", "--config", CONFIG, f"dataset.data_dir={data_dir}"],
        tmp_path,
    )
    assert proc.returncode != 0, output[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("error: ", "[rank 1] error: "))]
    assert errors and all(f"{data_dir / 'mmmlu.json'}:" in line for line in errors), proc.stderr[-4000:]
    assert any(line.startswith("error: ") for line in errors)


def test_medtune_validate_passes_a_shipped_config_for_the_recipes_its_header_names():
    proc = run_cli("medtune", ["validate", CONFIG])
    assert proc.stdout.strip() == (
        f"ok: {CONFIG} for recipes/full_finetune_single_device.py, recipes/full_finetune_distributed.py"
    )


def test_medtune_validate_lists_every_problem_and_exits_2():
    proc = run_cli(
        "medtune",
        ["validate", CONFIG, SINGLE, "batch_szie=4", "dataset.template=medalpacca", "dataset.data_dir=/nonexistent/mm"],
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    problems = [line for line in proc.stderr.splitlines() if line.startswith(f"{CONFIG}: ")]
    assert problems == [
        f"{CONFIG}: unknown key 'batch_szie' (did you mean 'batch_size'?): "
        "full_finetune_single_device.py does not read it, set on the command line",
        f"{CONFIG}: dataset.template: unknown template 'medalpacca' (did you mean 'medalpaca'?); "
        "the templates are medalpaca, alpaca, llama3_chat",
        f"{CONFIG}: dataset.data_dir: /nonexistent/mm: no such file or folder",
    ]
