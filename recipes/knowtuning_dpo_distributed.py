# Copyright (c) Meta Platforms, Inc. and affiliates.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
#
# medtune: copied from medtune's recipes/knowtuning_dpo_single_device.py (KnowTuning stage 2:
# LoRA DPO + gamma x SFT on the stage-1 model, which with the adapters disabled is also the
# reference; see its header for what it changed in torchtune's lora_dpo_single_device.py) and
# made distributed the way medtune's recipes/lora_finetune_distributed.py is (FSDP2 on GPUs with
# nccl or CPU processes with gloo, the model built on the meta device and loaded shard by shard,
# a fresh adapter drawn whole so that every process count starts from the same one, every rank's
# dataloader position and RNG streams in the step checkpoints, the full optimizer state gathered
# to rank 0, atomic folders, exact resume, the NaN stop). What is specific to DPO under FSDP2:
# - each process takes `batch_size` pairs; FSDP2 averages the gradients of the processes' mean
#   losses, which is the gradient of the mean over all pairs (every process has the same number:
#   drop_last), so N processes x batch b train as one process x batch N*b. The logged loss, its
#   DPO and SFT terms and the reward metrics are averaged over the processes;
# - the chunked log-probabilities (norm + output projection + log-softmax, LOGPROB_CHUNK_TOKENS
#   positions at a time) run inside the model's forward, as its `unembed` step, because FSDP2
#   gathers the root module's weights (final norm, output projection) only during its forward and
#   backward;
# - the reference forward is the same sharded model with the adapters disabled: no second copy.
# Changes marked "medtune:".

import gc
import inspect
import math
import sys
import time

from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple
from warnings import warn

import torch
from omegaconf import DictConfig, ListConfig

from torch import nn
from torch.distributed import destroy_process_group, init_process_group
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer
from torch.utils.checkpoint import checkpoint
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune import config, modules, rlhf, training, utils
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate_dpo
from torchtune.datasets import ConcatDataset
from torchtune.modules.peft import (
    disable_adapter,
    DoRALinear,
    get_adapter_params,
    get_adapter_state_dict,
    get_lora_module_names,
    LoRALinear,
    set_trainable_params,
    validate_missing_and_unexpected_for_lora,
)
from torchtune.recipe_interfaces import FTRecipeInterface

from tqdm import tqdm

from components.checkpointing import (
    GLOBAL_STEP_KEY,
    epoch_folder_name,
    lora_checkpoint_dict,
    write_lora_checkpoint,
)
from components.step_checkpoints import LR_SCHEDULER_KEY, StepCheckpointClient
from components.config_check import exit_on_config_problems
from components.user_errors import one_line_errors

log = utils.get_logger("DEBUG")

#: medtune: positions (rows of the flattened batch) whose logits exist at once in the DPO forward
LOGPROB_CHUNK_TOKENS = 1024


@contextmanager
def log_prob_head(model: nn.Module, labels: torch.Tensor) -> Iterator[None]:
    """medtune: inside, the decoder's forward ends in :func:`chunked_log_probs` of ``labels``
    instead of its ``unembed`` step (shadowed on the instance), so it returns ``(log-probs,
    mean logits)`` and the root module's weights are gathered by FSDP2 when they are used."""
    model.unembed = lambda h: chunked_log_probs(model, h, labels)
    try:
        yield
    finally:
        del model.unembed


