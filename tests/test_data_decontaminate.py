"""Decontamination: planted near-duplicates of real evaluation items are caught, clean rows kept."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from components.data import DataError, Decontaminator, decontaminate_records, medical_meadow_dataset, read_usmle
from components.data.decontaminate import words


@pytest.fixture(scope="module")
def eval_sets(shared_data):
    return {
        "usmle": str(shared_data / "usmle"),
        "medquad_test": str(shared_data / "knowtuning_medquad" / "medquad_test.json"),
    }


@pytest.fixture(scope="module")
def checker(eval_sets):
    return Decontaminator(eval_sets)


def _shout(text: str) -> str:
    """A near-duplicate: different case, spacing and punctuation."""
    return "  ".join(text.upper().replace(",", " ;").split())


def test_planted_near_duplicates_are_caught_and_clean_rows_kept(checker, shared_data):
    usmle, _ = read_usmle(shared_data / "usmle")
    test = json.loads((shared_data / "knowtuning_medquad" / "medquad_test.json").read_text())
    clean = json.loads((shared_data / "medical_meadow_small.json").read_text())[:50]
    question = usmle[200]["question"]
    middle = " ".join(question.split()[5:25])
    planted = [
        {"instruction": "Answer this question", "input": "Case: " + _shout(middle) + " What next?", "output": "x"},
        {"instruction": test[7]["instruction"].replace(" ?", "?"), "input": "", "output": "An answer."},
        {"instruction": "Explain", "input": "", "output": "Intro. " + test[3]["output"]},
    ]
    rows = clean[:20] + planted[:1] + clean[20:40] + planted[1:] + clean[40:]
    kept, report = decontaminate_records(rows, {"usmle": str(shared_data / "usmle"),
                                                "medquad_test": str(shared_data / "knowtuning_medquad" / "medquad_test.json")})
    assert kept == clean
    assert report["removed"] == 3 and report["checked"] == 53
    assert report["removed_per_set"] == {"usmle": 1, "medquad_test": 2}
    assert report["eval_sets"]["usmle"]["items"] == 376 and report["eval_sets"]["medquad_test"]["items"] == 200
    assert report["examples"]["usmle"][0]["index"] == 20
    assert report["examples"]["usmle"][0]["eval_item"] == f"step{usmle[200]['step']} no {usmle[200]['no']}"
    assert report["examples"]["medquad_test"][0]["eval_item"] == "#7"


def test_short_questions_need_an_exact_match(checker):
    assert checker.match({"instruction": "What is (are) Gilbert syndrome ?", "input": "", "output": "o"})
    assert checker.match({"instruction": "What is Gilbert syndrome, and is it common?", "input": "", "output": "o"}) is None


def test_twelve_shared_words_are_not_enough(shared_data):
    usmle, _ = read_usmle(shared_data / "usmle")
    w = words(usmle[0]["question"])
    checker = Decontaminator({"usmle": str(shared_data / "usmle")}, ngram=13)
    assert checker.match({"instruction": " ".join(w[:12]), "output": "o"}) is None
    assert checker.match({"instruction": " ".join(w[:13]), "output": "o"})
    assert Decontaminator({"usmle": str(shared_data / "usmle")}, ngram=8).match({"instruction": " ".join(w[:8]), "output": "o"})


def test_normalisation():
    assert words("Héllo, WORLD!  ﬁne  it's") == ["héllo", "world", "fine", "it", "s"]


def test_medqa_test_file_and_errors(tmp_path):
    path = tmp_path / "medqa_test.jsonl"
    q = "A 23-year-old woman comes to the physician because of a 2-day history of fever and a painful swollen knee"
    path.write_text(json.dumps({"question": q, "answer": "Gonorrhea", "options": {"A": "Gonorrhea"}}) + "\n")
    checker = Decontaminator({"medqa_test": str(path)})
    assert checker.match({"instruction": "Q", "input": q + ". Which is most likely?", "output": "Gonorrhea"})
    assert checker.match({"instruction": "Name the organism", "input": "", "output": "Gonorrhea"}) is None
    with pytest.raises(ValueError, match="unknown evaluation set 'mmlu'"):
        Decontaminator({"mmlu": str(path)})
    path.write_text(json.dumps({"answer": "x"}))
    with pytest.raises(DataError, match="record 0: no question text"):
        Decontaminator({"medqa_test": str(path)})


def test_builder_option_removes_and_reports(tokenizer, shared_data, eval_sets):
    ds = medical_meadow_dataset(
        tokenizer, source="json", data_files=str(shared_data / "medical_meadow_small.json"), decontaminate=eval_sets
    )
    report = ds.report["decontamination"]
    # the sample shares 13-grams with the MedQuAD test answers (NIH boilerplate and copied answers)
    assert report["removed_per_set"] == {"usmle": 0, "medquad_test": 14}
    assert len(ds) == 5_942 - 14 == ds.report["final"]


@pytest.fixture(scope="module")
def usmle_questions(shared_data):
    return [r["question"] for r in read_usmle(shared_data / "usmle")[0] if len(words(r["question"])) >= 13]


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_13_word_window_of_a_usmle_question_is_caught(checker, usmle_questions, data):
    texts = usmle_questions
    w = words(data.draw(st.sampled_from(texts)))
    start = data.draw(st.integers(0, len(w) - 13))
    noise = data.draw(st.lists(st.sampled_from(["zzq", "qqx", "xyzzy"]), max_size=5))
    text = " ".join(noise + w[start : start + 13] + noise)
    assert checker.match({"instruction": "", "input": text.upper(), "output": ""})

