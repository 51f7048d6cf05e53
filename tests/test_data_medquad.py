"""MedQuAD: the full real XML release (counts pinned), Hub-format rows, the builder, bad XML."""

import json

import pytest

from components.data import DataError, load_medquad, medquad_dataset, read_medquad_xml
from components.data.medquad import COLLECTIONS, parse_medquad_file

# pairs and answered pairs per collection, main <Document> schema (as in lavita/MedQuAD)
EXPECTED = {
    "1_CancerGov_QA": (116, 729, 729),
    "2_GARD_QA": (2685, 5394, 5389),
    "3_GHR_QA": (1086, 5430, 5430),
    "4_MPlus_Health_Topics_QA": (981, 981, 981),
    "5_NIDDK_QA": (157, 1192, 1192),
    "6_NINDS_QA": (277, 1088 + 16, 1088 + 16),  # + 4 files in the older <doc> schema
    "7_SeniorHealth_QA": (48, 769, 769),
    "8_NHLBI_QA_XML": (88, 559, 559),
    "9_CDC_QA": (59, 270, 270),
    "10_MPlus_ADAM_QA": (4366, 17348, 0),
    "11_MPlusDrugs_QA": (1312, 12889, 0),
    "12_MPlusHerbsSupplements_QA": (99, 792, 0),
}


@pytest.fixture(scope="module")
def medquad(shared_data):
    return read_medquad_xml(shared_data / "medquad")


def test_full_release_counts(medquad):
    records, report = medquad
    assert report["files"] == 11_274
    old = report["old_schema"]
    assert old == {"files": 4, "pairs": 16, "answered": 16}
    assert report["pairs"] - old["pairs"] == 47_441  # README / lavita/MedQuAD
    assert report["pairs"] == 47_457  # MedQuAD's own readme, with the 16 older-schema pairs
    assert report["answered"] - old["answered"] == 16_407
    assert report["skipped_no_answer"] == 47_441 - 16_407 == 31_034
    assert len(records) == report["answered"]
    got = {name: (c["files"], c["pairs"], c["answered"]) for name, c in report["collections"].items()}
    assert got == EXPECTED
    assert list(report["collections"]) == list(EXPECTED)  # numeric collection order
    for c in report["collections"].values():
        assert c["pairs"] == c["answered"] + c["skipped_no_answer"]


def test_records_keep_qid_qtype_focus_source_collection(medquad):
    records, _ = medquad
    first = records[0]
    assert first["qid"] == "0000001_1-1"
    assert first["qtype"] == "information"
    assert first["focus"] == "Adult Acute Lymphoblastic Leukemia"
    assert (first["source"], first["collection"]) == ("CancerGov", "1_CancerGov_QA")
    assert first["question"] == "What is (are) Adult Acute Lymphoblastic Leukemia ?"
    assert first["answer"].startswith("Key Points")
    # qids are not keys: they repeat across collections, and 34 answered pairs repeat one within
    assert len({(r["collection"], r["qid"]) for r in records}) == 16_423 - 34
    assert {r["source"] for r in records} == {s for s, c in COLLECTIONS.items() if EXPECTED[c][2]}
    old = [r for r in records if r["qid"] == "0000007-1" and r["collection"] == "6_NINDS_QA"]
    assert old and old[0]["focus"] == "Holmes-Adie" and old[0]["source"] == "NINDS"


def test_builder_on_the_xml_release(tokenizer, shared_data):
    ds = medquad_dataset(
        tokenizer,
        source=str(shared_data / "medquad"),
        filter_fn=lambda r: r["collection"] == "9_CDC_QA",
    )
    assert len(ds) == 270
    assert ds.report["answered"] == 16_423 and ds.report["after_filter"] == 270
    text = tokenizer.decode(ds[0]["tokens"])
    row = ds._data[0]
    assert row["collection"] == "9_CDC_QA" and row["input"] == ""
    assert f"### Instruction:\n{row['question']}\n\n### Input:\n\n\n### Response:\n{row['answer'][:30]}" in text


