"""The Medical Meadow mixture: per-set caps and counts on local files, and the study's sizes."""

import json

import datasets
import pytest

from components.data import MEDICAL_MEADOW_SETS, STUDY_MIX_ROWS, load_mixture, medical_meadow_mixture
from components.data.errors import DataError
from components.data.instruct import holdout_split
from components.data.mixture import parse_sets

SIZES = {"cord19": 400, "medical_flashcards": 300, "wikidoc": 200, "wikidoc_patient_information": 100,
         "mediqa": 50, "medqa": 40, "mmmlu": 30, "health_advice": 20}


@pytest.fixture(scope="module")
def data_dir(shared_data, tmp_path_factory):
    """Eight set files in the sample layout, cut from the real sample, each tagged by set."""
    rows = json.loads((shared_data / "medical_meadow_small.json").read_text())
    out, start = tmp_path_factory.mktemp("meadow"), 0
    for name, n in SIZES.items():
        part = [{**r, "instruction": f"[{name}] {r['instruction']}"} for r in rows[start : start + n]]
        suffix = ".jsonl" if name == "mmmlu" else ".json"
        text = "\n".join(map(json.dumps, part)) if suffix == ".jsonl" else json.dumps(part)
        (out / f"{name}{suffix}").write_text(text)
        start += n
    return out


def _sets_of(ds):
    return [r["instruction"].split("]")[0][1:] for r in ds._data]


def test_study_mix_constant_and_split_sizes():
    assert STUDY_MIX_ROWS == 895_753
    assert list(MEDICAL_MEADOW_SETS) == ["cord19", "medical_flashcards", "wikidoc", "wikidoc_patient_information",
                                         "mediqa", "medqa", "mmmlu", "health_advice"]
    rows = datasets.Dataset.from_dict({"i": range(STUDY_MIX_ROWS)})
    assert len(holdout_split(rows, 0.1, 42, "train")) == 806_177
    assert -(-806_177 // 4) // 6 == 33_590  # ceil(rows / batch 4) batches, // grad accumulation 6


def test_all_sets_whole_by_default(tokenizer, data_dir):
    ds = medical_meadow_mixture(tokenizer, data_dir=str(data_dir))
    assert len(ds) == sum(SIZES.values()) == 1_140
    assert {k: v["taken"] for k, v in ds.report["sets"].items()} == SIZES
    assert ds.report["sets"]["cord19"]["study"] == 821_007
    assert _sets_of(ds) == [name for name, n in SIZES.items() for _ in range(n)]


def test_caps_fractions_and_order(tokenizer, data_dir):
    sets = {"medical_flashcards": None, "cord19": 100, "mediqa": 0.5, "health_advice": 10_000}
    ds = medical_meadow_mixture(tokenizer, data_dir=str(data_dir), sets=sets)
    taken = {k: v["taken"] for k, v in ds.report["sets"].items()}
    assert taken == {"medical_flashcards": 300, "cord19": 100, "mediqa": 25, "health_advice": 20}
    assert _sets_of(ds) == ["medical_flashcards"] * 300 + ["cord19"] * 100 + ["mediqa"] * 25 + ["health_advice"] * 20
    again = medical_meadow_mixture(tokenizer, data_dir=str(data_dir), sets=sets)
    assert list(again._data) == list(ds._data)
    reseeded = medical_meadow_mixture(tokenizer, data_dir=str(data_dir), sets=sets, mix_seed=1)
    assert list(reseeded._data) != list(ds._data)


def test_flat_lists_and_prefixed_names(tokenizer, data_dir):
    ds = medical_meadow_mixture(tokenizer, data_dir=str(data_dir), sets=["medical_meadow_mmmlu", "wikidoc"], caps=[None, 5])
    assert {k: v["taken"] for k, v in ds.report["sets"].items()} == {"mmmlu": 30, "wikidoc": 5}


def test_holdout_on_the_whole_mixture(tokenizer, data_dir):
    train = medical_meadow_mixture(tokenizer, data_dir=str(data_dir), holdout_fraction=0.1)
    validation = medical_meadow_mixture(tokenizer, data_dir=str(data_dir), holdout_fraction=0.1, holdout="validation")
    assert (len(train), len(validation)) == (1_026, 114)
    assert train.report["holdout"]["validation"] == 114


@pytest.mark.parametrize(
    "sets, caps, message",
    [
        ({"pubmed": None}, None, "unknown Medical Meadow set 'pubmed'"),
        ({"cord19": -1}, None, "amount for 'cord19'"),
        ({"cord19": 1.5}, None, "amount for 'cord19'"),
        (["cord19", "cord19"], None, "listed twice"),
        (["cord19"], [1, 2], "caps has 2 entries for 1 sets"),
        ("cord19", None, "must be a list or a mapping"),
    ],
)
def test_bad_set_specs(sets, caps, message):
    with pytest.raises(ValueError, match=message):
        parse_sets(sets, caps)


def test_missing_set_file_is_named(tmp_path):
    with pytest.raises(DataError, match="no wikidoc.json or wikidoc.jsonl"):
        load_mixture(["wikidoc"], data_dir=str(tmp_path))


def test_yaml_config_instantiates_the_mixture(tokenizer, data_dir):
    from omegaconf import OmegaConf
    from torchtune import config

    cfg = OmegaConf.create(f"""
dataset:
  _component_: components.data.medical_meadow_mixture
  data_dir: {data_dir}
  sets: {{mediqa: 5, medqa: null}}
  holdout_fraction: 0.1
""")
    ds = config.instantiate(cfg.dataset, tokenizer)
    assert {k: v["taken"] for k, v in ds.report["sets"].items()} == {"mediqa": 5, "medqa": 40}
    assert len(ds) == 40  # 45 rows, validation ceil(4.5) = 5


def test_the_shipped_sample_layout(tokenizer):
    from pathlib import Path

    import components.data

    sample = Path(components.data.__file__).parent / "sample" / "medical_meadow"
    ds = medical_meadow_mixture(tokenizer, data_dir=str(sample))
    sets = ds.report["sets"]
    assert list(sets) == list(MEDICAL_MEADOW_SETS)
    assert all(0 < c["taken"] == c["available"] for c in sets.values())
    assert len(ds) == sum(c["taken"] for c in sets.values())
