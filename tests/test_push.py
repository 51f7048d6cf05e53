"""`medtune push`: the files it picks, the card it writes, what it refuses, how it fails, the token.

One real LoRA training (2 steps of configs/tiny/lora.yaml through `tune run`) lies in a study
output folder laid out as `medtune study` lays it out; the study's manifest.json and results.json
are written by the study's own code (`write_manifest`, `collect`, `write_report`) from evaluation
results made up here, so no evaluation has to run. The Hub is never reached: uploads go to a
stand-in `HfApi` (in process) or to a local port where nothing listens (subprocess).
"""

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Dict, List, Tuple

import httpx
import pytest
import torch
import yaml
from huggingface_hub import CommitOperationDelete, HfApi, ModelCard, constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.repocard_data import model_index_to_eval_results

from components.cli import main
from components.models import tiny_checkpoint_dir
from components.study.manifest import write_manifest
from components.study.report import collect, write_report
from components.study.runner import Outcome, StudyRunner
from components.study.spec import load_study
from tests.helpers import REPO_ROOT, run_cli

REPO_ID = "someone/medtune-test"
TOKEN = "hf_FAKEtokenForTestsOnly0123456789abcdef"
MEADOW_IDS = [
    f"medalpaca/medical_meadow_{name}"
    for name in ("cord19", "medical_flashcards", "wikidoc", "wikidoc_patient_information",
                 "mediqa", "medqa", "mmmlu", "health_advice")
]
TOKENIZER = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "original/tokenizer.model"}
MERGED = {"README.md", "config.json", "generation_config.json", "model.safetensors.index.json",
          "model-00001-of-00001.safetensors"} | TOKENIZER
ADAPTER = {"README.md", "adapter_config.json", "adapter_model.safetensors"} | TOKENIZER
# what `medtune eval` records as the data it scored (results.json medtune.data_reports): the real sets
REAL_SOURCES = {"usmle": "/data/hf/datasets--medalpaca--medical_meadow_usmle_self_assessment/snapshots/abc",
                "medquad": "https://raw.githubusercontent.com/youganglyu/KnowTuning/main/data/meduqad/medquad_test.json"}
SCORES = {  # (task, metric) -> per-question scores of (baseline, lora)
    ("usmle_step1", "acc"): ([1, 0, 0, 0, 1, 0], [1, 1, 0, 0, 1, 1]),
    ("usmle_step2", "acc"): ([0, 0, 1, 0, 0], [0, 1, 1, 0, 1]),
    ("medquad", "bertscore_precision"): ([0.10, 0.12, 0.11], [0.21, 0.19, 0.20]),
    ("medquad", "bertscore_recall"): ([0.05, 0.06, 0.04], [0.09, 0.08, 0.10]),
    ("medquad", "bertscore_f1"): ([0.07, 0.08, 0.06], [0.12, 0.11, 0.13]),
}


