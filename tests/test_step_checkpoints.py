"""components.step_checkpoints: what every training recipe's checkpoint and resume part goes through.

In process: the refusal to start afresh beside an earlier run's step checkpoints, the resume
folder's weights (safetensors or .bin shards) and adapter, the per-rank state of a distributed
checkpoint, the step-save trigger and the message a Ctrl-C leaves. Through the real `tune run`
on the tiny model: Ctrl-C (SIGINT) after the first step checkpoint exits 130 without a traceback,
printing a resume command that, run as printed, finishes the training; and a rerun into that
folder without `resume_from_checkpoint=True` is refused with one line and changes nothing.
"""

import os
import shlex
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from components.checkpointing import (
    RECIPE_STATE_FILE,
    adapter_checkpoint_file,
    adapter_dir,
    epoch_dir,
    epoch_dirs,
    is_epoch_folder,
    is_step_folder,
    latest_epoch_dir,
    save_recipe_state,
    unfinished_epoch_saves,
)
from components.metric_logs import latest_log, step_losses
from components.step_checkpoints import (
    INTERRUPTED_EXIT_CODE,
    StepCheckpointClient,
    own_rank_state,
    resume_command,
)
from tests.helpers import BIN, REPO_ROOT, kill_once_written, run_cli


def fake_checkpoint(output_dir: Path, folder: str, step: int) -> Path:
    """A resumable folder as the recipes write it (recipe state with its global step)."""
    path = output_dir / folder
    path.mkdir(parents=True)
    save_recipe_state(path, {"global_step": step})
    return path


def test_a_fresh_run_beside_an_earlier_runs_steps_is_refused_with_one_line(tmp_path, capsys):
    fake_checkpoint(tmp_path, "step_2", 2)
    fake_checkpoint(tmp_path, "step_4", 4)
    with pytest.raises(SystemExit) as stopped:
        StepCheckpointClient(tmp_path, resume_from_checkpoint=False)
    assert stopped.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message
    assert f"{tmp_path} holds resumable step checkpoints of an earlier run (newest: step_4)" in message
    assert "add resume_from_checkpoint=True" in message and "choose another output_dir" in message
    # resuming is what it asks for; a clean folder, or one with finished epochs only, starts afresh
    assert StepCheckpointClient(tmp_path, resume_from_checkpoint=True).resume_dir == tmp_path / "step_4"
    assert StepCheckpointClient(tmp_path / "new").resume_dir is None
    (tmp_path / "epochs_only" / "epoch_0").mkdir(parents=True)
    assert not StepCheckpointClient(tmp_path / "epochs_only").resuming


def test_resume_weights_are_the_folders_shards_safetensors_or_bin(tmp_path):
    class Checkpointer:
        _checkpoint_paths = ["configured.safetensors"]

    for suffix in ("safetensors", "bin"):
        out = tmp_path / suffix
        folder = fake_checkpoint(out, "step_3", 3)
        for shard in ("model-00002-of-00002", "model-00001-of-00002"):
            (folder / f"{shard}.{suffix}").touch()
        checkpointer = Checkpointer()
        StepCheckpointClient(out, resume_from_checkpoint=True).point_at_resume_weights(checkpointer)
        assert [p.name for p in checkpointer._checkpoint_paths] == [
            f"model-00001-of-00002.{suffix}", f"model-00002-of-00002.{suffix}"
        ]
    empty = tmp_path / "empty"
    fake_checkpoint(empty, "step_1", 1)
    with pytest.raises(ValueError, match="resumes Hugging Face format checkpoints"):
        StepCheckpointClient(empty, resume_from_checkpoint=True).point_at_resume_weights(Checkpointer())


