"""Every configs/smollm2_135m training, run by its header's `tune run` line on SmolLM2-135M-Instruct.

Short on purpose (about 5 s a step on a loaded 2-core CPU): a few steps at batch 2. For the
medAlpaca configs `tokenizer.max_seq_len=32` keeps each sequence to <|endoftext|>, the first 30
tokens of the medAlpaca primer (the same in all 285 training records, and trained:
train_on_input) and <|im_end|>, so every step sees the same tokens and the loss of one step compares with the next.
Default suite: full SFT (with the logit check on its checkpoint) and LoRA, about 20 and 13 s of
CPU. Behind the slow marker: QLoRA (NF4 quantization: about 35 s with a merged save), GaLore in both
modes, KnowTuning's two stages and the eval config on the full-SFT checkpoint.
"""

import json
import math
from pathlib import Path
from typing import List

import pytest
import torch

from components.cli import main
from components.metric_logs import latest_log, read_losses, step_metrics
from components.models import smollm2_checkpoint as sc
from tests.helpers import REPO_ROOT, header_command, run_cli
from tests.test_smollm2_checkpoint import smollm2_session_cache, smollm2_session_wheel
from tests.test_smollm2_model import LOGIT_ATOL

CONFIGS = REPO_ROOT / "configs" / "smollm2_135m"
STEPS = 3
QUICK = [f"max_steps_per_epoch={STEPS}", "batch_size=2", "tokenizer.max_seq_len=32"]
KNOWTUNING_SAMPLE = REPO_ROOT / "components" / "data" / "sample" / "knowtuning_medquad" / "medquad_test.json"


@pytest.fixture(scope="module")
def smollm2_env(tmp_path_factory):
    """The session's converted checkpoint, and the environment that points `tune run` at it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDTUNE_CACHE_DIR", str(smollm2_session_cache(tmp_path_factory)))
        mp.setenv(sc.WHEEL_ENV, str(smollm2_session_wheel(tmp_path_factory)))
        yield Path(sc.smollm2_checkpoint_dir())


def tune(config: str, output_dir: Path, *overrides: str) -> List[float]:
    """Run configs/smollm2_135m/<config>.yaml by its header command; the per-step losses."""
    command = header_command(CONFIGS / f"{config}.yaml")
    run_cli("tune", command[1:] + [f"output_dir={output_dir}", *overrides], timeout=1200)
    return read_losses(latest_log(output_dir))


def assert_falls(losses: List[float], steps: int = STEPS) -> None:
    assert len(losses) == steps, losses
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.fixture(scope="module")
def full_sft(smollm2_env, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("smollm2-full-sft")
    return output_dir, tune("full_sft", output_dir, *QUICK, "optimizer.lr=1e-4")


def test_full_sft_loss_falls(full_sft):
    assert_falls(full_sft[1])


def test_full_sft_checkpoint_gives_torchtunes_logits_in_transformers(full_sft, smollm2_env):
    """The trained folder loads in transformers and gives the logits of torchtune's model on the
    same weights (float32 both; LOGIT_ATOL as before training), and it is not the base model."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from torchtune.training import FullModelHFCheckpointer

    from components.models.smollm2 import smollm2_135m

    trained = full_sft[0] / "epoch_0"
    hf = AutoModelForCausalLM.from_pretrained(trained, dtype=torch.float32).eval()
    files = sorted(p.name for p in trained.glob("*.safetensors"))
    checkpointer = FullModelHFCheckpointer(checkpoint_dir=str(trained), checkpoint_files=files,
                                           model_type="LLAMA3_2", output_dir=str(full_sft[0] / "reload"))
    model = smollm2_135m()
    model.load_state_dict(checkpointer.load_checkpoint()["model"])
    model.eval()
    ids = AutoTokenizer.from_pretrained(trained)(
        "Question: Which vitamin deficiency causes scurvy? Answer:", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=LOGIT_ATOL, rtol=0)
    base = load_file(str(smollm2_env / sc.CHECKPOINT_FILE))
    weights = {k: v for f in files for k, v in load_file(str(trained / f)).items()}
    assert weights.keys() == base.keys()
    assert sum(not torch.equal(base[k], weights[k]) for k in base) > len(base) // 2


