"""KnowTuning end to end on the tiny model, through the real `medtune` and `tune` commands.

KA records are scored under the untrained tiny model, stage 1 (LoRA SFT) runs by its config's
header command, stage 2 (LoRA DPO + 0.2 x SFT) reads stage 1's output as base and reference, and
the mean log-probability margin of chosen over rejected on held-out pairs (questions stage 2
never saw) grows from the stage-1 model to the stage-2 model. Few steps, to stay fast on CPU.
"""

import json
import re

import pytest

from components.knowtuning.scoring import load_config, load_model, margin_report, preference_log_probs
from components.data.json_records import read_json_records
from components.metric_logs import latest_log
from tests.helpers import REPO_ROOT, header_command, run_cli

SAMPLE = REPO_ROOT / "components" / "data" / "sample" / "knowtuning_medquad" / "medquad_test.json"
KA_CONFIG = REPO_ROOT / "configs" / "tiny" / "knowtuning_ka.yaml"
KC_CONFIG = REPO_ROOT / "configs" / "tiny" / "knowtuning_kc.yaml"
STAGE1_STEPS_PER_EPOCH = 1  # x 3 epochs (the config's)
STAGE2_STEPS = 4
STAGE2_BATCH = 2
_METRIC = re.compile(r"(\S+?):([-+0-9.eE]+)")


def metrics(log_file):
    """Per-step metric dicts of a torchtune DiskLogger file."""
    return [
        {k: float(v) for k, v in _METRIC.findall(line)}
        for line in log_file.read_text().splitlines()
        if line.startswith("Step ")
    ]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from components.cli import main

    work = tmp_path_factory.mktemp("knowtuning")
    data = ["meadow:" + str(SAMPLE), "--holdout-fraction", "0.2"]
    # `medtune knowtuning ...` in process (its subprocess form is tested in test_knowtuning_pairs)
    # stage-2 pairs: 16 questions to train on, 4 held out
    assert main(["knowtuning", "build-kc", *data, "--out", str(work / "kc_train.jsonl")]) == 0
    assert main(["knowtuning", "build-kc", *data, "--holdout", "validation", "--out", str(work / "kc_heldout.jsonl")]) == 0
    # stage-1 records, facts scored under the model stage 1 starts from (the config's)
    assert main(["knowtuning", "build-ka", *data, "--config", str(KA_CONFIG), "--out", str(work / "ka.jsonl")]) == 0
    stage1, stage2 = work / "stage1", work / "stage2"
    run_cli(
        "tune",
        header_command(KA_CONFIG)[1:]
        + [f"output_dir={stage1}", f"dataset.data_files={work / 'ka.jsonl'}", f"max_steps_per_epoch={STAGE1_STEPS_PER_EPOCH}"],
    )
    run_cli(
        "tune",
        header_command(KC_CONFIG)[1:]
        + [f"output_dir={stage2}", f"stage1_dir={stage1}", f"dataset.data_files={work / 'kc_train.jsonl'}", f"max_steps_per_epoch={STAGE2_STEPS}", f"batch_size={STAGE2_BATCH}"],
    )
    return work, stage1, stage2


def test_ka_file_holds_originals_and_hard_facts(pipeline):
    work, _, _ = pipeline
    rows = read_json_records(work / "ka.jsonl")
    kinds = {r["kind"] for r in rows}
    assert kinds == {"original", "fact"}
    assert sum(r["kind"] == "original" for r in rows) == 16
    assert all(r["perplexity"] > 1 for r in rows if r["kind"] == "fact")