def test_the_adapter_of_a_step_folder_is_inside_it_and_of_an_epoch_folder_beside_it(tmp_path):
    step = fake_checkpoint(tmp_path, "step_2", 2)
    torch.save({"lora_a": torch.ones(1)}, step / "adapter_model.pt")
    assert adapter_checkpoint_file(step) == step / "adapter_model.pt"
    epoch = fake_checkpoint(tmp_path, "epoch_0", 5)
    adapter_dir(tmp_path, 0).mkdir(parents=True)
    torch.save({"lora_a": torch.zeros(1)}, adapter_dir(tmp_path, 0) / "adapter_model.pt")
    assert adapter_checkpoint_file(epoch) == tmp_path / "adapter" / "epoch_0" / "adapter_model.pt"
    client = StepCheckpointClient(tmp_path, resume_from_checkpoint=True, resume_from="epoch_0")
    assert client.load_adapter()["lora_a"].item() == 0.0
    bare = fake_checkpoint(tmp_path, "step_9", 9)
    with pytest.raises(ValueError, match=f"cannot resume from {bare}: no adapter_model.pt in it"):
        adapter_checkpoint_file(bare)


def test_mid_epoch_checkpoint_needs_its_world_size():
    """Each rank's dataloader position belongs to its shard of the data: a mid-epoch checkpoint
    resumes only with the number of processes that wrote it; an epoch-end one with any."""
    rank_states = [{"dataloader": {"pos": r}, "rng_state": {"torch": r}} for r in range(2)]
    assert own_rank_state({"rank_states": rank_states}, 1, 2) == rank_states[1]
    with pytest.raises(ValueError, match="written mid-epoch by 2 processes; resume it with "
                                         "--nproc_per_node 2 \\(not 4\\)"):
        own_rank_state({"rank_states": rank_states}, 0, 4)
    epoch_end = [{"dataloader": None, "rng_state": {}} for _ in range(2)]
    assert own_rank_state({"rank_states": epoch_end}, 3, 4) is None


def test_a_step_checkpoint_is_due_every_n_steps_except_at_an_epochs_end(tmp_path):
    client = StepCheckpointClient(tmp_path, save_every_n_steps=2)
    due = [client.due_step_folder(step, step, 6) for step in range(1, 7)]
    assert due == [None, "step_2", None, "step_4", None, None]  # step 6 gets epoch_0/
    assert StepCheckpointClient(tmp_path).due_step_folder(2, 2, 6) is None
    with pytest.raises(ValueError, match="save_every_n_steps must be a positive whole number"):
        StepCheckpointClient(tmp_path, save_every_n_steps=0)


def test_the_interrupt_message_names_the_last_checkpoint_and_the_resume_command(tmp_path, monkeypatch):
    monkeypatch.setattr(
        "sys.argv",
        ["recipes/x.py", "--config", "my config.yaml", "resume_from_checkpoint=False", "epochs=2"],
    )
    client = StepCheckpointClient(tmp_path)
    assert client.interrupted_message() == (
        f"Interrupted before any resumable checkpoint was written to {tmp_path}: nothing to resume; "
        "run the same command to start over."
    )
    fake_checkpoint(tmp_path, "step_4", 4)
    (tmp_path / ".step_6.partial").mkdir()
    assert client.interrupted_message() == (
        f"Interrupted. The last complete checkpoint is {tmp_path / 'step_4'} (step 4); resume with:\n"
        "  tune run recipes/x.py --config 'my config.yaml' epochs=2 resume_from_checkpoint=True"
    )
    assert resume_command(["r.py", "a=1"], nproc_per_node=2) == (
        "tune run --nproc_per_node 2 r.py a=1 resume_from_checkpoint=True"
    )
    monkeypatch.chdir(REPO_ROOT)  # `tune run` turned recipes/<name>.py into a module name
    assert resume_command(["recipes.lora_finetune_single_device", "a=1"]) == (
        "tune run recipes/lora_finetune_single_device.py a=1 resume_from_checkpoint=True"
    )
    assert resume_command([str(REPO_ROOT / "recipes" / "x.py")], nproc_per_node=2) == (
        "tune run --nproc_per_node 2 recipes/x.py resume_from_checkpoint=True"
    )


