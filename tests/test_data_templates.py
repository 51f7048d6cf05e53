"""Prompt templates, message transforms and plain-text tokenization."""

import pytest
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from components.data.templates import (
    InstructToMessages,
    PlainTextTokenizer,
    format_prompt,
    render_example,
)

RECORD = {"instruction": "Answer this question truthfully", "input": "What causes gout?", "output": "Uric acid crystals."}

MEDALPACA_TEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nAnswer this question truthfully\n\n### Input:\nWhat causes gout?\n\n### Response:\n"
)


def test_medalpaca_prompt_is_medalpacas_template():
    assert format_prompt("medalpaca", RECORD["instruction"], RECORD["input"]) == MEDALPACA_TEXT


def test_medalpaca_keeps_the_input_section_when_input_is_empty_but_alpaca_drops_it():
    assert "### Input:\n\n\n### Response:\n" in format_prompt("medalpaca", "Q?", "")
    no_input = format_prompt("alpaca", "Q?", "")
    assert "### Input" not in no_input
    assert no_input.startswith("Below is an instruction that describes a task. Write a response")


def test_alpaca_matches_torchtune_alpaca_to_messages():
    from torchtune.data import AlpacaToMessages

    for record in (RECORD, {**RECORD, "input": ""}):
        ours = InstructToMessages("alpaca")(dict(record))["messages"]
        theirs = AlpacaToMessages()(dict(record))["messages"]
        assert [m.text_content for m in ours] == [m.text_content for m in theirs]


@pytest.mark.parametrize("train_on_input", [True, False])
def test_train_on_input_sets_the_user_mask(train_on_input):
    user, assistant = InstructToMessages("medalpaca", train_on_input=train_on_input)(RECORD)["messages"]
    assert (user.role, assistant.role) == ("user", "assistant")
    assert user.masked is (not train_on_input)
    assert assistant.masked is False
    assert assistant.text_content == RECORD["output"]


def test_llama3_chat_messages_and_system_prompt():
    messages = InstructToMessages("llama3_chat", system_prompt="You are a physician.")(RECORD)["messages"]
    assert [m.role for m in messages] == ["system", "user", "assistant"]
    assert messages[0].masked
    assert messages[1].text_content == "Answer this question truthfully\n\nWhat causes gout?"


def test_column_map_and_missing_input():
    transform = InstructToMessages("medalpaca", column_map={"instruction": "q", "output": "a"})
    user, assistant = transform({"q": "Define gout.", "a": "A crystal arthropathy."})["messages"]
    assert "### Instruction:\nDefine gout.\n\n### Input:\n\n\n" in user.text_content
    assert assistant.text_content == "A crystal arthropathy."


def test_bad_template_names_are_rejected():
    with pytest.raises(ValueError, match="unknown template 'vicuna'"):
        InstructToMessages("vicuna")
    with pytest.raises(ValueError, match="system_prompt only applies"):
        InstructToMessages("medalpaca", system_prompt="x")


def test_plain_text_tokenization_is_bos_prompt_response_eos(tokenizer):
    messages = InstructToMessages("medalpaca", train_on_input=False)(RECORD)
    out = PlainTextTokenizer(tokenizer)(dict(messages))
    tokens, mask = out["tokens"], out["mask"]
    prompt_ids = tokenizer.encode(MEDALPACA_TEXT, add_bos=False, add_eos=False)
    response_ids = tokenizer.encode(RECORD["output"], add_bos=False, add_eos=False)
    assert tokens == [tokenizer.bos_id] + prompt_ids + response_ids + [tokenizer.eos_id]
    assert mask == [True] * (1 + len(prompt_ids)) + [False] * (len(response_ids) + 1)
    assert tokenizer.decode(tokens) == MEDALPACA_TEXT + RECORD["output"]
    assert tokenizer.start_header_id not in tokens  # no chat headers around a base-model prompt


def test_plain_text_truncates_to_max_seq_len_ending_in_eos(tokenizer):
    tokenizer.max_seq_len = 16
    try:
        out = PlainTextTokenizer(tokenizer)(InstructToMessages("medalpaca")(RECORD))
    finally:
        tokenizer.max_seq_len = None
    assert len(out["tokens"]) == 16 and out["tokens"][-1] == tokenizer.eos_id


def test_plain_text_inference_leaves_off_eos(tokenizer):
    sample = InstructToMessages("alpaca")(RECORD)
    out = PlainTextTokenizer(tokenizer)(sample, inference=True)
    assert out["tokens"][-1] != tokenizer.eos_id


def test_chat_template_uses_the_tokenizers_chat_format(tokenizer):
    from torchtune.datasets._sft import SFTTransform

    out = SFTTransform(InstructToMessages("llama3_chat", train_on_input=False), tokenizer)(dict(RECORD))
    assert out["tokens"].count(tokenizer.start_header_id) == 2
    assert CROSS_ENTROPY_IGNORE_IDX in out["labels"]
    assert tokenizer.decode(out["tokens"]).endswith("Uric acid crystals.")


def test_render_example_for_export():
    assert render_example("medalpaca", RECORD) == {"prompt": MEDALPACA_TEXT, "response": RECORD["output"]}
    chat = render_example("llama3_chat", RECORD, system_prompt="Be brief.")
    assert [m["role"] for m in chat["messages"]] == ["system", "user", "assistant"]
