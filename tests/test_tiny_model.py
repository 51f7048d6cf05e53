"""The embedded tiny model and tokenizer: one checkpoint that torchtune and transformers agree on."""

import json
import multiprocessing
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file
from torchtune.models.convert_weights import hf_to_tune

from components.models import (
    qlora_tiny_llama3_2,
    tiny_checkpoint_dir,
    tiny_llama3_2,
    tiny_llama3_2_tokenizer,
)
from components.models import tiny
from components.models.tokenizer import special_tokens_for

# Logits of the same fp32 weights through torchtune and transformers differ only by kernel order.
LOGITS_ATOL = 1e-4


@pytest.fixture(scope="module")
def ckpt() -> Path:
    return Path(tiny_checkpoint_dir())


@pytest.fixture(scope="module")
def tt_tokenizer(ckpt):
    return tiny_llama3_2_tokenizer(max_seq_len=512)


@pytest.fixture(scope="module")
def hf_tokenizer(ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt)


def test_checkpoint_is_a_hugging_face_directory(ckpt):
    names = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
    assert names == {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "original/tokenizer.model",
    }
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert config["rope_scaling"]["rope_type"] == "llama3"
    # A second call reuses the cached folder instead of building another one.
    assert Path(tiny_checkpoint_dir()) == ckpt
    assert len(list(ckpt.parent.glob("tiny-llama3_2-*"))) == 1


def test_tokenizer_is_a_trained_bpe_with_llama3_special_tokens(tt_tokenizer):
    assert tt_tokenizer.base_vocab_size == tiny.NUM_REGULAR_TOKENS
    assert tt_tokenizer.vocab_size == tiny.TINY_DIMS["vocab_size"]
    specials = special_tokens_for(tiny.NUM_REGULAR_TOKENS)
    assert tt_tokenizer.bos_id == specials["<|begin_of_text|>"] == tiny.NUM_REGULAR_TOKENS
    assert tt_tokenizer.eot_id == tiny.NUM_REGULAR_TOKENS + 9  # Llama 3's 128009, shifted
    # A real BPE: common medical words are single tokens, not bytes.
    ids = tt_tokenizer.encode(" patients with diabetes", add_bos=False, add_eos=False)
    assert len(ids) <= 4
    assert tt_tokenizer.decode(ids) == " patients with diabetes"


def test_torchtune_and_transformers_encode_the_sample_corpus_identically(tt_tokenizer, hf_tokenizer):
    corpus = tiny.sample_corpus()
    assert len(corpus) > 500
    for text in corpus:
        assert tt_tokenizer.encode(text, add_bos=True, add_eos=False) == hf_tokenizer(text)["input_ids"]


@settings(max_examples=200, deadline=None)
@given(text=st.text(min_size=1, max_size=200))
def test_torchtune_and_transformers_encode_any_text_identically(tt_tokenizer, hf_tokenizer, text):
    # Special-token strings typed in text are plain text to torchtune but specials to transformers,
    # as with Meta's own Llama 3 files; the tokens themselves never come from user text here.
    if "<|" in text:
        return
    assert tt_tokenizer.encode(text, add_bos=True, add_eos=False) == hf_tokenizer(text)["input_ids"]
    assert hf_tokenizer.decode(hf_tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_transformers_and_torchtune_give_the_same_logits(ckpt, tt_tokenizer):
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    model = tiny_llama3_2().eval()
    state = hf_to_tune(
        load_file(ckpt / "model.safetensors"),
        num_heads=tiny.TINY_DIMS["num_heads"],
        num_kv_heads=tiny.TINY_DIMS["num_kv_heads"],
        dim=tiny.TINY_DIMS["embed_dim"],
        head_dim=tiny.TINY_DIMS["embed_dim"] // tiny.TINY_DIMS["num_heads"],
    )
    model.load_state_dict(state)
    ids = torch.tensor([tt_tokenizer.encode("What are the symptoms of anemia? Fatigue.")])
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(ids).logits
    torch.testing.assert_close(ours, theirs, atol=LOGITS_ATOL, rtol=0)
    # The initial scale makes the starting loss close to uniform over the vocabulary.
    assert ours.abs().max() < 5


def test_qlora_model_quantizes_every_linear_to_nf4():
    from torchao.dtypes.nf4tensor import NF4Tensor

    model = qlora_tiny_llama3_2(
        lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True
    )
    nf4 = [n for n, p in model.named_parameters() if isinstance(p, NF4Tensor)]
    # q/k/v/o and the three MLP projections in each of the four layers
    assert len(nf4) == 7 * tiny.TINY_DIMS["num_layers"]


def _build_in_process(_):
    return tiny_checkpoint_dir()


def test_concurrent_first_use_builds_one_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTUNE_CACHE_DIR", str(tmp_path))
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        first, second = pool.map(_build_in_process, range(2))
    assert first == second
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [Path(first).name]
