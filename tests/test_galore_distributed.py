"""recipes/galore_finetune_distributed.py on CPU: GaLore under FSDP2 over gloo.

Every run is the real `tune run` on configs/tiny/galore.yaml with a projection update every 3
steps (steps 1, 4, 7, 10 of 2 epochs x 5), so the curves cross several updates and an epoch
boundary. The reference is the single-device recipe with the same global batch (4 = 2 processes
x 2): the distributed sampler deals the same shuffled indices out rank by rank.

Tolerance: the 2-process gradients differ from one process's by float32 rounding (another
reduction order), and GaLore amplifies that at a projection update: a weight whose gradient has
fewer than `rank` significant singular values gets projected coordinates that are rounding
noise, which Adam's normalised step turns into full-size updates of either sign. Up to and
including the second update (steps 1-4) the curves agree to float32 precision; after it they
drift apart by up to 4.4e-5 (svd full) and 2.0e-4 (randomized) relative over the 10 steps (the
same holds between two single-device runs on different BLAS builds). One process reproduces the
single-device recipe exactly.
"""

import shutil
from pathlib import Path

import pytest
import torch

from components.checkpointing import load_recipe_state
from components.metric_logs import latest_log, step_losses, step_metrics
from tests.helpers import run_cli
from tests.test_resume_distributed import (
    SETTINGS,
    STEPS,
    assert_resumed_exactly,
    check_pruned_and_complete,
    resume,
    run_until,
    step_folders,
    tune_args,
)

CONFIG = "configs/tiny/galore.yaml"
GAP = ["optimizer.update_proj_gap=3"]
UPDATE_STEPS = [1, 4, 7, 10]
TIGHT_RTOL, LOSS_RTOL = 1e-5, 1e-3


def single_device(out: Path, *overrides: str):
    settings = [s for s in SETTINGS if not s.startswith("batch_size=")]
    args = ["run", "recipes/galore_finetune_single_device.py", "--config", CONFIG, f"output_dir={out}"]
    run_cli("tune", [*args, *settings, "batch_size=4", *GAP, *overrides])
    return step_losses(latest_log(out))


def distributed(out: Path, *overrides: str, nproc: int = 2):
    args = tune_args("galore_finetune_distributed", CONFIG, out, *GAP, *overrides)
    args[2] = str(nproc)  # --nproc_per_node
    if nproc == 1:
        args = [a if a != "batch_size=2" else "batch_size=4" for a in args]
    run_cli("tune", args)
    return step_losses(latest_log(out))


