"""recipes/knowtuning_dpo_distributed.py on CPU: KnowTuning stage 2 (LoRA DPO + 0.2 x SFT) under
FSDP2 over gloo.

Every run is the real `tune run` on configs/tiny/knowtuning_kc.yaml, with the tiny base model
standing in for the stage-1 checkpoint (policy base and, adapters off, the reference) and the
preference pairs `medtune knowtuning build-kc` makes from the shipped MedQuAD sample; dropout off,
2 epochs x 5 steps, a step checkpoint every 3 (tests/test_resume_distributed.py's settings).

1 process x 4 pairs and 2 processes x 2 pairs train on the same pairs from the same adapter
(drawn whole, whatever the process count), so their losses agree to float32 reduction order
(measured: 1.4e-6 relative over 6 steps). The single-device recipe draws its adapter from the
global RNG instead, so it agrees at step 1 only (B = 0: policy = reference) and is compared for
the output layout.
"""

import math
from pathlib import Path

import pytest

from components.models import tiny_checkpoint_dir
from components.metric_logs import latest_log, step_losses, step_metrics
from tests.helpers import run_cli
from tests.test_recipes_distributed import files_under
from tests.test_resume_distributed import (
    SETTINGS,
    STEPS,
    assert_resumed_exactly,
    resume,
    run_until,
    step_folders,
    tune_args,
)

CONFIG = "configs/tiny/knowtuning_kc.yaml"
RECIPE = "knowtuning_dpo_distributed"
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def overrides(tmp_path_factory):
    """The stage-1 stand-in and the pairs: what every run of this module adds to the config."""
    pairs = tmp_path_factory.mktemp("kc") / "kc.jsonl"
    run_cli("medtune", ["knowtuning", "build-kc", "meadow:components/data/sample/knowtuning_medquad/medquad_test.json",
                        "--out", str(pairs)])
    return [f"checkpointer.checkpoint_dir={tiny_checkpoint_dir()}", "checkpointer.checkpoint_files=[model.safetensors]",
            f"dataset.data_files={pairs}", "model.lora_dropout=0.0"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, overrides):
    """The uninterrupted 2-process run: its output folder."""
    out = tmp_path_factory.mktemp("dpo") / "reference"
    run_cli("tune", tune_args(RECIPE, CONFIG, out, *overrides))
    return out


def test_two_processes_train_as_one(reference, overrides, tmp_path):
    two = step_losses(latest_log(reference))
    args = tune_args(RECIPE, CONFIG, tmp_path / "one", *overrides, "batch_size=4")
    args[2] = "1"  # --nproc_per_node
    run_cli("tune", args)
    one = step_losses(latest_log(tmp_path / "one"))
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=LOSS_RTOL), (step, one, two)
    # policy = reference at step 1 (LoRA's B starts at zero): the DPO term is ln 2, and it falls
    dpo = {step: m["loss/dpo"] for step, m in step_metrics(latest_log(reference)).items()}
    assert dpo[1] == pytest.approx(math.log(2), abs=1e-6)
    assert dpo[STEPS] < dpo[1] and two[STEPS] < two[1]


def test_output_layout_is_the_single_device_recipes(reference, overrides, tmp_path):
    out = tmp_path / "single"
    settings = [s for s in SETTINGS if not s.startswith(("save_every", "keep_last"))]
    run_cli("tune", ["run", "recipes/knowtuning_dpo_single_device.py", "--config", CONFIG, f"output_dir={out}",
                     *settings, *overrides, "batch_size=4"])
    for folder in ("epoch_0", "epoch_1", "adapter/epoch_0", "adapter/epoch_1"):
        assert files_under(reference / folder) == files_under(out / folder), folder
    # the merged model in epoch_N/, the PEFT adapter apart
    assert "model-00001-of-00001.safetensors" in files_under(reference / "epoch_1")
    assert "adapter_model.safetensors" in files_under(reference / "adapter" / "epoch_1")
    assert sorted(step_folders(reference)) == [6, 9]


def test_killed_after_a_step_checkpoint_resumes_exactly(reference, overrides, tmp_path):
    out = tmp_path / "killed"
    run_until(RECIPE, CONFIG, out, lambda o: 3 in step_folders(o), *overrides)
    resumed = resume(RECIPE, CONFIG, out, *overrides)
    assert_resumed_exactly(resumed, step_losses(latest_log(reference)), start=3)
