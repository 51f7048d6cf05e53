"""recipes/galore_finetune_single_device.py through the real `tune` CLI on the tiny model.

Each tiny GaLore config runs by the command in its header: losses fall, the first ones equal
pinned values, step checkpoints carry a recipe state (projection matrices included) that loads
with torch.load(weights_only=True), only the newest `KEEP_LAST` step folders stay, a run killed
after a step checkpoint and resumed logs the same losses as the run that was never stopped, and
a NaN loss stops the run naming the step and the last good checkpoint. The same checkpoint code
is tested on the other single-device recipes in test_resume_single_device.py.
"""

import importlib.util
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from components.metric_logs import latest_log, step_losses
from tests.helpers import BIN, REPO_ROOT, header_command, kill_once_written, run_cli

STEPS = 16
SAVE_EVERY = 4
KEEP_LAST = 2
# First losses for seed 42 on this project's CPU build of torch (one OpenMP thread). The first
# is the untrained model's; GaLore's first update (projection from step 0's gradient) moves the
# second. galore clips at 1.0, galore_layerwise cannot clip, hence their step 2 differs.
PINNED_FIRST_LOSSES = {
    "galore": [7.778120, 7.519439, 7.166909],
    "galore_layerwise": [7.778120, 7.518908, 7.171122],
}
PINNED_ATOL = 1e-4
def command_for(method: str, output_dir: Path, *extra: str):
    command = header_command(REPO_ROOT / "configs" / "tiny" / f"{method}.yaml")
    assert command[:3] == ["tune", "run", "recipes/galore_finetune_single_device.py"]
    return command[1:] + [
        f"output_dir={output_dir}",
        f"max_steps_per_epoch={STEPS}",
        f"save_every_n_steps={SAVE_EVERY}",
        f"keep_last_n_checkpoints={KEEP_LAST}",
        *extra,
    ]


@pytest.fixture(scope="module", params=sorted(PINNED_FIRST_LOSSES))
def trained(request, tmp_path_factory):
    method = request.param
    output_dir = tmp_path_factory.mktemp(method)
    run_cli("tune", command_for(method, output_dir))
    return method, output_dir


def test_loss_falls_and_first_losses_are_pinned(trained):
    method, output_dir = trained
    losses = step_losses(latest_log(output_dir))
    assert sorted(losses) == list(range(1, STEPS + 1))
    values = [losses[s] for s in sorted(losses)]
    assert sum(values[-4:]) / 4 < sum(values[:4]) / 4 - 0.3, values
    pinned = PINNED_FIRST_LOSSES[method]
    assert values[: len(pinned)] == pytest.approx(pinned, abs=PINNED_ATOL), values[:5]


def test_step_checkpoints_hold_weights_only_recipe_state_with_projections(trained):
    method, output_dir = trained
    # steps 4, 8 and 12 were saved (16 is the epoch's end: epoch_0/); the newest KEEP_LAST stay
    assert sorted(p.name for p in output_dir.glob("step_*")) == ["step_12", "step_8"]
    assert not list(output_dir.glob(".*.partial")), "a staging folder was left behind"
    for folder in ("step_8", "step_12", "epoch_0"):
        assert (output_dir / folder / "model-00001-of-00001.safetensors").is_file()
        assert (output_dir / folder / "config.json").is_file()
    assert not (output_dir / "epoch_0" / "recipe_state.pt").exists(), "nothing follows the last epoch"
    state = torch.load(output_dir / "step_8" / "recipe_state.pt", weights_only=True)
    assert state["global_step"] == 8 and state["epochs_run"] == 0
    assert set(state["rng_state"]) >= {"torch", "python"}
    optimizer = state["optimizer"]
    if method == "galore_layerwise":
        per_param = optimizer["layers.0.mlp.w1.weight"]
        projector = per_param["state"][0]["projector"]
        assert "projector" not in optimizer["tok_embeddings.weight"]["state"][0]
    else:
        plain, projected = optimizer["param_groups"]
        assert "rank" not in plain and projected["rank"] == 16
        projectors = [optimizer["state"][i]["projector"] for i in projected["params"]]
        assert len(projectors) == 4 * 7
        projector = projectors[0]
    assert (projector["rank"], projector["update_proj_gap"], projector["proj_type"]) == (16, 8, "std")
    assert isinstance(projector["ortho_matrix"], torch.Tensor)


