"""Medical Meadow builders on the real sample (5,942 rows), the 90/10 split, and bad input."""

import json
from collections import Counter
from pathlib import Path

import datasets

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchtune.datasets import PackedDataset, SFTDataset

from components.data import DataError, medical_meadow_dataset, medical_meadow_wikidoc_patient_information
from components.data.instruct import holdout_split, load_instruction_rows
from components.data.json_records import read_json_records
from components.data.medical_meadow import MEDICAL_MEADOW_SETS, hub_id, set_name

ROWS = 5_942


@pytest.fixture(scope="module")
def small(shared_data) -> str:
    return str(shared_data / "medical_meadow_small.json")


def _texts(ds):
    return [(r["instruction"], r["input"], r["output"]) for r in ds._data]


def test_builder_reads_every_record_of_the_real_sample(tokenizer, small):
    ds = medical_meadow_wikidoc_patient_information(tokenizer, source="json", data_files=small)
    assert isinstance(ds, SFTDataset)
    assert len(ds) == ROWS
    assert ds.report["rows"] == ds.report["final"] == ROWS
    sample = ds[0]
    assert set(sample) >= {"tokens", "mask", "labels"}
    assert tokenizer.decode(sample["tokens"]).startswith("Below is an instruction that describes a task, paired")
    assert sample["labels"][1] != -100  # train_on_input defaults to True, as in the study


def test_study_split_is_disjoint_complete_and_deterministic(tokenizer, small):
    kwargs = dict(source="json", data_files=small, holdout_fraction=0.1, holdout_seed=42)
    train = medical_meadow_dataset(tokenizer, holdout="train", **kwargs)
    validation = medical_meadow_dataset(tokenizer, holdout="validation", **kwargs)
    assert (len(train), len(validation)) == (5_347, 595)  # validation = ceil(0.1 * 5,942)
    assert len(train) + len(validation) == ROWS
    train_rows, validation_rows = _texts(train), _texts(validation)
    everything = _texts(medical_meadow_dataset(tokenizer, source="json", data_files=small))
    assert Counter(train_rows) + Counter(validation_rows) == Counter(everything)
    # the sample repeats some rows, so check disjointness on row positions
    indexed = datasets.Dataset.from_list([{"row": i, **r} for i, r in enumerate(json.loads(Path(small).read_text()))])
    train_ids = holdout_split(indexed, 0.1, 42, "train")["row"][:]
    validation_ids = holdout_split(indexed, 0.1, 42, "validation")["row"][:]
    assert not set(train_ids) & set(validation_ids)
    assert len(set(train_ids) | set(validation_ids)) == ROWS
    assert [everything[i] for i in train_ids] == train_rows
    assert _texts(medical_meadow_dataset(tokenizer, holdout="train", **kwargs)) == train_rows
    other_seed = medical_meadow_dataset(tokenizer, **{**kwargs, "holdout_seed": 0})
    assert _texts(other_seed) != train_rows
    assert train.report["holdout"] == {"fraction": 0.1, "seed": 42, "part": "train", "train": 5_347, "validation": 595}


def test_split_slices_filter_fn_and_packing(tokenizer, small):
    part = medical_meadow_dataset(tokenizer, source="json", data_files=small, split="train[:10%]")
    assert len(part) == 594
    kept = medical_meadow_dataset(
        tokenizer, source="json", data_files=small, filter_fn=lambda r: "symptoms" in r["input"]
    )
    assert 0 < len(kept) < ROWS and all("symptoms" in r["input"] for r in kept._data)
    tokenizer.max_seq_len = 256
    try:
        packed = medical_meadow_dataset(tokenizer, source="json", data_files=small, split="train[:50]", packed=True)
    finally:
        tokenizer.max_seq_len = None
    assert isinstance(packed, PackedDataset)
    assert all(len(pack["tokens"]) == 256 for pack in packed)


def test_llama3_chat_and_masked_prompt(tokenizer, small):
    ds = medical_meadow_dataset(
        tokenizer, source="json", data_files=small, split="train[:3]", template="llama3_chat", train_on_input=False
    )
    sample = ds[0]
    assert sample["tokens"].count(tokenizer.start_header_id) == 2
    first_trained = next(i for i, label in enumerate(sample["labels"]) if label != -100)
    assert tokenizer.decode(sample["tokens"][first_trained:]).startswith(ds._data[0]["output"][:20].strip())


def test_set_names_and_hub_ids():
    assert hub_id("medical_flashcards") == "medalpaca/medical_meadow_medical_flashcards"
    assert hub_id("medalpaca/medical_meadow_wikidoc_patient_information").endswith("wikidoc_patient_information")
    assert set_name("medical_meadow_cord19") == "cord19"
    assert sum(MEDICAL_MEADOW_SETS.values()) == 895_753
    with pytest.raises(ValueError, match="unknown Medical Meadow set 'pubmed'"):
        set_name("pubmed")
    assert medical_meadow_wikidoc_patient_information.keywords["source"] == hub_id("wikidoc_patient_information")


