"""recipes/lora_finetune_single_device.py through the real `tune` executable, on CPU.

LoRA and QLoRA (NF4 base) on the tiny model with configs/tiny/{lora,qlora}.yaml: the loss falls,
`epoch_N/` is a plain merged Hugging Face model with no adapter files, and the PEFT adapter in
`adapter/epoch_N/` loaded by peft onto the base gives the merged model's logits. A run resumed
from `epoch_0/` (recipe state) finds the adapter in `adapter/epoch_0/`. Step checkpoints and
mid-epoch resume: test_resume_single_device.py.
"""

import json
import re
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from components.metric_logs import latest_log, step_losses
from tests.helpers import run_cli

RECIPE = "recipes/lora_finetune_single_device.py"
STEPS = 20
# Short sequences keep each run to a few seconds; the loss still falls clearly within 20 steps.
FAST = [f"max_steps_per_epoch={STEPS}", "tokenizer.max_seq_len=128", "log_every_n_steps=1"]
# peft's LoRA on the base against the merged weights: same fp32 model, only the order of the
# additions differs (measured max |diff| ~2e-6 on logits of magnitude ~5).
LOGITS_ATOL = 1e-4
# QLoRA: torchtune dequantizes the NF4 base through bfloat16 for the merge and adds the LoRA delta
# in place into that bfloat16 weight, so the merged q/k/v/o weights carry bf16 rounding of their
# sum that peft (fp32 delta on the same base) does not (measured max |diff| ~6e-3 on logits).
QLORA_LOGITS_ATOL = 2e-2
ADAPTER_FILES = {"adapter_model.safetensors", "adapter_config.json", "adapter_model.pt"}


def tune_run(config: str, out: Path, *overrides: str) -> str:
    proc = run_cli("tune", ["run", RECIPE, "--config", config, f"output_dir={out}", *overrides])
    return proc.stdout + proc.stderr


