"""USMLE reader: real counts and flaws, and malformed folders."""

import json
import shutil

import pytest

from components.data import DataError, read_usmle


@pytest.fixture(scope="module")
def usmle(shared_data):
    return read_usmle(shared_data / "usmle")


def test_real_counts(usmle):
    records, report = usmle
    assert report["questions"] == {1: 119, 2: 120, 3: 137}
    assert report["with_image"] == {1: 27, 2: 10, 3: 13}
    assert sum(r["has_image"] for r in records) == 50
    assert len(records) == report["total"] == 376
    assert report["no_options"] == [{"step": 2, "no": 119}]
    assert report["answer_not_in_options"] == [{"step": 2, "no": 115, "answer": "E"}]


def test_record_fields(usmle):
    records, _ = usmle
    first = records[0]
    assert set(first) == {"step", "no", "question", "options", "answer", "has_image"}
    assert (first["step"], first["no"], first["answer"], first["has_image"]) == (1, 1, "B", False)
    assert first["options"]["B"] == "120-140"
    assert {r["answer"] for r in records} <= set("ABCDEFGHI")
    assert next(r for r in records if (r["step"], r["no"]) == (1, 4))["has_image"]


@pytest.fixture
def copy(shared_data, tmp_path):
    for name in ["question_with_images.json"] + [f"step{s}{x}.json" for s in (1, 2, 3) for x in ("", "_solutions")]:
        shutil.copy(shared_data / "usmle" / name, tmp_path / name)
    return tmp_path


def _edit(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_missing_answer(copy):
    _edit(copy / "step3_solutions.json", lambda d: d.pop("7"))
    with pytest.raises(DataError, match=r"step3_solutions\.json: key 7: no answer for question 7"):
        read_usmle(copy)


def test_answer_without_question(copy):
    _edit(copy / "step1_solutions.json", lambda d: d.update({"500": "A"}))
    with pytest.raises(DataError, match=r"answers for questions that do not exist: \['500'\]"):
        read_usmle(copy)


def test_duplicate_number_and_bad_types(copy):
    _edit(copy / "step2.json", lambda d: d.append(dict(d[0])))
    with pytest.raises(DataError, match="question number 1 appears twice"):
        read_usmle(copy)
    shutil.copy(copy / "step1.json", copy / "step2.json")
    _edit(copy / "step1.json", lambda d: d[5].update({"options": ["a", "b"]}))
    with pytest.raises(DataError, match=r"step1\.json: record 5: question 6: 'options' must map letters"):
        read_usmle(copy)


def test_truncated_file_and_missing_folder(copy, tmp_path):
    text = (copy / "step1.json").read_text()
    (copy / "step1.json").write_text(text[: len(text) // 2])
    with pytest.raises(DataError, match=r"step1\.json: record \d+: not valid JSON \(truncated\)"):
        read_usmle(copy)
    with pytest.raises(DataError, match="not a directory"):
        read_usmle(tmp_path / "nowhere")
