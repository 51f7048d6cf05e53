"""Fact perplexities and preference log-probabilities under the tiny model: batching changes
nothing, and the numbers are the model's own log-softmax over the response tokens."""

import math

import pytest
import torch

from components.data.json_records import read_json_records
from components.data.templates import format_prompt
from components.knowtuning import build_kc_pairs, split_facts
from components.knowtuning.scoring import fact_perplexities, load_config, load_model, preference_log_probs
from tests.helpers import REPO_ROOT

SAMPLE = REPO_ROOT / "components" / "data" / "sample" / "knowtuning_medquad" / "medquad_test.json"


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config(REPO_ROOT / "configs" / "tiny" / "knowtuning_ka.yaml")
    model, tokenizer = load_model(cfg)
    return model, tokenizer


def test_fact_perplexity_is_the_models_and_batching_changes_nothing(tiny):
    model, tokenizer = tiny
    record = read_json_records(SAMPLE)[0]
    items = [(record["instruction"], "", fact) for fact in split_facts(record["output"])]
    one_by_one = fact_perplexities(model, tokenizer, items, template="alpaca", batch_size=1)
    batched = fact_perplexities(model, tokenizer, items, template="alpaca", batch_size=4)
    assert batched == pytest.approx(one_by_one, rel=1e-4)
    # by hand for the first fact: BOS + prompt, then the fact's tokens
    prompt = [tokenizer.bos_id] + tokenizer.encode(format_prompt("alpaca", record["instruction"]), add_bos=False, add_eos=False)
    fact = tokenizer.encode(items[0][2], add_bos=False, add_eos=False)
    with torch.no_grad():
        logps = model(torch.tensor([prompt + fact]))[0].log_softmax(-1)
    nll = -sum(logps[len(prompt) - 1 + i, token].item() for i, token in enumerate(fact)) / len(fact)
    assert one_by_one[0] == pytest.approx(math.exp(nll), rel=1e-4)


def test_preference_log_probs_batching_changes_nothing(tiny):
    model, tokenizer = tiny
    pairs, _ = build_kc_pairs(read_json_records(SAMPLE)[:1])
    a = preference_log_probs(model, tokenizer, pairs, template="alpaca", batch_size=1)
    b = preference_log_probs(model, tokenizer, pairs, template="alpaca", batch_size=3)
    assert len(a) == 3
    for (c1, r1), (c2, r2) in zip(a, b):
        assert c1 == pytest.approx(c2, rel=1e-4) and r1 == pytest.approx(r2, rel=1e-4)
    # a logicality negative has the same tokens in another order: not the same log-probability
    logicality = [lp for p, lp in zip(pairs, a) if p["type"] == "logicality"]
    assert all(c != r for c, r in logicality)
