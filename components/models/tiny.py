"""The embedded default: a tiny Llama 3.2 model and BPE tokenizer, created by code, cached on disk.

The checkpoint is an ordinary Hugging Face directory (model.safetensors, config.json, tokenizer
files, and Llama 3's `original/tokenizer.model` rank file for torchtune), so the very same folder
feeds torchtune's `FullModelHFCheckpointer`, `transformers.AutoModelForCausalLM` and
`lm_eval --model hf`. Its dimensions keep Llama 3.2 3B's structure (grouped-query attention,
tied embeddings, scaled RoPE) and make every linear weight a multiple of 2 x 16,384 elements:
torchao's NF4 (QLoRA) needs 16,384, and FSDP2 must split each NF4 weight evenly across 2
processes (4 key/value heads rather than 3B's 8:24 ratio, whose k/v would be too small here).
The folder name carries a hash of everything it is made from, so a change to
the dimensions or to the sample data makes a new one instead of reusing a stale one.
"""

import hashlib
import json
import shutil
import tempfile
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional

import torch
from filelock import FileLock
from safetensors.torch import save_file
from torchtune.models.convert_weights import tune_to_hf
from torchtune.models.llama3 import Llama3Tokenizer, llama3_tokenizer
from torchtune.models.llama3_2 import llama3_2, lora_llama3_2
from torchtune.modules import TransformerDecoder
from torchtune.training import FullModelHFCheckpointer

from components.cache_root import cache_root
from components.models.tokenizer import (
    NUM_SPECIAL_TOKENS,
    special_tokens_for,
    train_byte_level_bpe,
    write_hf_tokenizer_files,
    write_tiktoken_file,
)

NUM_REGULAR_TOKENS = 2048
TINY_DIMS = dict(
    vocab_size=NUM_REGULAR_TOKENS + NUM_SPECIAL_TOKENS,
    num_layers=4,
    num_heads=8,
    num_kv_heads=4,
    embed_dim=256,
    intermediate_dim=768,
    max_seq_len=131_072,
    rope_base=500_000,
    scale_factor=32,
    norm_eps=1e-5,
)
INIT_SEED = 0
FORMAT_VERSION = "1"
SAMPLE_DIR = Path(__file__).resolve().parent.parent / "data" / "sample"
CHECKPOINT_FILE = "model.safetensors"


def tiny_llama3_2() -> TransformerDecoder:
    """The tiny Llama 3.2 architecture (torchtune's `llama3_2` builder, tied embeddings)."""
    return llama3_2(**TINY_DIMS)


