"""Step checkpoints, kills and exact resume of the distributed recipes (2 CPU processes, gloo).

Every run goes through the real `tune run --nproc_per_node 2` on configs/tiny/*.yaml. A run is
killed with SIGKILL (tune/torchrun's process group, and both ranks: torchrun starts each worker in
a session of its own, so killing the group alone leaves them training), then resumed with
`resume_from_checkpoint=True`; every step after the checkpoint it resumed from must log exactly the
loss of an uninterrupted run (same seed, same float32 arithmetic on the CPU). One reference run
per recipe is shared by the tests of this module.
"""

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict

import psutil
import pytest
import torch

from components.checkpointing import (
    find_resume_dir,
    GLOBAL_STEP_KEY,
    load_recipe_state,
    resumable_checkpoints,
    STAGING_SUFFIX,
)
from components.metric_logs import latest_log, step_losses
from tests.helpers import BIN, REPO_ROOT, run_cli
from tests.test_recipes_distributed import files_under

# Two epochs of 5 steps (2 processes x batch 2), a step checkpoint every 3 steps (steps 3, 6, 9;
# step 6 is the first of the second epoch), the newest 2 kept; the recipes' own epoch folders too.
EPOCHS, STEPS_PER_EPOCH, EVERY, KEEP = 2, 5, 3, 2
STEPS = EPOCHS * STEPS_PER_EPOCH
SETTINGS = [
    f"epochs={EPOCHS}",
    f"max_steps_per_epoch={STEPS_PER_EPOCH}",
    "batch_size=2",
    "tokenizer.max_seq_len=128",
    "log_every_n_steps=1",
    f"save_every_n_steps={EVERY}",
    f"keep_last_n_checkpoints={KEEP}",
]
RUN_TIMEOUT = 600
STEP_DIR = re.compile(r"step_(\d+)")
STAGING_DIR = re.compile(r"\.step_(\d+)" + re.escape(STAGING_SUFFIX))


def tune_args(recipe: str, config: str, out: Path, *overrides: str):
    return [
        "run", "--nproc_per_node", "2", f"recipes/{recipe}.py", "--config", config,
        f"output_dir={out}", *SETTINGS, *overrides,
    ]


def step_folders(out: Path) -> Dict[int, Path]:
    """The complete step_N folders of a run (staging folders start with a dot)."""
    return {
        int(m.group(1)): p
        for p in out.iterdir()
        if (m := STEP_DIR.fullmatch(p.name)) and p.is_dir()
    }


def kill_run(proc: subprocess.Popen) -> None:
    """SIGKILL a `tune run` and every process under it, the workers first (their own sessions)."""
    for worker in psutil.Process(proc.pid).children(recursive=True):
        worker.kill()
    os.killpg(proc.pid, signal.SIGKILL)


