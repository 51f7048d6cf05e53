# Copyright (c) Meta Platforms, Inc. and affiliates.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
#
# medtune: copied from torchtune 0.6.1's recipes/lora_finetune_distributed.py (LoRA, and QLoRA
# through the `qlora_*` model builders). Changed:
# - CPU training: the process-group backend follows the device (gloo on CPU, torchtune's
#   cuda:nccl,cpu:gloo on CUDA) and accelerator-only calls (memory stats, cache clearing) are
#   guarded by the device type (fsdp_cpu_offload is ignored on CPU), so FSDP2 runs on CPU under
#   torchrun.
# - LoRA initialisation: the adapter's initial weights are made once as full tensors on rank 0
#   and loaded like a resumed adapter, so they do not depend on the number of processes (torchtune
#   initialised each rank's shard from its own seed, seed + rank).
# - QLoRA: FSDP2 shards torchao's NF4 weights on CPU/gloo too, where they split evenly; where they
#   cannot be sharded (one process; or a quantized weight whose NF4 parts do not split evenly
#   across the processes) the recipe stops before sharding with a message naming the reason,
#   instead of failing inside FSDP or torchao.
# - The adapter's place: `epoch_N/` keeps only the merged HF model (+ config and tokenizer files);
#   the adapter (PEFT files + torchtune's adapter_model.pt) goes to `output_dir/adapter/epoch_N/`,
#   where a resumed run also looks for it (torchtune wrote both into `epoch_N/`, and
#   `lm_eval --model hf` then applied the adapter twice).
# - Checkpoints: `save_every_n_steps: N` writes `output_dir/step_<global step>/` (the adapter,
#   PEFT files + adapter_model.pt, and `recipe_state.pt`: the gathered full optimizer state, LR
#   scheduler, global step, and every rank's dataloader position and RNG states; the frozen base
#   is not gathered); `keep_last_n_checkpoints` prunes old step folders; `epoch_N/` gets a
#   `recipe_state.pt` when more epochs follow. Rank 0 writes each folder into a hidden staging
#   folder and renames it into place (components.checkpointing.write_atomically), so a kill
#   mid-save leaves the previous checkpoint intact. `resume_from_checkpoint: True` continues,
#   mid-epoch included, from the newest complete folder (or `resume_from: <folder>`) with the
#   losses of an uninterrupted run. A NaN/inf loss stops every rank with an error naming the step
#   and the last good checkpoint. An epoch stops after exactly its number of optimizer steps.
# - Saving no longer merges LoRA into the live weights when gathering returns them uncopied (one
#   CPU process): torchtune's in-place merge then corrupted the rest of training.
# Changes are marked "medtune:".

import gc
import math
import sys
import time

from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Union
from warnings import warn

import torch
from omegaconf import DictConfig, ListConfig

from torch import nn
from torch.distributed import destroy_process_group, init_process_group
from torch.distributed.tensor import DTensor

from torch.optim import Optimizer
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune import config, modules, training, utils
from torchtune.config._utils import _get_component_from_path
from torchtune.data import padded_collate_packed
from torchtune.datasets import ConcatDataset
from torchtune.modules.peft import (
    DoRALinear,
    get_adapter_params,
    get_adapter_state_dict,
    get_lora_module_names,
    LoRALinear,
    set_trainable_params,
    validate_missing_and_unexpected_for_lora,
)
from torchao.dtypes.nf4tensor import NF4Tensor
from torchtune.recipe_interfaces import FTRecipeInterface
from torchtune.training import DummyProfiler, PROFILER_KEY

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

# medtune: the helpers below replace torchtune calls that assume an accelerator.
def _process_group_backend(device_type: str) -> str:
    """gloo on CPU; torchtune's hard-coded cuda:nccl,cpu:gloo on CUDA; the device's own elsewhere."""
    if device_type == "cpu":
        return "gloo"
    if device_type == "cuda":
        return "cuda:nccl,cpu:gloo"
    return training.get_distributed_backend(device_type, offload_ops_to_cpu=True)


def _cleanup_before_training(device: torch.device) -> None:
    """torchtune's cleanup_before_training, without the accelerator calls on CPU."""
    if device.type == "cpu":
        gc.collect()
    else:
        training.cleanup_before_training()


NF4_SHARDED_PARTS = ("quantized_data", "quantized_scalers", "quantization_factor")


