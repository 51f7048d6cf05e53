"""The cached data pipeline: hits, misses, killed builds, skip counts, and the same tokens as the
lazy (uncached) path."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import pytest
from torchtune.datasets import PackedDataset

from components.data import DataError, medical_meadow_mixture
from components.data import pipeline
from components.data.instruct import load_instruction_rows
from components.data.medical_meadow import MEDICAL_MEADOW_SETS
from components.models import tiny_llama3_2_tokenizer

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "components" / "data" / "sample" / "medical_meadow"


@pytest.fixture(scope="module")
def tok256():
    return tiny_llama3_2_tokenizer(max_seq_len=256)


@pytest.fixture(scope="module")
def eval_sets(shared_data):
    return {
        "usmle": str(shared_data / "usmle"),
        "medquad_test": str(shared_data / "knowtuning_medquad" / "medquad_test.json"),
    }


@pytest.fixture(scope="module")
def real_dir(shared_data, tmp_path_factory):
    """The real 5,942-row sample as the wikidoc_patient_information set, plus a JSONL set."""
    out = tmp_path_factory.mktemp("real")
    rows = json.loads((shared_data / "medical_meadow_small.json").read_text())
    shutil.copy(shared_data / "medical_meadow_small.json", out / "wikidoc_patient_information.json")
    (out / "mmmlu.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:300]) + "\n")
    return out


def _items(ds):
    return [ds[i] for i in range(len(ds))]


def _same_items(cached, lazy):
    assert len(cached) == len(lazy)
    for a, b in zip(_items(cached), _items(lazy)):
        assert a["tokens"] == list(b["tokens"])
        assert a["labels"] == [int(x) for x in b["labels"]]
        assert a["mask"] == list(b["mask"])


def _complete(cache_dir: Path):
    return sorted(p.name for p in cache_dir.glob("medical_meadow_mixture-*") if (p / "report.json").is_file())


def test_cached_equals_uncached_on_the_real_sample(tmp_path, tok256, real_dir, eval_sets):
    kwargs = dict(data_dir=str(real_dir), sets=["wikidoc_patient_information", "mmmlu"], holdout_fraction=0.1,
                  decontaminate=eval_sets)
    cached = medical_meadow_mixture(tok256, cache_dir=str(tmp_path), **kwargs)
    lazy = medical_meadow_mixture(tok256, cache=False, **kwargs)
    assert isinstance(cached, pipeline.CachedInstructDataset)
    assert list(cached._data.select_columns(["instruction", "input", "output"])) == list(lazy._data)
    _same_items(cached, lazy)
    for key in ("rows", "sets", "holdout", "final"):
        assert cached.report[key] == lazy.report[key]
    assert cached.report["decontamination"] == lazy.report["decontamination"]
    assert cached.report["decontamination"]["removed"] > 0
    assert cached.report["skipped"] == {"contaminated": cached.report["decontamination"]["removed"], "empty": 0, "too_long": 0}
    assert 0 < cached.report["truncated"] < len(cached)  # truncated to 256 and counted, as the study did


@pytest.mark.parametrize("max_seq_len", [None, 64])
def test_chat_template_unmasked_and_unlimited(tmp_path, max_seq_len):
    tok = tiny_llama3_2_tokenizer(max_seq_len=max_seq_len)
    kwargs = dict(data_dir=str(SAMPLE), sets={"mediqa": None, "medqa": 20}, template="llama3_chat",
                  train_on_input=False, system_prompt="Be brief.")
    cached = medical_meadow_mixture(tok, cache_dir=str(tmp_path), **kwargs)
    _same_items(cached, medical_meadow_mixture(tok, cache=False, **kwargs))


def test_tiny_config_dataset_is_unchanged(tmp_path, tok256):
    """configs/tiny/*.yaml's dataset: same tokens in the same order, so pinned losses hold."""
    kwargs = dict(data_dir=str(SAMPLE), template="medalpaca", train_on_input=True, holdout_fraction=0.1,
                  holdout_seed=42, holdout="train", decontaminate={"usmle": "components/data/sample/usmle"})
    cached = medical_meadow_mixture(tok256, cache_dir=str(tmp_path), **kwargs)
    _same_items(cached, medical_meadow_mixture(tok256, cache=False, **kwargs))


def test_same_settings_hit_without_any_work(tmp_path, tok256, monkeypatch):
    kwargs = dict(data_dir=str(SAMPLE), holdout_fraction=0.1, cache_dir=str(tmp_path))
    first = medical_meadow_mixture(tok256, **kwargs)
    assert first.report["cache"]["hit"] is False
    builds = pipeline.STATS["builds"]

    def forbidden(*args, **kwargs):
        raise AssertionError("a cache hit must not read, check or tokenize anything")

    monkeypatch.setattr(pipeline.RecordProcessor, "__call__", forbidden)
    monkeypatch.setattr(pipeline, "write_instruction_file", forbidden)
    monkeypatch.setattr(pipeline, "_build", forbidden)
    again = medical_meadow_mixture(tok256, **kwargs)
    assert pipeline.STATS["builds"] == builds
    assert again.report["cache"]["hit"] is True and again.cache_dir == first.cache_dir
    assert _items(again) == _items(first)
    assert {k: v for k, v in again.report.items() if k != "cache"} == {k: v for k, v in first.report.items() if k != "cache"}
    assert len(_complete(tmp_path)) == 1


def test_a_fresh_tokenizer_object_with_the_same_files_hits(tmp_path):
    kwargs = dict(data_dir=str(SAMPLE), sets=["mmmlu"], cache_dir=str(tmp_path))
    medical_meadow_mixture(tiny_llama3_2_tokenizer(max_seq_len=256), **kwargs)
    assert medical_meadow_mixture(tiny_llama3_2_tokenizer(max_seq_len=256), **kwargs).report["cache"]["hit"]


@pytest.mark.parametrize(
    "change",
    ["max_seq_len", "train_on_input", "template", "holdout_seed", "holdout_part", "ngram", "caps", "mix_seed",
     "skip_empty", "long_records", "input_file", "eval_file", "code", "filter_fn"],
)
def test_a_changed_setting_misses(tmp_path, change, shared_data, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(SAMPLE, data)
    usmle = tmp_path / "usmle"
    shutil.copytree(REPO / "components" / "data" / "sample" / "usmle", usmle)
    cache = tmp_path / "cache"
    base = dict(data_dir=str(data), sets={"mmmlu": None, "mediqa": 3}, holdout_fraction=0.2,
                decontaminate={"usmle": str(usmle)}, cache_dir=str(cache))
    tok = tiny_llama3_2_tokenizer(max_seq_len=128)
    first = medical_meadow_mixture(tok, **base)
    kwargs = dict(base)
    if change == "max_seq_len":
        tok = tiny_llama3_2_tokenizer(max_seq_len=64)
    elif change == "train_on_input":
        kwargs["train_on_input"] = False
    elif change == "template":
        kwargs["template"] = "alpaca"
    elif change == "holdout_seed":
        kwargs["holdout_seed"] = 1
    elif change == "holdout_part":
        kwargs["holdout"] = "validation"
    elif change == "ngram":
        kwargs["decontaminate_ngram"] = 8
    elif change == "caps":
        kwargs["sets"] = {"mmmlu": None, "mediqa": 4}
    elif change == "mix_seed":
        kwargs["mix_seed"] = 7
    elif change == "skip_empty":
        kwargs["skip_empty"] = True
    elif change == "long_records":
        kwargs["long_records"] = "skip"
    elif change == "input_file":
        path = data / "mmmlu.json"
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    elif change == "eval_file":
        path = next(usmle.glob("*.json"))
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    elif change == "code":
        monkeypatch.setattr(pipeline, "PIPELINE_VERSION", "test-bump")
    elif change == "filter_fn":
        kwargs["filter_fn"] = lambda row: len(row["output"]) > 10
    second = medical_meadow_mixture(tok, **kwargs)
    assert second.report["cache"]["hit"] is False
    assert second.cache_dir != first.cache_dir
    assert len(_complete(cache)) == 2


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    from components.data import medical_meadow_mixture, pipeline
    from components.models import tiny_llama3_2_tokenizer
    where = {where!r}
    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    if where == "tokenizing":
        pipeline.RecordProcessor.__call__ = die
    else:  # after the Arrow data is written, before the report and the rename
        pipeline.write_report = die
    medical_meadow_mixture(tiny_llama3_2_tokenizer(max_seq_len=128), data_dir={data!r}, sets=["mmmlu", "medqa"],
                           holdout_fraction=0.1, cache_dir={cache!r})
    print("not killed")
""")


@pytest.mark.parametrize("where", ["tokenizing", "before_rename"])
def test_a_killed_build_leaves_no_valid_cache(tmp_path, where):
    cache = tmp_path / "cache"
    script = KILL_SCRIPT.format(repo=str(REPO), where=where, data=str(SAMPLE), cache=str(cache))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert _complete(cache) == []
    assert list(cache.glob("medical_meadow_mixture-*")) == []
    (leftover,) = cache.glob(".tmp-*")
    if where == "before_rename":
        assert list((leftover / "dataset").glob("*.arrow"))  # the data was there; it is not taken as a cache
    ds = medical_meadow_mixture(tiny_llama3_2_tokenizer(max_seq_len=128), data_dir=str(SAMPLE),
                                sets=["mmmlu", "medqa"], holdout_fraction=0.1, cache_dir=str(cache))
    assert ds.report["cache"]["hit"] is False
    assert not leftover.exists()  # the dead build's folder is cleaned up
    assert len(_complete(cache)) == 1


def test_skipped_records_are_counted_and_reported(tmp_path, caplog, shared_data):
    usmle = json.loads((shared_data / "usmle" / "step1.json").read_text())
    question = " ".join(usmle[3]["question"].split()[:20])
    good = {"instruction": "Answer this question truthfully", "input": "What is an allergy?", "output": "A reaction."}
    rows = [good] * 5 + [
        {**good, "output": "   "},
        {**good, "input": "Case: " + question},
        {**good, "output": "word " * 400},
    ]
    data = tmp_path / "data"
    data.mkdir()
    (data / "mediqa.json").write_text(json.dumps(rows))
    tok = tiny_llama3_2_tokenizer(max_seq_len=160)
    common = dict(data_dir=str(data), sets=["mediqa"], decontaminate={"usmle": str(shared_data / "usmle")},
                  cache_dir=str(tmp_path / "cache"))
    with caplog.at_level("INFO"):
        ds = medical_meadow_mixture(tok, skip_empty=True, long_records="skip", **common)
    assert ds.report["skipped"] == {"contaminated": 1, "empty": 1, "too_long": 1}
    assert ds.report["decontamination"]["examples"]["usmle"][0]["index"] == 6
    assert len(ds) == ds.report["final"] == 5
    on_disk = json.loads((ds.cache_dir / "report.json").read_text())
    assert on_disk["skipped"] == ds.report["skipped"] and on_disk["final"] == 5
    assert "'contaminated': 1, 'empty': 1, 'too_long': 1" in caplog.text
    # the defaults keep the empty and the long record (truncated, and counted)
    kept = medical_meadow_mixture(tok, **common)
    assert kept.report["skipped"] == {"contaminated": 1, "empty": 0, "too_long": 0}
    assert kept.report["truncated"] == 1 and len(kept) == 7
    with pytest.raises(ValueError, match="long_records must be one of"):
        medical_meadow_mixture(tok, long_records="drop", **common)
    with pytest.raises(ValueError, match="need cache=True"):
        medical_meadow_mixture(tok, cache=False, skip_empty=True, data_dir=str(data), sets=["mediqa"])


def test_packing_works_over_the_cache(tmp_path, tok256):
    kwargs = dict(data_dir=str(SAMPLE), sets=["mmmlu", "mediqa"], packed=True)
    packed = medical_meadow_mixture(tok256, cache_dir=str(tmp_path), **kwargs)
    lazy = medical_meadow_mixture(tok256, cache=False, **kwargs)
    assert isinstance(packed, PackedDataset) and len(packed) == len(lazy)
    for a, b in zip(packed, lazy):
        for key in ("tokens", "labels", "input_pos", "seq_lens"):
            assert a[key].tolist() == b[key].tolist()


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_streaming_reader_matches_the_whole_file_reader(tmp_path, suffix, shared_data):
    rows = json.loads((shared_data / "medical_meadow_small.json").read_text())[:2000]
    rows[5] = {"instruction": "caf\u00e9 \u2603", "input": None, "output": "x"}
    rows[6] = {"instruction": "i", "output": "no input field"}
    path = tmp_path / f"set{suffix}"
    path.write_text("\n".join(json.dumps(r) for r in rows) if suffix == ".jsonl" else json.dumps(rows, indent=2))
    streamed = pipeline.write_instruction_file(path, tmp_path / "out.arrow")
    assert streamed.to_list() == load_instruction_rows("json", data_files=str(path)).to_list()
    # small reads: records cut across chunk boundaries
    if suffix == ".json":
        assert list(pipeline._iter_json_array(path, chunk=97)) == json.loads(path.read_text())


@pytest.mark.parametrize(
    "content",
    [
        json.dumps([{"instruction": "i", "input": "", "output": "o"}] * 3)[:-20],
        json.dumps([{"instruction": "i", "input": "", "output": "o"}, {"instruction": "i", "input": ""}]),
        json.dumps([{"instruction": "i", "input": "", "output": 3}]),
        b'[{"instruction": "caf\xe9", "input": "", "output": "o"}]',
        "[]",
        "42",
        '[{"instruction": "i", "input": "", "output": "o", "output": "p"}]',
        '[{"instruction": "i", "input": "\\ud800", "output": "o"}]',
        '[{"instruction": "i", "input": "", "output": "o", "x": ' + "[" * 100_000 + "]" * 100_000 + "}]",
        '{"instruction": "i", "input": "", "output": "o", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
    ],
)
def test_malformed_files_fail_as_in_the_uncached_path(tmp_path, tok256, content):
    data = tmp_path / "data"
    data.mkdir()
    path = data / "mmmlu.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as expected:
        load_instruction_rows("json", data_files=str(path))
    with pytest.raises(DataError) as got:
        medical_meadow_mixture(tok256, data_dir=str(data), sets=["mmmlu"], cache_dir=str(tmp_path / "cache"))
    assert str(got.value) == str(expected.value)
    assert _complete(tmp_path / "cache") == [] and list((tmp_path / "cache").glob(".tmp-*")) == []


def test_hub_sets_are_keyed_by_their_datasets_fingerprint(tmp_path, tok256, monkeypatch, shared_data):
    """Hub sets (here: a parquet file standing in for ``load_dataset``) are checked on a miss
    only, and keyed by the loaded dataset's fingerprint."""
    rows = json.loads((shared_data / "medical_meadow_small.json").read_text())[:500]
    parquet = tmp_path / "medqa.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    loads = []
    real_load_dataset = datasets.load_dataset

    def fake_load_dataset(name, split="train", **kwargs):
        loads.append(name)
        return real_load_dataset("parquet", data_files=str(parquet), split=split,
                                     cache_dir=str(tmp_path / "hf"))

    import components.data.mixture as mixture

    monkeypatch.setattr(mixture.datasets, "load_dataset", fake_load_dataset)
    first = medical_meadow_mixture(tok256, sets=["medqa"], holdout_fraction=0.1, cache_dir=str(tmp_path / "c"))
    again = medical_meadow_mixture(tok256, sets=["medqa"], holdout_fraction=0.1, cache_dir=str(tmp_path / "c"))
    assert loads == ["medalpaca/medical_meadow_medqa"] * 2
    assert (first.report["cache"]["hit"], again.report["cache"]["hit"]) == (False, True)
    assert len(again) == 450 and first.report["sets"]["medqa"] == {"available": 500, "taken": 500,
                                                                   "study": MEDICAL_MEADOW_SETS["medqa"]}


def test_a_second_process_after_the_same_cache_waits_and_reuses_it(tmp_path, tok256, monkeypatch):
    """Two builders of one cache (say two ranks of a distributed run): while the first builds, the
    second waits on the build lock, then reuses the first's cache; the data is built once."""
    import threading

    kwargs = dict(data_dir=str(SAMPLE), holdout_fraction=0.1, cache_dir=str(tmp_path))
    real_build, builds, second = pipeline._build, [], {}

    def second_builder():
        second["ds"] = medical_meadow_mixture(tok256, **kwargs)

    def build_while_another_arrives(*args, **kw):
        builds.append(threading.current_thread().name)
        if len(builds) == 1:  # the second builder arrives while the first holds the lock
            second["thread"] = threading.Thread(target=second_builder, name="second")
            second["thread"].start()
            second["thread"].join(timeout=1.0)
            assert second["thread"].is_alive(), "the second builder did not wait for the first"
        return real_build(*args, **kw)

    monkeypatch.setattr(pipeline, "_build", build_while_another_arrives)
    first = medical_meadow_mixture(tok256, **kwargs)
    second["thread"].join(timeout=120)
    assert builds == ["MainThread"]
    assert first.report["cache"]["hit"] is False and second["ds"].report["cache"]["hit"] is True
    assert second["ds"].cache_dir == first.cache_dir and _items(second["ds"]) == _items(first)
