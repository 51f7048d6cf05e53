"""A tiny trained checkpoint, evaluated in process (recipes/eleuther_eval.py, run by the line in
configs/tiny/eval.yaml) and by the stock `lm_eval --model hf`: same log-likelihood accuracy and
the same greedy generations."""

import json

import pytest

from tests.helpers import REPO_ROOT, header_command, run_cli

SAMPLE_USMLE = REPO_ROOT / "components" / "data" / "sample" / "usmle"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("full_sft")
    command = header_command(REPO_ROOT / "configs" / "tiny" / "full_sft.yaml")
    run_cli("tune", command[1:] + [f"output_dir={out}", "max_steps_per_epoch=4"])
    return out / "epoch_0"


@pytest.fixture(scope="module")
def in_process(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    command = header_command(REPO_ROOT / "configs" / "tiny" / "eval.yaml")
    assert command[:3] == ["tune", "run", "recipes/eleuther_eval.py"]
    proc = run_cli("tune", command[1:] + [
        f"output_dir={out}",
        f"checkpointer.checkpoint_dir={trained}",
        "tasks=[usmle_mc,usmle_step1_gen]",
        "gen_kwargs.max_gen_toks=4",  # a smoke test of generation; the protocol's 128 is slow on CPU
    ])
    return out, proc


def test_recipe_writes_results_and_samples(in_process):
    out, proc = in_process
    body = json.loads((out / "results.json").read_text())
    assert {"usmle_step1", "usmle_step2", "usmle_step3", "usmle_mc", "usmle_step1_gen"} <= set(body["results"])
    assert body["results"]["usmle_step1"]["acc_stderr,none"] > 0
    summary = body["medtune"]["summary"]
    assert summary["usmle_mc"]["acc"]["n"] == 35  # the sample: 12 per step; like the real set, one has no options
    assert summary["usmle_step1_gen"]["acc"]["n"] == 12
    lines = (out / "samples" / "usmle_step1_gen.jsonl").read_text().splitlines()
    assert len(lines) == 12
    assert json.loads(lines[0])["arguments"][0][0].endswith("The Answer to the question is:")
    assert "95% bootstrap interval" in proc.stdout + proc.stderr


def test_in_process_and_lm_eval_hf_agree(trained, in_process, tmp_path):
    out, _ = in_process
    ours = json.loads((out / "results.json").read_text())["results"]
    run_cli("lm_eval", [
        "--model", "hf", "--model_args", f"pretrained={trained},dtype=float32",
        "--include_path", str(REPO_ROOT / "evals" / "tasks"), "--tasks", "usmle_mc,usmle_step1_gen",
        "--gen_kwargs", "max_gen_toks=4",
        "--metadata", json.dumps({"usmle_dir": str(SAMPLE_USMLE)}),
        "--device", "cpu", "--batch_size", "8", "--output_path", str(tmp_path), "--log_samples",
    ])
    (results_file,) = tmp_path.rglob("results_*.json")
    theirs = json.loads(results_file.read_text())["results"]
    for step in (1, 2, 3):
        assert theirs[f"usmle_step{step}"]["acc,none"] == ours[f"usmle_step{step}"]["acc,none"], step
    # the same choices question by question, from near-identical log-likelihoods
    (hf_samples,) = tmp_path.rglob("samples_usmle_step2_*.jsonl")
    hf = {json.loads(l)["doc_id"]: json.loads(l) for l in hf_samples.read_text().splitlines()}
    tt = {json.loads(l)["doc_id"]: json.loads(l) for l in (out / "samples" / "usmle_step2.jsonl").read_text().splitlines()}
    assert hf.keys() == tt.keys()
    for doc_id, sample in tt.items():
        ll_tt = [float(r[0][0]) for r in sample["resps"]]
        ll_hf = [float(r[0][0]) for r in hf[doc_id]["resps"]]
        assert ll_tt == pytest.approx(ll_hf, abs=1e-3)
    # greedy generations: the same text (our KV caches are sized per batch, transformers' grow)
    (hf_gen,) = tmp_path.rglob("samples_usmle_step1_gen_*.jsonl")
    hf = {json.loads(l)["doc_id"]: json.loads(l)["resps"] for l in hf_gen.read_text().splitlines()}
    tt = {json.loads(l)["doc_id"]: json.loads(l)["resps"] for l in (out / "samples" / "usmle_step1_gen.jsonl").read_text().splitlines()}
    assert len(tt) == 12 and tt == hf