def run_until(
    recipe: str, config: str, out: Path, stop: Callable[[Path], bool], *overrides: str
) -> None:
    """Start a run and SIGKILL all its processes as soon as ``stop(out)`` holds."""
    out.mkdir(parents=True)
    with open(out.parent / f"{out.name}.console.txt", "w") as console:
        proc = subprocess.Popen(
            [str(BIN / "tune"), *tune_args(recipe, config, out, *overrides)],
            cwd=REPO_ROOT,
            env=dict(os.environ),
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + RUN_TIMEOUT
        try:
            while not stop(out):
                if proc.poll() is not None:
                    raise AssertionError(
                        f"the run ended (exit {proc.returncode}) before it could be killed:\n"
                        + (out.parent / f"{out.name}.console.txt").read_text()[-6000:]
                    )
                if time.monotonic() > deadline:
                    raise AssertionError("the run never reached the point to kill it at")
                time.sleep(0.002)
        finally:
            if proc.poll() is None:
                kill_run(proc)
            proc.wait()


def resume(recipe: str, config: str, out: Path, *overrides: str) -> Dict[int, float]:
    """Resume a killed run to its end; the losses it logged, by step."""
    run_cli("tune", tune_args(recipe, config, out, "resume_from_checkpoint=True", *overrides),
            timeout=RUN_TIMEOUT)
    return step_losses(latest_log(out))


def assert_resumed_exactly(resumed: Dict[int, float], reference: Dict[int, float], start: int):
    """Steps start+1..STEPS were run after resuming, each with the uninterrupted run's loss."""
    assert sorted(resumed) == list(range(start + 1, STEPS + 1)), (start, resumed)
    assert resumed == {step: reference[step] for step in resumed}, (resumed, reference)


def check_pruned_and_complete(out: Path) -> None:
    """keep_last_n_checkpoints: the newest 2 step folders (6, 9) remain; no staging left over."""
    assert sorted(step_folders(out)) == [6, 9]
    assert not [p.name for p in out.iterdir() if p.name.endswith(STAGING_SUFFIX)]
    assert [step for step, _ in resumable_checkpoints(out)] == [5, 6, 9]  # epoch_0 is step 5


@pytest.fixture(scope="module")
def full_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "reference"
    run_cli("tune", tune_args("full_finetune_distributed", "configs/tiny/full_sft.yaml", out),
            timeout=RUN_TIMEOUT)
    return out, step_losses(latest_log(out))


@pytest.fixture(scope="module")
def lora_reference(tmp_path_factory):
    # LoRA dropout stays on (0.05): each rank's random stream must resume where it stopped.
    out = tmp_path_factory.mktemp("lora") / "reference"
    run_cli("tune", tune_args("lora_finetune_distributed", "configs/tiny/lora.yaml", out),
            timeout=RUN_TIMEOUT)
    return out, step_losses(latest_log(out))


def test_full_sft_step_checkpoints(full_reference):
    """A full-SFT step folder: HF weights like the epoch folders, and a weights_only-loadable
    recipe state with the gathered optimizer state and each rank's dataloader position."""
    out, losses = full_reference
    assert sorted(losses) == list(range(1, STEPS + 1))
    check_pruned_and_complete(out)
    files = files_under(out / "step_6")
    assert {"config.json", "model-00001-of-00001.safetensors", "recipe_state.pt"} <= set(files)
    state = load_recipe_state(out / "step_6")
    assert state[GLOBAL_STEP_KEY] == 6 and state["epochs_run"] == 1
    assert state["lr_scheduler"]["last_epoch"] == 6
    assert len(state["optimizer"]["state"]) == len(state["optimizer"]["param_groups"][0]["params"])
    positions = [rank["dataloader"] for rank in state["rank_states"]]
    assert len(positions) == 2 and positions[0] == positions[1]  # 1 batch each into epoch 2
    rngs = [rank["rng_state"]["torch"] for rank in state["rank_states"]]
    assert not torch.equal(rngs[0], rngs[1])  # each rank has its own stream (seed + rank)
    # the last epoch's folder is final: nothing to resume there
    assert "recipe_state.pt" not in files_under(out / f"epoch_{EPOCHS - 1}")
    assert "recipe_state.pt" in files_under(out / "epoch_0")


def test_full_sft_killed_during_a_save_resumes_exactly(full_reference, tmp_path):
    """SIGKILL while rank 0 writes a step folder (its staging folder exists): the partial
    folder is ignored, the run resumes from the checkpoint before it, and every later step
    logs the uninterrupted run's loss; the next save replaces the staging folder."""
    _, reference = full_reference
    out = tmp_path / "killed"
    killed_at = {}

    def saving_after_a_checkpoint(folder: Path) -> bool:
        done = step_folders(folder) if folder.is_dir() else {}
        for entry in os.scandir(folder):
            m = STAGING_DIR.fullmatch(entry.name)
            if m and done and int(m.group(1)) > max(done):
                killed_at["saving"] = int(m.group(1))
                return True
        return False

    run_until(
        "full_finetune_distributed", "configs/tiny/full_sft.yaml", out, saving_after_a_checkpoint
    )
    saving = killed_at["saving"]
    assert (out / f".step_{saving}{STAGING_SUFFIX}").is_dir()
    assert not (out / f"step_{saving}").exists()
    # the newest complete checkpoint before it: epoch_0 (step 5) when step 6 was being saved
    start = load_recipe_state(find_resume_dir(out))[GLOBAL_STEP_KEY]
    assert start == max(step for step in (EVERY, STEPS_PER_EPOCH, 2 * EVERY) if step < saving)

    resumed = resume("full_finetune_distributed", "configs/tiny/full_sft.yaml", out)
    assert_resumed_exactly(resumed, reference, start)
    check_pruned_and_complete(out)


def test_lora_step_checkpoints(lora_reference):
    """A LoRA step folder holds the adapter (PEFT files, and torchtune's .pt that resume reads)
    and the recipe state, not the (frozen) base weights; epoch folders keep their layout."""
    out, losses = lora_reference
    assert sorted(losses) == list(range(1, STEPS + 1))
    check_pruned_and_complete(out)
    files = files_under(out / "step_6")
    assert {
        "adapter_config.json", "adapter_model.pt", "adapter_model.safetensors", "recipe_state.pt"
    } <= set(files)
    assert not [f for f in files if f.startswith("model")], files
    assert len(load_recipe_state(out / "step_6")["rank_states"]) == 2
    for epoch in range(EPOCHS):
        assert not [f for f in files_under(out / f"epoch_{epoch}") if "adapter" in f]
        assert files_under(out / "adapter" / f"epoch_{epoch}") == [
            "adapter_config.json", "adapter_model.pt", "adapter_model.safetensors"
        ]


def test_lora_killed_between_saves_resumes_exactly(lora_reference, tmp_path):
    """SIGKILL once the first step checkpoint exists; the resumed run (dropout on) crosses the
    epoch boundary and logs exactly the uninterrupted run's losses."""
    _, reference = lora_reference
    out = tmp_path / "killed"
    run_until(
        "lora_finetune_distributed", "configs/tiny/lora.yaml", out,
        lambda folder: bool(step_folders(folder)),
    )
    start = load_recipe_state(find_resume_dir(out))[GLOBAL_STEP_KEY]
    assert start in (3, 5, 6, 9), start  # whatever it had written when the kill landed
    resumed = resume("lora_finetune_distributed", "configs/tiny/lora.yaml", out)
    assert_resumed_exactly(resumed, reference, start)
    check_pruned_and_complete(out)


def test_nonfinite_loss_stops_every_rank(tmp_path):
    """An absurd learning rate makes the loss NaN at step 3: both ranks stop with the step and
    the last good checkpoint named, the run exits nonzero, and step 3 is not saved."""
    out = tmp_path / "nan"
    proc = run_cli(
        "tune",
        tune_args(
            "full_finetune_distributed", "configs/tiny/full_sft.yaml", out,
            "max_steps_per_epoch=3", "save_every_n_steps=1", "keep_last_n_checkpoints=null",
            "optimizer.lr=1e30", "clip_grad_norm=null",
        ),
        check=False,
        timeout=RUN_TIMEOUT,
    )
    assert proc.returncode != 0
    message = f"the training loss is nan at step 3; stopping without saving this step: " \
              f"the last good checkpoint is {out / 'step_2'} (step 2)"
    for rank in (0, 1):
        assert f"[rank{rank}]: components.checkpointing.NonFiniteLossError: {message}" in proc.stderr
    assert sorted(step_folders(out)) == [1, 2]


def test_qlora_resumes_exactly_from_a_copied_step_folder(tmp_path):
    """QLoRA (NF4 base sharded by FSDP2): a step folder copied on its own into a fresh
    output_dir is all a resume needs (the base comes from the configured checkpoint); the steps
    after it log exactly the uninterrupted run's losses."""
    quick = ["epochs=1", "max_steps_per_epoch=4", "save_every_n_steps=2"]
    reference_out = tmp_path / "reference"
    run_cli("tune", tune_args("lora_finetune_distributed", "configs/tiny/qlora.yaml",
                              reference_out, *quick), timeout=RUN_TIMEOUT)
    reference = step_losses(latest_log(reference_out))
    assert sorted(reference) == [1, 2, 3, 4]

    out = tmp_path / "resumed"
    shutil.copytree(reference_out / "step_2", out / "step_2")
    run_cli("tune", tune_args("lora_finetune_distributed", "configs/tiny/qlora.yaml", out,
                              *quick, "resume_from_checkpoint=True"), timeout=RUN_TIMEOUT)
    resumed = step_losses(latest_log(out))
    assert resumed == {step: reference[step] for step in (3, 4)}, (resumed, reference)
