"""Each tiny config, run by the command in its header through the real `tune` CLI, trains for real.

Losses must fall, the first ones must equal pinned values for the fixed seed, and the checkpoint
directory must reload in transformers with the logits torchtune computes from the same files.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torchtune.models.convert_weights import hf_to_tune

from components.models import tiny, tiny_llama3_2, tiny_llama3_2_tokenizer
from components.metric_logs import latest_log, read_losses
from tests.helpers import REPO_ROOT, header_command, run_cli

STEPS = 16
# The first losses of each config for seed 42, measured on this project's CPU build of torch.
# The first is the untrained model's loss on the first batch; the next ones move with training.
PINNED_FIRST_LOSSES = {
    "full_sft": [7.778120, 7.528976, 7.072922],
    "lora": [7.778120, 7.639345, 7.434215],
    "qlora": [7.775865, 7.636157, 7.428303],
}
PINNED_ATOL = 1e-4
# fp32 weights through torchtune and transformers differ only by kernel order.
LOGITS_ATOL = 1e-4


@pytest.fixture(scope="module", params=sorted(PINNED_FIRST_LOSSES))
def trained(request, tmp_path_factory):
    method = request.param
    output_dir = tmp_path_factory.mktemp(method)
    command = header_command(REPO_ROOT / "configs" / "tiny" / f"{method}.yaml")
    assert command[:2] == ["tune", "run"]
    run_cli("tune", command[1:] + [f"output_dir={output_dir}", f"max_steps_per_epoch={STEPS}"])
    return method, output_dir


def test_loss_falls_and_first_losses_are_pinned(trained):
    method, output_dir = trained
    losses = read_losses(latest_log(output_dir))
    assert len(losses) == STEPS
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses
    pinned = PINNED_FIRST_LOSSES[method]
    assert losses[: len(pinned)] == pytest.approx(pinned, abs=PINNED_ATOL), losses[:5]


def test_checkpoint_reloads_in_transformers_with_the_same_logits(trained):
    from transformers import AutoModelForCausalLM

    method, output_dir = trained
    ckpt = output_dir / "epoch_0"
    assert not list(ckpt.glob("adapter_*")), "adapter files belong in output_dir/adapter/"
    hf_model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    weights = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        weights.update(load_file(shard))
    model = tiny_llama3_2().eval()
    model.load_state_dict(
        hf_to_tune(
            {k: v.float() for k, v in weights.items()},
            num_heads=tiny.TINY_DIMS["num_heads"],
            num_kv_heads=tiny.TINY_DIMS["num_kv_heads"],
            dim=tiny.TINY_DIMS["embed_dim"],
            head_dim=tiny.TINY_DIMS["embed_dim"] // tiny.TINY_DIMS["num_heads"],
        )
    )
    tokens = tiny_llama3_2_tokenizer().encode("What causes iron deficiency anemia?")
    ids = torch.tensor([tokens])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_model(ids).logits, atol=LOGITS_ATOL, rtol=0)
    # and the weights moved away from the untrained checkpoint
    base = load_file(Path(tiny.tiny_checkpoint_dir()) / "model.safetensors")
    moved = [k for k in base if not torch.equal(base[k], weights[k].to(base[k].dtype))]
    assert moved, f"{method}: the saved weights equal the untrained model's"


@pytest.mark.parametrize("method", ["full_sft", "lora"])
def test_activation_checkpointing_runs_and_leaves_the_losses_unchanged(method, tmp_path):
    """Recomputing activations in the backward pass changes memory, not the maths: the first
    losses equal the pinned ones (the tiny checkpointer carries the model_type recipes read)."""
    command = header_command(REPO_ROOT / "configs" / "tiny" / f"{method}.yaml")
    run_cli(
        "tune",
        command[1:] + [f"output_dir={tmp_path}", f"max_steps_per_epoch={STEPS}", "enable_activation_checkpointing=True"],
    )
    pinned = PINNED_FIRST_LOSSES[method]  # the schedule depends on the step count: same STEPS
    losses = read_losses(latest_log(tmp_path))
    assert losses[: len(pinned)] == pytest.approx(pinned, abs=PINNED_ATOL), losses[:5]
