"""``medtune eval``/``score`` mistakes end in one line and exit status 2, checked before any model
loads; lm_eval on the USMLE tasks without data names the environment variable and --metadata."""

import os
import subprocess

import pytest
import torch

from components.cli import main
from components.evaluation.bertscore import DEFAULT_MODEL, MINILM_ALIAS, _scorer
from tests.helpers import BIN, REPO_ROOT


def one_line_error(capsys, *argv) -> str:
    code = main(list(argv))
    _, err = capsys.readouterr()
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("medtune: error: ")
    return line


def test_eval_names_an_unknown_task_and_the_closest_before_loading_the_model(capsys, tmp_path):
    # tmp_path is no checkpoint: a model load would fail with "no config.json" instead
    line = one_line_error(capsys, "eval", str(tmp_path), "--tasks", "usmle_stp1")
    assert "unknown task 'usmle_stp1' (closest: usmle_step1)" in line
    assert "usmle_step1_gen" in line and "medquad" in line


def test_score_names_an_unknown_task(capsys, tmp_path):
    line = one_line_error(capsys, "score", "medquadd", str(tmp_path / "generations.json"))
    assert "unknown task 'medquadd' (closest: medquad)" in line


def test_score_refuses_a_log_likelihood_task_and_names_the_generation_tasks(capsys, tmp_path):
    line = one_line_error(capsys, "score", "usmle_step1", str(tmp_path / "generations.json"))
    assert "'usmle_step1' scores log-likelihoods" in line
    assert "replays stored generations" in line
    assert "medquad, usmle_gen, usmle_step1_gen, usmle_step2_gen, usmle_step3_gen" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_eval_on_cuda_without_a_gpu(capsys, tmp_path):
    line = one_line_error(capsys, "eval", str(tmp_path), "--tasks", "usmle_step1", "--device", "cuda")
    assert "--device cuda: no CUDA GPU is visible" in line and "--device cpu" in line


def test_unreachable_default_bertscore_model_names_the_offline_choice():
    with pytest.raises(OSError) as caught:  # the tests run with the Hub switched off
        _scorer(DEFAULT_MODEL, 40, 8)
    message = str(caught.value)
    assert DEFAULT_MODEL in message and f"--bertscore-model {MINILM_ALIAS}" in message


def test_lm_eval_usmle_without_data_names_the_env_var_and_metadata_last(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MEDTUNE_USMLE_DIR"}
    proc = subprocess.run(
        [str(BIN / "lm_eval"), "--model", "dummy", "--include_path", "evals/tasks", "--tasks", "usmle_step1",
         "--limit", "1", "--output_path", str(tmp_path)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]  # lm_eval prints its traceback above our message
    assert last.startswith("OSError: no local USMLE questions")
    assert "MEDTUNE_USMLE_DIR=" in last and """--metadata '{"usmle_dir": """ in last
