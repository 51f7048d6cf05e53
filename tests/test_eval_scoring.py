"""Answer-letter parsing, standard errors and bootstrap intervals, ROUGE-L / token F1, BERTScore set-up."""

import math

import numpy as np
import pytest

from components.evaluation.bertscore import DEFAULT_MODEL, MINILM_ALIAS, resolve_model
from components.evaluation.parsing import first_option_letter
from components.evaluation.stats import bootstrap_interval, mean_stderr, summarize
from components.evaluation.text_metrics import normalize_answer, rouge_l, token_f1
from components.evaluation.usmle import repair_glued_option, study_prompt


@pytest.mark.parametrize(
    "text, letter",
    [
        ("C", "C"),
        ("C.", "C"),
        ("C: Ovarian torsion", "C"),
        ("(C)", "C"),
        ("Answer: C", "C"),
        ("c", "C"),
        ("c.", "C"),
        ("(c) ovarian torsion", "C"),
        ("answer: c", "C"),
        ("The answer is (d).", "D"),
        ("**B**", "B"),
        (" E<|end_of_text", "E"),  # the study's stored form
        ("C\nExplanation: A is wrong because", "C"),
        ("I think the answer is B", "B"),
        ("The Answer to the question is: F", "F"),
        ("Option G is correct", "G"),
        ("a 45-year-old man has no letter", None),
        ("no letter at all", None),
        ("", None),
        (None, None),
    ],
)
def test_first_option_letter(text, letter):
    assert first_option_letter(text) == letter


def test_letters_outside_the_set_are_not_choices():
    assert first_option_letter("J") is None
    assert first_option_letter("J or C", letters="ABCD") == "C"


def test_stderr_is_lm_evals_formula():
    values = [1, 0, 0, 1, 1, 0, 0, 0]
    assert mean_stderr(values) == pytest.approx(np.std(values, ddof=1) / math.sqrt(len(values)))
    assert math.isnan(mean_stderr([1]))


def test_bootstrap_interval_is_reproducible_and_brackets_the_mean():
    rng = np.random.default_rng(0)
    values = (rng.random(120) < 0.4).astype(float)
    low, high = bootstrap_interval(values)
    assert (low, high) == bootstrap_interval(values)
    assert low < values.mean() < high
    # about +-1.96 standard errors for a proportion at n=120
    assert high - low == pytest.approx(2 * 1.96 * mean_stderr(values), rel=0.1)
    assert bootstrap_interval([1.0] * 10) == (1.0, 1.0)
    s = summarize([1, 0, 1, 1])
    assert (s["n"], s["correct"], s["acc"]) == (4, 3.0, 0.75)


def test_token_f1_and_rouge_l():
    assert normalize_answer("The Cat, sat!") == "cat sat"
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert 0 < rouge_l("the cat sat", "a cat was sitting on a mat") < 1


def test_bertscore_model_resolution(monkeypatch):
    monkeypatch.delenv("MEDTUNE_BERTSCORE_MODEL", raising=False)
    monkeypatch.delenv("MEDTUNE_BERTSCORE_NUM_LAYERS", raising=False)
    assert resolve_model() == (DEFAULT_MODEL, 40)  # bert_score's default layer for it
    assert resolve_model("/models/deberta-xlarge-mnli") == ("/models/deberta-xlarge-mnli", 40)
    path, layers = resolve_model(MINILM_ALIAS)
    assert layers == 6 and path.endswith("model")
    with pytest.raises(ValueError, match="num_layers"):
        resolve_model("/models/my-own-bert")
    monkeypatch.setenv("MEDTUNE_BERTSCORE_MODEL", "/models/my-own-bert")
    monkeypatch.setenv("MEDTUNE_BERTSCORE_NUM_LAYERS", "9")
    assert resolve_model() == ("/models/my-own-bert", 9)
    assert resolve_model("none") == ("none", 0)


def test_study_prompt_and_the_glued_option():
    prompt = study_prompt("Q?", {"A": "x", "B": "y"})
    assert prompt.endswith("### Input:\nQ?\nA: x\nB: y\n\n### Response:\nThe Answer to the question is:")
    assert prompt.startswith("Below is an instruction that describes a task, paired with an input")
    fixed, note = repair_glued_option({"A": "a", "D": "Pyelonephritis\n\nAnswer E: Tubo-ovarian abscess"})
    assert fixed == {"A": "a", "D": "Pyelonephritis", "E": "Tubo-ovarian abscess"} and note
    assert repair_glued_option({"A": "a", "B": "b"}) == ({"A": "a", "B": "b"}, None)
