"""Long single-device runs survive kills, through the real `tune` CLI on the tiny model.

For full SFT, LoRA, QLoRA and KnowTuning stage 2 (DPO + SFT) with step checkpoints every
`SAVE_EVERY` steps (GaLore has the same tests in test_galore_recipe.py):
- an uninterrupted run keeps only the newest `KEEP_LAST` step folders, and what a step folder
  holds is what the recipe's header says;
- a run SIGKILLed (the whole process group, from outside) after a step checkpoint and resumed
  with `resume_from_checkpoint=True` logs exactly the uninterrupted run's losses after it
  (LoRA dropout included: the RNG state is part of the checkpoint);
- a run killed in the middle of writing a step checkpoint (weights written, recipe state not,
  nothing renamed) leaves the previous checkpoint as the newest resumable one, and resumes
  from it with the same losses;
- a NaN loss stops the run with an error naming the step and the last good checkpoint,
  exiting nonzero without a folder for that step.
"""

import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from components.checkpointing import RECIPE_STATE_FILE, resumable_checkpoints
from components.metric_logs import latest_log, step_losses
from tests.helpers import BIN, REPO_ROOT, header_command, kill_once_written, run_cli

STEPS = 8
SAVE_EVERY = 2
KEEP_LAST = 2
# Every method's tiny config, run by its header command, with shorter sequences where that
# keeps the loss meaningful and the run a few seconds.
METHODS = {
    "full_sft": ["tokenizer.max_seq_len=128"],
    "lora": ["tokenizer.max_seq_len=128"],
    "qlora": ["tokenizer.max_seq_len=128"],
    "knowtuning_kc": ["tokenizer.max_seq_len=256", "batch_size=2"],
}
EXPECTED_RECIPES = {
    "full_sft": "recipes/full_finetune_single_device.py",
    "lora": "recipes/lora_finetune_single_device.py",
    "qlora": "recipes/lora_finetune_single_device.py",
    "knowtuning_kc": "recipes/knowtuning_dpo_single_device.py",
}
ADAPTER_FILES = {"adapter_model.safetensors", "adapter_config.json", "adapter_model.pt"}
KC_SAMPLE = REPO_ROOT / "components" / "data" / "sample" / "knowtuning_medquad" / "medquad_test.json"


def killing_checkpointer(kill_in: str, inner: str, **kwargs: Any):
    """The checkpointer ``inner`` builds, in a process that SIGKILLs itself right after the
    checkpointer has written into the staging folder named ``kill_in`` (weights on disk, no
    recipe state, nothing renamed yet): a kill during a save, at a known point.

    Used as ``checkpointer._component_`` inside the `tune` process (imported from ``tests``).
    """
    from torchtune.config._utils import _get_component_from_path

    checkpointer = _get_component_from_path(inner)(**kwargs)
    save = checkpointer.save_checkpoint

    def save_then_die(*args: Any, **save_kwargs: Any) -> None:
        save(*args, **save_kwargs)
        if Path(checkpointer._output_dir).name == kill_in:
            os.kill(os.getpid(), signal.SIGKILL)

    checkpointer.save_checkpoint = save_then_die
    return checkpointer


@pytest.fixture(scope="module")
def kc_pairs(tmp_path_factory):
    """KnowTuning stage-2 pairs from the shipped MedQuAD sample (60 pairs)."""
    from components.cli import main

    out = tmp_path_factory.mktemp("kc") / "kc.jsonl"
    assert main(["knowtuning", "build-kc", "meadow:" + str(KC_SAMPLE), "--out", str(out)]) == 0
    return out


def command_for(method: str, output_dir: Path, kc_pairs: Path, *extra: str):
    """The config's header command for ``method``; KnowTuning's stage 2 starts from the untrained
    tiny checkpoint instead of a stage-1 run (the cheapest base: resume needs no stage 1)."""
    from components.models import tiny_checkpoint_dir
    from components.models.tiny import CHECKPOINT_FILE

    config = REPO_ROOT / "configs" / "tiny" / f"{method}.yaml"
    command = header_command(config)
    assert command[:3] == ["tune", "run", EXPECTED_RECIPES[method]]
    if method == "knowtuning_kc":
        extra = (
            f"checkpointer.checkpoint_dir={tiny_checkpoint_dir()}",
            f"checkpointer.checkpoint_files=[{CHECKPOINT_FILE}]",
            f"dataset.data_files={kc_pairs}",
            *extra,
        )
    return command[1:] + [
        f"output_dir={output_dir}",
        f"max_steps_per_epoch={STEPS}",
        f"save_every_n_steps={SAVE_EVERY}",
        f"keep_last_n_checkpoints={KEEP_LAST}",
        *METHODS[method],
        *extra,
    ]


def inner_checkpointer(method: str) -> str:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(REPO_ROOT / "configs" / "tiny" / f"{method}.yaml")
    return cfg.checkpointer._component_


