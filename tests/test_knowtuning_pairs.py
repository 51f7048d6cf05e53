"""KnowTuning's data builders on the real MedQuAD splits KnowTuning used (../shared/data)."""

import json
import random
from collections import Counter

import pytest

from components.data.errors import DataError
from components.data.json_records import read_json_records
from components.knowtuning import (
    NEGATIVE_TYPES,
    build_ka_records,
    build_kc_pairs,
    join_facts,
    knowtuning_kc_dataset,
    length_stats,
    question_focus,
    split_facts,
)
from components.knowtuning.disturb import (
    change_number,
    change_unit,
    flip_antonym,
    flip_negation,
    swap_entity,
)
from components.knowtuning.facts import normalize_space
from components.knowtuning.kc import answer_text, write_jsonl
from tests.helpers import REPO_ROOT, run_cli

SAMPLE = REPO_ROOT / "components" / "data" / "sample" / "knowtuning_medquad" / "medquad_test.json"


@pytest.fixture(scope="module")
def test_split(shared_data):
    records = read_json_records(shared_data / "knowtuning_medquad" / "medquad_test.json")
    assert len(records) == 200
    return records


@pytest.fixture(scope="module")
def built(test_split):
    return build_kc_pairs(test_split, seed=42)


def test_facts_rejoin_to_the_answer_on_both_real_splits(shared_data):
    for name in ("medquad_test.json", "medquad_valid.json"):
        for record in read_json_records(shared_data / "knowtuning_medquad" / name):
            facts = split_facts(record["output"])
            assert len(facts) >= 2, record["output"]
            assert join_facts(facts) == normalize_space(record["output"])


def test_splitter_rules():
    text = "Dr. Smith saw it in the U.S. in 1990. It is rare; it affects 1 in 10,000 people.    - Fever    - Rash"
    assert split_facts(text) == [
        "Dr. Smith saw it in the U.S. in 1990.",
        "It is rare;",
        "it affects 1 in 10,000 people.",
        "- Fever",
        "- Rash",
    ]
    # a one-sentence answer is split at a clause connective so it can still be reordered
    assert split_facts("The ventricles are larger than normal because white matter failed to develop.") == [
        "The ventricles are larger than normal",
        "because white matter failed to develop.",
    ]


def test_every_item_yields_its_three_negatives(test_split, built):
    pairs, report = built
    assert report["skipped"] == []
    assert report["pairs_per_type"] == {kind: 200 for kind in NEGATIVE_TYPES}
    assert Counter(p["item"] for p in pairs) == {i: 3 for i in range(200)}
    for pair in pairs:
        record = test_split[pair["item"]]
        chosen, rejected = answer_text(pair["chosen"]), answer_text(pair["rejected"])
        assert chosen != rejected
        assert chosen == normalize_space(record["output"])
        assert pair["chosen"][0] == pair["rejected"][0] == {"role": "user", "content": record["instruction"]}
        assert rejected == join_facts(pair["rejected_facts"])
        assert pair["chosen_facts"] == split_facts(record["output"])


def test_each_negative_differs_the_way_its_type_says(built):
    pairs, _ = built
    for pair in pairs:
        facts, negative = pair["chosen_facts"], pair["rejected_facts"]
        edits = pair["edits"]
        if pair["type"] == "completeness":
            dropped = [e["fact"] for e in edits]
            assert all(e["op"] == "delete" for e in edits) and dropped and 0 not in dropped
            # the rest, in order: exactly the dropped facts are missing
            assert negative == [f for i, f in enumerate(facts) if i not in dropped]
            assert len(negative) < len(facts)
        elif pair["type"] == "factuality":
            changed = {e["fact"] for e in edits}
            assert changed and len(negative) == len(facts)
            for i, (before, after) in enumerate(zip(facts, negative)):
                if i in changed:
                    assert after != before
                else:
                    assert after == before
            for e in edits:
                # the change is the one recorded: one span replaced
                assert e["from"] in facts[e["fact"]] and e["to"] in negative[e["fact"]]
                assert e["from"] != e["to"]
        else:
            assert [e["op"] for e in edits] == ["reorder"]
            order = edits[0]["order"]
            assert sorted(order) == list(range(len(facts)))
            assert negative == [facts[i] for i in order]
            assert Counter(negative) == Counter(facts) and negative != facts


