"""Model and tokenizer builders: the tiny embedded default (Llama 3.2 architecture)."""

from components.models.tiny import (
    lora_tiny_llama3_2,
    qlora_tiny_llama3_2,
    tiny_checkpoint_dir,
    tiny_llama3_2,
    tiny_llama3_2_checkpointer,
    tiny_llama3_2_tokenizer,
)

__all__ = [
    "lora_tiny_llama3_2",
    "qlora_tiny_llama3_2",
    "tiny_checkpoint_dir",
    "tiny_llama3_2",
    "tiny_llama3_2_checkpointer",
    "tiny_llama3_2_tokenizer",
]
