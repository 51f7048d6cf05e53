"""recipes/{full,lora}_finetune_distributed.py on CPU: FSDP2 over gloo with 2 processes.

Each run goes through the real `tune run --nproc_per_node N` (torchrun) on configs/tiny/*.yaml.
Two processes with batch_size 2 see the same global batch of 4 as one process with batch_size 4
(the distributed sampler deals the same shuffled indices out rank by rank), so the per-step loss
curves must agree up to float32 reduction order.
"""

import json
from pathlib import Path
from typing import List

import pytest
import torch

from components.metric_logs import latest_log, step_losses
from tests.helpers import run_cli

# Two epochs of 2 steps: the curves also cover the end-of-epoch checkpoint (saving must leave
# the model being trained untouched) and the start of a new epoch.
EPOCHS, STEPS_PER_EPOCH = 2, 2
STEPS = EPOCHS * STEPS_PER_EPOCH
FAST = [
    f"epochs={EPOCHS}",
    f"max_steps_per_epoch={STEPS_PER_EPOCH}",
    "tokenizer.max_seq_len=128",
    "log_every_n_steps=1",
]
# Relative difference allowed between the 1-process and 2-process losses: the same float32
# arithmetic, but sums reduced in another order across processes (measured: <= 1e-7).
LOSS_RTOL = 1e-5


def tune_run(recipe: str, config: str, nproc: int, out: Path, *overrides: str, check=True):
    args = ["run", "--nproc_per_node", str(nproc), f"recipes/{recipe}.py", "--config", config]
    return run_cli("tune", [*args, f"output_dir={out}", *overrides], check=check)


def files_under(path: Path) -> List[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


def one_vs_two_processes(tmp_path: Path, recipe: str, config: str, *overrides: str):
    """Loss curves of 1 process x batch 4 and 2 processes x batch 2, and the 2-process output."""
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"nproc{nproc}"
        tune_run(recipe, config, nproc, out, *FAST, f"batch_size={4 // nproc}", *overrides)
        runs[nproc] = step_losses(latest_log(out))
    assert sorted(runs[1]) == sorted(runs[2]) == list(range(1, STEPS + 1))
    for step in runs[1]:
        assert runs[2][step] == pytest.approx(runs[1][step], rel=LOSS_RTOL), (step, runs)
    assert runs[1][STEPS] < runs[1][1]  # and it trains
    return runs, tmp_path / "nproc2"


def test_full_sft_two_cpu_processes_match_one(tmp_path):
    _, out = one_vs_two_processes(tmp_path, "full_finetune_distributed", "configs/tiny/full_sft.yaml")
    for epoch in range(EPOCHS):
        files = files_under(out / f"epoch_{epoch}")
        assert "config.json" in files and "model-00001-of-00001.safetensors" in files


def test_lora_two_cpu_processes_match_one(tmp_path):
    # Dropout draws differ between 1 and 2 processes; without it the runs must agree.
    _, out = one_vs_two_processes(
        tmp_path, "lora_finetune_distributed", "configs/tiny/lora.yaml", "model.lora_dropout=0.0"
    )
    for epoch in range(EPOCHS):
        merged = files_under(out / f"epoch_{epoch}")
        assert "model-00001-of-00001.safetensors" in merged
        assert not [f for f in merged if "adapter" in f], merged
        adapter = out / "adapter" / f"epoch_{epoch}"
        assert files_under(adapter) == [
            "adapter_config.json",
            "adapter_model.pt",
            "adapter_model.safetensors",
        ]
        assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"


def load_recipe(name: str):
    """Import recipes/<name>.py by path (the `recipes` package resolves only from the repo root)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "recipes" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_medtune_recipe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_qlora_nf4_shardability_check():
    """Which NF4 weights FSDP2 can shard: each of an NF4 weight's three parts (packed data,
    one scaler per 64 values, one scaler factor per 16,384 values) must split evenly. The tiny
    model's smallest NF4 weights (k/v, 128 x 256 = 2 scaler factors) split across 2 processes but
    not 4, where the recipe stops before sharding with this message (instead of an assertion
    inside torchao); one process hits a torch FSDP2 shortcut that NF4 does not survive, and stops
    with its own message."""
    from torchtune.models.llama3_2 import lora_llama3_2

    from components.models import qlora_tiny_llama3_2
    from components.models.tiny import TINY_DIMS

    check = load_recipe("lora_finetune_distributed")._check_nf4_shardable
    modules = ["q_proj", "k_proj", "v_proj", "output_proj"]
    with torch.device("meta"):
        tiny = qlora_tiny_llama3_2(modules)
        plain_lora = lora_llama3_2(modules, **TINY_DIMS, lora_rank=8, lora_alpha=16)
    with pytest.raises(ValueError, match="in a single process"):
        check(tiny, 1)
    check(tiny, 2)
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.k_proj\.weight of shape \(128, 256\)"):
        check(tiny, 4)
    check(plain_lora, 1)  # nothing quantized: nothing to check


def test_qlora_trains_on_two_cpu_processes(tmp_path):
    """QLoRA under FSDP2 over gloo: NF4 shards all-gathered on CPU, the loss falls, and the saved
    adapter reproduces the merged weights on the NF4 base (see the single-device QLoRA test;
    here the gathered NF4 base is dequantized to float32, so the fp32 tolerance holds)."""
    from components.models import tiny_checkpoint_dir
    from tests.test_recipe_lora_single_device import (
        LOGITS_ATOL,
        check_peft_matches_merged,
        nf4_roundtrip_base,
    )

    out = tmp_path / "qlora2"
    tune_run(
        "lora_finetune_distributed", "configs/tiny/qlora.yaml", 2, out, *FAST, "batch_size=2",
        "model.lora_dropout=0.0",
    )
    losses = step_losses(latest_log(out))
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 0.1, losses
    for epoch in range(EPOCHS):
        assert not [f for f in files_under(out / f"epoch_{epoch}") if "adapter" in f]
    base = nf4_roundtrip_base(Path(tiny_checkpoint_dir()), via=torch.float32)
    check_peft_matches_merged(out, base, EPOCHS - 1, atol=LOGITS_ATOL)