def test_factuality_uses_every_kind_of_rule(built):
    _, report = built
    for op in ("number", "unit", "antonym", "negation", "entity"):
        assert report["edits"].get(op, 0) > 0, report["edits"]


def test_same_seed_same_file_other_seed_other_file(test_split, built, tmp_path):
    pairs, _ = built
    write_jsonl(pairs, tmp_path / "a.jsonl")
    write_jsonl(build_kc_pairs(test_split, seed=42)[0], tmp_path / "b.jsonl")
    write_jsonl(build_kc_pairs(test_split, seed=7)[0], tmp_path / "c.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert (tmp_path / "a.jsonl").read_bytes() != (tmp_path / "c.jsonl").read_bytes()


def test_length_statistics(built):
    pairs, report = built
    stats = report["length"]
    assert list(stats) == [*NEGATIVE_TYPES, "all"]
    assert stats["logicality"]["rejected_equal"] == 1.0 and stats["logicality"]["length_only_accuracy"] == 0.5
    assert stats["completeness"]["rejected_shorter"] == 1.0  # deletion shortens, by construction
    # over all pairs, length alone is a weak signal (a length-only rule is right < 65% of the time)
    assert 0.5 <= stats["all"]["length_only_accuracy"] < 0.65
    assert stats["all"]["pairs"] == 600
    chars = length_stats(pairs, unit="chars")
    assert chars["all"]["chosen_mean"] > stats["all"]["chosen_mean"]


@pytest.mark.parametrize(
    "falsify, fact, expected",
    [
        (change_number, "It affects 1 in 10,000 people.", "10,000"),
        (change_unit, "Symptoms last 3 days.", "3 weeks"),
        (flip_antonym, "It is inherited in an autosomal dominant pattern.", "autosomal recessive"),
        (flip_antonym, "It causes hyperthyroidism.", "hypothyroidism"),
        (flip_negation, "The condition is treatable.", "is not treatable"),
        (flip_negation, "The liver does not process bilirubin.", "does process"),
    ],
)
def test_falsifiers(falsify, fact, expected):
    new, detail = falsify(fact, random.Random(0), {})
    assert new != fact
    if falsify is change_number:
        assert expected not in new and detail["from"] in ("1", "10,000")
        assert detail["from"] == "1" or "," in detail["to"]
    else:
        assert expected in new


def test_entity_swap_draws_from_other_answers():
    context = {"focus": "Gilbert syndrome", "foci": ["Carney complex"], "own_symbols": ["UGT1A1"], "symbols": ["PRKAR1A", "MFDM"]}
    new, detail = swap_entity("Gilbert syndrome is caused by mutations in the UGT1A1 gene.", random.Random(1), context)
    assert (detail["from"], detail["to"]) in {("Gilbert syndrome", "Carney complex"), ("UGT1A1", "PRKAR1A")}
    assert detail["to"] in new and detail["from"] not in new


def test_question_focus():
    assert question_focus("What is (are) Gilbert syndrome ?") == "Gilbert syndrome"
    assert question_focus("Do you have information about Teen Mental Health") == "Teen Mental Health"
    assert question_focus("What are the symptoms of Fabry disease ?") == "Fabry disease"


def test_a_rewriter_takes_over_falsifying_and_revising(test_split):
    calls = Counter()

    def rewriter(task, text, context):
        calls[task] += 1
        if task == "falsify":
            return "FALSE: " + text
        return None  # revise: keep the rule output

    pairs, report = build_kc_pairs(test_split[:5], types=["factuality"], rewriter=rewriter)
    assert len(pairs) == 5 and calls["falsify"] >= 5 and calls["revise"] == 10
    assert all(e["op"] == "rewriter" for p in pairs for e in p["edits"])
    assert all("FALSE: " in answer_text(p["rejected"]) for p in pairs)


def test_ka_keeps_the_hardest_facts_beside_the_originals(test_split):
    records = test_split[:10]
    # a stand-in scorer: longer facts are "harder"
    rows, report = build_ka_records(records, lambda items: [float(len(f)) for _, _, f in items], top_fraction=0.5)
    originals = [r for r in rows if r["kind"] == "original"]
    facts = [r for r in rows if r["kind"] == "fact"]
    assert [r["output"] for r in originals] == [r["output"] for r in records]
    for index, record in enumerate(records):
        candidates = [f for f in split_facts(record["output"]) if len(f.split()) >= 3]
        kept = [r for r in facts if r["item"] == index]
        assert len(kept) == -(-len(candidates) // 2)  # ceil
        threshold = min(r["perplexity"] for r in kept)
        dropped = [len(f) for f in candidates if f not in {r["output"] for r in kept}]
        assert all(d <= threshold for d in dropped)
        assert all(r["instruction"] == record["instruction"] + " State one specific fact." for r in kept)
    assert report["rows"] == len(rows) == len(originals) + len(facts)


def test_kc_dataset_tokenizes_like_stage_one(tokenizer, tmp_path):
    from components.data.templates import format_prompt

    records = read_json_records(SAMPLE)
    pairs, _ = build_kc_pairs(records[:3])
    write_jsonl(pairs, tmp_path / "kc.jsonl")
    ds = knowtuning_kc_dataset(tokenizer, data_files=str(tmp_path / "kc.jsonl"), template="alpaca")
    assert len(ds) == 9
    sample = ds[0]
    prompt = [tokenizer.bos_id] + tokenizer.encode(format_prompt("alpaca", records[0]["instruction"]), add_bos=False, add_eos=False)
    for side in ("chosen", "rejected"):
        ids, labels = sample[f"{side}_input_ids"], sample[f"{side}_labels"]
        assert ids[: len(prompt)] == prompt and ids[-1] == tokenizer.eos_id
        assert all(label == -100 for label in labels[: len(prompt)])
        assert labels[len(prompt) :] == ids[len(prompt) :]
    assert sample["chosen_input_ids"] != sample["rejected_input_ids"]
    only = knowtuning_kc_dataset(tokenizer, data_files=str(tmp_path / "kc.jsonl"), types=["logicality"])
    assert len(only) == 3


def test_kc_dataset_names_the_bad_row(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    good = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"chosen": good["chosen"]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl: record 1: 'rejected'"):
        knowtuning_kc_dataset(tokenizer, data_files=str(path))


def test_build_kc_cli_prints_statistics_per_type(tmp_path):
    out = tmp_path / "kc.jsonl"
    proc = run_cli("medtune", ["knowtuning", "build-kc", f"meadow:{SAMPLE}", "--out", str(out), "--seed", "3"])
    assert "wrote 60 rows" in proc.stdout
    for kind in NEGATIVE_TYPES:
        assert f"  {kind}: 20" in proc.stdout
    assert "len-only acc" in proc.stdout
    again = tmp_path / "again.jsonl"
    from components.cli import main

    assert main(["knowtuning", "build-kc", f"meadow:{SAMPLE}", "--out", str(again), "--seed", "3"]) == 0
    assert out.read_bytes() == again.read_bytes()  # across processes too (no hash randomisation)



def test_build_kc_cli_refuses_short_answer_data(tmp_path, capsys):
    from components.cli import main

    assert main(["knowtuning", "build-kc", "usmle:x", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "usmle" in capsys.readouterr().err