# --- bad input: every loader names the file and the record -------------------------------

def _write(tmp_path: Path, content, name="data.json") -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


GOOD = {"instruction": "i", "input": "x", "output": "o"}


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "file is empty"),
        ("  \n", "file is empty"),
        (json.dumps([GOOD, {"instruction": "i", "input": "x"}]), r"record 1: missing field 'output'"),
        (json.dumps([GOOD, GOOD, {**GOOD, "output": 3}]), r"record 2: field 'output' must be a string, got int"),
        (json.dumps([{**GOOD, "instruction": ["a"]}]), r"record 0: field 'instruction' must be a string, got list"),
        (json.dumps([GOOD, "text"]), r"record 1: expected a JSON object, got str"),
        (json.dumps([GOOD, GOOD])[:-30], r"record 1: not valid JSON \(truncated\)"),
        (json.dumps([GOOD]) + "]", "unexpected data after the JSON array"),
        (json.dumps(GOOD) + "\n" + json.dumps(GOOD)[:-2] + "\n", r"record 1: not valid JSON on line 2"),
        (json.dumps([]), "holds no records"),
        ("42", r"record 0: expected a JSON object, got int"),
        (b'[{"instruction": "caf\xe9", "input": "", "output": "o"}]', r"not valid UTF-8: byte 0xe9 at offset 21 \(line 1\)"),
    ],
)
def test_malformed_files_raise_data_error_naming_file_and_record(tmp_path, content, message):
    path = _write(tmp_path, content)
    with pytest.raises(DataError, match=message) as info:
        load_instruction_rows("json", data_files=path)
    assert str(info.value).startswith(path)
    assert isinstance(info.value, ValueError)


def test_missing_file_and_missing_data_files(tmp_path, tokenizer):
    with pytest.raises(DataError, match="no such file"):
        medical_meadow_dataset(tokenizer, source="json", data_files=str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="needs data_files"):
        medical_meadow_dataset(tokenizer, source="json")


def test_jsonl_and_null_input_are_accepted(tmp_path):
    lines = "\n".join(json.dumps(r) for r in [GOOD, {"instruction": "i", "output": "o"}, {**GOOD, "input": None}])
    rows = load_instruction_rows("json", data_files=_write(tmp_path, lines + "\n", "d.jsonl"))
    assert rows["input"][:] == ["x", "", ""]


def test_second_file_is_named(tmp_path):
    good = _write(tmp_path, json.dumps([GOOD]), "a.json")
    bad = _write(tmp_path, json.dumps([GOOD, {"input": "x", "output": "o"}]), "b.json")
    with pytest.raises(DataError, match=r"b\.json: record 1: missing field 'instruction'"):
        load_instruction_rows("json", data_files=[good, bad])


text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
records = st.lists(st.fixed_dictionaries({"instruction": text, "input": text, "output": text}), min_size=1, max_size=20)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=records, jsonl=st.booleans())
def test_any_valid_file_round_trips(tmp_path, records, jsonl):
    body = "\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records, indent=1)
    path = _write(tmp_path, body, "rt.jsonl" if jsonl else "rt.json")
    assert read_json_records(path) == records
    assert load_instruction_rows("json", data_files=path).to_list() == records


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=records, data=st.data())
def test_any_truncation_is_a_data_error_never_a_traceback(tmp_path, records, data):
    body = json.dumps(records, indent=1)
    cut = data.draw(st.integers(min_value=1, max_value=len(body) - 1))
    path = _write(tmp_path, body[:cut], "cut.json")
    with pytest.raises(DataError) as info:
        load_instruction_rows("json", data_files=path)
    assert path in str(info.value)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=records, data=st.data())
def test_a_bad_field_is_reported_at_its_index(tmp_path, records, data):
    index = data.draw(st.integers(min_value=0, max_value=len(records) - 1))
    field = data.draw(st.sampled_from(["instruction", "output"]))
    bad = data.draw(st.sampled_from([None, 1, 2.5, True, ["x"], {"a": 1}]))
    records = [dict(r) for r in records]
    if bad is None:
        del records[index][field]
    else:
        records[index][field] = bad
    path = _write(tmp_path, json.dumps(records), "bad.json")
    with pytest.raises(DataError, match=rf"record {index}: .*'{field}'"):
        load_instruction_rows("json", data_files=path)


def test_other_load_dataset_sources_are_checked_too(tmp_path, tokenizer):
    path = str(tmp_path / "rows.parquet")
    datasets.Dataset.from_list([GOOD, {**GOOD, "input": None}, GOOD]).to_parquet(path)
    ds = medical_meadow_dataset(tokenizer, source="parquet", data_files=path)
    assert len(ds) == 3 and ds._data["input"][:] == ["x", None, "x"]
    datasets.Dataset.from_list([GOOD, {**GOOD, "output": None}]).to_parquet(path)
    with pytest.raises(DataError, match=rf"parquet {path}: record 1: missing field 'output'"):
        medical_meadow_dataset(tokenizer, source="parquet", data_files=path)