def _chunk_log_probs(
    model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token log-probs and per-row mean logits of one chunk of rows, as torchtune computes
    them: norm, output projection, fp32, ``rlhf.logits_to_logprobs``."""
    logits = model.output(model.norm(hidden)).float()
    log_probs = rlhf.logits_to_logprobs(logits, labels, temperature=1.0)
    return log_probs, logits.detach().mean(-1)


def chunked_log_probs(
    model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """medtune: ``[b, s-1]`` log-probs of ``labels`` (the next tokens) and ``[b, s]`` mean
    logits of every position (the logits metrics) from the last hidden state ``[b, s, d]``,
    LOGPROB_CHUNK_TOKENS positions at a time. With gradients on, each chunk is recomputed in
    the backward pass (activation checkpointing), so only one chunk's logits are ever alive."""
    b, s, d = hidden.shape
    # the last position predicts no label but counts in the logits metric, as in torchtune
    padded = torch.cat([labels, labels.new_zeros(b, 1)], dim=1).reshape(b * s, 1)
    rows = hidden.reshape(b * s, 1, d)
    log_probs, means = [], []
    for start in range(0, b * s, LOGPROB_CHUNK_TOKENS):
        part = (model, rows[start : start + LOGPROB_CHUNK_TOKENS], padded[start : start + LOGPROB_CHUNK_TOKENS])
        if torch.is_grad_enabled():
            lp, mean = checkpoint(_chunk_log_probs, *part, use_reentrant=False)
        else:
            lp, mean = _chunk_log_probs(*part)
        log_probs.append(lp)
        means.append(mean)
    return torch.cat(log_probs).reshape(b, s)[:, :-1], torch.cat(means).reshape(b, s)


def _process_group_backend(device_type: str) -> str:
    """medtune: gloo on CPU; torchtune's cuda:nccl,cpu:gloo on CUDA; the device's own elsewhere."""
    if device_type == "cpu":
        return "gloo"
    if device_type == "cuda":
        return "cuda:nccl,cpu:gloo"
    return training.get_distributed_backend(device_type, offload_ops_to_cpu=True)


def _cleanup_before_training(device: torch.device) -> None:
    """medtune: torchtune's cleanup_before_training, without the accelerator calls on CPU."""
    if device.type == "cpu":
        gc.collect()
    else:
        training.cleanup_before_training()


def _full_lora_init_state_dict(model: nn.Module, dtype: torch.dtype, seed: int) -> Dict[str, torch.Tensor]:
    """medtune: LoRA's initial weights drawn whole from one generator (Kaiming-uniform A, zero B,
    as torchtune's LoRALinear), so every process count starts from the same adapter."""
    generator = torch.Generator().manual_seed(seed)
    full_sd = {}
    for name, module in model.named_modules():
        if isinstance(module, (LoRALinear, DoRALinear)):
            lora_a = torch.empty(module.lora_a.weight.shape, dtype=dtype)
            nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5), generator=generator)
            full_sd[f"{name}.lora_a.weight"] = lora_a
            full_sd[f"{name}.lora_b.weight"] = torch.zeros(module.lora_b.weight.shape, dtype=dtype)
    return full_sd