def test_both_stages_ran_and_chained(pipeline):
    _, stage1, stage2 = pipeline
    assert (stage1 / "epoch_2" / "model-00001-of-00001.safetensors").is_file()
    assert (stage2 / "epoch_0" / "model-00001-of-00001.safetensors").is_file()
    assert (stage2 / "adapter" / "epoch_0" / "adapter_model.safetensors").is_file()
    assert not list((stage2 / "epoch_0").glob("adapter_*"))
    steps = metrics(latest_log(stage2))
    assert len(steps) == STAGE2_STEPS
    # step 1: the policy is stage 1's model plus zero-initialised adapters, so it equals the
    # reference: the reference is the stage-1 model
    assert steps[0]["rewards/chosen"] == 0.0 and steps[0]["rewards/rejected"] == 0.0
    assert steps[0]["loss/dpo"] == pytest.approx(0.693147, abs=1e-5)  # log 2
    for step in steps:  # the logged loss is DPO + 0.2 x SFT
        assert step["loss"] == pytest.approx(step["loss/dpo"] + 0.2 * step["loss/sft"], rel=1e-5)


def test_margin_on_held_out_pairs_grows_after_stage_2(pipeline):
    work, stage1, stage2 = pipeline
    pairs = read_json_records(work / "kc_heldout.jsonl")
    assert len(pairs) == 12
    train_questions = {p["instruction"] for p in read_json_records(work / "kc_train.jsonl")}
    assert not train_questions & {p["instruction"] for p in pairs}
    cfg = load_config(KC_CONFIG)
    reports = {}
    for name, checkpoint in (("before", stage1 / "epoch_2"), ("after", stage2 / "epoch_0")):
        model, tokenizer = load_model(cfg, checkpoint_dir=checkpoint)
        reports[name] = margin_report(pairs, preference_log_probs(model, tokenizer, pairs, template=cfg.dataset.template))
    print(json.dumps(reports, indent=2))
    before, after = reports["before"]["all"]["mean_margin"], reports["after"]["all"]["mean_margin"]
    assert after > before + 0.01, reports



def margin_changes(pairs, before, after, overrides=()):
    """Per pair, how much stage 2 moved log p(chosen) - log p(rejected) from stage 1 (what DPO
    optimises: the reward margin over beta)."""
    cfg = load_config(KC_CONFIG, overrides)
    margins = []
    for checkpoint in (before, after):
        model, tokenizer = load_model(cfg, checkpoint_dir=checkpoint)
        margins.append([c - r for c, r in preference_log_probs(model, tokenizer, pairs, template=cfg.dataset.template)])
    return [a - b for a, b in zip(margins[1], margins[0])]


def test_the_quickstarts_knowtuning_moves_the_margin_the_right_way(tmp_path):
    """KnowTuning's four training steps exactly as `medtune study configs/studies/quickstart.yaml`
    runs them: stage 2 moves log p(chosen) - log p(rejected) up from stage 1 on its training pairs
    and, a little, on held-out pairs (the MedQuAD XML sample's questions). At stage 1's learning
    rate (3e-3, the quickstart's before) the DPO term overshot and the margin shrank in 73% of the
    training pairs."""
    from components.study.runner import StudyRunner
    from components.study.spec import load_study

    runner = StudyRunner(load_study(str(REPO_ROOT / "configs/studies/quickstart.yaml")), str(tmp_path), ["knowtuning"])
    runner.steps = [step for step in runner.steps if step.kind == "train"]
    assert [s.run for s in runner.steps] == ["knowtuning_data_ka", "knowtuning_ka", "knowtuning_data_kc", "knowtuning"]
    assert all(o.status == "done" for o in runner.run(echo=lambda _: None))
    stage1, stage2 = runner.checkpoint_of("knowtuning_ka"), runner.checkpoint_of("knowtuning")
    train = read_json_records(tmp_path / "runs" / "knowtuning_data_kc" / "kc.jsonl")
    changes = margin_changes(train, stage1, stage2)
    assert sum(c > 0 for c in changes) / len(changes) > 0.8 and sum(changes) > 0, changes
    from components.cli import main

    assert main(["knowtuning", "build-kc", "medquad:" + str(REPO_ROOT / "components/data/sample/medquad"),
                 "--out", str(tmp_path / "heldout.jsonl")]) == 0
    held_out = read_json_records(tmp_path / "heldout.jsonl")
    assert not {p["instruction"] for p in train} & {p["instruction"] for p in held_out}
    assert sum(margin_changes(held_out, stage1, stage2)) > 0
