"""The 3B configs' data path through torchtune's llama3_tokenizer and the real Llama 3 file.

Each dataset is built from a 3B config's own ``tokenizer`` and ``dataset`` sections, with only
the tokenizer path and the data source pointed at local files (the configs read the Hub).
"""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from torchtune import config

from components.data.templates import MEDALPACA_PROMPT
from components.models.llama3_vocab import llama3_tokenizer_model
from tests.conftest import REPO_ROOT

CONFIGS = REPO_ROOT / "configs" / "llama3_2_3B"
SAMPLE = REPO_ROOT / "components" / "data" / "sample"
MIXTURE_CONFIGS = ["full_sft", "lora", "qlora", "galore", "galore_layerwise"]
BOS, EOS, START_HEADER, END_HEADER, EOT = 128000, 128001, 128006, 128007, 128009


def build(name: str, *, max_seq_len="as shipped", drop=(), **dataset):
    """(tokenizer, dataset) from ``configs/llama3_2_3B/<name>.yaml`` with ``dataset`` overrides."""
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    cfg.tokenizer.path = llama3_tokenizer_model()
    if max_seq_len != "as shipped":
        cfg.tokenizer.max_seq_len = max_seq_len
    for key in drop:
        del cfg.dataset[key]
    for key, value in dataset.items():
        cfg.dataset[key] = value
    tokenizer = config.instantiate(cfg.tokenizer)
    return tokenizer, config.instantiate(cfg.dataset, tokenizer)


def sample_mix(name: str, **dataset):
    return build(name, data_dir=str(SAMPLE / "medical_meadow"), **dataset)


@pytest.mark.parametrize("name", MIXTURE_CONFIGS)
def test_mixture_configs_medalpaca_prompt_in_the_loss(name):
    tokenizer, ds = sample_mix(name)
    assert tokenizer.max_seq_len == 256
    assert ds.report["holdout"] == {"fraction": 0.1, "seed": 42, "part": "train", "train": 288, "validation": 32}
    assert len(ds) == 288
    row = ds[0]
    text = tokenizer.decode(row["tokens"], skip_special_tokens=False)
    assert text.startswith("<|begin_of_text|>" + MEDALPACA_PROMPT.split("{instruction}")[0])
    assert "\n\n### Input:\n" in text and "\n\n### Response:\n" in text
    assert row["tokens"][0] == BOS and row["tokens"][-1] == EOS
    # train_on_input: every token after BOS is a label (the prompt too, as the study trained)
    assert row["labels"][1:] == row["tokens"][1:]


def test_medalpaca_without_train_on_input_masks_exactly_the_prompt():
    tokenizer, ds = sample_mix("lora", train_on_input=False)
    records = [r for name in ds.report["sets"] for r in json.loads((SAMPLE / "medical_meadow" / f"{name}.json").read_text())]
    prompts_by_output = {}
    for r in records:
        prompts_by_output.setdefault(r["output"], []).append(MEDALPACA_PROMPT.format(instruction=r["instruction"], input=r["input"]))
    checked = 0
    for i in range(len(ds)):
        row = ds[i]
        masked = [t for t, label in zip(row["tokens"], row["labels"]) if label == -100]
        kept = [t for t, label in zip(row["tokens"], row["labels"]) if label != -100]
        if row["tokens"][-1] != EOS or len(row["tokens"]) == 256:
            continue
        response = tokenizer.decode(kept[:-1])
        assert [BOS] + tokenizer.encode(tokenizer.decode(masked[1:]), add_bos=False, add_eos=False) == masked
        assert tokenizer.decode(masked[1:]) in prompts_by_output[response]
        assert kept[-1] == EOS
        checked += 1
    assert checked > 250


def test_study_max_length_truncates_long_records_to_256():
    _, full = sample_mix("full_sft", max_seq_len=None)
    _, cut = sample_mix("full_sft")
    assert cut.report["truncated"] == 3
    long_rows = [i for i in range(len(full)) if len(full[i]["tokens"]) > 256]
    assert len(long_rows) == 3
    for i in long_rows:
        tokens = cut[i]["tokens"]
        assert len(tokens) == 256
        assert tokens[:255] == full[i]["tokens"][:255] and tokens[-1] == EOS
    assert all(len(cut[i]["tokens"]) <= 256 for i in range(len(cut)))


def test_llama3_chat_template():
    tokenizer, ds = sample_mix("lora", template="llama3_chat", train_on_input=False)
    row = ds[0]
    tokens = row["tokens"]
    assert tokens[:2] == [BOS, START_HEADER]
    assert tokenizer.decode(tokens[2 : tokens.index(END_HEADER)], skip_special_tokens=False) == "user"
    assert tokens.count(EOT) == 2 and tokens[-2:] == [EOT, EOS]
    assistant = tokens.index(START_HEADER, 2)
    assert tokenizer.decode(tokens[assistant + 1 : tokens.index(END_HEADER, assistant)]) == "assistant"
    # the user turn is out of the loss; the assistant turn (its header, answer, <|eot_id|>) is in,
    # torchtune's closing <|end_of_text|> is not
    first_label = next(i for i, label in enumerate(row["labels"]) if label != -100)
    assert first_label == assistant and row["labels"][assistant:-1] == tokens[assistant:-1]
    assert row["labels"][-2:] == [EOT, -100]


def test_medquad_config_decontaminates_against_the_test_split():
    _, ds = build(
        "full_sft_medquad",
        source=str(SAMPLE / "medquad"),
        decontaminate={"medquad_test": str(SAMPLE / "knowtuning_medquad" / "medquad_test.json")},
    )
    report = ds.report["decontamination"]
    assert report["removed"] == 1 and report["removed_per_set"] == {"medquad_test": 1}
    assert len(ds) == report["checked"] - 1 == 30
    assert all(len(ds[i]["tokens"]) <= 256 for i in range(len(ds)))


def test_packing_at_256_keeps_every_token():
    _, rows = sample_mix("lora")
    _, packs = sample_mix("lora", packed=True)
    row_tokens = sum(len(rows[i]["tokens"]) for i in range(len(rows)))
    assert packs.report["packing"]["tokens"] == row_tokens
    for i in range(len(packs)):
        pack = packs[i]
        assert len(pack["tokens"]) == 256
        assert int(pack["seq_lens"].sum()) == 256
    first = packs[0]["tokens"].tolist()
    assert first[: len(rows[0]["tokens"])] == rows[0]["tokens"]


def test_real_tokens_per_row(shared_data):
    """The figures in benchmarks/RESULTS.md (Real Llama 3 tokens per row)."""
    from benchmarks.llama3_token_counts import DROP, counts

    sample = counts("sample", {"data_dir": str(SAMPLE / "medical_meadow")})
    assert (sample["rows"], sample["tokens"], sample["max"], sample["over_256"]) == (320, 41674, 288, 3)
    small = counts(
        "small",
        {
            "_component_": "components.data.medical_meadow_dataset",
            "source": "json",
            "data_files": str(Path(shared_data) / "medical_meadow_small.json"),
            "sets": DROP,
        },
    )
    assert (small["rows"], small["tokens"], small["max"], small["over_256"]) == (5942, 906391, 3160, 652)
    assert small["tokens_at_256"] == 828544
