"""A real byte-level BPE in Llama 3's format, trained on the shipped sample data.

Llama 3 ships a tiktoken rank file (read by torchtune's `Llama3Tokenizer`) and a `tokenizer.json`
converted from it (read by transformers). We do the same at tiny scale: train a byte-level BPE
with the `tokenizers` library under Llama 3's pre-tokenisation regex, write its ranks as a tiktoken
file, and derive `tokenizer.json` from that file with transformers' own `TikTokenConverter`, so
both stacks encode identically. The 256 special tokens follow Llama 3's layout, shifted to sit
right after the regular vocabulary instead of at 128,000.
"""

import base64
import json
from pathlib import Path
from typing import Dict, Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from torchtune.models.llama3._tokenizer import CL100K_PATTERN, LLAMA3_SPECIAL_TOKENS

LLAMA3_SPECIAL_BASE = 128_000
NUM_SPECIAL_TOKENS = 256


def special_tokens_for(num_regular: int) -> Dict[str, int]:
    """Llama 3's special tokens moved to ids `num_regular .. num_regular + 255`.

    torchtune puts `<|image|>` at 128,256 (Llama 3.2 Vision), outside the 256-id block; here it
    takes the block's one free slot (offset 11) so every special id is inside the embedding.
    """
    tokens = {}
    for name, token_id in LLAMA3_SPECIAL_TOKENS.items():
        offset = 11 if name == "<|image|>" else token_id - LLAMA3_SPECIAL_BASE
        tokens[name] = num_regular + offset
    assert sorted(tokens.values()) == list(range(num_regular, num_regular + NUM_SPECIAL_TOKENS))
    return tokens


def train_byte_level_bpe(texts: Iterable[str], num_regular: int) -> Dict[bytes, int]:
    """Train a byte-level BPE with Llama 3's regex; return tiktoken ranks (bytes -> rank).

    Ranks are the trained ids: the 256 single bytes first, then tokens in the order the trainer
    merged them, which is the order tiktoken's rank-greedy merging needs.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CL100K_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=num_regular,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_decoder = {char: byte for byte, char in bytes_to_unicode().items()}
    vocab = sorted(bpe.get_vocab().items(), key=lambda item: item[1])
    ranks = {bytes(byte_decoder[c] for c in token): rank for rank, (token, _) in enumerate(vocab)}
    if len(ranks) != num_regular:
        raise ValueError(
            f"the sample corpus only supports {len(ranks)} BPE tokens, {num_regular} were asked for"
        )
    return ranks


def write_tiktoken_file(ranks: Dict[bytes, int], path: Path) -> None:
    """Write ranks in tiktoken's `base64(token) rank` line format (Llama 3's tokenizer.model)."""
    lines = (f"{base64.b64encode(token).decode()} {rank}" for token, rank in ranks.items())
    path.write_text("\n".join(lines) + "\n")


def write_hf_tokenizer_files(tiktoken_path: Path, out_dir: Path, model_max_length: int) -> None:
    """Write tokenizer.json / tokenizer_config.json / special_tokens_map.json from the rank file.

    The conversion is transformers' `TikTokenConverter`, the one used for Meta's own Llama 3
    checkpoints; a BOS is prepended by the post-processor, as in Llama 3's tokenizer.json.
    """
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    num_regular = sum(1 for line in tiktoken_path.read_text().splitlines() if line)
    specials = special_tokens_for(num_regular)
    ordered = [name for name, _ in sorted(specials.items(), key=lambda item: item[1])]
    hf = TikTokenConverter(
        vocab_file=str(tiktoken_path), pattern=CL100K_PATTERN, extra_special_tokens=ordered
    ).converted()
    bos = "<|begin_of_text|>"
    hf.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, specials[bos])],
            ),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    hf.save(str(out_dir / "tokenizer.json"))
    special_map = {"bos_token": bos, "eos_token": "<|end_of_text|>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": True,
        "model_input_names": ["input_ids", "attention_mask"],
        **special_map,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")