@pytest.mark.parametrize(
    "config, overrides",
    [
        ("lora", ["optimizer.lr=1e-3", "save_adapter_weights_only=True"]),
        pytest.param("qlora", ["optimizer.lr=1e-3", "save_adapter_weights_only=True"], marks=pytest.mark.slow),
        pytest.param("galore", ["optimizer.lr=1e-4", "optimizer.svd=randomized"], marks=pytest.mark.slow),
        pytest.param("galore_layerwise", ["optimizer.lr=1e-4", "optimizer.svd=randomized"], marks=pytest.mark.slow),
    ],
)
def test_config_trains_and_loss_falls(smollm2_env, tmp_path, config, overrides):
    assert_falls(tune(config, tmp_path, *QUICK, *overrides))
    if config.endswith("lora"):
        assert (tmp_path / "adapter" / "epoch_0" / "adapter_model.safetensors").is_file()
    else:
        assert (tmp_path / "epoch_0" / "model-00001-of-00001.safetensors").is_file()


@pytest.mark.slow
def test_knowtuning_stages_train_and_chain(smollm2_env, tmp_path):
    """Stage 1 on KA records whose facts SmolLM2 scored (2 sample questions: 9 rows), 3 epochs of
    one whole-file batch; stage 2 on those questions' 6 pairs, from stage 1's epoch_2 (base and
    reference), 3 epochs of one whole-file batch: the SFT loss and then the DPO term fall."""
    spec = ["meadow:" + str(KNOWTUNING_SAMPLE), "--holdout-fraction", "0.1", "--holdout", "validation"]
    ka, kc = tmp_path / "ka.jsonl", tmp_path / "kc.jsonl"
    assert main(["knowtuning", "build-ka", *spec, "--config", str(CONFIGS / "knowtuning_ka.yaml"), "--out", str(ka)]) == 0
    assert main(["knowtuning", "build-kc", *spec, "--out", str(kc)]) == 0
    rows = [json.loads(line) for line in ka.read_text().splitlines()]
    pairs = len(kc.read_text().splitlines())
    assert {r["kind"] for r in rows} == {"original", "fact"} and pairs >= 3

    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    assert_falls(tune("knowtuning_ka", stage1, f"dataset.data_files={ka}", f"batch_size={len(rows)}",
                      "max_steps_per_epoch=1", "tokenizer.max_seq_len=96", "optimizer.lr=1e-3"))
    assert (stage1 / "epoch_2" / "model-00001-of-00001.safetensors").is_file()
    tune("knowtuning_kc", stage2, f"stage1_dir={stage1}", f"dataset.data_files={kc}", f"batch_size={pairs}",
         "max_steps_per_epoch=1", f"epochs={STEPS}", "tokenizer.max_seq_len=128", "optimizer.lr=1e-4")
    steps = [m for _, m in sorted(step_metrics(latest_log(stage2)).items())]
    dpo = [m["loss/dpo"] for m in steps]
    assert len(dpo) == STEPS and dpo[0] == pytest.approx(math.log(2), abs=1e-5), dpo  # policy = reference
    assert dpo[-1] < dpo[0] and steps[-1]["rewards/margins"] > 0, steps
    assert (stage2 / "adapter" / f"epoch_{STEPS - 1}" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_eval_config_scores_the_trained_checkpoint(full_sft, tmp_path):
    """configs/smollm2_135m/eval.yaml by its header line on the full-SFT run's epoch_0: both
    USMLE protocols on 3 questions, results.json and the generation samples written."""
    command = header_command(CONFIGS / "eval.yaml")
    run_cli("tune", command[1:] + [f"output_dir={tmp_path}", f"checkpointer.checkpoint_dir={full_sft[0] / 'epoch_0'}",
                                   "tasks=[usmle_step1,usmle_step1_gen]", "limit=3"], timeout=1200)
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert {"usmle_step1", "usmle_step1_gen"} <= set(results)
    assert 0 <= results["usmle_step1"]["acc,none"] <= 1
    assert len((tmp_path / "samples" / "usmle_step1_gen.jsonl").read_text().splitlines()) == 3
