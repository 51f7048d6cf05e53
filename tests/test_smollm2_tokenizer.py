"""SmolLM2's torchtune tokenizer gives transformers' ids: plain text (shipped sample data and
hypothesis strings) and ChatML conversations (against the checkpoint's own chat template)."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchtune.data import Message

from components.models import smollm2_checkpoint as sc
from components.models.smollm2 import smollm2_tokenizer
from components.models.tiny import sample_corpus
from tests.test_smollm2_checkpoint import smollm2_session_cache, smollm2_session_wheel


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """(ours, transformers') over the session's converted checkpoint."""
    from transformers import AutoTokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDTUNE_CACHE_DIR", str(smollm2_session_cache(tmp_path_factory)))
        mp.setenv(sc.WHEEL_ENV, str(smollm2_session_wheel(tmp_path_factory)))
        yield smollm2_tokenizer(), AutoTokenizer.from_pretrained(sc.smollm2_checkpoint_dir())


def test_sample_data_ids_equal_transformers(tokenizers):
    ours, hf = tokenizers
    texts = sample_corpus()
    assert len(texts) > 50
    for text in texts:
        ids = ours.encode(text, add_bos=False, add_eos=False)
        assert ids == hf(text, add_special_tokens=False).input_ids
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=80))
def test_any_string_ids_equal_transformers(tokenizers, text):
    ours, hf = tokenizers
    assert ours.encode(text, add_bos=False, add_eos=False) == hf(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("with_system", [False, True])
def test_chatml_equals_the_chat_template_and_masks_the_prompt(tokenizers, with_system):
    ours, hf = tokenizers
    chat = [{"role": "user", "content": "Which nerve innervates the deltoid?\nA. Axillary\nB. Radial"},
            {"role": "assistant", "content": "A. Axillary"}]
    if with_system:
        chat.insert(0, {"role": "system", "content": "Answer with the option letter."})
    messages = [Message(role=m["role"], content=m["content"], masked=m["role"] != "assistant") for m in chat]
    tokens, mask = ours.tokenize_messages(messages)
    assert tokens == hf.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
    trained = [t for t, m in zip(tokens, mask) if not m]
    assert trained == ours.encode("A. Axillary", add_bos=False, add_eos=False) + [ours.eos_id]
    prompt, _ = ours.tokenize_messages(messages[:-1], add_end_tokens=False)
    assert prompt == hf.apply_chat_template(chat[:-1], add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]


@pytest.mark.parametrize("template", ["medalpaca", "alpaca"])
def test_text_templates_start_at_a_document_boundary_not_a_chat_turn(tokenizers, template):
    """medAlpaca/Alpaca are plain text: <|endoftext|> (SmolLM2's document separator), then exactly
    transformers' ids of the prompt and of the response, then <|im_end|>; <|im_start|> (which opens
    a ChatML turn and wants a role name after it) appears nowhere."""
    from components.data.templates import InstructToMessages, format_prompt, model_transform_for

    ours, hf = tokenizers
    record = {"instruction": "Answer this question truthfully", "input": "What causes scurvy?",
              "output": "A lack of vitamin C."}
    messages = InstructToMessages(template)(dict(record))["messages"]
    tokens, mask = model_transform_for(template, ours).tokenize_messages(messages)
    prompt = hf(format_prompt(template, record["instruction"], record["input"]), add_special_tokens=False).input_ids
    response = hf(record["output"], add_special_tokens=False).input_ids
    assert tokens == [hf.convert_tokens_to_ids("<|endoftext|>")] + prompt + response + [hf.eos_token_id]
    assert hf.bos_token_id not in tokens and hf.bos_token == "<|im_start|>"
    assert mask[0] and not mask[-1]  # the separator is context, the closing <|im_end|> is trained


def test_chat_template_records_are_chatml(tokenizers):
    """The `llama3_chat` template name hands the record to the tokenizer's own chat format: for
    SmolLM2 that is its ChatML, token for token the checkpoint's chat template."""
    from components.data.templates import InstructToMessages, model_transform_for

    ours, hf = tokenizers
    record = {"instruction": "Answer this question truthfully", "input": "What causes scurvy?",
              "output": "A lack of vitamin C."}
    messages = InstructToMessages("llama3_chat", train_on_input=False)(dict(record))["messages"]
    tokens, mask = model_transform_for("llama3_chat", ours).tokenize_messages(messages)
    chat = [{"role": "user", "content": "Answer this question truthfully\n\nWhat causes scurvy?"},
            {"role": "assistant", "content": "A lack of vitamin C."}]
    assert tokens == hf.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
    trained = [t for t, m in zip(tokens, mask) if not m]
    assert trained == hf("A lack of vitamin C.", add_special_tokens=False).input_ids + [hf.eos_token_id]