def lora_tiny_llama3_2(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> TransformerDecoder:
    """The tiny model with LoRA adapters (torchtune's `lora_llama3_2` component builder)."""
    return lora_llama3_2(
        lora_attn_modules=lora_attn_modules,
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        **TINY_DIMS,
    )


qlora_tiny_llama3_2 = partial(lora_tiny_llama3_2, quantize_base=True)
qlora_tiny_llama3_2.__doc__ = """The tiny model with LoRA on an NF4-quantized base (QLoRA through
torchao), made the way torchtune makes its own ``qlora_*`` builders."""


def tiny_llama3_2_tokenizer(
    max_seq_len: Optional[int] = None, prompt_template: Optional[str] = None
) -> Llama3Tokenizer:
    """torchtune's Llama 3 tokenizer over the tiny BPE (created on first use)."""
    ckpt = Path(tiny_checkpoint_dir())
    return llama3_tokenizer(
        path=str(ckpt / "original" / "tokenizer.model"),
        special_tokens_path=str(ckpt / "tokenizer.json"),
        max_seq_len=max_seq_len,
        prompt_template=prompt_template,
    )


def tiny_llama3_2_checkpointer(
    output_dir: str,
    recipe_checkpoint: Optional[str] = None,
    adapter_checkpoint: Optional[str] = None,
    resume_from_checkpoint: bool = False,
    safe_serialization: bool = True,
    should_load_recipe_state: bool = False,
    model_type: str = "LLAMA3_2",
) -> FullModelHFCheckpointer:
    """torchtune's HF checkpointer reading the tiny checkpoint (created on first use).

    ``model_type`` is there because recipes read ``checkpointer.model_type`` (with activation
    checkpointing on); the tiny model is a Llama 3.2, so nothing else is accepted.
    """
    if model_type != "LLAMA3_2":
        raise ValueError(f"tiny_llama3_2_checkpointer: model_type must be 'LLAMA3_2' (got {model_type!r})")
    return FullModelHFCheckpointer(
        checkpoint_dir=tiny_checkpoint_dir(),
        checkpoint_files=[CHECKPOINT_FILE],
        model_type=model_type,
        output_dir=output_dir,
        recipe_checkpoint=recipe_checkpoint,
        adapter_checkpoint=adapter_checkpoint,
        resume_from_checkpoint=resume_from_checkpoint,
        safe_serialization=safe_serialization,
        should_load_recipe_state=should_load_recipe_state,
    )


def tiny_checkpoint_path(corpus: Optional[List[str]] = None) -> Path:
    """Where the tiny checkpoint for the current dimensions and sample data lives (built or not)."""
    corpus = sample_corpus() if corpus is None else corpus
    digest = hashlib.sha256(
        json.dumps(
            [FORMAT_VERSION, TINY_DIMS, INIT_SEED, torch.__version__.split("+")[0], corpus]
        ).encode()
    ).hexdigest()[:12]
    return cache_root() / f"tiny-llama3_2-{digest}"


def tiny_checkpoint_dir() -> str:
    """Path of the tiny HF checkpoint, building it once (safe under concurrent processes)."""
    corpus = sample_corpus()
    target = tiny_checkpoint_path(corpus)
    if (target / CHECKPOINT_FILE).is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if not (target / CHECKPOINT_FILE).is_file():
            staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
            try:
                _write_checkpoint(staging, corpus)
                staging.rename(target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def sample_corpus() -> List[str]:
    """Every text field of the shipped sample data, in a fixed order: the BPE training corpus."""
    import xml.etree.ElementTree as ET

    texts: List[str] = []
    for path in sorted(SAMPLE_DIR.rglob("*")):
        if path.suffix == ".json":
            texts.extend(_strings(json.loads(path.read_text(encoding="utf-8"))))
        elif path.suffix == ".xml":
            texts.extend(t.strip() for t in ET.parse(path).getroot().itertext() if t.strip())
    if not texts:
        raise FileNotFoundError(f"no sample data under {SAMPLE_DIR}: the package is incomplete")
    return texts


def _strings(node) -> List[str]:
    if isinstance(node, str):
        return [node] if node.strip() else []
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    return [text for child in children for text in _strings(child)]


def _write_checkpoint(out: Path, corpus: List[str]) -> None:
    (out / "original").mkdir(parents=True)
    ranks = train_byte_level_bpe(corpus, NUM_REGULAR_TOKENS)
    write_tiktoken_file(ranks, out / "original" / "tokenizer.model")
    write_hf_tokenizer_files(
        out / "original" / "tokenizer.model", out, model_max_length=TINY_DIMS["max_seq_len"]
    )
    model = _initialised_model()
    head_dim = TINY_DIMS["embed_dim"] // TINY_DIMS["num_heads"]
    state = tune_to_hf(
        model.state_dict(),
        num_heads=TINY_DIMS["num_heads"],
        num_kv_heads=TINY_DIMS["num_kv_heads"],
        dim=TINY_DIMS["embed_dim"],
        head_dim=head_dim,
    )
    save_file({k: v.contiguous() for k, v in state.items()}, out / CHECKPOINT_FILE, {"format": "pt"})
    specials = special_tokens_for(NUM_REGULAR_TOKENS)
    (out / "config.json").write_text(json.dumps(_hf_config(head_dim, specials), indent=2) + "\n")
    generation = {
        "bos_token_id": specials["<|begin_of_text|>"],
        "eos_token_id": specials["<|end_of_text|>"],
        "do_sample": False,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def _initialised_model() -> TransformerDecoder:
    """The tiny model with a fixed-seed GPT-style init (N(0, 0.02) weights, unit norms).

    torchtune's default leaves embeddings at N(0, 1), which with tied output weights starts the
    loss far above log(vocab); a pretrained model's scale is closer to this.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        model = tiny_llama3_2()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name or "scale" in name:
                    param.fill_(1.0)
                else:
                    param.normal_(mean=0.0, std=0.02)
    return model


def _hf_config(head_dim: int, specials: Dict[str, int]) -> dict:
    """transformers' LlamaConfig for TINY_DIMS, with Llama 3.2's RoPE scaling."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": TINY_DIMS["vocab_size"],
        "hidden_size": TINY_DIMS["embed_dim"],
        "intermediate_size": TINY_DIMS["intermediate_dim"],
        "num_hidden_layers": TINY_DIMS["num_layers"],
        "num_attention_heads": TINY_DIMS["num_heads"],
        "num_key_value_heads": TINY_DIMS["num_kv_heads"],
        "head_dim": head_dim,
        "max_position_embeddings": TINY_DIMS["max_seq_len"],
        "rms_norm_eps": TINY_DIMS["norm_eps"],
        "rope_theta": float(TINY_DIMS["rope_base"]),
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": float(TINY_DIMS["scale_factor"]),
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": specials["<|begin_of_text|>"],
        "eos_token_id": specials["<|end_of_text|>"],
        "torch_dtype": "float32",
        "initializer_range": 0.02,
    }
