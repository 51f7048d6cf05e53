# Copyright (c) Meta Platforms, Inc. and affiliates.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
#
# medtune: copied from torchtune 0.6.1's recipes/eleuther_eval.py and changed where marked
# "medtune:". What changed and why:
# - lm-eval 0.4.13 is accepted: torchtune compares version strings ("0.4.13" < "0.4.5" as text)
#   and refuses it; here the check compares parsed versions.
# - No `gpt2` download: torchtune's wrapper calls `HFLM.__init__(pretrained="gpt2")` only to get
#   lm-eval's bookkeeping. Here the wrapper sets the attributes lm-eval's HFLM loops read and
#   never touches the Hub, so it runs offline.
# - Tokenization matches `lm_eval --model hf`: BOS is added unless the text already starts with
#   it (`add_bos: True`, the HF tokenizer's default), so a checkpoint scores the same in process
#   and through the stock client. torchtune's wrapper never adds BOS.
# - Full, LoRA and QLoRA checkpoints: a LoRA/QLoRA model builder gets the base weights from the
#   checkpointer and the adapter from `adapter_checkpoint` (torchtune's `adapter_model.pt`, which
#   recipes/lora_finetune_single_device.py writes to output_dir/adapter/epoch_N/); the QLoRA base
#   is quantized to NF4 as in training. A merged checkpoint (output_dir/epoch_N) loads into the
#   plain model builder.
# - Our tasks: `include_path` defaults to evals/tasks, `metadata` is handed to the tasks (e.g.
#   usmle_dir, include_images, medquad_test, bertscore_model), `gen_kwargs` can override the
#   tasks' generation settings.
# - Outputs: lm-eval's results JSON and the per-sample outputs go to `output_dir` (results.json,
#   samples/<task>.jsonl) through components.evaluation.runner, with every accuracy's standard
#   error and 95% bootstrap interval, also printed.
# - The vision-language wrapper is gone: medtune evaluates text-only decoders.
# - The config is checked before any work (components.config_check): an unknown key or a
#   `_component_` that does not exist or takes no such argument stops the run, naming the key and
#   the closest valid one.
# - The quantized path loads its checkpoint with `weights_only=True` (torchtune: False).

import sys
import time

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from lm_eval.api.model import TemplateLM
from lm_eval.models.huggingface import HFLM
from lm_eval.utils import make_table
from omegaconf import DictConfig, OmegaConf

from torchtune import config, training, utils
from torchtune.data import left_pad_sequence
from torchtune.generation import generate
from torchtune.modules import TransformerDecoder
from torchtune.modules.common_utils import local_kv_cache
from torchtune.modules.peft import get_adapter_params, validate_missing_and_unexpected_for_lora
from torchtune.modules.transforms.tokenizers import ModelTokenizer
from torchtune.recipe_interfaces import EvalRecipeInterface
from torchtune.training import FullModelTorchTuneCheckpointer

from components.config_check import exit_on_config_problems
from components.user_errors import one_line_errors
from components.evaluation.runner import format_summary, run_tasks, TASKS_DIR

MIN_LM_EVAL = "0.4.5"