def _check_nf4_shardable(model: nn.Module, world_size: int) -> None:
    """medtune: fail early, and say why, where FSDP2 cannot shard torchao's NF4 weights (QLoRA).

    An NF4 weight is three tensors: packed 4-bit data, one scaler per 64-value block and one
    scaler factor per 64 x 256 = 16,384 values. FSDP2 shards each along dim 0, so each must split
    evenly across the processes. With one process, torch's FSDP2 takes a shortcut that copies only
    the first of the three (torchao's fsdp_post_all_gather then fails).
    """
    nf4_params = [(n, p) for n, p in model.named_parameters() if isinstance(p, NF4Tensor)]
    if not nf4_params:
        return
    if world_size == 1:
        raise ValueError(
            "QLoRA (an NF4-quantized base) cannot be sharded by FSDP2 in a single process: torch "
            f"{torch.__version__}'s FSDP2 shortcut for a world size of 1 copies only the first of "
            "the three tensors an NF4 weight is made of, and torchao's fsdp_post_all_gather fails. "
            "Run with 2 or more processes, or use recipes/lora_finetune_single_device.py."
        )
    for name, param in nf4_params:
        parts = {attr: getattr(param, attr).numel() for attr in NF4_SHARDED_PARTS}
        uneven = [f"{a} ({n} elements)" for a, n in parts.items() if n % world_size]
        if param.size(0) % world_size or uneven:
            raise ValueError(
                f"QLoRA under FSDP2 cannot shard the NF4 weight {name} of shape "
                f"{tuple(param.shape)} across {world_size} processes: torchao's NF4 splits its "
                "packed data, its per-64-value scalers and its per-16,384-value scaler factors "
                f"along dim 0, and {', '.join(uneven) or 'dim 0'} does not divide by "
                f"{world_size}. Every quantized weight needs a multiple of 16,384 x {world_size} "
                f"= {16384 * world_size} elements; use a model with larger dimensions, or "
                "recipes/lora_finetune_single_device.py."
            )


def _full_lora_init_state_dict(
    model: nn.Module, dtype: torch.dtype, seed: int
) -> Dict[str, torch.Tensor]:
    """medtune: LoRA's initial weights as full (unsharded) CPU tensors, from one generator.

    Same initialisation as torchtune's LoRALinear/DoRALinear.initialize_parameters (Kaiming
    uniform A, zero B), but drawn for the whole matrix at once, so every world size starts from
    the same adapter. Only rank 0's copy is used (it is broadcast when loaded).
    """
    generator = torch.Generator().manual_seed(seed)
    full_sd = {}
    for name, module in model.named_modules():
        if isinstance(module, (LoRALinear, DoRALinear)):
            lora_a = torch.empty(module.lora_a.weight.shape, dtype=dtype)
            nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5), generator=generator)
            full_sd[f"{name}.lora_a.weight"] = lora_a
            full_sd[f"{name}.lora_b.weight"] = torch.zeros(
                module.lora_b.weight.shape, dtype=dtype
            )
    return full_sd


