"""SmolLM2-135M-Instruct through `tune run` (slow: about 20 s a step on a loaded 2-core CPU)."""

import pytest

from components.models import smollm2_checkpoint as sc
from tests.helpers import REPO_ROOT, header_command, run_cli
from tests.test_smollm2_checkpoint import smollm2_session_cache, smollm2_session_wheel


@pytest.mark.slow
def test_lora_config_trains_and_loss_falls(tmp_path_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTUNE_CACHE_DIR", str(smollm2_session_cache(tmp_path_factory)))
    monkeypatch.setenv(sc.WHEEL_ENV, str(smollm2_session_wheel(tmp_path_factory)))
    out = tmp_path / "lora"
    command = header_command(REPO_ROOT / "configs" / "smollm2_135m" / "lora.yaml")
    run_cli(command[0], command[1:] + [f"output_dir={out}", "max_steps_per_epoch=6", "batch_size=2",
                                       "tokenizer.max_seq_len=128", "optimizer.lr=1e-3"], timeout=1200)
    log = next((out / "logs").glob("*.txt")).read_text()
    losses = [float(line.split("loss:")[1].split()[0]) for line in log.splitlines() if "loss:" in line]
    assert len(losses) == 6
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses
    assert (out / "adapter" / "epoch_0" / "adapter_model.safetensors").is_file()