def test_a_killed_run_resumes_with_the_same_losses(trained, tmp_path):
    method, reference_dir = trained
    expected = step_losses(latest_log(reference_dir))
    output_dir = tmp_path / "stopped"
    proc = subprocess.Popen(
        [str(BIN / "tune"), *command_for(method, output_dir)],
        cwd=REPO_ROOT,
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    kill_once_written(proc, output_dir / f"step_{SAVE_EVERY}" / "recipe_state.pt")
    stopped = step_losses(latest_log(output_dir))
    resumable = sorted(int(p.parent.name[5:]) for p in output_dir.glob("step_*/recipe_state.pt"))
    assert resumable and max(stopped) < STEPS, "the run was not stopped before its end"

    run_cli("tune", command_for(method, output_dir, "resume_from_checkpoint=True"))
    resumed = step_losses(latest_log(output_dir))
    assert min(resumed) == resumable[-1] + 1 and max(resumed) == STEPS
    for step, loss in resumed.items():
        assert loss == pytest.approx(expected[step], abs=1e-6), (step, resumed, expected)


def test_randomized_svd_through_the_cli_loss_falls_and_checkpoints_say_randomized(tmp_path):
    """optimizer.svd=randomized with a projection update every 4 steps (four updates in 16)."""
    output_dir = tmp_path / "randomized"
    run_cli("tune", command_for("galore", output_dir, "optimizer.svd=randomized", "optimizer.update_proj_gap=4"))
    losses = step_losses(latest_log(output_dir))
    assert sorted(losses) == list(range(1, STEPS + 1))
    values = [losses[s] for s in sorted(losses)]
    assert sum(values[-4:]) / 4 < sum(values[:4]) / 4 - 0.3, values
    optimizer = torch.load(output_dir / "step_12" / "recipe_state.pt", weights_only=True)["optimizer"]
    projected = optimizer["param_groups"][1]
    assert (projected["svd"], projected["svd_oversample"], projected["svd_power_iters"]) == ("randomized", 8, 2)
    projectors = [optimizer["state"][i]["projector"] for i in projected["params"]]
    assert len(projectors) == 4 * 7 and {p["svd"] for p in projectors} == {"randomized"}
    assert len({p["svd_seed"] for p in projectors}) == 4 * 7


def test_a_nan_loss_stops_the_run_naming_the_step_and_the_last_good_checkpoint(tmp_path):
    output_dir = tmp_path / "nan"
    # One step of 1e30 sends the weights past float32's range: the next loss is NaN or inf.
    proc = run_cli(
        "tune", command_for("galore", output_dir, "optimizer.lr=1e30", "save_every_n_steps=1"), check=False
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    found = re.search(r"the training loss is (nan|inf|-inf) at step (\d+); stopping without saving", output)
    assert found, output[-3000:]
    bad = int(found.group(2))
    last = output_dir / f"step_{bad - 1}"
    assert bad > 1 and f"the last good checkpoint is {last} (step {bad - 1})" in output
    assert not (output_dir / f"step_{bad}").exists() and not list(output_dir.glob(".*.partial"))


def _recipe_class():
    path = REPO_ROOT / "recipes" / "galore_finetune_single_device.py"
    spec = importlib.util.spec_from_file_location("medtune_galore_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.GaLoreFinetuneRecipeSingleDevice


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["gradient_accumulation_steps=2"], r"gradient_accumulation_steps=2 cannot work with optimizer.layerwise=True"),
        (["clip_grad_norm=1.0"], r"clip_grad_norm=1.0 cannot work with optimizer.layerwise=True.*clip_grad_norm=null"),
        (["optimizer_in_bwd=True"], r"optimizer.layerwise=True"),
    ],
    ids=["accumulation", "clipping", "torchtune-flag"],
)
def test_layerwise_refuses_what_it_cannot_do_with_a_clear_message(overrides, message):
    cfg = OmegaConf.load(REPO_ROOT / "configs" / "tiny" / "galore_layerwise.yaml")
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    with pytest.raises(ValueError, match=message):
        _recipe_class()(cfg)