class LoRAFinetuneRecipeDistributed(FTRecipeInterface):
    """
    Distributed LoRA finetuning recipe for dense transformer-based LLMs such as Llama2. This recipe supports
    distributed training and can be run on a single node (1 to 8 GPUs).

    Features:
        - FSDP. Supported using PyTorch's FSDP APIs. CPU offload of parameters, gradients, and optimizer states
            is supported via ``fsdp_cpu_offload``. Resharding of parameters after the forward pass is
            done by default (corresponding to FULL_SHARD sharding strategy), but can be disabled by setting the config
            ``fsdp_reshard_after_forward`` to False (this corresponds to SHARD_GRAD_OP sharding strategy).
            DDP is currently not supported. Training on CPU (gloo) is supported (medtune).

        - Activation Checkpointing. This can be controlled using the ``enable_activation_checkpointing``
            flag. Activation checkpointing helps reduce the memory footprint since we no longer keep
            activations in memory and instead recompute them during the backward pass. This is especially
            helpful for larger batch sizes when you're memory constrained. But these savings in memory
            come at the cost of training performance. In most cases training can slow-down quite a bit as
            a result of this activation recomputation.

        - Activation Offloading. This can be controlled using the ``enable_activation_offloading``
            flag. Activation offloading is a technique similar to activations checkpointing that helps
            reduce the memory footprint to prevent OOMs on CUDA and enable bigger batches. Where activations
            checkpointing drops the activation in the forward to recompute it later in the backward,
            activations offloading will drop the activation in the forward to the CPU and bring it
            back during the backward pass. As always, there is a tradeoff--these savings in memory can
            come at the cost of training performance and CPU resources. To recover some runtime cost,
            we've added an option to enable offloading on a different stream to permit overlapping with
            the computation. This option is currently only available on PyTorch 2.5.0 or later and will be
            enabled by default if an acceptable torch version is found. Activation offloading can be used in
            conjunction with activation checkpointing.

        - Precision. Full fp32 and bf16 training are supported. Precision is controlled using the ``dtype``
            flag. When ``dtype=bf16``, all activations, gradients and optimizer states are in bfloat16. In
            most cases this should halve the memory footprint of full precision (fp32) training, without
            loss in model quality (will depend on the model, training data and other settings). For
            GPUs which do not support bfloat16, we fall back to fp32. Mixed precision training and fp16
            precision are currently not supported.

        - Gradient Accumulation. You can simulate larger batch sizes by accumulating gradients. This is
            controlled using the ``gradient_accumulation_steps`` flag.

                Total Batch Size = batch_size * number of GPUs * gradient accumulation steps.

            For example: with batch_size=1, nproc_per_node=2 and gradient_accumulation_steps=32 we get a
            total batch size of 64.

            Gradient accumulation is especially useful when you are memory constrained. In this case,
            accumulating gradients might give you better training speed than enabling activation
            checkpointing.

        - Checkpointing. Model weights are checkpointed both at the end of each epoch and at the end of
            training. Currently we checkpoint both the adapter weights (trainable params only) and the
            complete merged weights (adapter weights added back to the base model). For more details
            please take a look at our LoRA tutorial
            (https://pytorch.org/torchtune/main/tutorials/lora_finetune.html).

            Optimizer State and recipe state (seed, total_epochs, number of epochs run etc) are
            saved at the end of a given epoch and (medtune) every ``save_every_n_steps`` optimizer
            steps in ``output_dir/step_<global step>/`` with the adapter (the newest
            ``keep_last_n_checkpoints`` are kept), and used in case of resuming training. Resuming
            training is controlled by the ``resume_from_checkpoint`` flag (medtune: from the newest
            complete folder, or ``resume_from: <folder>``; mid-epoch included).

            For more details on the checkpointer, please take a look at
            our checkpointer deepdive (https://pytorch.org/torchtune/main/tutorials/checkpointer.html).

        - Logging. Terminal, Disk, WandB and TensorBoard are all supported.

        - Gradient Clipping. Gradient clipping is supported using the ``clip_grad_norm`` flag. By default,
            ``clip_grad_norm`` is set to ``None``. If you only want to log the grad norm, you can set
            ``clip_grad_norm='inf'``.

    For a full list of example configs for this recipe, run ``tune ls`` on the command line. Each config
    has example commands for how to kick-off training.

    Args:
        cfg (DictConfig): OmegaConf object parsed from yaml file

    Raises:
        ValueError: If ``dtype`` is set to fp16.
        ValueError: If world_size is 1
        RuntimeError: If ``dtype`` is set to bf16 and the hardware does not support bf16.
        RuntimeError: If ``left_pad_sequence`` is set as the data collator.
        RuntimeError: If ``enable_activation_offloading`` is True and device is not CUDA.
        RuntimeError: If ``enable_activation_offloading`` is True and ``enable_activation_checkpointing`` is False.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)

        if self._dtype == torch.float16:
            raise ValueError(
                "full fp16 training is not supported with this recipe. Please use bf16 or fp32 instead."
            )

        self.world_size, self.rank = utils.get_world_size_and_rank()

        self._is_rank_zero = self.rank == 0

        # logging attributes
        self._output_dir = cfg.output_dir
        self._log_every_n_steps = cfg.get("log_every_n_steps", 1)
        self._log_peak_memory_stats = cfg.get("log_peak_memory_stats", False)

        if self._log_peak_memory_stats and self._device.type != "cuda":
            log.info(
                "log_peak_memory_stats was set to True, however, training does not use cuda. Setting log_peak_memory_stats=False."
            )
            self._log_peak_memory_stats = False

        # These attributes constitute the recipe state and are updated by ``load_checkpoint``
        # when ``resume_from_checkpoint`` is ``True``
        self.seed = training.set_seed(
            seed=cfg.seed, debug_mode=cfg.get("cudnn_deterministic_mode", None)
        )
        self.epochs_run = 0
        self.total_epochs = cfg.epochs
        self.max_steps_per_epoch = cfg.max_steps_per_epoch
        self.global_step = 0
        self._clip_grad_norm = cfg.get("clip_grad_norm", None)

        self._save_adapter_weights_only = cfg.get("save_adapter_weights_only", False)
        # medtune: step checkpoints, resume and Ctrl-C (components.step_checkpoints); missing
        # keys default
        self._resume_from_checkpoint = cfg.get("resume_from_checkpoint", False)
        self._checkpoints = StepCheckpointClient(
            cfg.output_dir,
            resume_from_checkpoint=self._resume_from_checkpoint,
            resume_from=cfg.get("resume_from", None),
            save_every_n_steps=cfg.get("save_every_n_steps", None),
            keep_last_n_checkpoints=cfg.get("keep_last_n_checkpoints", None),
            distributed=True,
        )
        self._checkpoints.exit_cleanly_on_interrupt()
        self._resumed_state = None  # the recipe state of the checkpoint resumed from
        # medtune: parameters already live on the CPU; FSDP's CPU offload would be a no-op.
        self._fsdp_cpu_offload = cfg.get("fsdp_cpu_offload", False)
        if self._fsdp_cpu_offload and self._device.type == "cpu":
            utils.log_rank_zero(
                log, "fsdp_cpu_offload has no effect when training on CPU; ignoring it."
            )
            self._fsdp_cpu_offload = False
        self._gradient_accumulation_steps = cfg.gradient_accumulation_steps

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
        elif (
            self._enable_activation_checkpointing
            and cfg.checkpointer.model_type != "LLAMA3_VISION"
        ):
            utils.log_rank_zero(
                log,
                "Hint: enable_activation_checkpointing is True, but enable_activation_offloading isn't. "
                "Enabling activation offloading should reduce memory further.",
            )

    def load_checkpoint(self, cfg_checkpointer: DictConfig) -> Dict[str, Any]:
        """
        Extract the checkpoint state from file and validate. This includes the
        base model weights. If resume_from_checkpoint is True, this also includes
        the adapter weights and recipe state

        medtune: those come from the newest complete step_N/ or epoch_N/ folder in output_dir
        (or ``resume_from``), found here (torchtune 0.6.1 expects file names edited into the
        config); the checkpointer only reads the base weights.
        """
        self._checkpointer = config.instantiate(
            cfg_checkpointer, should_load_recipe_state=False
        )
        checkpoint_dict = self._checkpointer.load_checkpoint()
        if self._checkpoints.resuming:
            checkpoint_dict[training.ADAPTER_KEY] = self._checkpoints.load_adapter()
            checkpoint_dict.update(self._checkpoints.load_state())
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

        checkpoint_dict = self.load_checkpoint(cfg_checkpointer=cfg.checkpointer)
        self._compile = cfg.get("compile", False)

        self._model = self._setup_model(
            cfg_model=cfg.model,
            enable_activation_checkpointing=self._enable_activation_checkpointing,
            enable_activation_offloading=self._enable_activation_offloading,
            custom_sharded_layers=cfg.get("custom_sharded_layers", None),
            fsdp_cpu_offload=self._fsdp_cpu_offload,
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

        # initialize loss
        self._loss_fn = config.instantiate(cfg.loss)

        if self._compile:
            training.compile_loss(self._loss_fn, verbose=self._is_rank_zero)

        if self._loss_fn.__class__.__name__ == "CEWithChunkedOutputLoss":
            # set num_output_chunks for model
            self._model.set_num_output_chunks(self._loss_fn.num_output_chunks)
        utils.log_rank_zero(log, "Loss is initialized.")

        # sampler and dataloader depend on the tokenizer and loss_fn and should be
        # setup after all of these are setup
        collate_name = cfg.get("collate_fn", "torchtune.data.padded_collate_sft")
        self._dataloader = self._setup_data(
            cfg_dataset=cfg.dataset,
            shuffle=cfg.shuffle,
            batch_size=cfg.batch_size,
            collate_fn=collate_name,
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
        # medtune: a resumed run restored global_step from the recipe state
        if not self._resume_from_checkpoint:
            self.global_step = self.epochs_run * self._steps_per_epoch

        # Learning rate scheduler can only be set up after number of steps
        # has been computed
        self._lr_scheduler = self._setup_lr_scheduler(
            cfg_lr_scheduler=cfg.lr_scheduler,
            num_training_steps=self.total_epochs * self._steps_per_epoch,
            last_epoch=self.global_step - 1,
        )
        # medtune: and the scheduler's own state, as saved
        if self._resumed_state is not None:
            self._lr_scheduler.load_state_dict(self._resumed_state[LR_SCHEDULER_KEY])

        # Set up profiler, returns DummyProfiler (nullcontext object with no-op `step` method)
        # if cfg is missing profiler key or if `cfg.profiler.enabled = False`
        self._profiler = self._setup_profiler(cfg.get(PROFILER_KEY, None))

        # Used to ignore labels for loss computation
        self.ignore_labels_cache = torch.full(
            (cfg.batch_size, 1), self._loss_fn.ignore_index, device=self._device
        )

        # medtune: continue this rank's random streams where the saved run left them
        self._checkpoints.restore_rng()
        self._resumed_state = None  # the optimizer state is loaded; free it

    def _setup_profiler(
        self, cfg_profiler: Optional[DictConfig] = None
    ) -> Union[torch.profiler.profile, DummyProfiler]:
        """
        Parses the `profiler` section of top-level `cfg` and sets up profiler

        Args:
            cfg_profiler (Optional[DictConfig]): ``profiler`` section of the top-level ``cfg`` (the main config passed to
                `recipe.main`). Default None.

        Returns:
            profiler: Union[torch.profiler.profile, DummyProfiler] - DummyProfiler is a nullcontext with no-op methods
            for `start`, `stop`, and `step` that can be used in place of `torch.profiler.profile` if profiler is not enabled such
            that the instrumented training loop does not need to be changed profiling is disabled.

        The profiler config can be provided in configs under the `profiler` key with the following layout:

        .. code-block:: yaml
            profiler:
                enabled: bool

                #Output directory of trace artifacts
                output_dir: str

            #`torch.profiler.ProfilerActivity` types to trace
            cpu: bool
            cuda: bool

                #Trace options
                profile_memory: bool
                with_stack: bool
                record_shapes: bool
                with_flops: bool

            # `torch.profiler.schedule` options:
            # wait_steps -> wait, warmup_steps -> warmup, active_steps -> active, num_cycles -> repeat
            wait_steps: int
            warmup_steps: int
            active_steps: int
            num_cycles: int
        """
        # Missing profiler section in config, assume disabled
        if cfg_profiler is None:
            cfg_profiler = DictConfig({"enabled": False})

        # Check that component is included and set correctly
        if cfg_profiler.get("_component_", None) is None:
            cfg_profiler["_component_"] = "torchtune.training.setup_torch_profiler"
        else:
            assert (
                cfg_profiler.get("_component_")
                == "torchtune.training.setup_torch_profiler"
            ), "Only torch profiler supported currently: component must be `torchtune.training.setup_torch_profiler`"

        profiler, profiler_cfg = config.instantiate(cfg_profiler)

        utils.log_rank_zero(
            log, f" Profiler config after instantiation: {profiler_cfg}"
        )
        if self._is_rank_zero:
            self.profiler_profile_memory = profiler_cfg.get("profile_memory", False)
            if profiler_cfg["enabled"]:
                self.profiler_wait_steps = profiler_cfg["wait_steps"]
                self.profiler_warmup_steps = profiler_cfg["warmup_steps"]
                self.profiler_active_steps = profiler_cfg["active_steps"]

        return profiler

    def _setup_model(
        self,
        cfg_model: DictConfig,
        enable_activation_checkpointing: bool,
        enable_activation_offloading: bool,
        fsdp_cpu_offload: bool,
        reshard_after_forward: bool,
        base_model_state_dict: Dict[str, Any],
        custom_sharded_layers: Optional[List[str]] = None,
        lora_weights_state_dict: Optional[Dict[str, Any]] = None,
    ) -> nn.Module:
        """
        Model initialization has some important considerations:
           a. To minimize GPU peak memory, we initialize the model on meta device with
              the right dtype
           b. All ranks calls ``load_state_dict`` without peaking CPU RAMs since
              full state dicts are loaded with ``torch.load(mmap=True)``
           c. We register (pre-)forward hooks with ``fully_shard`` instead of wrapping `nn.Module`
        """

        self._lora_rank = cfg_model.lora_rank
        self._lora_alpha = cfg_model.lora_alpha
        self._lora_attn_modules = list(cfg_model.lora_attn_modules)
        self._apply_lora_to_mlp = cfg_model.apply_lora_to_mlp
        self._apply_lora_to_output = getattr(cfg_model, "apply_lora_to_output", False)

        utils.log_rank_zero(
            log,
            "FSDP is enabled. Instantiating model and loading checkpoint on Rank 0 ...",
        )
        init_start = time.perf_counter()

        with training.set_default_dtype(self._dtype), torch.device("meta"):
            model = config.instantiate(cfg_model)

        set_trainable_params(model, get_adapter_params(model))
        # medtune: QLoRA: stop here, with the reason, if FSDP2 cannot shard the NF4 weights.
        _check_nf4_shardable(model, self.world_size)

        if self._compile:
            training.compile_model(model, verbose=self._is_rank_zero)

        if enable_activation_checkpointing:
            training.set_activation_checkpointing(
                model, auto_wrap_policy={modules.TransformerSelfAttentionLayer}
            )

        # For FSDP sharding
        fsdp_shard_conditions = [
            partial(
                training.get_shard_conditions,
                names_to_match=custom_sharded_layers,
            )
        ]
        training.shard_model(
            model=model,
            shard_conditions=fsdp_shard_conditions,
            cpu_offload=fsdp_cpu_offload,
            reshard_after_forward=reshard_after_forward,
        )

        if lora_weights_state_dict:
            lora_missing, lora_unexpected = training.load_from_full_model_state_dict(
                model,
                lora_weights_state_dict,
                self._device,
                cpu_offload=fsdp_cpu_offload,
            )
        else:
            lora_missing, lora_unexpected = None, None

        # Initialize LoRA params and RoPE buffers
        with training.set_default_dtype(self._dtype), self._device:
            lora_device = "cpu" if fsdp_cpu_offload else self._device
            for m in model.modules():
                if (
                    isinstance(m, LoRALinear) or isinstance(m, DoRALinear)
                ) and not lora_weights_state_dict:
                    # lora may not be covered in state dict
                    # if finetune for the 1st time
                    m.to_empty(device=lora_device)
                    m.initialize_parameters()

                if hasattr(m, "rope_init"):
                    m.rope_init()

        # medtune: a fresh adapter's A and B are then overwritten by one full-size draw made on
        # rank 0 (see _full_lora_init_state_dict), so they do not depend on the world size:
        # each rank's shard was initialised above from its own seed (seed + rank).
        if not lora_weights_state_dict:
            training.load_from_full_model_state_dict(
                model,
                _full_lora_init_state_dict(model, self._dtype, self.seed),
                self._device,
                cpu_offload=fsdp_cpu_offload,
            )

        base_missing, base_unexpected = training.load_from_full_model_state_dict(
            model,
            base_model_state_dict,
            self._device,
            cpu_offload=fsdp_cpu_offload,
        )
        for m in model.modules():
            if hasattr(m, "initialize_dora_magnitude"):
                m.initialize_dora_magnitude()

        validate_missing_and_unexpected_for_lora(
            lora_attn_modules=self._lora_attn_modules,
            apply_lora_to_mlp=self._apply_lora_to_mlp,
            apply_lora_to_output=self._apply_lora_to_output,
            base_missing=base_missing,
            base_unexpected=base_unexpected,
            lora_missing=lora_missing,
            lora_unexpected=lora_unexpected,
        )
        # Ensure no params and buffers are on meta device
        training.validate_no_params_on_meta_device(model)

        # activation offloading
        self.activations_handling_ctx = training.get_act_offloading_ctx_manager(
            model, enable_activation_offloading
        )

        # log
        utils.log_rank_zero(
            log,
            f"Instantiating model and loading checkpoint took {time.perf_counter() - init_start:.2f} secs",
        )
        # medtune: memory stats exist only for accelerators.
        if self._is_rank_zero and self._device.type != "cpu":
            memory_stats = training.get_memory_stats(device=self._device)
            training.log_memory_stats(memory_stats)

        # synchronize before training begins
        torch.distributed.barrier()

        return model

    def _setup_optimizer(
        self, cfg_optimizer: DictConfig, opt_state_dict: Optional[Dict[str, Any]] = None
    ) -> Optimizer:
        optimizer = config.instantiate(cfg_optimizer, self._model.parameters())
        if opt_state_dict:
            training.load_from_full_optimizer_state_dict(
                self._model,
                optimizer,
                opt_state_dict,
                self._device,
            )

        utils.log_rank_zero(log, "Optimizer is initialized.")
        return optimizer

    def _setup_lr_scheduler(
        self,
        cfg_lr_scheduler: DictConfig,
        num_training_steps: int,
        last_epoch: int,
    ) -> Optimizer:
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
        collate_fn: str,
        dataloader_state_dict: Optional[Dict[str, Any]] = None,
    ) -> StatefulDataLoader:
        """
        All data related setup happens here. This recipe currently supports only
        map-style datasets. If a state_dict is provided (meaning we are resuming a training run),
        it is loaded into the dataloader.
        """
        if isinstance(cfg_dataset, ListConfig):
            datasets = [
                config.instantiate(single_cfg_dataset, self._tokenizer)
                for single_cfg_dataset in cfg_dataset
            ]
            ds = ConcatDataset(datasets=datasets)
            packed = getattr(ds, "packed", False)
        else:
            ds = config.instantiate(cfg_dataset, self._tokenizer)
            packed = cfg_dataset.get("packed", False)

        # Instantiate collate_fn
        if "left_pad_sequence" in collate_fn:
            raise RuntimeError("left_pad_sequence collator is only for inference.")
        collate_fn = _get_component_from_path(collate_fn)

        sampler = StatefulDistributedSampler(
            ds,
            num_replicas=self.world_size,
            rank=self.rank,
            shuffle=shuffle,
        )
        dataloader = StatefulDataLoader(
            dataset=ds,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=(
                partial(
                    collate_fn,
                    padding_idx=self._tokenizer.pad_id,
                    ignore_idx=self._loss_fn.ignore_index,
                )
                if not packed
                else padded_collate_packed
            ),
            # dropping last avoids shape issues with compile + flex attention
            drop_last=True,
            # medtune: its own generator, so that starting an epoch's iterator (which draws a
            # worker base seed) takes nothing from the global RNG stream that a resumed run
            # restores mid-epoch (dropout masks would shift by one draw)
            generator=torch.Generator().manual_seed(self.seed),
        )
        # medtune: torchtune 0.6.1 passes the saved position here but never loads it
        if dataloader_state_dict is not None:
            dataloader.load_state_dict(dataloader_state_dict)

        return dataloader

    def save_checkpoint(
        self, folder: str, resumable: bool, epoch_end: bool = False
    ) -> None:
        """
        medtune: write a checkpoint folder; every rank takes part in gathering to rank 0, which
        writes atomically (components.step_checkpoints); all ranks wait for it.

        - ``step_N/``: the adapter (PEFT files and torchtune's adapter_model.pt) and the recipe
          state. Only the adapter is gathered, not the frozen base.
        - ``epoch_N/``: the merged HF model (unless ``save_adapter_weights_only``), and the
          recipe state when ``resumable``; the adapter goes to ``adapter/epoch_N/`` first.
        """
        utils.log_rank_zero(
            log, f"Saving {folder}. Retrieving full model state dict..."
        )
        if epoch_end:
            # To prevent GPU memory from spiking during checkpoint save,
            # we consolidate the full model and optim state dicts on CPU for rank 0
            cpu_state_dict = training.gather_cpu_state_dict(
                self._model,
                self._is_rank_zero,
                device=self._device,
                adapter_weights_only=self._save_adapter_weights_only,
            )
        else:
            cpu_state_dict = self._gather_adapter_state_dict()
        recipe_state = (
            self._checkpoints.recipe_state(
                self,
                training.get_full_optimizer_state_dict(
                    self._model, self._optimizer, self._is_rank_zero, device=self._device
                ),
                epoch_end,
                self._lr_scheduler,
            )
            if resumable
            else None
        )
        adapter_only = self._save_adapter_weights_only or not epoch_end

        def write(staging: Path) -> None:
            checkpoint_dict = lora_checkpoint_dict(
                cpu_state_dict,
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
                self._checkpointer, staging, folder, self._output_dir, checkpoint_dict, adapter_only
            )

        self._checkpoints.save(folder, write, recipe_state)

    def _gather_adapter_state_dict(self) -> Dict[str, torch.Tensor]:
        """medtune: the adapter's full weights on rank 0 ({} elsewhere); the base stays sharded."""
        adapter_state_dict = {}
        for name, param in get_adapter_state_dict(
            self._model.state_dict(), device=None
        ).items():
            if param.is_cpu and self._device.type != "cpu":
                param = param.to(self._device)  # offloaded shards gather on the device
            if isinstance(param, DTensor):
                param = param.full_tensor()
            if self._is_rank_zero:
                adapter_state_dict[name] = param.cpu()
        return adapter_state_dict

    def train(self) -> None:
        """
        The core training loop.
        """
        # clean up before training begins
        _cleanup_before_training(self._device)  # medtune: no accelerator calls on CPU

        # zero out the gradients before starting training
        self._optimizer.zero_grad()

        # Initialize tokens count and running loss (for grad accumulation)
        t0 = time.perf_counter()
        running_loss = 0
        num_tokens = 0

        self._profiler.start()
        # self.epochs_run should be non-zero when we're resuming from a checkpoint
        for curr_epoch in range(self.epochs_run, self.total_epochs):
            # medtune: optimizer steps already taken in this epoch (non-zero after a mid-epoch resume)
            steps_in_epoch = self.global_step - curr_epoch * self._steps_per_epoch
            pbar = tqdm(
                total=self._steps_per_epoch,
                initial=steps_in_epoch,
                disable=not (self.rank == 0),
            )
            self._dataloader.sampler.set_epoch(curr_epoch)
            for idx, batch in enumerate(self._dataloader):
                # Start tracking CUDA memory for active steps for just the first epoch
                if (
                    self._is_rank_zero
                    and curr_epoch == 0
                    and self.profiler_profile_memory
                    and idx == self.profiler_wait_steps + self.profiler_warmup_steps
                    and self._device.type == "cuda"
                ):
                    torch.cuda.memory._record_memory_history()

                utils.batch_to_device(batch, self._device)

                # Calculate the number of unmasked tokens in the current batch
                # and increment the total number of tokens seen in the step
                current_num_tokens = (
                    batch["labels"] != self._loss_fn.ignore_index
                ).sum()
                num_tokens += current_num_tokens

                # Shape [b, s], needed for the loss not the model
                labels = batch.pop("labels")

                with self.activations_handling_ctx:
                    logits = self._model(**batch)

                # Shift labels to compute loss
                # equivalent to doing labels[..., 1:] and logits[..., :-1, :]
                # But this way we dont need to slice the logits. We just add an ignore index to labels.
                labels = torch.hstack(
                    (labels[..., 1:], self.ignore_labels_cache[: labels.shape[0]])
                )
                if not isinstance(logits, list):
                    labels = labels.reshape(-1)
                    logits = logits.reshape(-1, logits.size(-1))

                # Compute loss
                # Loss is normalized by default so we multiply by the number of tokens
                # This way we can normalize by the total number of tokens if we're accumulating gradients
                current_loss = self._loss_fn(logits, labels) * current_num_tokens

                # free logits otherwise it peaks backward memory
                del logits

                running_loss += current_loss
                current_loss.backward()

                # Step with optimizer
                if (idx + 1) % self._gradient_accumulation_steps == 0:
                    # Get total number of tokens across all ranks to normalize gradients
                    torch.distributed.all_reduce(num_tokens)
                    # This will ensure that the logged loss matches what we're optimizing
                    torch.distributed.all_reduce(running_loss)
                    # medtune: every rank holds the all-reduced loss, so every rank stops here,
                    # before the optimizer step, when it is NaN/inf
                    loss_to_log = running_loss.item() / num_tokens
                    self._checkpoints.check_loss(loss_to_log, self.global_step + 1)
                    # Manually scale the gradients from unnormalized loss by total # of tokens
                    # We multiply by world_size to undo FSDP2 gradient normalization.
                    training.scale_grads(self._model, self.world_size / num_tokens)
                    if self._clip_grad_norm is not None:
                        grad_norm = torch.nn.utils.clip_grad_norm_(
                            self._model.parameters(),
                            max_norm=float(self._clip_grad_norm),
                        ).full_tensor()
                    self._optimizer.step()
                    self._optimizer.zero_grad(set_to_none=True)
                    self._lr_scheduler.step()

                    # Update the number of steps when the weights are updated
                    self.global_step += 1
                    steps_in_epoch += 1

                    pbar.update(1)
                    pbar.set_description(
                        f"{curr_epoch + 1}|{self.global_step}|Loss: {loss_to_log}"
                    )

                    # Log per-step metrics
                    if (
                        self.global_step % self._log_every_n_steps == 0
                        and self._is_rank_zero
                    ):
                        time_per_step = time.perf_counter() - t0
                        log_dict = {
                            "loss": loss_to_log,
                            "lr": self._optimizer.param_groups[0]["lr"],
                            "tokens_per_second_per_gpu": num_tokens
                            / (time_per_step * self.world_size),
                        }
                        if self._log_peak_memory_stats:
                            log_dict.update(
                                training.get_memory_stats(device=self._device)
                            )

                        if self._clip_grad_norm is not None:
                            log_dict.update({"grad_norm": grad_norm})
                        self._metric_logger.log_dict(
                            log_dict,
                            step=self.global_step,
                        )

                    # Reset running stats for the next step
                    running_loss = 0
                    num_tokens = 0

                    # medtune: step checkpoints (the epoch's last step gets the epoch one)
                    folder = self._checkpoints.due_step_folder(
                        self.global_step, steps_in_epoch, self._steps_per_epoch
                    )
                    if folder:
                        self.save_checkpoint(folder, resumable=True)
                    t0 = time.perf_counter()

                    # Stop tracking CUDA memory now that active steps are complete
                    if (
                        self._is_rank_zero
                        and curr_epoch == 0
                        and self.profiler_profile_memory
                        and idx
                        == self.profiler_wait_steps
                        + self.profiler_warmup_steps
                        + self.profiler_active_steps
                        and self._device.type == "cuda"
                    ):
                        torch.cuda.memory._record_memory_history(enabled=None)

                    # Step profiler
                    # Note that this is called within gradient accumulation block, hence
                    # will include multiple forward / backward passes if gradient accumulation > 1
                    self._profiler.step()

                # medtune: counted in optimizer steps, so a resumed epoch stops where it should
                if steps_in_epoch >= self._steps_per_epoch:
                    break

            self.epochs_run += 1
            self.save_checkpoint(
                epoch_folder_name(curr_epoch),
                resumable=curr_epoch + 1 < self.total_epochs,
                epoch_end=True,
            )

        self._profiler.stop()

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
    # medtune: the backend follows the device (torchtune hard-coded "cuda:nccl,cpu:gloo").
    device_type = utils.get_device(device=cfg.get("device", None)).type
    init_process_group(_process_group_backend(device_type))
    if cfg.get("fsdp_cpu_offload", False) and device_type != "cpu":  # medtune: see __init__
        # Utilize all available CPU cores for intra-op parallelism. This provides ~2x
        # speed up when benchmarking fused AdamW on CPU
        training.set_torch_num_threads()

    config.log_config(recipe_name="LoRAFinetuneRecipeDistributed", cfg=cfg)

    recipe = LoRAFinetuneRecipeDistributed(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
