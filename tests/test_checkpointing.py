"""components.checkpointing: atomic folders under SIGKILL, resume discovery, pruning, RNG state."""

import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from components.checkpointing import (
    RECIPE_STATE_FILE,
    NonFiniteLossError,
    check_finite_loss,
    find_resume_dir,
    load_recipe_state,
    prune_step_checkpoints,
    restore_rng_state,
    resumable_checkpoints,
    rng_state,
    save_recipe_state,
    write_atomically,
    write_with_checkpointer,
)
from tests.helpers import REPO_ROOT


def _checkpoint(output_dir, folder, step, payload=b"weights"):
    def write(staging):
        (staging / "model.safetensors").write_bytes(payload)
        save_recipe_state(staging, {"global_step": step, "optimizer": {"lr": 0.1}})

    return write_atomically(output_dir, folder, write)


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_and_is_ignored(tmp_path):
    _checkpoint(tmp_path, "step_2", 2)
    script = textwrap.dedent(
        f"""
        import os, signal
        from components.checkpointing import write_atomically

        def write(staging):
            (staging / "model.safetensors").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)

        write_atomically({str(tmp_path)!r}, "step_4", write)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT)
    assert proc.returncode == -9
    assert (tmp_path / ".step_4.partial").is_dir() and not (tmp_path / "step_4").exists()
    assert resumable_checkpoints(tmp_path) == [(2, tmp_path / "step_2")]
    assert find_resume_dir(tmp_path) == tmp_path / "step_2"

    _checkpoint(tmp_path, "step_4", 4)
    assert not (tmp_path / ".step_4.partial").exists()
    assert find_resume_dir(tmp_path) == tmp_path / "step_4"
    assert load_recipe_state(tmp_path / "step_4")["global_step"] == 4


def test_rewriting_a_folder_replaces_it_whole(tmp_path):
    _checkpoint(tmp_path, "epoch_0", 3, b"old")
    (tmp_path / "epoch_0" / "stale.bin").write_bytes(b"x")
    _checkpoint(tmp_path, "epoch_0", 3, b"new")
    assert sorted(p.name for p in (tmp_path / "epoch_0").iterdir()) == [
        "model.safetensors",
        RECIPE_STATE_FILE,
    ]
    assert (tmp_path / "epoch_0" / "model.safetensors").read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_0"]


def test_resume_takes_the_most_steps_or_the_named_folder(tmp_path):
    for step in (10, 2, 6):
        _checkpoint(tmp_path, f"step_{step}", step)
    (tmp_path / "epoch_0").mkdir()  # final weights without a recipe state: not resumable
    assert [s for s, _ in resumable_checkpoints(tmp_path)] == [2, 6, 10]
    assert find_resume_dir(tmp_path) == tmp_path / "step_10"
    assert find_resume_dir(tmp_path, "step_6") == tmp_path / "step_6"
    with pytest.raises(ValueError, match="resume_from=epoch_0: no recipe_state.pt"):
        find_resume_dir(tmp_path, "epoch_0")
    with pytest.raises(ValueError, match="holds no step_N/ or epoch_N/ folder"):
        find_resume_dir(tmp_path / "empty")


def test_pruning_keeps_the_newest_step_folders_and_every_epoch_folder(tmp_path):
    for step in (2, 4, 6, 8, 10):
        _checkpoint(tmp_path, f"step_{step}", step)
    _checkpoint(tmp_path, "epoch_0", 5)
    assert prune_step_checkpoints(tmp_path, None) == []
    removed = prune_step_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["step_2", "step_4", "step_6"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0", "step_10", "step_8"]
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="keep_last_n_checkpoints must be a positive whole"):
            prune_step_checkpoints(tmp_path, bad)


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    save_recipe_state(tmp_path, {"global_step": 1, "rng_state": rng_state()})
    expected = (torch.rand(4), random.random())
    restore_rng_state(load_recipe_state(tmp_path)["rng_state"])
    assert torch.equal(torch.rand(4), expected[0]) and random.random() == expected[1]


def test_a_non_finite_loss_names_the_step_and_the_last_good_checkpoint(tmp_path):
    check_finite_loss(2.5, 7, tmp_path)
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 7; .* no resumable checkpoint"):
        check_finite_loss(float("nan"), 7, tmp_path)
    _checkpoint(tmp_path, "step_6", 6)
    with pytest.raises(NonFiniteLossError, match=r"loss is inf at step 9; .*step_6 \(step 6\)"):
        check_finite_loss(float("inf"), 9, tmp_path)


def test_a_torchtune_checkpointer_writes_straight_into_the_staging_folder(tmp_path):
    from torchtune import training

    from components.models import tiny_llama3_2, tiny_llama3_2_checkpointer

    checkpointer = tiny_llama3_2_checkpointer(output_dir=str(tmp_path / "run"))
    checkpointer.load_checkpoint()  # the checkpointer learns the shard layout it writes back
    state = {training.MODEL_KEY: tiny_llama3_2().state_dict()}
    target = write_atomically(
        tmp_path / "run", "step_3", lambda staging: write_with_checkpointer(checkpointer, staging, state)
    )
    names = {p.name for p in target.iterdir()}
    assert {"model-00001-of-00001.safetensors", "config.json", "model.safetensors.index.json"} <= names
    assert "epoch_0" not in names
    assert Path(checkpointer._output_dir) == tmp_path / "run"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["step_3"]