class _LLMEvalWrapper(HFLM):
    """An EvalWrapper for EleutherAI's eval harness based on gpt-fast's
    EvalWrapper: https://github.com/pytorch-labs/gpt-fast/blob/main/eval.py.

    Note:
        This is for text-only decoder models.

    Args:
        model (TransformerDecoder): The model to evaluate.
        tokenizer (ModelTokenizer): Tokenizer associated with the model being evaluated.
            This should be the same tokenizer used when fine-tuning the model.
        device (torch.device): The device to use.
        max_seq_length (int): The maximum sequence length to use.
        batch_size (int): The batch size per GPU to use.
        dtype (torch.dtype): dtype for the model caches during generation.
        enable_kv_cache (bool): Whether to enable KV cache for generation.
        add_bos (bool): medtune: prepend BOS as `lm_eval --model hf` does. Default True.
        max_gen_toks (int): medtune: generation budget when a task sets none. Default 256.
    """

    def __init__(
        self,
        model: TransformerDecoder,
        tokenizer: ModelTokenizer,
        *,
        device: torch.device,
        max_seq_length: int = 4096,
        batch_size: int = 8,
        dtype: torch.dtype = torch.float32,
        enable_kv_cache: bool = True,
        add_bos: bool = True,
        max_gen_toks: int = 256,
    ):
        # medtune: no HFLM.__init__ (it would download `gpt2`): the base LM set-up, then the
        # attributes HFLM's loglikelihood and generate_until loops read.
        TemplateLM.__init__(self)
        self._model = model
        self._tokenizer = tokenizer
        self._device = torch.device(device)
        self._max_seq_length = max_seq_length
        self._batch_size = batch_size
        self._dtype = dtype
        self._enable_kv_cache = enable_kv_cache
        self._add_bos = add_bos
        self._max_gen_toks = max_gen_toks
        self.backend = "causal"
        self.batch_size_per_gpu = batch_size
        self.batch_schedule = 1
        self.batch_sizes = {}
        self.max_batch_size = batch_size
        self.logits_cache = True
        self.softmax_dtype = None
        self.mixed_precision_dtype = None
        self.vocab_size = tokenizer.vocab_size
        self.think_end_token = None
        self.enable_thinking = None
        self.chat_template_args = {}
        self.truncation = False
        self.add_bos_token = add_bos
        self.custom_prefix_token_id = None
        self.pretrained = "torchtune"
        self.revision = None
        self.peft = None
        self.delta = None

    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        # medtune: lm-eval's results logger reads HF tokenizer fields from `lm.tokenizer`; the
        # torchtune tokenizer is `self._tokenizer`.
        return None

    @tokenizer.setter
    def tokenizer(self, value):
        pass

    @property
    def eot_token_id(self):
        return self._tokenizer.eos_id

    @property
    def prefix_token_id(self):
        # medtune: an empty context is conditioned on BOS, as HFLM does for Llama tokenizers.
        return self._tokenizer.bos_id

    @property
    def max_length(self):
        return self._max_seq_length

    @property
    def max_gen_toks(self):
        return self._max_gen_toks

    @property
    def batch_size(self):
        return self._batch_size

    @property
    def device(self):
        return self._device

    @property
    def enable_kv_cache(self):
        return self._enable_kv_cache

    def get_model_info(self) -> Dict[str, Any]:
        # medtune: HFLM's version reads Hugging Face model attributes.
        return {
            "model_source": "torchtune",
            "model_num_parameters": sum(p.numel() for p in self._model.parameters()),
            "model_dtype": str(self._dtype),
        }

    def tok_encode(self, text: str, add_special_tokens: Optional[bool] = None, **kwargs) -> List[int]:
        # medtune: BOS as `lm_eval --model hf` adds it (None means the tokenizer's default, which
        # for Llama 3 is to add it), but never twice. torchtune's wrapper always left it out.
        bos_text = self._tokenizer.decode([self._tokenizer.bos_id], skip_special_tokens=False)
        add_bos = self._add_bos if add_special_tokens is None else add_special_tokens
        if add_special_tokens is None and text.startswith(bos_text):
            add_bos = False
        return self._tokenizer.encode(text=text, add_bos=add_bos, add_eos=False)

    def tok_batch_encode(
        self, text: List[str], left_truncate_len: int = None, **kwargs
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        tokenized_text = [self.tok_encode(x) for x in text]

        # pad left
        x = left_pad_sequence(
            [torch.tensor(x) for x in tokenized_text],
            batch_first=True,
            padding_value=self._tokenizer.pad_id,
        )

        # the harness will use left_truncate_len to indicate that the current batch
        # needs to be truncated to self.max_seq_len - self.max_gen_toks
        if left_truncate_len is not None:
            x = x[:, -left_truncate_len:]

        return x, torch.ones_like(x)  # return 'mask' b/c it's expected by the harness

    def tok_decode(self, tokens: Union[List[int], int], skip_special_tokens: bool = True, **kwargs) -> str:
        if isinstance(tokens, int):
            tokens = [tokens]
        # medtune: honour skip_special_tokens (lm-eval decodes the EOS text with False).
        return self._tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _model_call(self, inps: torch.Tensor, **kwargs) -> torch.Tensor:
        return self._model(inps)

    @torch.inference_mode()
    def _model_generate(
        self, context: torch.Tensor, max_length: Optional[int] = None, stop=None, **generation_kwargs
    ) -> torch.Tensor:
        bsz, seq_len = context.shape

        temperature = generation_kwargs.get("temperature", 0.0)
        do_sample = generation_kwargs.get("do_sample", False)
        if do_sample or temperature != 0.0:
            raise RuntimeError(
                "Any decoding strategy other than greedy is not supported."
            )
        # medtune: lm-eval 0.4.13 passes the total length; generate the rest.
        max_new = (max_length - seq_len) if max_length is not None else self.max_gen_toks

        # if we've recieved fewer than self._batch_size samples in the current
        # batch we need to pad the batch out. here we're padding the end of the
        # current batch to the correct length. this is because when we use static
        # KV-caches, the model will expect a fixed batch size for all samples.
        maybe_padded_context = torch.nn.functional.pad(
            context,
            (0, 0, 0, self._batch_size - bsz),
            value=self._tokenizer.eos_id,  # pad with one of the tokenizer's stop tokens so generation can stop early
        )
        # medtune: caches as long as this batch needs (prompt + new tokens), not max_seq_length:
        # every decode step attends over the whole cache (1.8x on USMLE, same generations).
        with local_kv_cache(
            self.model,
            batch_size=self.batch_size,
            device=self.device,
            dtype=self._dtype,
            decoder_max_seq_len=min(self.max_length, seq_len + max_new),
        ):

            toks, _ = generate(
                self.model,
                maybe_padded_context,
                max_generated_tokens=max_new,
                temperature=temperature,
                top_k=None,
                pad_id=self._tokenizer.pad_id,
                stop_tokens=self._tokenizer.stop_tokens,
            )
        return toks[:bsz]


class EleutherEvalRecipe(EvalRecipeInterface):
    """
    This recipe runs evaluation on a trained model using EleutherAI's eval harness.
    This assumes the user has the EleutherAI eval harness installed. See
    https://github.com/EleutherAI/lm-evaluation-harness for more details.

    Features:
        - Single GPU evaluation. Multi-GPU evaluation is currently not supported.
        - Quantization (for text-only models) is supported.
        - Any task from the EleutherAI eval harness, and medtune's (evals/tasks)
        - medtune: full, LoRA (base + adapter) and QLoRA (NF4 base + adapter) checkpoints
        - medtune: results.json and samples/<task>.jsonl in output_dir

    We recommend launching evaluation using the tune CLI::

        tune run recipes/eleuther_eval.py --config configs/tiny/eval.yaml \
            tasks=[usmle_step1] limit=50
    """

    def __init__(self, cfg: DictConfig) -> None:
        # Double check we have the right Eval Harness version
        from importlib.metadata import version

        from packaging.version import Version

        # medtune: compare versions, not strings ("0.4.13" < "0.4.5" as text).
        if Version(version("lm-eval")) < Version(MIN_LM_EVAL):
            raise RuntimeError(
                f"This recipe requires EleutherAI Eval Harness v{MIN_LM_EVAL} or higher. "
                f"Please install with `pip install lm-eval>={MIN_LM_EVAL}`"
            )

        # General variable initialization
        self.device = utils.get_device(device=cfg.device)
        self.dtype = training.get_dtype(dtype=cfg.dtype, device=self.device)
        self.logger = utils.get_logger(cfg.get("log_level", "info"))
        training.set_seed(
            seed=cfg.seed, debug_mode=cfg.get("cudnn_deterministic_mode", None)
        )

        # Eval specific variables
        self.seed = cfg.seed
        self.limit = cfg.limit
        self.tasks = list(cfg.tasks)
        self.batch_size = cfg.batch_size
        self.enable_kv_cache = cfg.get("enable_kv_cache", True)
        # medtune: our tasks by default, task metadata, generation overrides, outputs.
        self.include_path = cfg.get("include_path", None) or str(TASKS_DIR)
        metadata = cfg.get("metadata", None)
        self.metadata = OmegaConf.to_container(metadata, resolve=True) if metadata else {}
        gen_kwargs = cfg.get("gen_kwargs", None)
        self.gen_kwargs = (
            OmegaConf.to_container(gen_kwargs, resolve=True) if isinstance(gen_kwargs, DictConfig) else gen_kwargs
        )
        self.output_dir = cfg.get("output_dir", None)

    def _load_adapter(self, path: str) -> Dict[str, Any]:
        """medtune: torchtune's adapter_model.pt, given as the file or its folder."""
        p = Path(path)
        if p.is_dir():
            p = p / "adapter_model.pt"
        if not p.is_file():
            raise FileNotFoundError(
                f"adapter_checkpoint: {p} not found (expected torchtune's adapter_model.pt, "
                "e.g. <lora output_dir>/adapter/epoch_0/adapter_model.pt)"
            )
        return torch.load(p, map_location="cpu", weights_only=True)

    def setup(self, cfg: DictConfig) -> None:
        # Initialize quantizer and quantization mode
        quantizer = config.instantiate(cfg.get("quantizer", None))
        quantization_mode = training.get_quantizer_mode(quantizer)

        # Load checkpoint
        checkpointer = config.instantiate(cfg.checkpointer)

        # Initialize model
        with training.set_default_dtype(self.dtype), self.device:
            model = config.instantiate(cfg.model)

        adapter_params = get_adapter_params(model)
        adapter_checkpoint = cfg.get("adapter_checkpoint", None)
        if adapter_checkpoint and not adapter_params:
            raise ValueError(
                "adapter_checkpoint is set but the model has no LoRA layers: use the LoRA/QLoRA "
                "model builder of the training config, or evaluate the merged weights without it"
            )

        # Quantize model if requested
        if quantization_mode is not None:
            if not isinstance(checkpointer, FullModelTorchTuneCheckpointer):
                raise ValueError(
                    "Quantization is only supported for models quantized and saved with the "
                    "FullModelTorchTuneCheckpointer - please ensure you have quantized your "
                    "model and are using the quantized weights!"
                )
            if "qat" in quantization_mode:
                raise ValueError(
                    "You have specified a quantizer with 'QAT' - "
                    "QAT quantizers should only be used during quantization aware training "
                    "and when quantizing models. Please use the corresponding post-training "
                    "quantizer e.g. Int8DynActInt4WeightQuantizer for Int8DynActInt4WeightQATQuantizer."
                )
            model = quantizer.quantize(model)
            model = model.to(device=self.device, dtype=self.dtype)
            # medtune: weights_only=True (torchtune: False): no arbitrary unpickling of a checkpoint
            ckpt_dict = checkpointer.load_checkpoint(weights_only=True)[
                training.MODEL_KEY
            ]
            for k, v in ckpt_dict.items():
                ckpt_dict[k] = v.to(self.device)
            model.load_state_dict(ckpt_dict, assign=True)
        elif adapter_params:
            # medtune: LoRA / QLoRA: base weights (NF4-quantized on load for QLoRA), then the
            # adapter; every LoRA weight must come from the adapter, every other from the base.
            ckpt_dict = checkpointer.load_checkpoint()[training.MODEL_KEY]
            base_missing, base_unexpected = model.load_state_dict(ckpt_dict, strict=False)
            if adapter_checkpoint:
                adapter = self._load_adapter(adapter_checkpoint)
                lora_missing, lora_unexpected = model.load_state_dict(adapter, strict=False)
            else:
                raise ValueError(
                    "the model has LoRA layers but no adapter_checkpoint is set: point it at "
                    "<lora output_dir>/adapter/epoch_N/adapter_model.pt, or evaluate the merged "
                    "weights (<lora output_dir>/epoch_N) with the plain model builder"
                )
            cfg_model = cfg.model
            validate_missing_and_unexpected_for_lora(
                lora_attn_modules=list(cfg_model.lora_attn_modules),
                apply_lora_to_mlp=cfg_model.get("apply_lora_to_mlp", False),
                apply_lora_to_output=cfg_model.get("apply_lora_to_output", False),
                base_missing=base_missing,
                base_unexpected=base_unexpected,
                lora_missing=lora_missing,
                lora_unexpected=lora_unexpected,
            )
            self.logger.info(f"Loaded the base weights and the adapter {adapter_checkpoint}")
        else:
            ckpt_dict = checkpointer.load_checkpoint()[training.MODEL_KEY]
            model.load_state_dict(ckpt_dict)

        # Load model weights into initialized model
        self.logger.info(f"Model is initialized with precision {self.dtype}.")

        # Put model in eval mode.
        # Note: This will not disable the dropout applied in SDPA,
        # see https://github.com/pytorch/pytorch/issues/124464
        model.eval()

        # Initialize tokenizer/transform
        model_transform = config.instantiate(cfg.tokenizer)

        # Finally, we setup the actual EvalWrapper class
        if not isinstance(model, TransformerDecoder):
            # medtune: text-only decoders (the multimodal wrapper was removed).
            raise ValueError(f"expected a TransformerDecoder, got {type(model).__name__}")
        self.eleuther_model_wrapper = _LLMEvalWrapper(
            model,
            model_transform,
            device=self.device,
            max_seq_length=cfg.max_seq_length,
            batch_size=self.batch_size,
            dtype=self.dtype,
            enable_kv_cache=self.enable_kv_cache,
            add_bos=cfg.get("add_bos", True),
            max_gen_toks=cfg.get("max_gen_toks", 256),
        )

    def evaluate(self) -> Dict[str, Any]:
        # Run evaluation (medtune: through components.evaluation.runner, which builds the task
        # manager with our tasks and metadata and writes results + samples to output_dir)
        t0 = time.time()
        self.logger.info(f"Running evaluation on the following tasks: {self.tasks}")
        output = run_tasks(
            self.eleuther_model_wrapper,
            self.tasks,
            output_dir=self.output_dir,
            limit=self.limit,
            metadata=self.metadata,
            include_path=self.include_path,
            gen_kwargs=self.gen_kwargs,
            seed=self.seed,
        )
        t1 = time.time() - t0

        # Log metrics
        self.logger.info(f"Eval completed in {t1:.02f} seconds.")
        if self.device.type != "cpu":
            torch_device = utils.get_torch_device_namespace()
            self.logger.info(
                f"Max memory allocated: {torch_device.max_memory_allocated() / 1e9:.02f} GB"
            )
        formatted_output = make_table(output)
        if "groups" in output:
            formatted_output += "\n" + make_table(output, "groups")
        self.logger.info(f"\n\n{formatted_output}\n")
        self.logger.info(
            "\n\nEvery accuracy with its standard error and 95% bootstrap interval:\n"
            f"{format_summary(output['medtune']['summary'])}\n"
        )
        if self.output_dir:
            self.logger.info(f"Results and per-sample outputs written to {self.output_dir}")
        return output


@one_line_errors  # medtune: a bad --config, data file or path: one line, exit status 2
@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point for the recipe."""
    exit_on_config_problems(cfg, __file__)  # medtune: every unknown key or component, before any work
    config.log_config(recipe_name="EleutherEvalRecipe", cfg=cfg)
    recipe = EleutherEvalRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.evaluate()


if __name__ == "__main__":
    sys.exit(recipe_main())