def _write_eval_results(folder: Path, which: int, tasks: List[str]) -> None:
    """An evaluation's results.json in the layout `medtune eval` writes (medtune summary + per question)."""
    summary: Dict = {}
    per_question: Dict = {}
    for (task, metric), scores in SCORES.items():
        if task not in tasks:
            continue
        values = scores[which]
        mean = sum(values) / len(values)
        summary.setdefault(task, {})[metric] = {
            "n": len(values), "acc": mean, "ci95_low": max(0.0, mean - 0.1), "ci95_high": min(1.0, mean + 0.1)
        }
        per_question.setdefault(task, {})[metric] = {str(i): v for i, v in enumerate(values)}
    scorers = {"medquad": {"model": "microsoft/deberta-xlarge-mnli", "num_layers": 40}} if "medquad" in tasks else {}
    reports = {task: {"source": REAL_SOURCES[task.split("_")[0]]} for task in tasks}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(
        {"medtune": {"summary": summary, "per_question": per_question, "bertscore": scorers, "data_reports": reports}}
    ))


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A study output folder with one really trained LoRA run, its manifest and its results."""
    base = tmp_path_factory.mktemp("push")
    spec_file = base / "push_study.yaml"
    spec_file.write_text(yaml.safe_dump({
        "name": "push_test",
        "output_dir": str(base / "out"),
        "baseline": {"label": "Baseline", "checkpoint": str(base / "base_model")},
        "runs": {"lora": {"label": "LoRA", "recipe": "recipes/lora_finetune_single_device.py",
                          "config": "configs/tiny/lora.yaml",
                          "overrides": {"max_steps_per_epoch": 2, "tokenizer.max_seq_len": 64}}},
        "evaluations": {
            "usmle": {"table": "usmle", "tasks": ["usmle_step1", "usmle_step2"], "runs": ["baseline", "lora"]},
            "medquad": {"table": "medquad", "tasks": ["medquad"], "runs": ["baseline", "lora"]},
        },
    }))
    spec = load_study(str(spec_file))
    runner = StudyRunner(spec)
    outcomes = []
    for step in runner.steps:
        if step.kind == "train":
            command = runner.command(step)
            run_cli(command[0], command[1:])
        else:
            tasks = spec.evaluations[step.evaluation].tasks
            _write_eval_results(step.output_dir, 0 if step.run == "baseline" else 1, tasks)
            command = runner.command(step)
        outcomes.append(Outcome(step, "done", command, 12.5, 700.0))
    write_manifest(runner, outcomes)
    write_report(spec, runner.root, collect(spec, runner.root))
    return runner.root


@pytest.fixture
def study_copy(study, tmp_path) -> Path:
    """A copy of the study output that a test may break."""
    return Path(shutil.copytree(study, tmp_path / "out"))


def push(capsys, *args: str) -> Tuple[int, str, str]:
    code = main(["push", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def listed_files(out: str) -> List[str]:
    """The paths in the repository that a `--dry-run` lists (the lines before the card)."""
    table = out.split("----- README.md -----")[0].splitlines()[1:]
    return [line.split()[0] for line in table if line.startswith("  ") and "files," not in line]


class FakeHub:
    """Stands in for the Hub's calls; holds the repository's files, applies commits or fails as told."""

    def __init__(self, monkeypatch, fail_commit: Exception = None):
        self.created: List[str] = []
        self.files: Dict[str, bytes] = {}
        self.fail_commit = fail_commit
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setattr(HfApi, "create_repo", self.create_repo)
        monkeypatch.setattr(HfApi, "create_commit", self.create_commit)
        monkeypatch.setattr(HfApi, "list_repo_files", self.list_repo_files)

    def create_repo(self, repo_id, **kwargs):
        self.created.append(repo_id)
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **kwargs):
        operations = list(operations)
        if self.fail_commit is not None:
            raise self.fail_commit
        for op in operations:
            if isinstance(op, CommitOperationDelete):
                del self.files[op.path_in_repo]
                continue
            data = op.path_or_fileobj
            self.files[op.path_in_repo] = data if isinstance(data, bytes) else Path(data).read_bytes()
        url = f"https://huggingface.co/{repo_id}"
        return type("Commit", (), {"repo_url": url, "oid": "0123456789abcdef", "commit_url": f"{url}/commit/0123"})()

    def list_repo_files(self, repo_id, **kwargs):
        return [".gitattributes", *self.files]

    def write(self, folder: Path) -> Path:
        for name, data in self.files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        return folder


def test_dry_run_lists_exactly_the_merged_model(study, capsys):
    code, out, err = push(capsys, study / "runs" / "lora", "--repo-id", REPO_ID, "--dry-run")
    assert code == 0, err
    assert sorted(listed_files(out)) == sorted(MERGED)
    assert "adapter" not in " ".join(listed_files(out))


def test_dry_run_lists_exactly_the_adapter(study, capsys):
    code, out, err = push(capsys, study / "runs" / "lora", "--repo-id", REPO_ID, "--adapter-only", "--dry-run")
    assert code == 0, err
    assert sorted(listed_files(out)) == sorted(ADAPTER)  # not torchtune's adapter_model.pt
    # naming the adapter folder pushes the adapter; --merged overrides that
    adapter_dir = study / "runs" / "lora" / "adapter" / "epoch_0"
    code, named, _ = push(capsys, adapter_dir, "--repo-id", REPO_ID, "--dry-run")
    assert code == 0 and sorted(listed_files(named)) == sorted(ADAPTER)
    code, merged, _ = push(capsys, adapter_dir, "--repo-id", REPO_ID, "--merged", "--dry-run")
    assert code == 0 and sorted(listed_files(merged)) == sorted(MERGED)


def test_a_step_folder_of_a_lora_run_pushes_its_adapter(study_copy, capsys):
    """`step_N/` holds the adapter alone (no merged weights); the tokenizer comes from epoch_N."""
    run = study_copy / "runs" / "lora"
    shutil.copytree(run / "adapter" / "epoch_0", run / "step_2")
    code, out, err = push(capsys, run / "step_2", "--repo-id", REPO_ID, "--dry-run")
    assert code == 0, err
    assert sorted(listed_files(out)) == sorted(ADAPTER)
    assert f"{run / 'epoch_0' / 'tokenizer.json'}" in out
    assert "the study evaluated epoch_0, not step_2: the card has no scores" in err
    assert "model-index" not in out


def test_card_metadata_and_eval_results_round_trip(study, capsys, tmp_path):
    code, out, err = push(capsys, study / "runs" / "lora", "--repo-id", REPO_ID, "--dry-run",
                          "--base-model", "meta-llama/Llama-3.2-3B")
    assert code == 0, err
    (tmp_path / "README.md").write_text(out.split("----- README.md -----\n", 1)[1])
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "meta-llama/Llama-3.2-3B"
    assert data["license"] == "llama3.2"
    assert data["datasets"] == MEADOW_IDS
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"medical", "torchtune", "medtune", "lora"} <= set(data["tags"])
    name, results = model_index_to_eval_results(data["model-index"])
    assert name == "medtune-test"
    cells = json.loads((study / "results.json").read_text())
    cells = [c for c in cells if c["run"] == "lora" and c["value"] is not None]
    assert len(results) == len(cells) == 5
    got = {(r.dataset_type, r.dataset_config, r.metric_type, r.metric_config): r.metric_value for r in results}
    assert got == {
        ("medalpaca/medical_meadow_usmle_self_assessment", "step1", "accuracy", None): pytest.approx(4 / 6),
        ("medalpaca/medical_meadow_usmle_self_assessment", "step2", "accuracy", None): pytest.approx(3 / 5),
        ("lavita/MedQuAD", None, "bertscore", "precision"): pytest.approx(0.20),
        ("lavita/MedQuAD", None, "bertscore", "recall"): pytest.approx(0.09),
        ("lavita/MedQuAD", None, "bertscore", "f1"): pytest.approx(0.12),
    }
    assert sorted(got.values()) == pytest.approx(sorted(c["value"] for c in cells))
    text = card.text
    assert "Not for clinical use" in text and "Step 2 no. 119" in text
    assert "tune run recipes/lora_finetune_single_device.py --config configs/tiny/lora.yaml" in text
    assert "0.667 [0.567, 0.767]" in text  # a score with its 95% interval
    assert "BERTScore model: `microsoft/deberta-xlarge-mnli (layer 40)`." in text  # as results.json records it
    assert str(study) not in text  # local paths are written as $STUDY
    facts = ("seed: 42", "wall time: 12 s", "peak resident memory: 700 MB", "torchtune 0.6.1", "medtune git commit")
    for fact in facts:
        assert fact in text, fact


def _card_results(capsys, run_dir: Path, tmp_path: Path):
    code, out, err = push(capsys, run_dir, "--repo-id", REPO_ID, "--dry-run")
    assert code == 0, err
    (tmp_path / "README.md").write_text(out.split("----- README.md -----\n", 1)[1])
    card = ModelCard.load(tmp_path / "README.md")
    return card, model_index_to_eval_results(card.data.to_dict()["model-index"])[1]


@pytest.mark.parametrize("recorded", ["sample", "nothing"])
def test_model_index_names_the_data_that_was_scored(study_copy, capsys, tmp_path, recorded):
    """Scores on the shipped 12-question sample never pass for the real USMLE set (nor the
    MedQuAD sample for KnowTuning's split); scores whose data went unrecorded say so."""
    samples = {"usmle": "components/data/sample/usmle",
               "medquad": str(REPO_ROOT / "components/data/sample/knowtuning_medquad/medquad_test.json")}
    for results in study_copy.glob("evals/*/lora/results.json"):
        body = json.loads(results.read_text())
        reports = body["medtune"].pop("data_reports")
        if recorded == "sample":
            body["medtune"]["data_reports"] = {t: {"source": samples[t.split("_")[0]]} for t in reports}
        results.write_text(json.dumps(body))
    card, results = _card_results(capsys, study_copy / "runs" / "lora", tmp_path)
    assert len(results) == 5
    by_task = {(r.dataset_config, r.metric_config): r for r in results}
    step1, f1 = by_task[("step1", None)], by_task[(None, "f1")]
    if recorded == "sample":
        assert {r.dataset_type for r in results} == {"medtune-sample-usmle", "medtune-sample-medquad"}
        assert step1.dataset_name.startswith("medtune's shipped USMLE-style sample, Step 1")
        assert "not the USMLE self-assessment" in step1.dataset_name
        assert "not KnowTuning's test split" in f1.dataset_name
        assert "medical_meadow_usmle_self_assessment" not in card.data.to_yaml()
        assert "| medtune's shipped USMLE-style sample, Step 2" in card.text
    else:
        assert step1.dataset_type == "medalpaca/medical_meadow_usmle_self_assessment"
        assert all("(the evaluation did not record its data)" in r.dataset_name for r in results)


def test_medtune_eval_records_the_medquad_file_it_scored(tmp_path):
    """A real `medtune eval` of the MedQuAD task writes which file it scored into results.json,
    where the model card reads it, and reports it without tripping over its USMLE-only fields."""
    sample = REPO_ROOT / "components/data/sample/knowtuning_medquad/medquad_test.json"
    proc = run_cli("medtune", ["eval", tiny_checkpoint_dir(), "--tasks", "medquad", "--limit", "2",
                               "--gen-kwargs", "max_gen_toks=4", "--output-dir", str(tmp_path),
                               "--metadata", json.dumps({"medquad_test": str(sample), "bertscore_model": "none"})])
    assert "Traceback" not in proc.stderr
    reports = json.loads((tmp_path / "results.json").read_text())["medtune"]["data_reports"]
    assert reports["medquad"]["source"] == str(sample)
    from components.hub.model_card import task_dataset

    assert task_dataset("medquad", reports["medquad"]["source"])[0] == "medtune-sample-medquad"


def test_base_model_and_datasets_come_from_the_study_configs():
    from components.hub.model_card import base_model_id, method_of, training_datasets

    def config(name):
        return yaml.safe_load((REPO_ROOT / "configs" / "llama3_2_3B" / name).read_text())

    assert base_model_id(config("lora.yaml")) == "meta-llama/Llama-3.2-3B"
    assert base_model_id(config("qlora.yaml")) == "meta-llama/Llama-3.2-3B"
    assert training_datasets(config("full_sft.yaml")) == MEADOW_IDS
    assert training_datasets(config("full_sft_medquad.yaml")) == ["lavita/MedQuAD"]
    assert method_of(config("qlora.yaml"), "recipes/lora_finetune_single_device.py") == "qlora"
    assert method_of(config("galore.yaml"), "recipes/galore_finetune_single_device.py") == "galore"
    assert method_of(config("full_sft.yaml"), "full_finetune_single_device") == "full-fine-tuning"


def _break(study: Path, how: str) -> Tuple[Path, List[str]]:
    """Damage a copy of the run; return the path to push and the extra arguments."""
    run = study / "runs" / "lora"
    merged, adapter = run / "epoch_0", run / "adapter" / "epoch_0"
    if how == "shard":
        (merged / "model-00001-of-00001.safetensors").unlink()
    elif how == "truncated":
        shard = merged / "model-00001-of-00001.safetensors"
        shard.write_bytes(shard.read_bytes()[:-1000])
    elif how == "config":
        (merged / "config.json").unlink()
    elif how == "tokenizer":
        (merged / "tokenizer.json").unlink()
        (merged / "original" / "tokenizer.model").unlink()
    elif how == "partial":
        (run / ".epoch_1.partial").mkdir()
    elif how == "staging":
        (run / ".epoch_1.partial").mkdir()
        return run / ".epoch_1.partial", []
    elif how == "adapter_config":
        (adapter / "adapter_config.json").unlink()
        return run, ["--adapter-only"]
    elif how == "no_adapter":
        shutil.rmtree(run / "adapter")
        return run, ["--adapter-only"]
    elif how == "failed":
        manifest = json.loads((study / "manifest.json").read_text())
        manifest["steps"][0]["status"] = "failed"
        (study / "manifest.json").write_text(json.dumps(manifest))
    elif how == "study_root":
        return study, []
    return run, []


@pytest.mark.parametrize("how, expected", [
    ("shard", "missing: model-00001-of-00001.safetensors (listed in model.safetensors.index.json)"),
    ("truncated", "model-00001-of-00001.safetensors (truncated:"),
    ("config", "missing: config.json"),
    ("tokenizer", "missing: the tokenizer (tokenizer.json or tokenizer.model or original/tokenizer.model)"),
    ("partial", ".epoch_1.partial is an unfinished save of epoch_1"),
    ("staging", "is the staging folder of a checkpoint save that did not finish"),
    ("adapter_config", "missing: adapter_config.json"),
    ("no_adapter", "has no PEFT adapter for epoch_0"),
    ("failed", "records train/lora as 'failed'"),
    ("study_root", "is a study's output folder; name one of its runs"),
])
def test_incomplete_checkpoints_are_refused(study_copy, capsys, how, expected):
    path, extra = _break(study_copy, how)
    code, out, err = push(capsys, path, "--repo-id", REPO_ID, "--dry-run", *extra)
    assert code == 2
    assert expected in err, err
    assert out == "" and "Traceback" not in err


def test_push_is_one_commit_that_transformers_and_peft_load(study, capsys, monkeypatch, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_hub = FakeHub(monkeypatch)
    code, out, err = push(capsys, study / "runs" / "lora", "--repo-id", REPO_ID, "--private")
    assert code == 0, err
    assert merged_hub.created == [REPO_ID] and set(merged_hub.files) == MERGED
    assert f"pushed {len(MERGED)} files to https://huggingface.co/{REPO_ID}" in out
    merged_dir = merged_hub.write(tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    tokens = AutoTokenizer.from_pretrained(merged_dir)("What causes anemia?", return_tensors="pt")

    adapter_hub = FakeHub(monkeypatch)
    code, out, err = push(capsys, study / "runs" / "lora", "--repo-id", REPO_ID, "--adapter-only")
    assert code == 0, err
    adapter_dir = adapter_hub.write(tmp_path / "adapter")
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    assert ModelCard.load(adapter_dir / "README.md").data.library_name == "peft"
    # the adapter on the model it was trained from gives the merged model's logits
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint_dir())
    with_adapter = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        expected, got = model(**tokens).logits, with_adapter(**tokens).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_a_second_push_names_stale_files_and_replace_deletes_them_in_its_commit(study, capsys, monkeypatch):
    """Merged model, then adapter, to one repository: the merged files stay (with a warning)
    unless --replace deletes them in the adapter's commit."""
    hub = FakeHub(monkeypatch)
    code, _, err = push(capsys, study / "runs" / "lora", "--repo-id", REPO_ID)
    assert code == 0 and "warning" not in err, err
    code, _, err = push(capsys, study / "runs" / "lora", "--repo-id", REPO_ID, "--adapter-only")
    stale = sorted(MERGED - ADAPTER)
    assert code == 0, err
    assert f"warning: {REPO_ID} keeps {len(stale)} files that this push does not write: {', '.join(stale)}" in err
    assert set(hub.files) == MERGED | ADAPTER
    code, out, err = push(capsys, study / "runs" / "lora", "--repo-id", REPO_ID, "--adapter-only", "--replace")
    assert code == 0 and "warning" not in err, err
    assert f"deleting {len(stale)} files of {REPO_ID} that this push does not write" in out
    assert set(hub.files) == ADAPTER


def test_failure_mid_upload_says_what_and_claims_nothing(study, capsys, monkeypatch):
    request = httpx.Request("POST", f"https://huggingface.co/api/models/{REPO_ID}/commit/main")
    error = HfHubHTTPError(
        f"500 Server Error for url {request.url} (headers: Authorization: Bearer {TOKEN})",
        response=httpx.Response(500, request=request),
    )
    hub = FakeHub(monkeypatch, fail_commit=error)
    code, out, err = push(capsys, study / "runs" / "lora", "--repo-id", REPO_ID)
    assert code == 1
    assert hub.created == [REPO_ID] and hub.files == {}
    assert f"FAILED while uploading {len(MERGED)} files" in err and REPO_ID in err
    assert "500 Server Error" in err and "none of them was published" in err
    assert "pushed" not in out
    assert TOKEN not in out + err and "hf_FAKE" not in out + err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_token_never_printed_nor_written(study_copy, capsys, monkeypatch):
    """A dry run and a real push that cannot connect, with a token in the environment."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code, dry_out, dry_err = push(capsys, study_copy / "runs" / "lora", "--repo-id", REPO_ID, "--dry-run")
    assert code == 0
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")  # huggingface_hub reads it as HF_HUB_OFFLINE too
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_free_port()}")
    proc = run_cli("medtune", ["push", str(study_copy / "runs" / "lora"), "--repo-id", REPO_ID], check=False)
    assert proc.returncode == 1, proc.stderr
    assert f"FAILED while creating the repository {REPO_ID}" in proc.stderr
    assert "No file was uploaded." in proc.stderr and "pushed" not in proc.stdout
    for text in (dry_out, dry_err, proc.stdout, proc.stderr):
        assert TOKEN not in text and "hf_FAKE" not in text
    for root in (study_copy, Path(os.environ["HF_HOME"])):
        for path in root.rglob("*"):
            if path.is_file():
                assert TOKEN.encode() not in path.read_bytes(), path


def test_no_token_stops_before_the_network(study, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(HfApi, "create_repo", lambda *a, **k: pytest.fail("reached the Hub without a token"))
    code, out, err = push(capsys, study / "runs" / "lora", "--repo-id", REPO_ID)
    assert code == 2 and "no Hugging Face token: set HF_TOKEN" in err


@pytest.mark.parametrize("repo_id", ["no-slash", "a/b/c", "bad name/x"])
def test_bad_repo_ids_are_refused(study, capsys, repo_id):
    code, _, err = push(capsys, study / "runs" / "lora", "--repo-id", repo_id, "--dry-run")
    assert code == 2 and "--repo-id" in err
