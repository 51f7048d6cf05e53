"""SmolLM2-135M-Instruct through medtune's evaluations: the study's USMLE generation protocol gets
option letters from a real instruction-tuned model; `medtune eval` and `lm_eval --model hf` score
the base checkpoint and a fine-tuned one; `medtune push --dry-run` names the real base model.

Default run: the generation protocol on 6 questions of the shipped sample (8 new tokens: the
protocol reads the first option letter) and the base model id of every SmolLM2 config. Behind
`slow`: one 2-step full SFT shared by the fine-tuned checks (the two take ~70 s on idle cores).
"""

import json
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from components.hub.model_card import base_model_id
from components.models import smollm2_checkpoint as sc
from tests.helpers import REPO_ROOT, header_command, run_cli
from tests.test_smollm2_checkpoint import smollm2_dir, smollm2_wheel  # noqa: F401 (session fixtures)

SAMPLE_USMLE = REPO_ROOT / "components" / "data" / "sample" / "usmle"
CONFIGS = sorted((REPO_ROOT / "configs" / "smollm2_135m").glob("*.yaml"))


def medtune_eval(checkpoint: Path, tasks: str, out: Path, limit: int) -> dict:
    """`medtune eval` (in process: no second interpreter to start) on the shipped USMLE sample; its results.json."""
    from components.cli import main

    assert main(["eval", str(checkpoint), "--tasks", tasks, "--limit", str(limit), "--gen-kwargs", "max_gen_toks=8",
                 "--usmle-dir", str(SAMPLE_USMLE), "--output-dir", str(out)]) == 0
    return json.loads((out / "results.json").read_text())


def lm_eval_hf(checkpoint: Path, tasks: str, out: Path, limit: int) -> dict:
    """`lm_eval --model hf ... --include_path evals/tasks` on the shipped USMLE sample; its results."""
    run_cli("lm_eval", [
        "--model", "hf", "--model_args", f"pretrained={checkpoint},dtype=float32",
        "--include_path", str(REPO_ROOT / "evals" / "tasks"), "--tasks", tasks, "--limit", str(limit),
        "--gen_kwargs", "max_gen_toks=8", "--metadata", json.dumps({"usmle_dir": str(SAMPLE_USMLE)}),
        "--device", "cpu", "--batch_size", "8", "--output_path", str(out),
    ])
    (results,) = out.rglob("results_*.json")
    return json.loads(results.read_text())["results"]


def test_generation_protocol_gets_option_letters_from_the_real_model(smollm2_dir, tmp_path):
    body = medtune_eval(smollm2_dir, "usmle_step1_gen", tmp_path, limit=6)
    answered = body["medtune"]["summary"]["usmle_step1_gen"]["answered"]
    print(f"SmolLM2-135M-Instruct, usmle_step1_gen: answered {answered['acc']:.3f} of {answered['n']}")
    assert answered["n"] == 6
    assert answered["acc"] > 0.5  # the tiny random model answers none
    lines = (tmp_path / "samples" / "usmle_step1_gen.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(line)["resps"][0][0].strip() for line in lines)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_smollm2_config_names_the_real_base_model(config):
    data = yaml.safe_load(config.read_text())
    if "model" not in data:  # a config without a model of its own (none today) names no base
        pytest.skip(f"{config.name} builds no model")
    assert base_model_id(data) == sc.HUB_ID
    data["checkpointer"]["source"] = "someone/SmolLM2-135M-medical"
    assert base_model_id(data) == "someone/SmolLM2-135M-medical"


@pytest.fixture(scope="module")
def finetuned(smollm2_dir, smollm2_wheel, tmp_path_factory):  # noqa: F811
    """One 2-step full SFT of configs/smollm2_135m/full_sft.yaml through `tune run`: its output_dir."""
    out = tmp_path_factory.mktemp("smollm2_sft")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDTUNE_CACHE_DIR", str(Path(smollm2_dir).parent))
        mp.setenv(sc.WHEEL_ENV, str(smollm2_wheel))
        command = header_command(REPO_ROOT / "configs" / "smollm2_135m" / "full_sft.yaml")
        run_cli(command[0], command[1:] + [f"output_dir={out}", "max_steps_per_epoch=2", "batch_size=1",
                                           "tokenizer.max_seq_len=64"], timeout=1200)
    return out


@pytest.mark.slow
def test_medtune_eval_and_lm_eval_agree_on_base_and_finetuned(smollm2_dir, finetuned, tmp_path):
    for name, checkpoint in (("base", Path(smollm2_dir)), ("finetuned", finetuned / "epoch_0")):
        ours = medtune_eval(checkpoint, "usmle_step1,usmle_step1_gen", tmp_path / name / "medtune", limit=4)["results"]
        theirs = lm_eval_hf(checkpoint, "usmle_step1,usmle_step1_gen", tmp_path / name / "lm_eval", limit=4)
        for task, metric in (("usmle_step1", "acc,none"), ("usmle_step1_gen", "acc,none"), ("usmle_step1_gen", "answered,none")):
            assert theirs[task][metric] == ours[task][metric], (name, task, metric)
        assert ours["usmle_step1_gen"]["answered,none"] > 0.5, name


@pytest.mark.slow
def test_push_dry_run_card_names_the_real_hub_id(finetuned, capsys):
    from components.cli import main

    assert main(["push", str(finetuned), "--repo-id", "someone/smollm2-medical", "--dry-run"]) == 0
    out = capsys.readouterr().out
    card = ModelCard(out[out.index("---\n"):])
    assert card.data.base_model == sc.HUB_ID
    assert card.data.license == "apache-2.0"
    assert f"https://huggingface.co/{sc.HUB_ID}" in card.text
    assert "4-bit GGUF" in card.text