def test_layout_helpers_name_and_find_the_run_folders(tmp_path):
    for name in ("epoch_10", "epoch_2", "step_3", "epoch_x", ".epoch_11.partial", ".epoch_1.partial"):
        (tmp_path / name).mkdir()
    assert epoch_dir(tmp_path, 2) == tmp_path / "epoch_2"
    assert epoch_dirs(tmp_path) == [tmp_path / "epoch_2", tmp_path / "epoch_10"]
    assert latest_epoch_dir(tmp_path) == tmp_path / "epoch_10"
    assert latest_epoch_dir(tmp_path / "step_3") is None
    assert unfinished_epoch_saves(tmp_path) == [
        (1, tmp_path / ".epoch_1.partial"), (11, tmp_path / ".epoch_11.partial")
    ]
    assert is_step_folder(tmp_path / "step_3") and not is_step_folder(tmp_path / "epoch_2")
    assert is_epoch_folder("epoch_2") and not is_epoch_folder("epoch_x")


# ---- through the real `tune run` --------------------------------------------------------------
RUN = [
    "run", "recipes/full_finetune_single_device.py", "--config", "configs/tiny/full_sft.yaml",
    "max_steps_per_epoch=16", "save_every_n_steps=2", "keep_last_n_checkpoints=2",
    "tokenizer.max_seq_len=128",
]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A full SFT run sent SIGINT (what Ctrl-C sends to the terminal's process group) as soon
    as its first step checkpoint is complete: (output_dir, completed process)."""
    out = tmp_path_factory.mktemp("ctrl_c") / "run"
    console = out.parent / "console.txt"
    with open(console, "w") as sink:
        proc = subprocess.Popen(
            [str(BIN / "tune"), *RUN, f"output_dir={out}"],
            cwd=REPO_ROOT, env=dict(os.environ), stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        kill_once_written(proc, out / "step_2" / RECIPE_STATE_FILE, sig=signal.SIGINT)
    return out, proc.returncode, console.read_text()


def test_ctrl_c_exits_130_naming_the_checkpoint_and_a_resume_command_that_finishes_the_run(interrupted):
    out, returncode, console = interrupted
    assert returncode == INTERRUPTED_EXIT_CODE, console[-3000:]
    assert "Traceback" not in console, console[-3000:]
    lines = console.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith("Interrupted. The last complete checkpoint is "))
    step = int(lines[index].split("(step ")[1].split(")")[0])
    assert lines[index] == f"Interrupted. The last complete checkpoint is {out / f'step_{step}'} (step {step}); resume with:"
    assert (out / f"step_{step}" / RECIPE_STATE_FILE).is_file()
    command = shlex.split(lines[index + 1])
    assert command[:2] == ["tune", "run"] and command[-1] == "resume_from_checkpoint=True"
    assert command[2:-1] == [*RUN[1:], f"output_dir={out}"]

    proc = run_cli(command[0], command[1:])
    assert f"Resuming from {out / f'step_{step}'}" in proc.stdout + proc.stderr
    assert sorted(step_losses(latest_log(out))) == list(range(step + 1, 17))
    assert (out / "epoch_0" / "model-00001-of-00001.safetensors").is_file()


def test_a_rerun_without_resume_is_refused_and_changes_nothing(tmp_path):
    out = tmp_path / "run"
    run_cli("tune", [*RUN, "max_steps_per_epoch=4", f"output_dir={out}"])
    before = sorted(p.name for p in out.iterdir())
    assert "step_2" in before and "epoch_0" in before
    proc = run_cli("tune", [*RUN, "max_steps_per_epoch=4", f"output_dir={out}"], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    refusal = [line for line in proc.stderr.splitlines() if "holds resumable step checkpoints" in line]
    assert refusal == [
        f"{out} holds resumable step checkpoints of an earlier run (newest: step_2): add "
        "resume_from_checkpoint=True to continue it, or choose another output_dir (or delete its "
        "step_N folders) to start over. Nothing was run."
    ]
    assert sorted(p.name for p in out.iterdir()) == before