class KnowTuningDPORecipeDistributed(FTRecipeInterface):
    """
    LoRA DPO recipe for dense transformer-based LLMs, distributed with FSDP2 (medtune: GPUs with
    nccl, or CPU processes with gloo). This is based on HF's DPOTrainer in the
    TRL library: https://github.com/huggingface/trl/blob/main/trl/trainer/dpo_trainer.py#L65

    medtune: KnowTuning's stage 2. Point the checkpointer at stage 1's merged output so that the
    reference (adapters disabled) is the stage-1 model, and use
    :class:`components.knowtuning.DPOSFTLoss` (DPO + gamma x SFT on the chosen answer). The same
    configs as recipes/knowtuning_dpo_single_device.py; ``batch_size`` is per process.

    This recipe supports:
        - Activation checkpointing. This is enabled by default but is configurable.
        - Activation offloading - this is enabled by default and should only be used alongside
            activation checkpointing.
        - Full bf16 training for supported HW architectures. We currently check bf16 support via
            the `torch.cuda.is_bf16_supported` API. This is disabled by default but can be enabled via
            setting `dtype=bf16` in configuration.
        - Checkpointing: of LoRA adapter parameters and their optimizer states. When resuming
            from a checkpoint, the adapter parameters are loaded from the checkpoint along
            with the base model weights. medtune: mid-epoch too, from step checkpoints.
        - Logging to terminal, WandB, or TensorBoard.


    The following losses are supported in this recipe:
        - :class:`components.knowtuning.DPOSFTLoss`: DPO + gamma x SFT (medtune, KnowTuning).
        - :class:`~torchtune.rlhf.loss.DPOLoss`: Direct Preference Optimization (DPO).
        - :class:`~torchtune.rlhf.loss.RSOPLoss`: Rejection Sampling Optimization (RSO).

    Assumptions:
        - medtune: checkpoints are saved every ``save_every_n_steps`` optimizer steps and at
            epoch boundaries.
        - Datasets are Map-style and data fits in memory (not streamed).

    The following configs can be used to run this recipe:
        >>> tune ls
        RECIPE                          CONFIG
        lora_dpo_distributed            llama2/7B_lora_dpo

    Args:
        cfg (DictConfig): OmegaConf object parsed from yaml file

    Raises:
        ValueError: If ``dtype`` is set to fp16.
        RuntimeError: If ``dtype`` is set to bf16 and the hardware does not support bf16.
        RuntimeError: If ``enable_activation_offloading`` is True and device is not CUDA.
        RuntimeError: If ``enable_activation_offloading`` is True and ``enable_activation_checkpointing`` is False.

    """

    def __init__(self, cfg: DictConfig) -> None:

        self._device = utils.get_device(device=cfg.device)
        # Reduced precision logic
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)

        # fp16 precision is explicitly disabled as it is not supported in this
        # recipe (for example, no gradient scaling).
        if self._dtype == torch.float16:
            raise ValueError(
                "fp16 precision is not supported in this recipe. Please use fp32 or bf16."
            )
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self._is_rank_zero = self.rank == 0

        # logging attributes
        self._output_dir = cfg.output_dir
        self._log_every_n_steps = cfg.get("log_every_n_steps", 1)
        self._log_peak_memory_stats = cfg.get("log_peak_memory_stats", False)

        if self._log_peak_memory_stats and self._device.type != "cuda":
            utils.log_rank_zero(
                log,
                "log_peak_memory_stats was set to True, however, training does not use cuda. "
                "Setting log_peak_memory_stats=False.",
            )
            self._log_peak_memory_stats = False
        # medtune: parameters already live on the CPU; FSDP's CPU offload would be a no-op.
        self._fsdp_cpu_offload = cfg.get("fsdp_cpu_offload", False) and self._device.type != "cpu"

        # activation checkpointing/offloading
        self._enable_activation_checkpointing = cfg.get(
            "enable_activation_checkpointing", False
        )
        self._enable_activation_offloading = cfg.get(
            "enable_activation_offloading", False
        )
        if self._enable_activation_offloading:
            if self._device.type != "cuda":
                raise RuntimeError(
                    "enable_activation_offloading should only be True when training on CUDA"
                )
            if not self._enable_activation_checkpointing:
                raise RuntimeError(
                    "enable_activation_offloading should only be True when enable_activation_checkpointing is True"
                )
        elif self._enable_activation_checkpointing:
            utils.log_rank_zero(
                log,
                "Hint: enable_activation_checkpointing is True, but enable_activation_offloading isn't. "
                "Enabling activation offloading should reduce memory further.",
            )

        # These are public properties which are updated by the checkpoint loader
        # when ``resume_from_checkpoint`` is `True` or validated in tests
        self.seed = training.set_seed(
            seed=cfg.seed, debug_mode=cfg.get("cudnn_deterministic_mode", None)
        )
        self.epochs_run = 0
        self.total_epochs = cfg.epochs
        self.max_steps_per_epoch = cfg.max_steps_per_epoch
        self.global_step = 0
        self._resume_from_checkpoint = cfg.resume_from_checkpoint
        self._save_adapter_weights_only = cfg.get("save_adapter_weights_only", False)
        self._gradient_accumulation_steps = cfg.gradient_accumulation_steps
        # medtune: step checkpoints, where to resume from, and a Ctrl-C that names both; every
        # rank's dataloader position and RNG streams
        self._checkpoints = StepCheckpointClient(
            cfg.output_dir,
            resume_from_checkpoint=cfg.resume_from_checkpoint,
            resume_from=cfg.get("resume_from", None),
            save_every_n_steps=cfg.get("save_every_n_steps", None),
            keep_last_n_checkpoints=cfg.get("keep_last_n_checkpoints", None),
            distributed=True,
        )
        self._checkpoints.exit_cleanly_on_interrupt()
        self._resumed_state = None  # the recipe state of the checkpoint resumed from

    def load_checkpoint(self, cfg_checkpointer: DictConfig) -> Dict[str, Any]:
        """
        Extract the checkpoint state from file and validate. This includes the
        base model weights. If resume_from_checkpoint is True, this also includes
        the adapter weights and recipe state
        """
        # medtune: the checkpointer only reads the base weights; the adapter and recipe state
        # come from this recipe's own resumable folder (step_N/, or epoch_N/ with adapter/epoch_N/).
        self._checkpointer = config.instantiate(cfg_checkpointer, should_load_recipe_state=False)
        checkpoint_dict = self._checkpointer.load_checkpoint()
        # medtune: these weights are the policy's base and, with the adapters disabled, the reference.
        utils.log_rank_zero(
            log,
            "Reference model (and the policy's base): the weights in "
            f"{cfg_checkpointer.get('checkpoint_dir', '<checkpointer default>')}",
        )

        if self._checkpoints.resuming:
            checkpoint_dict[training.ADAPTER_KEY] = self._checkpoints.load_adapter()
            checkpoint_dict.update(self._checkpoints.load_state())
            # _update_recipe_state will throw an exception if the recipe state is not correctly loaded
            # no need to check here
            self._update_recipe_state(checkpoint_dict)
        return checkpoint_dict

    def _update_recipe_state(self, ckpt_dict: Dict[str, Any]) -> None:
        """
        Updates the recipe state from checkpoint.
        """
        try:
            self.epochs_run = ckpt_dict[training.EPOCHS_KEY]

            # on mismatch, warn the user and prevent the override
            if self.seed != ckpt_dict[training.SEED_KEY]:
                warn(
                    message=(
                        "Config value for seed does not match the checkpoint value, "
                        f"using the checkpoint value: {ckpt_dict[training.SEED_KEY]}"
                    )
                )
                self.seed = ckpt_dict[training.SEED_KEY]
            if self.max_steps_per_epoch != ckpt_dict[training.MAX_STEPS_KEY]:
                warn(
                    message=(
                        "Config value for max_steps_per_epoch does not match the checkpoint value, "
                        f"using the checkpoint value: {ckpt_dict[training.MAX_STEPS_KEY]}"
                    )
                )
                self.max_steps_per_epoch = ckpt_dict[training.MAX_STEPS_KEY]
            # medtune: mid-epoch position; the RNG streams are restored once setup is done
            self.global_step = ckpt_dict[GLOBAL_STEP_KEY]
            self._resumed_state = ckpt_dict

            # on mismatch, warn the user but allow the override
            if self.total_epochs != ckpt_dict[training.TOTAL_EPOCHS_KEY]:
                warn(
                    message=(
                        "Config value for total_epochs does not match the checkpoint value, "
                        f"using the config value: {self.total_epochs}"
                    )
                )

        except KeyError as e:
            raise KeyError(
                "Checkpoint does not contain the required keys needed for updating recipe state. "
                "Are you sure you passed in the right recipe checkpoint?"
            ) from e

    def setup(self, cfg: DictConfig) -> None:
        """
        Setup the recipe state. This includes recipe state (if resume_from_checkpoint is True),
        model, tokenizer, loss, optimizer, learning rate scheduler, sampler, and dataloader.
        """
        if self._is_rank_zero:
            self._metric_logger = config.instantiate(cfg.metric_logger)
            # log config with parameter override
            self._metric_logger.log_config(cfg)

        self._model_compile = cfg.compile
        checkpoint_dict = self.load_checkpoint(cfg_checkpointer=cfg.checkpointer)

        self._model = self._setup_model(
            cfg_model=cfg.model,
            enable_activation_checkpointing=cfg.enable_activation_checkpointing,
            enable_activation_offloading=self._enable_activation_offloading,
            compile_model=cfg.compile,
            custom_sharded_layers=cfg.get("custom_sharded_layers", None),
            reshard_after_forward=cfg.get("fsdp_reshard_after_forward", True),
            base_model_state_dict=checkpoint_dict[training.MODEL_KEY],
            lora_weights_state_dict=(
                checkpoint_dict[training.ADAPTER_KEY]
                if self._resume_from_checkpoint
                else None
            ),
        )

        self._tokenizer = config.instantiate(cfg.tokenizer)

        self._optimizer = self._setup_optimizer(
            cfg_optimizer=cfg.optimizer,
            opt_state_dict=(
                checkpoint_dict[training.OPT_KEY]
                if self._resume_from_checkpoint
                else None
            ),
        )

        self._loss_fn = config.instantiate(cfg.loss)
        # medtune: a loss with an SFT term gets the chosen answers' mean token log-probabilities.
        self._loss_takes_sft = (
            "policy_chosen_mean_logps"
            in inspect.signature(self._loss_fn.forward).parameters
        )
        utils.log_rank_zero(log, "Loss function is initialized.")

        # Dataloader depends on the tokenizer and loss_fn and should be
        # setup after all of these are setup
        self._sampler, self._dataloader = self._setup_data(
            cfg_dataset=cfg.dataset,
            shuffle=cfg.shuffle,
            batch_size=cfg.batch_size,
            dataloader_state_dict=self._checkpoints.resumed_dataloader_state(),
        )

        # Finally update the recipe state which can only be correctly set after all of the
        # other components have been initialized and updated.

        # Number of training steps in each epoch depends on the number of batches produced
        # by the dataloader and the max_steps_per_epoch param set by the user and is used
        # for logging and tracking training state. This should be computed after the dataloader
        # has been setup
        self._steps_per_epoch = (
            len(self._dataloader) // self._gradient_accumulation_steps
        )
        if (
            self.max_steps_per_epoch is not None
            and self.max_steps_per_epoch < self._steps_per_epoch
        ):
            self._steps_per_epoch = self.max_steps_per_epoch
        # medtune: outside the `if`, so a resumed run without max_steps_per_epoch keeps its step;
        # a resumed run takes it from the recipe state (mid-epoch included).
        if not self._resume_from_checkpoint:
            self.global_step = self.epochs_run * self._steps_per_epoch

        # Learning rate scheduler can only be set up after number of steps
        # has been computed
        self._lr_scheduler = self._setup_lr_scheduler(
            cfg_lr_scheduler=cfg.get("lr_scheduler", None),
            num_training_steps=self.total_epochs * self._steps_per_epoch,
            last_epoch=self.global_step - 1,
        )
        # medtune: and the scheduler's own state, as saved
        if self._resumed_state is not None and self._lr_scheduler is not None:
            self._lr_scheduler.load_state_dict(self._resumed_state[LR_SCHEDULER_KEY])
        self._resumed_state = None  # medtune: the RNG streams continue in train (epoch_batches)

    def _setup_model(
        self,
        cfg_model: DictConfig,
        enable_activation_checkpointing: bool,
        enable_activation_offloading: bool,
        compile_model: bool,
        base_model_state_dict: Dict[str, Any],
        custom_sharded_layers: Optional[List[str]] = None,
        reshard_after_forward: bool = True,
        lora_weights_state_dict: Optional[Dict[str, Any]] = None,
    ) -> nn.Module:
        """medtune: as recipes/lora_finetune_distributed.py: built on the meta device, sharded by
        FSDP2 layer by layer, then loaded from the full state dicts; a fresh adapter is drawn
        whole (:func:`_full_lora_init_state_dict`)."""
        self._lora_rank = cfg_model.lora_rank
        self._lora_alpha = cfg_model.lora_alpha
        self._lora_attn_modules = list(cfg_model.lora_attn_modules)
        self._apply_lora_to_mlp = cfg_model.apply_lora_to_mlp
        self._apply_lora_to_output = getattr(cfg_model, "apply_lora_to_output", False)

        with training.set_default_dtype(self._dtype), torch.device("meta"):
            model = config.instantiate(cfg_model)
        set_trainable_params(model, get_adapter_params(model))

        if compile_model:
            training.compile_model(model, verbose=self._is_rank_zero)
        if enable_activation_checkpointing:
            training.set_activation_checkpointing(
                model, auto_wrap_policy={modules.TransformerSelfAttentionLayer}
            )
        training.shard_model(
            model=model,
            shard_conditions=[
                partial(training.get_shard_conditions, names_to_match=custom_sharded_layers)
            ],
            cpu_offload=self._fsdp_cpu_offload,
            reshard_after_forward=reshard_after_forward,
        )

        if lora_weights_state_dict:
            lora_missing, lora_unexpected = training.load_from_full_model_state_dict(
                model, lora_weights_state_dict, self._device, cpu_offload=self._fsdp_cpu_offload
            )
        else:
            lora_missing, lora_unexpected = None, None
        with training.set_default_dtype(self._dtype), self._device:
            lora_device = "cpu" if self._fsdp_cpu_offload else self._device
            for m in model.modules():
                if isinstance(m, (LoRALinear, DoRALinear)) and not lora_weights_state_dict:
                    m.to_empty(device=lora_device)
                    m.initialize_parameters()
                if hasattr(m, "rope_init"):
                    m.rope_init()
        if not lora_weights_state_dict:
            training.load_from_full_model_state_dict(
                model,
                _full_lora_init_state_dict(model, self._dtype, self.seed),
                self._device,
                cpu_offload=self._fsdp_cpu_offload,
            )
        base_missing, base_unexpected = training.load_from_full_model_state_dict(
            model, base_model_state_dict, self._device, cpu_offload=self._fsdp_cpu_offload
        )
        validate_missing_and_unexpected_for_lora(
            lora_attn_modules=self._lora_attn_modules,
            apply_lora_to_mlp=self._apply_lora_to_mlp,
            apply_lora_to_output=self._apply_lora_to_output,
            base_missing=base_missing,
            base_unexpected=base_unexpected,
            lora_missing=lora_missing,
            lora_unexpected=lora_unexpected,
        )
        training.validate_no_params_on_meta_device(model)

        # activation offloading
        self.activations_handling_ctx = training.get_act_offloading_ctx_manager(
            model, enable_activation_offloading
        )
        utils.log_rank_zero(log, f"Model is initialized with precision {self._dtype}.")
        if self._is_rank_zero and self._device.type != "cpu":
            training.log_memory_stats(training.get_memory_stats(device=self._device))
        torch.distributed.barrier()
        return model

    def _setup_optimizer(
        self, cfg_optimizer: DictConfig, opt_state_dict: Optional[Dict[str, Any]] = None
    ) -> Optimizer:
        optimizer = config.instantiate(cfg_optimizer, self._model.parameters())
        if opt_state_dict:
            training.load_from_full_optimizer_state_dict(
                self._model, optimizer, opt_state_dict, self._device
            )
        utils.log_rank_zero(log, "Optimizer is initialized.")
        return optimizer

    def _setup_lr_scheduler(
        self,
        cfg_lr_scheduler: Optional[DictConfig],
        num_training_steps: int,
        last_epoch: int,
    ) -> Optional[Optimizer]:
        if cfg_lr_scheduler is None:
            utils.log_rank_zero(
                log, "No learning rate scheduler configured. Using constant learning rate."
            )
            return None

        lr_scheduler = config.instantiate(
            cfg_lr_scheduler,
            self._optimizer,
            num_training_steps=num_training_steps,
            last_epoch=last_epoch,
        )

        utils.log_rank_zero(log, "Learning rate scheduler is initialized.")
        return lr_scheduler

    def _setup_data(
        self,
        cfg_dataset: DictConfig,
        shuffle: bool,
        batch_size: int,
        dataloader_state_dict: Optional[Dict[str, Any]] = None,
    ) -> Tuple[StatefulDistributedSampler, StatefulDataLoader]:
        """
        All data related setup happens here. Currently this recipe only supports
        Map-style Datasets which fit into memory and an option for random shuffling.
        Samplers, iterable datasets, and streaming datasets are not supported.

        medtune: torchdata's stateful sampler and dataloader (the same order as torch's), so a
        step checkpoint records the position within the epoch (``dataloader_state_dict``).
        """
        if isinstance(cfg_dataset, ListConfig):
            datasets = [
                config.instantiate(single_cfg_dataset, tokenizer=self._tokenizer)
                for single_cfg_dataset in cfg_dataset
            ]
            ds = ConcatDataset(datasets=datasets)
        else:
            ds = config.instantiate(cfg_dataset, tokenizer=self._tokenizer)

        sampler = StatefulDistributedSampler(
            ds,
            num_replicas=self.world_size,
            rank=self.rank,
            shuffle=shuffle,
            seed=0,
        )
        dataloader = StatefulDataLoader(
            dataset=ds,
            sampler=sampler,
            batch_size=batch_size,
            # dropping last avoids shape issues with compile + flex attention
            drop_last=True,
            collate_fn=partial(
                padded_collate_dpo,
                padding_idx=self._tokenizer.pad_id,
                ignore_idx=CROSS_ENTROPY_IGNORE_IDX,
            ),
        )
        if dataloader_state_dict is not None:
            dataloader.load_state_dict(dataloader_state_dict)
        utils.log_rank_zero(log, "Dataset and Sampler are initialized.")

        return sampler, dataloader

    def save_checkpoint(self, epoch: int) -> None:
        """
        Checkpoint the state of the recipe. The constructed checkpoint state dict
        contains the following information:
        - Merged weights with key MODEL_KEY
        - Adapter weights with key ADAPTER_KEY
        - Relevant recipe state if training is not complete
        - If the `self._save_adapter_weights_only` option is True, the checkpointer will save only the adapter weights

        To correctly resume from training, the adapter weights and recipe state must be provided along with the base model weights.

        medtune: ``output_dir/adapter/epoch_<epoch>/`` and then ``output_dir/epoch_<epoch>/``,
        with ``recipe_state.pt`` in the latter when more epochs follow.
        """
        self._write_checkpoint(
            epoch_folder_name(epoch), with_recipe_state=epoch + 1 < self.total_epochs, epoch_end=True
        )

    def _write_checkpoint(
        self, folder: str, with_recipe_state: bool, epoch_end: bool = False
    ) -> None:
        """medtune: ``output_dir/<folder>``: every rank takes part in gathering to rank 0, which
        writes it atomically (components.step_checkpoints); a step folder holds the adapter
        (+ recipe state), an epoch folder the merged weights, its adapter going to
        adapter/<folder>/ (components.checkpointing.write_lora_checkpoint)."""
        adapter_only = self._save_adapter_weights_only or not epoch_end
        if adapter_only:
            state_dict = self._gather_adapter_state_dict()
        else:
            state_dict = training.gather_cpu_state_dict(
                self._model, self._is_rank_zero, device=self._device
            )
        recipe_state = (
            self._checkpoints.recipe_state(
                self,
                training.get_full_optimizer_state_dict(
                    self._model, self._optimizer, self._is_rank_zero, device=self._device
                ),
                epoch_end,
                self._lr_scheduler,
            )
            if with_recipe_state
            else None
        )

        def write(staging: Path) -> None:
            ckpt_dict = lora_checkpoint_dict(
                state_dict,
                rank=self._lora_rank,
                alpha=self._lora_alpha,
                target_modules=get_lora_module_names(
                    self._lora_attn_modules,
                    self._apply_lora_to_mlp,
                    self._apply_lora_to_output,
                ),
                merge=not adapter_only,
                # medtune: with one CPU process those are the live weights; do not merge into them
                copy_base=self._device.type == "cpu",
            )
            write_lora_checkpoint(
                self._checkpointer, staging, folder, self._output_dir, ckpt_dict, adapter_only
            )

        self._checkpoints.save(folder, write, recipe_state)

    def _gather_adapter_state_dict(self) -> Dict[str, torch.Tensor]:
        """medtune: the adapter's full weights on rank 0 ({} elsewhere); the base stays sharded."""
        adapter_state_dict = {}
        for name, param in get_adapter_state_dict(self._model.state_dict(), device=None).items():
            if param.is_cpu and self._device.type != "cpu":
                param = param.to(self._device)  # offloaded shards gather on the device
            if isinstance(param, DTensor):
                param = param.full_tensor()
            if self._is_rank_zero:
                adapter_state_dict[name] = param.cpu()
        return adapter_state_dict

    def concatenated_forward(
        self, model: nn.Module, batch: Tuple[torch.Tensor, torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Run forward pass of the model with chosen and rejected samples concatenated.

        Args:
            model (nn.Module): The model to be used for the forward pass.
            batch (Tuple[torch.Tensor, torch.Tensor]): Tuple of input_ids and labels.

        Returns:
            Tuple of chosen log probs, rejected log probs, (medtune) the mean chosen and
            rejected logits (detached, for the metrics), and the chosen answers' mean
            per-token log probs.
        """
        concatenated_input_ids, concatenated_labels = batch
        concatenated_input_ids = concatenated_input_ids.to(self._device)
        concatenated_labels = concatenated_labels.to(self._device)

        # formed by concatenating an equal number of "chosen" and "rejected".
        len_chosen = concatenated_input_ids.shape[0] // 2

        # medtune: the model's forward ends in chunked_log_probs (log_prob_head), which turns
        # the last hidden state into log-probabilities LOGPROB_CHUNK_TOKENS positions at a time,
        # so the [batch, seq, vocab] logits never exist at once; one log-softmax gives both the
        # summed log probs (DPO) and their per-token mean over the answer (the SFT term).
        labels = concatenated_labels[:, 1:].clone()
        loss_mask = labels != CROSS_ENTROPY_IGNORE_IDX
        labels[~loss_mask] = 0
        with self.activations_handling_ctx, log_prob_head(model, labels):
            per_token_log_probs, logit_means = model(concatenated_input_ids)
        all_log_probs = (per_token_log_probs * loss_mask).sum(-1)
        all_mean_log_probs = all_log_probs / loss_mask.sum(-1).clamp(min=1)

        chosen_log_probs = all_log_probs[:len_chosen]
        rejected_log_probs = all_log_probs[len_chosen:]

        # medtune: the mean logits (metrics only) instead of the logits themselves
        return (
            chosen_log_probs,
            rejected_log_probs,
            logit_means[:len_chosen].mean(),
            logit_means[len_chosen:].mean(),
            all_mean_log_probs[:len_chosen],
        )

    def train(self) -> None:
        """
        The core training loop.
        """
        _cleanup_before_training(self._device)  # medtune: no accelerator calls on CPU
        if self._model_compile:
            utils.log_rank_zero(
                log,
                "NOTE: torch.compile is enabled and model is compiled in first forward. Expect a relatively slow first iteration.",
            )

        # Initialize tokens count and running loss (for grad accumulation)
        t0 = time.perf_counter()
        running_loss = 0
        running_dpo = running_sft = 0.0  # medtune: the two terms of DPOSFTLoss
        num_tokens = 0

        # self.epochs_run should be non-zero when we're resuming from a checkpoint
        for curr_epoch in range(self.epochs_run, self.total_epochs):
            # Update the sampler to ensure data is correctly shuffled across epochs
            # in case shuffle is True
            self._sampler.set_epoch(curr_epoch)
            # medtune: optimizer steps already taken in this epoch (non-zero after a mid-epoch resume)
            steps_in_epoch = self.global_step - curr_epoch * self._steps_per_epoch
            pbar = tqdm(total=self._steps_per_epoch, initial=steps_in_epoch, disable=not self._is_rank_zero)
            # medtune: a resumed run's RNG continues the saved stream
            batches = self._checkpoints.epoch_batches(self._dataloader, steps_in_epoch)
            for idx, batch in enumerate(batches):
                # batch is input_ids, labels
                num_tokens += batch[0].numel()
                (
                    policy_chosen_log_probs,
                    policy_rejected_log_probs,
                    policy_chosen_logits_mean,
                    policy_rejected_logits_mean,
                    policy_chosen_mean_log_probs,
                ) = self.concatenated_forward(self._model, batch)

                with torch.no_grad(), disable_adapter(self._model):
                    (
                        reference_chosen_log_probs,
                        reference_rejected_log_probs,
                        _,
                        _,
                        _,
                    ) = self.concatenated_forward(self._model, batch)
                # medtune: pass the SFT input to losses that take it (DPOSFTLoss)
                extra_loss_inputs = (
                    {"policy_chosen_mean_logps": policy_chosen_mean_log_probs}
                    if self._loss_takes_sft
                    else {}
                )
                loss, chosen_rewards, rejected_rewards = self._loss_fn(
                    policy_chosen_log_probs,
                    policy_rejected_log_probs,
                    reference_chosen_log_probs,
                    reference_rejected_log_probs,
                    **extra_loss_inputs,
                )
                terms = getattr(self._loss_fn, "last_terms", None)
                if terms is not None:
                    running_dpo += terms[0].mean() / self._gradient_accumulation_steps
                    running_sft += terms[1].mean() / self._gradient_accumulation_steps

                loss = loss.mean()
                reward_accuracies = (chosen_rewards > rejected_rewards).float()

                loss = loss / self._gradient_accumulation_steps
                running_loss += loss
                loss.backward()

                # Step with optimizer
                if (idx + 1) % self._gradient_accumulation_steps == 0:
                    # medtune: the loss, its two terms and the reward metrics of the last
                    # micro-batch, averaged over the processes (FSDP2 averages the gradients)
                    values = [
                        running_loss.item(), float(running_dpo), float(running_sft),
                        chosen_rewards.mean().item(), rejected_rewards.mean().item(),
                        reward_accuracies.mean().item(), policy_chosen_log_probs.detach().mean().item(),
                        policy_rejected_log_probs.detach().mean().item(),
                        policy_chosen_logits_mean.item(), policy_rejected_logits_mean.item(),
                        float(num_tokens),
                    ]
                    reduced = torch.tensor(values, dtype=torch.float64, device=self._device)
                    torch.distributed.all_reduce(reduced)  # a sum: gloo has no average
                    metrics = (reduced[:-1] / self.world_size).tolist()
                    num_tokens = reduced[-1].item()
                    # medtune: every rank holds the averaged loss, so every rank stops here,
                    # before the optimizer step, when it is NaN/inf
                    loss_to_log = metrics[0]
                    self._checkpoints.check_loss(loss_to_log, self.global_step + 1)
                    self._optimizer.step()
                    self._optimizer.zero_grad(set_to_none=True)

                    if self._lr_scheduler is not None:
                        self._lr_scheduler.step()
                    # Update the number of steps when the weights are updated
                    self.global_step += 1
                    steps_in_epoch += 1

                    pbar.update(1)
                    pbar.set_description(
                        f"{curr_epoch + 1}|{self.global_step}|Loss: {loss_to_log}"
                    )

                    # Log per-step metrics
                    if self.global_step % self._log_every_n_steps == 0 and self._is_rank_zero:
                        time_per_step = time.perf_counter() - t0
                        log_dict = {
                            "loss": loss_to_log,
                            "lr": self._optimizer.param_groups[0]["lr"],
                            "tokens_per_second_per_gpu": num_tokens / (time_per_step * self.world_size),
                            "rewards/chosen": metrics[3],
                            "rewards/rejected": metrics[4],
                            "rewards/accuracies": metrics[5],
                            "rewards/margins": metrics[3] - metrics[4],
                            "log_probs/chosen": metrics[6],
                            "log_probs/rejected": metrics[7],
                            "logits/chosen": metrics[8],
                            "logits/rejected": metrics[9],
                        }
                        if getattr(self._loss_fn, "last_terms", None) is not None:
                            log_dict["loss/dpo"] = metrics[1]
                            log_dict["loss/sft"] = metrics[2]
                        if self._log_peak_memory_stats:
                            log_dict.update(
                                training.get_memory_stats(device=self._device)
                            )
                        self._metric_logger.log_dict(
                            log_dict,
                            step=self.global_step,
                        )

                    # Reset running stats for the next step
                    running_loss = 0
                    running_dpo = running_sft = 0.0
                    num_tokens = 0

                    # medtune: step-based checkpoints (the epoch's last step gets the epoch one)
                    folder = self._checkpoints.due_step_folder(
                        self.global_step, steps_in_epoch, self._steps_per_epoch
                    )
                    if folder:
                        self._write_checkpoint(folder, with_recipe_state=True)
                    t0 = time.perf_counter()

                # medtune: counted in optimizer steps, so a resumed epoch stops where it should
                if steps_in_epoch >= self._steps_per_epoch:
                    break

            self.epochs_run += 1
            self.save_checkpoint(epoch=curr_epoch)

    def cleanup(self) -> None:
        if self._is_rank_zero:
            self._metric_logger.close()
        destroy_process_group()


@one_line_errors  # medtune: a bad --config, data file or path: one line, exit status 2
@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """
    Entry point for the recipe.

    Configurable parameters are read in the following order:
        - Parameters specified in config (see available configs through ``tune ls``)
        - Overwritten by arguments from the command-line
    """
    exit_on_config_problems(cfg, __file__)  # medtune: every unknown key or component, before any work
    if not training.is_distributed():
        raise RuntimeError(
            "Distributed finetune recipe should be run via a distributed launcher."
            "If using tune CLI, please specify --nnodes 1 and --nproc_per_node [num_gpus]"
        )
    # medtune: the backend follows the device (gloo on CPU)
    init_process_group(_process_group_backend(utils.get_device(device=cfg.get("device", None)).type))
    config.log_config(recipe_name="KnowTuningDPORecipeDistributed", cfg=cfg)
    recipe = KnowTuningDPORecipeDistributed(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