@pytest.fixture(scope="module", params=sorted(METHODS))
def reference(request, tmp_path_factory, kc_pairs):
    """The uninterrupted run of each method: (method, output_dir, step -> loss)."""
    method = request.param
    output_dir = tmp_path_factory.mktemp(method)
    run_cli("tune", command_for(method, output_dir, kc_pairs))
    losses = step_losses(latest_log(output_dir))
    assert sorted(losses) == list(range(1, STEPS + 1))
    return method, output_dir, losses


def start(method: str, output_dir: Path, kc_pairs: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "tune"), *command_for(method, output_dir, kc_pairs, *extra)],
        cwd=REPO_ROOT,
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def assert_resumes_with_the_same_losses(method, output_dir, kc_pairs, expected, resumed_from):
    proc = run_cli("tune", command_for(method, output_dir, kc_pairs, "resume_from_checkpoint=True"))
    assert f"Resuming from {output_dir / f'step_{resumed_from}'}" in proc.stdout + proc.stderr
    resumed = step_losses(latest_log(output_dir))
    assert sorted(resumed) == list(range(resumed_from + 1, STEPS + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(expected[step], abs=1e-6), (step, resumed, expected)
    assert not list(output_dir.glob(".*.partial")), "a staging folder was left behind"


def test_step_folders_are_pruned_to_the_newest_and_hold_what_the_recipe_says(reference):
    method, output_dir, _ = reference
    # steps 2, 4, 6 were saved (8 is the epoch's end: epoch_0/); the newest KEEP_LAST stay
    assert sorted(p.name for p in output_dir.glob("step_*")) == ["step_4", "step_6"]
    assert [step for step, _ in resumable_checkpoints(output_dir)] == [4, 6]
    assert not list(output_dir.glob(".*"))
    files = {p.name for p in (output_dir / "step_6").iterdir()}
    if method == "full_sft":
        assert {"model-00001-of-00001.safetensors", "config.json", RECIPE_STATE_FILE} <= files
    else:  # the adapter only: a resume takes the base weights from the config's checkpoint
        assert files == ADAPTER_FILES | {RECIPE_STATE_FILE}
        assert (output_dir / "adapter" / "epoch_0" / "adapter_model.safetensors").is_file()
        assert not list((output_dir / "epoch_0").glob("adapter_*"))
    assert not (output_dir / "epoch_0" / RECIPE_STATE_FILE).exists(), "nothing follows the last epoch"
    state = torch.load(output_dir / "step_6" / RECIPE_STATE_FILE, weights_only=True)
    assert state["global_step"] == 6 and state["epochs_run"] == 0
    assert set(state["rng_state"]) >= {"torch", "python"}
    assert state["dataloader"] is not None and state["optimizer"]["state"]


def test_a_run_killed_after_a_step_checkpoint_resumes_with_the_same_losses(reference, tmp_path, kc_pairs):
    method, _, expected = reference
    output_dir = tmp_path / "killed"
    proc = start(method, output_dir, kc_pairs)
    kill_once_written(proc, output_dir / "step_4" / RECIPE_STATE_FILE)
    stopped = step_losses(latest_log(output_dir))
    newest = resumable_checkpoints(output_dir)[-1][0]
    assert max(stopped) < STEPS and newest < STEPS, "the run was not stopped before its end"
    assert_resumes_with_the_same_losses(method, output_dir, kc_pairs, expected, newest)


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_to_resume_from(reference, tmp_path, kc_pairs):
    method, _, expected = reference
    output_dir = tmp_path / "killed_saving"
    proc = run_cli(
        "tune",
        command_for(
            method,
            output_dir,
            kc_pairs,
            "checkpointer._component_=tests.test_resume_single_device.killing_checkpointer",
            f"checkpointer.inner={inner_checkpointer(method)}",
            "checkpointer.kill_in=.step_6.partial",
        ),
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    staged = output_dir / ".step_6.partial"
    assert staged.is_dir() and not (staged / RECIPE_STATE_FILE).exists()
    assert not (output_dir / "step_6").exists()
    assert [step for step, _ in resumable_checkpoints(output_dir)] == [2, 4]
    assert max(step_losses(latest_log(output_dir))) == 6
    assert_resumes_with_the_same_losses(method, output_dir, kc_pairs, expected, 4)


def test_a_nan_loss_stops_the_run_naming_the_step_and_the_last_good_checkpoint(reference, tmp_path, kc_pairs):
    method = reference[0]
    output_dir = tmp_path / "nan"
    # One AdamW step of 1e30 sends the weights past float32's range: the next loss is NaN or inf.
    proc = run_cli(
        "tune",
        command_for(method, output_dir, kc_pairs, "optimizer.lr=1e30", "save_every_n_steps=1"),
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    found = re.search(r"the training loss is (nan|inf|-inf) at step (\d+); stopping without saving", output)
    assert found, output[-3000:]
    bad = int(found.group(2))
    assert bad > 1
    last = output_dir / f"step_{bad - 1}"
    assert f"the last good checkpoint is {last} (step {bad - 1})" in output
    assert (last / RECIPE_STATE_FILE).is_file()
    assert not (output_dir / f"step_{bad}").exists() and not list(output_dir.glob(".*.partial"))
    assert max(step_losses(latest_log(output_dir))) == bad - 1