def _xml(pairs: str, root="Document") -> str:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<{root} id="1" source="GARD" url="u">'
        f"<Focus>F</Focus><QAPairs>{pairs}</QAPairs></{root}>"
    )


@pytest.mark.parametrize(
    "content, message",
    [
        (_xml('<QAPair pid="1"><Question qid="1-1" qtype="t">Q?</Question><Answer>A')[:-20], "not well-formed XML"),
        ("", "not well-formed XML"),
        (_xml('<QAPair pid="3"><Question qtype="t">Q?</Question><Answer>A</Answer></QAPair>'), r"QAPair 3: <Question> has no qid"),
        (_xml('<QAPair pid="2"><Answer>A</Answer></QAPair>'), "QAPair 2: no <Question>"),
        (_xml('<QAPair pid="1"><Question qid="1-1" qtype="t"> </Question><Answer>A</Answer></QAPair>'), "qid 1-1: empty question"),
        (_xml("", root="Other"), "root element is <Other>"),
    ],
)
def test_malformed_xml_names_file_and_pair(tmp_path, content, message):
    path = tmp_path / "2_GARD_QA" / "0000001.xml"
    path.parent.mkdir()
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        read_medquad_xml(tmp_path)
    assert str(path) in str(info.value)


def test_empty_answers_are_skipped_and_counted(tmp_path):
    path = tmp_path / "x.xml"
    path.write_text(_xml(
        '<QAPair pid="1"><Question qid="1-1" qtype="t">Q1?</Question><Answer>  </Answer></QAPair>'
        '<QAPair pid="2"><Question qid="1-2" qtype="t">Q2?</Question><Answer>A2</Answer></QAPair>'
        '<QAPair pid="3"><Question qid="1-3" qtype="t">Q3?</Question></QAPair>'
    ))
    records, unanswered, _ = parse_medquad_file(path, "c")
    assert [r["qid"] for r in records] == ["1-2"] and unanswered == 2


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no collection folders"):
        read_medquad_xml(tmp_path)


def test_hub_layouts(tmp_path):
    lavita = [
        {"document_id": "1", "document_source": "GARD", "document_url": "u", "category": None, "umls_cui": "",
         "umls_semantic_types": "", "umls_semantic_group": "", "synonyms": "", "question_id": "1-1",
         "question_focus": "F", "question_type": "symptoms", "question": "Q1?", "answer": "A1"},
        {"document_id": "2", "document_source": "ADAM", "document_url": "u", "category": "Disease", "umls_cui": "",
         "umls_semantic_types": "", "umls_semantic_group": "", "synonyms": "", "question_id": "2-1",
         "question_focus": "G", "question_type": "information", "question": "Q2?", "answer": None},
    ]
    path = tmp_path / "lavita.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lavita))
    records, report = load_medquad("json", data_files=str(path))
    assert (report["pairs"], report["answered"], report["skipped_no_answer"]) == (2, 1, 1)
    assert records[0]["collection"] == "2_GARD_QA" and records[0]["qid"] == "1-1" and records[0]["focus"] == "F"
    assert report["collections"]["10_MPlus_ADAM_QA"]["skipped_no_answer"] == 1

    path = tmp_path / "keivalya.jsonl"
    path.write_text(json.dumps({"qtype": "symptoms", "Question": "Q?", "Answer": "A"}))
    records, report = load_medquad("json", data_files=str(path))
    assert records[0]["qtype"] == "symptoms" and records[0]["qid"] is None and report["answered"] == 1

    path = tmp_path / "other.jsonl"
    path.write_text(json.dumps({"q": "Q?", "a": "A"}))
    with pytest.raises(DataError, match="unknown MedQuAD columns"):
        load_medquad("json", data_files=str(path))