def assert_close_to_single_device(two: dict, one: dict, steps=range(1, STEPS + 1)):
    assert sorted(two) == sorted(one) == list(steps)
    first = list(steps)[:4]
    for step in steps:
        rtol = TIGHT_RTOL if step in first else LOSS_RTOL
        assert two[step] == pytest.approx(one[step], rel=rtol), (step, two, one)
    assert one[max(steps)] < one[min(steps)]  # and it trains


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 2-process run (svd full): its output folder."""
    out = tmp_path_factory.mktemp("galore") / "reference"
    distributed(out)
    return out


def test_two_processes_follow_the_single_device_recipe(reference, tmp_path):
    two = step_losses(latest_log(reference))
    one = single_device(tmp_path / "single")
    assert_close_to_single_device(two, one)
    # one process is the single-device recipe, bit for bit
    assert distributed(tmp_path / "one", nproc=1) == one
    # every projection update logs what it cost, and only those steps do
    metrics = step_metrics(latest_log(reference))
    assert [step for step in sorted(metrics) if "projection_update_secs" in metrics[step]] == UPDATE_STEPS


@pytest.mark.slow  # the optimizer-level test (tests/test_galore_sharded.py) covers it by default
def test_randomized_svd_two_processes_follow_the_single_device_recipe(tmp_path):
    randomized = ["optimizer.svd=randomized", "save_every_n_steps=null"]
    assert_close_to_single_device(
        distributed(tmp_path / "two", *randomized), single_device(tmp_path / "one", *randomized)
    )


def test_apollo_two_processes_follow_the_single_device_recipe(tmp_path):
    """APOLLO in the same recipe (configs/tiny/apollo.yaml): its projection is random, not an
    SVD of the gradient, so nothing amplifies the rounding: every step agrees to 1e-5 (measured:
    2e-7 over the 10 steps)."""
    config = ["--config", "configs/tiny/apollo.yaml"]
    settings = [s for s in SETTINGS if not s.startswith(("batch_size=", "save_every", "keep_last"))]
    losses = {}
    for recipe, nproc, batch in (("galore_finetune_single_device", None, 4), ("galore_finetune_distributed", 2, 2)):
        out = tmp_path / recipe
        launch = ["run"] + (["--nproc_per_node", str(nproc)] if nproc else [])
        run_cli("tune", [*launch, f"recipes/{recipe}.py", *config, f"output_dir={out}", *settings, *GAP, f"batch_size={batch}"])
        losses[recipe] = step_losses(latest_log(out))
    one, two = losses["galore_finetune_single_device"], losses["galore_finetune_distributed"]
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=TIGHT_RTOL), (step, one, two)
    assert one[STEPS] < one[1]


def test_each_rank_saves_its_own_sharded_optimizer_state(reference):
    state = load_recipe_state(reference / "step_9")
    ranks = state["optimizer"]["rank_optimizer_states"]
    assert len(ranks) == 2
    # the first GaLore weight, layers.0.attn.q_proj (square: projected on the right): each rank
    # holds its rows of the m x rank moments, and both the same projection matrix
    shapes = []
    for rank_state in ranks:
        galore = [s for s in rank_state["state"].values() if "projector" in s]
        assert galore, "no GaLore parameter state saved"
        entry = galore[0]["exp_avg"]
        shapes.append((tuple(entry["shape"]), tuple(entry["dtensor_local"].shape), entry["placements"]))
    (whole, local0, placement), (_, local1, _) = shapes
    assert placement == [["shard", 0]] and local0[0] + local1[0] == whole[0] and local0[1] == whole[1]
    matrices = [next(s for s in r["state"].values() if "projector" in s)["projector"]["ortho_matrix"] for r in ranks]
    assert torch.equal(matrices[0], matrices[1])
    check_pruned_and_complete(reference)


def test_killed_after_a_step_checkpoint_resumes_exactly(reference, tmp_path):
    out = tmp_path / "killed"
    run_until("galore_finetune_distributed", CONFIG, out, lambda o: 3 in step_folders(o), *GAP)
    resumed = resume("galore_finetune_distributed", CONFIG, out, *GAP)
    assert_resumed_exactly(resumed, step_losses(latest_log(reference)), start=3)


def test_resuming_with_another_number_of_processes_is_one_line(reference, tmp_path):
    out = tmp_path / "other"
    out.mkdir()
    shutil.copytree(reference / "epoch_0", out / "epoch_0")
    args = tune_args("galore_finetune_distributed", CONFIG, out, *GAP, "resume_from_checkpoint=True")
    args[2] = "1"
    proc = run_cli("tune", args, check=False)
    assert proc.returncode != 0
    assert (
        "error: this checkpoint holds the GaLore optimizer state of 2 processes, each its own "
        "shard; resume it with --nproc_per_node 2 (not 1)" in proc.stderr
    ), proc.stderr[-3000:]


def test_layerwise_steps_inside_fsdp2_backward_like_one_device(tmp_path):
    """optimizer.layerwise: FSDP2 runs each parameter's post-accumulate-grad hook after its
    reduce-scatter; the sharded optimizer steps there (projection updates included)."""
    layerwise = ["optimizer.layerwise=True", "clip_grad_norm=null", "save_every_n_steps=null", "epochs=1"]
    two = distributed(tmp_path / "two", *layerwise)
    one = single_device(tmp_path / "one", *layerwise)
    assert_close_to_single_device(two, one, steps=range(1, STEPS // 2 + 1))


def test_what_galore_under_fsdp2_cannot_do_is_one_line(tmp_path):
    cases = {
        "clip_grad_norm=1.0 cannot work with optimizer.layerwise=True": ["optimizer.layerwise=True"],
        "tensor_parallel_dim=2: GaLore under FSDP2 needs": ["tensor_parallel_dim=2"],
        "components.optim.galore_adafactor does not run under FSDP2": [
            "optimizer._component_=components.optim.galore_adafactor"
        ],
    }
    for message, overrides in cases.items():
        proc = run_cli("tune", tune_args("galore_finetune_distributed", CONFIG, tmp_path / "x", *overrides), check=False)
        assert proc.returncode != 0 and f"error: {message}" in proc.stderr, (message, proc.stderr[-3000:])
    apollo_svd = tune_args("galore_finetune_distributed", "configs/tiny/apollo.yaml", tmp_path / "y", "optimizer.proj=svd")
    proc = run_cli("tune", apollo_svd, check=False)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "error: components.optim.apollo_adamw with proj: svd does not run under FSDP2" in proc.stderr, proc.stderr[-3000:]