def files_under(path: Path) -> List[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


# Two epochs of 10 steps (20 in all), so epoch 0 also leaves a resumable recipe state. With the
# config's LoRA dropout: the recipe state holds the RNG state, so a resumed run draws the same
# dropout masks.
LORA_RUN = [*FAST, "epochs=2", "max_steps_per_epoch=10"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    tune_run("configs/tiny/lora.yaml", out, *LORA_RUN)
    return out


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora")
    tune_run("configs/tiny/qlora.yaml", out, *FAST)
    return out


def assert_loss_falls(losses: Dict[int, float]) -> None:
    assert sorted(losses) == list(range(1, STEPS + 1))
    first = sum(losses[s] for s in (1, 2, 3)) / 3
    last = sum(losses[s] for s in (STEPS - 2, STEPS - 1, STEPS)) / 3
    assert last < first - 0.2, losses


def assert_adapter_layout(out: Path, epoch: int) -> None:
    merged = out / f"epoch_{epoch}"
    adapter = out / "adapter" / f"epoch_{epoch}"
    merged_files = set(files_under(merged))
    # epoch_N: the merged HF model with its config and tokenizer files, and nothing of the adapter.
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= merged_files
    assert any(f.startswith("model-") and f.endswith(".safetensors") for f in merged_files)
    assert not [f for f in merged_files if "adapter" in f], merged_files
    assert set(files_under(adapter)) == ADAPTER_FILES
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def nf4_roundtrip_base(base_dir: Path, via: torch.dtype = torch.bfloat16):
    """The HF base model with every weight QLoRA quantizes replaced by its NF4 round trip.

    torchtune's QLoRA merges the adapter into the *dequantized* NF4 base, so the PEFT adapter
    reproduces the merged model only on top of that same base. The single-device recipe
    dequantizes through bfloat16 (the QLoRA builders' state-dict hook's default dtype, whatever
    the recipe's dtype); the distributed one gathers the NF4 shards and dequantizes to float32:
    `via` picks which. The round trip is done in torchtune's layout (HF permutes q/k rows, which
    would change NF4's 64-value blocks).
    """
    from safetensors.torch import load_file
    from torchao.dtypes.nf4tensor import to_nf4
    from torchtune.models.convert_weights import hf_to_tune, tune_to_hf
    from transformers import AutoModelForCausalLM

    cfg = json.loads((base_dir / "config.json").read_text())
    dims = dict(
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg["num_key_value_heads"],
        dim=cfg["hidden_size"],
        head_dim=cfg["head_dim"],
    )
    sd = hf_to_tune(load_file(base_dir / "model.safetensors"), **dims)
    quantized = re.compile(r"layers\.\d+\.(attn\.(q|k|v|output)_proj|mlp\.w[123])\.weight")
    n = 0
    for key in list(sd):
        if quantized.fullmatch(key):
            sd[key] = to_nf4(sd[key]).to(via).to(torch.float32)
            n += 1
    assert n == 7 * cfg["num_hidden_layers"]
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(tune_to_hf(sd, **dims), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    return model.eval()


def check_peft_matches_merged(out: Path, base, epoch: int = 0, atol: float = LOGITS_ATOL) -> float:
    """Logits of peft(base, adapter/epoch_N) == logits of the merged epoch_N; returns the max diff."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / f"epoch_{epoch}", dtype=torch.float32).eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    base_logits = hf_logits(base, ids)
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter" / f"epoch_{epoch}")).eval()
    peft_logits = hf_logits(peft_model, ids)
    merged_logits = hf_logits(merged, ids)
    # The adapter really changes the model (else the comparison below would prove nothing) ...
    assert (peft_logits - base_logits).abs().max() > 10 * atol
    # ... and peft reproduces the merged weights.
    diff = (peft_logits - merged_logits).abs().max().item()
    assert diff < atol, diff
    return diff


def test_lora_loss_falls_and_adapter_is_kept_apart(lora_run):
    assert_loss_falls(step_losses(latest_log(lora_run)))
    for epoch in (0, 1):
        assert_adapter_layout(lora_run, epoch)
    assert (lora_run / "epoch_0" / "recipe_state.pt").is_file()
    assert not (lora_run / "epoch_1" / "recipe_state.pt").exists(), "nothing follows the last epoch"


@pytest.mark.parametrize("epoch", [0, 1])
def test_lora_adapter_loads_with_peft_onto_base(lora_run, epoch):
    """Epoch 1 also checks that saving epoch 0 left the model being trained intact (on CPU,
    torchtune's merge added the LoRA delta into the live base weights, so every later epoch
    trained on, and saved, a base that already held an earlier delta)."""
    from transformers import AutoModelForCausalLM

    from components.models import tiny_checkpoint_dir

    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint_dir(), dtype=torch.float32).eval()
    check_peft_matches_merged(lora_run, base, epoch)


def test_lora_resume_finds_adapter_in_its_folder(lora_run, tmp_path):
    """Resume epoch 1 from epoch 0's recipe state and its adapter (in adapter/epoch_0)."""
    out = tmp_path / "resumed"
    out.mkdir()
    for part in ("adapter/epoch_0", "epoch_0"):
        src = lora_run / part
        for f in src.rglob("*"):
            if f.is_file():
                dst = out / part / f.relative_to(src)
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(f.read_bytes())
    log = tune_run("configs/tiny/lora.yaml", out, *LORA_RUN, "resume_from_checkpoint=True")
    assert f"Resuming from {out / 'epoch_0'} (adapter: {out / 'adapter' / 'epoch_0' / 'adapter_model.pt'})" in log
    resumed = step_losses(latest_log(out))
    uninterrupted = step_losses(latest_log(lora_run))
    # It continues the step count and reproduces the uninterrupted run's epoch 1.
    assert sorted(resumed) == list(range(11, 21))
    for step in resumed:
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6), (resumed, uninterrupted)
    assert_adapter_layout(out, 1)


def test_qlora_loss_falls_and_adapter_reproduces_merged_on_nf4_base(qlora_run):
    from components.models import tiny_checkpoint_dir

    assert_loss_falls(step_losses(latest_log(qlora_run)))
    assert_adapter_layout(qlora_run, 0)
    check_peft_matches_merged(
        qlora_run, nf4_roundtrip_base(Path(tiny_checkpoint_dir())), atol=QLORA_LOGITS_ATOL
    )
