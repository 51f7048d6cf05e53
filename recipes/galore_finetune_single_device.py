# Copyright (c) Meta Platforms, Inc. and affiliates.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
#
# medtune: copied from torchtune 0.6.1's recipes/full_finetune_single_device.py and changed for
# GaLore (full-parameter fine-tuning with low-rank projected optimizer state, galore-torch 1.0):
#   - the optimizer builder gets `model.named_parameters()` (torchtune passes bare parameters),
#     so `components.optim.galore_*` can put the named target modules under GaLore;
#   - layer-wise mode (`optimizer.layerwise: True`): every parameter steps in its
#     post-accumulate-grad hook. Gradient accumulation > 1 and gradient clipping are refused with
#     a message saying why. The backward runs on the per-token loss, so the in-backward step sees
#     the same normalised gradient as the ordinary step (torchtune 0.6.1's `optimizer_in_bwd`
#     steps on gradients still multiplied by the token count); torchtune's `optimizer_in_bwd`
#     flag is refused in favour of `optimizer.layerwise`;
#   - step-based checkpoints (`save_every_n_steps`) in `output_dir/step_N/`, of which the newest
#     `keep_last_n_checkpoints` stay (null keeps all), and every resumable checkpoint folder
#     (`step_N/`, or `epoch_N/` before the last epoch) holds the HF weights and its own
#     `recipe_state.pt` (optimizer state including each GaLore projection matrix, LR scheduler
#     position (the global step), dataloader position, torch and Python RNG states) that loads
#     with `torch.load(weights_only=True)`. `resume_from_checkpoint: True` resumes from the newest
#     of them (or `resume_from: <dir>`), mid-epoch included, with the same losses as an
#     uninterrupted run. Checkpoints are written to a staging folder and renamed
#     (components.checkpointing), so an interrupted save never looks resumable;
#   - a NaN or infinite loss stops the run before the optimizer step, naming the step and the
#     last good checkpoint (components.checkpointing.NonFiniteLossError); nothing of it is saved;
#   - an epoch stops after exactly `steps_per_epoch` optimizer steps (no stray micro-batches
#     whose gradients leaked into the next step), and CPU runs can log peak resident memory.
# Changes are marked "medtune:".

import resource
import sys
import time
from functools import partial
from typing import Any, Dict, Optional, Union
from warnings import warn

import torch
from omegaconf import DictConfig, ListConfig

from torch import nn
from torch.optim import Optimizer
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune import config, modules, training, utils
from torchtune.config._utils import _get_component_from_path
from torchtune.data import padded_collate_packed
from torchtune.datasets import ConcatDataset
from torchtune.recipe_interfaces import FTRecipeInterface
from torchtune.training import DummyProfiler, PROFILER_KEY
from torchtune.training.lr_schedulers import get_lr

from tqdm import tqdm

from components.checkpointing import (
    GLOBAL_STEP_KEY,
    epoch_folder_name,
    write_with_checkpointer,
)
from components.step_checkpoints import StepCheckpointClient
from components.config_check import exit_on_config_problems
from components.user_errors import SettingsError, one_line_errors


log = utils.get_logger("DEBUG")


class GaLoreFinetuneRecipeSingleDevice(FTRecipeInterface):
    """
    Full finetuning recipe for dense transformer-based LLMs with GaLore optimizers (medtune:
    see the header for what differs from torchtune's full_finetune_single_device). Runs on one
    GPU or on CPU.

    medtune: GaLore. ``optimizer._component_`` names a builder from ``components.optim``
    (``galore_adamw``, ``galore_adafactor``, ``galore_adamw8bit``; any ``torch.optim`` optimizer
    works too, as it accepts named parameters). ``optimizer.layerwise: True`` steps each
    parameter during backward, so that the full gradient never exists.

    medtune: Checkpointing. ``save_every_n_steps: N`` writes ``output_dir/step_<global step>/``
    every N optimizer steps (HF weights + ``recipe_state.pt``), keeping the newest
    ``keep_last_n_checkpoints``; the end of each epoch writes ``output_dir/epoch_<n>/``.
    ``resume_from_checkpoint: True`` continues from the newest resumable folder, or from
    ``resume_from: <folder>``. A NaN or infinite loss stops the run.

    Features:
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
            the computation. This option is currently only available on PyTorch 2.5 or later and will
            be enabled by default if an acceptable torch version is found. Activation offloading can be
            used in conjunction with activation checkpointing.

        - Precision. Full fp32 and bf16 training are supported. Precision is controlled using the ``dtype``
            flag. When ``dtype=bf16``, all activations, gradients and optimizer states are in bfloat16. In
            most cases this should halve the memory footprint of full precision (fp32) training, without
            loss in model quality (will depend on the model, training data and other settings). For
            GPUs which do not support bfloat16, we fall back to fp32. Mixed precision training and fp16
            precision are currently not supported.

        - Gradient Accumulation. You can simulate larger batch sizes by accumulating gradients. This is
            controlled using the ``gradient_accumulation_steps`` flag.

                Total Batch Size = batch_size * gradient accumulation steps.

            For example: with batch_size=1 and gradient_accumulation_steps=32 we get a total batch size of 32.

            Gradient accumulation is especially useful when you are memory constrained. In this case,
            accumulating gradients might give you better training speed than enabling activation
            checkpointing.

        - Optimizer in Backward. Fusing the optimizer step into the backward pass helps reduce the memory
            footprint associated with gradients. This can be especially helpful when you are memory
            constrained. Note that users can only use ONE of gradient accumulation or optimizer in backward.
            These features currently do not work together. For more details on optimizer in backward, please
            see this tutorial: https://pytorch.org/tutorials/intermediate/optimizer_step_in_backward_tutorial.html

        - Lower precision optimizers. This recipe supports lower-precision optimizers from the bitsandbytes
            library (https://huggingface.co/docs/bitsandbytes/main/en/index). We've tested the recipe with
            8-bit AdamW and Paged AdamW. These optimizers are especially helpful when you are memory constrained
            since they help reduce the memory footprint associated with the optimizer states.

        - Checkpointing. Model weights are checkpointed both at the end of each epoch and at the end of
            training. Optimizer State and recipe state (seed, total_epochs, number of epochs run etc) are
            only saved at the end of a given epoch and used in case of resuming training.

            Resuming training is controlled by the ``resume_from_checkpoint`` flag. Mid-epoch checkpointing is
            currently not supported.

            For more details on the checkpointer, please take a look at
            our checkpointer deepdive (https://pytorch.org/torchtune/main/deep_dives/checkpointer.html).

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
        RuntimeError: If ``dtype`` is set to bf16 and the hardware does not support bf16.
        ValueError: If ``optimizer.layerwise`` is True with ``gradient_accumulation_steps > 1`` or
            ``clip_grad_norm`` set (medtune), or if torchtune's ``optimizer_in_bwd`` is True.
        RuntimeError: If ``left_pad_sequence`` is set as the data collator.
        RuntimeError: If ``enable_activation_offloading`` is True and device is not CUDA.
        RuntimeError: If ``enable_activation_offloading`` is True and ``enable_activation_checkpointing`` is False.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        # Disable for fp16, as we haven't validated "full" fp16 with this recipe, nor
        # enabled necessary features such as gradient scaling.
        if self._dtype == torch.float16:
            raise ValueError(
                "full fp16 training is not supported with this recipe. Please use bf16 or fp32 instead."
            )

        # logging attributes
        self._output_dir = cfg.output_dir
        self._log_every_n_steps = cfg.get("log_every_n_steps", 1)
        self._log_peak_memory_stats = cfg.get("log_peak_memory_stats", False)

        # medtune: on CPU, log the process's peak resident memory instead of CUDA stats
        self._log_cpu_peak_rss = self._log_peak_memory_stats and self._device.type == "cpu"
        if self._log_peak_memory_stats and self._device.type == "cpu":
            self._log_peak_memory_stats = False

        # Training cfg
        self._resume_from_checkpoint = cfg.resume_from_checkpoint
        self._gradient_accumulation_steps = cfg.gradient_accumulation_steps
        self._clip_grad_norm = cfg.get("clip_grad_norm", None)
        # medtune: layer-wise stepping is a property of the optimizer (`optimizer.layerwise`);
        # torchtune's own flag would wrap one torchtune optimizer per parameter instead.
        if cfg.get("optimizer_in_bwd", False):
            raise SettingsError(
                "optimizer_in_bwd=True is torchtune's per-parameter optimizer; this recipe does "
                "layer-wise stepping through the optimizer builder. Set optimizer_in_bwd=False and "
                "optimizer.layerwise=True (components.optim.galore_* builders)."
            )
        self._optimizer_in_bwd = bool(cfg.optimizer.get("layerwise", False))
        # medtune: step checkpoints, where to resume from, and a Ctrl-C that names both
        self._checkpoints = StepCheckpointClient(
            cfg.output_dir,
            resume_from_checkpoint=cfg.resume_from_checkpoint,
            resume_from=cfg.get("resume_from", None),
            save_every_n_steps=cfg.get("save_every_n_steps", None),
            keep_last_n_checkpoints=cfg.get("keep_last_n_checkpoints", None),
        )
        self._checkpoints.exit_cleanly_on_interrupt()

        # Layer-wise stepping is not compatible with gradient accumulation or gradient clipping
        if self._optimizer_in_bwd:
            if self._clip_grad_norm is not None:
                raise SettingsError(
                    f"clip_grad_norm={self._clip_grad_norm} cannot work with optimizer.layerwise=True: "
                    "layer-wise GaLore steps each parameter inside backward as soon as its gradient "
                    "exists, so the norm of the whole gradient is never known before parameters "
                    "have moved. Set clip_grad_norm=null, or optimizer.layerwise=False to clip."
                )
            if self._gradient_accumulation_steps > 1:
                raise SettingsError(
                    f"gradient_accumulation_steps={self._gradient_accumulation_steps} cannot work "
                    "with optimizer.layerwise=True: layer-wise GaLore steps every parameter in "
                    "every backward pass, so each micro-batch would be its own optimizer step. "
                    "Set gradient_accumulation_steps=1 (raise batch_size instead), or "
                    "optimizer.layerwise=False to accumulate."
                )

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

        # These are public properties which are updated by the checkpoint loader
        # when ``resume_from_checkpoint`` is `True` or validated in tests
        self.seed = training.set_seed(
            seed=cfg.seed, debug_mode=cfg.get("cudnn_deterministic_mode", None)
        )
        self.epochs_run = 0
        self.total_epochs = cfg.epochs
        self.max_steps_per_epoch = cfg.max_steps_per_epoch
        self.global_step = 0

    def load_checkpoint(self, cfg_checkpointer: DictConfig) -> Dict[str, Any]:
        """
        Extract the checkpoint state from file and validate. If resume_from_checkpoint
        is True, this also includes the recipe state.
        """
        # medtune: the checkpointer only reads weights; which folder to resume from and its
        # recipe state are this recipe's business (torchtune 0.6.1's resume path expects the
        # checkpoint file names to be edited in the config by hand).
        self._checkpointer = config.instantiate(cfg_checkpointer, should_load_recipe_state=False)
        self._checkpoints.point_at_resume_weights(self._checkpointer)
        checkpoint_dict = self._checkpointer.load_checkpoint()

        if self._checkpoints.resuming:
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
            # medtune: mid-epoch position; the RNG is restored when training starts (`train`)
            self.global_step = ckpt_dict[GLOBAL_STEP_KEY]

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
        Sets up the recipe state correctly. This includes setting recipe attributes based
        on the ``resume_from_checkpoint`` flag.
        """
        self._metric_logger = config.instantiate(cfg.metric_logger)

        # log config with parameter override
        self._metric_logger.log_config(cfg)

        ckpt_dict = self.load_checkpoint(cfg.checkpointer)

        # ``_setup_model`` handles initialization and loading the state dict. This method
        # should be called before ``_setup_optimizer`` since transforming the optimizer
        # state dict requires the model
        self._compile = cfg.compile
        if cfg.device == "npu" and cfg.compile:
            raise ValueError(
                "NPU does not support model compilation. Please set `compile: False` in the config."
            )
        self._model = self._setup_model(
            cfg_model=cfg.model,
            enable_activation_checkpointing=self._enable_activation_checkpointing,
            enable_activation_offloading=self._enable_activation_offloading,
            compile_model=self._compile,
            model_state_dict=ckpt_dict[training.MODEL_KEY],
        )
        self._tokenizer = config.instantiate(cfg.tokenizer)
        log.info("Tokenizer is initialized from file.")

        # _setup_optimizer should take in ckpt_dict only if training is resumed from
        # checkpoint. Transforming the opt state dict is handled by this method
        self._optimizer = self._setup_optimizer(
            cfg_optimizer=cfg.optimizer,
            opt_state_dict=(
                ckpt_dict[training.OPT_KEY] if self._resume_from_checkpoint else None
            ),
        )

        # initialize loss
        self._loss_fn = config.instantiate(cfg.loss)

        if self._compile:
            training.compile_loss(self._loss_fn)

        if self._loss_fn.__class__.__name__ == "CEWithChunkedOutputLoss":
            # set num_output_chunks for model
            self._model.set_num_output_chunks(self._loss_fn.num_output_chunks)

        log.info("Loss is initialized.")

        # sampler and dataloader depend on the tokenizer and loss_fn and should be
        # setup after both of these are initialized
        collate_name = cfg.get("collate_fn", "torchtune.data.padded_collate_sft")
        self._dataloader = self._setup_data(
            cfg_dataset=cfg.dataset,
            shuffle=cfg.shuffle,
            batch_size=cfg.batch_size,
            collate_fn=collate_name,
            dataloader_state_dict=(
                ckpt_dict[training.DATALOADER_KEY]
                if self._resume_from_checkpoint
                else None
            ),
        )

        # Finally update the recipe state which can only be correctly set after all of the
        # other components have been initialized and updated.
        #
        # Number of training steps in each epoch depends on the number of batches produced
        # by the dataloader, the max_steps_per_epoch param set by the user and the
        # gradient_accumulation_steps param. This value is used for logging and tracking
        # training state. The computation should happen after the dataloader has been setup
        self._steps_per_epoch = (
            len(self._dataloader) // self._gradient_accumulation_steps
        )
        if (
            self.max_steps_per_epoch is not None
            and self.max_steps_per_epoch < self._steps_per_epoch
        ):
            self._steps_per_epoch = self.max_steps_per_epoch
        # medtune: a mid-epoch resume restored global_step from the recipe state
        if not self._resume_from_checkpoint:
            self.global_step = self.epochs_run * self._steps_per_epoch

        # Setup lr scheduler
        self._lr_scheduler = self._setup_lr_scheduler(
            cfg_lr_scheduler=cfg.get("lr_scheduler", None),
            num_training_steps=self.total_epochs * self._steps_per_epoch,
            last_epoch=self.global_step - 1,
        )

        # Set up profiler, returns DummyProfiler (nullcontext object with no-op `step` method)
        # if cfg is missing profiler key or if `cfg.profiler.enabled = False`
        self._profiler = self._setup_profiler(cfg.get(PROFILER_KEY, None))

        # Used to ignore labels for loss computation
        self.ignore_labels_cache = torch.full(
            (cfg.batch_size, 1), self._loss_fn.ignore_index, device=self._device
        )

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

        log.info(f" Profiler config after instantiation: {profiler_cfg}")

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
        compile_model: bool,
        model_state_dict: Dict[str, Any],
    ) -> nn.Module:
        """
        Set up the model including enabling activation checkpointing.
        """
        with training.set_default_dtype(self._dtype), self._device:
            model = config.instantiate(cfg_model)

        if compile_model:
            training.compile_model(model)

        if enable_activation_checkpointing:
            training.set_activation_checkpointing(
                model, auto_wrap_policy={modules.TransformerSelfAttentionLayer}
            )

        model.load_state_dict(model_state_dict)

        # Validate model was loaded in with the expected dtype.
        training.validate_expected_param_dtype(
            model.named_parameters(), dtype=self._dtype
        )

        # Enable activation offloading
        self.activations_handling_ctx = training.get_act_offloading_ctx_manager(
            model, enable_activation_offloading
        )

        log.info(f"Model is initialized with precision {self._dtype}.")

        if self._device.type != "cpu":
            memory_stats = training.get_memory_stats(device=self._device)
            training.log_memory_stats(memory_stats)

        return model

    def _setup_optimizer(
        self,
        cfg_optimizer: DictConfig,
        opt_state_dict: Optional[Dict[str, Any]] = None,
    ) -> Optimizer:
        """
        Set up the optimizer. This method also handles loading the optimizer state_dict, if specified.

        medtune: the builder gets ``named_parameters()``; a layer-wise optimizer registers its own
        post-accumulate-grad hooks and is still one ``Optimizer`` for the scheduler and checkpoints.
        """
        optimizer = config.instantiate(cfg_optimizer, list(self._model.named_parameters()))
        if bool(getattr(optimizer, "steps_in_backward", False)) != self._optimizer_in_bwd:
            raise ValueError(
                f"{cfg_optimizer._component_} with layerwise={self._optimizer_in_bwd} built an "
                "optimizer that does not match: only components.optim builders support layerwise"
            )
        if opt_state_dict:
            try:
                optimizer.load_state_dict(opt_state_dict)
            except (KeyError, ValueError) as e:
                raise RuntimeError(
                    "The saved optimizer state does not fit this optimizer: resume with the same "
                    "optimizer settings (layerwise included) as the run that saved it."
                ) from e
        log.info(
            "Layer-wise optimizer is set up: parameters step during backward."
            if self._optimizer_in_bwd
            else "Optimizer is initialized."
        )
        return optimizer

    def _setup_lr_scheduler(
        self,
        cfg_lr_scheduler: Optional[DictConfig],
        num_training_steps: int,
        last_epoch: int,
    ) -> Optional[Optimizer]:
        """
        Set up the learning rate scheduler based on the provided configuration.
        It handles both standard optimization and optimizer-in-backward cases, and supports
        schedulers from both torchtune.modules and torch.optim.

        Args:
            cfg_lr_scheduler (Optional[DictConfig]): The learning rate scheduler configuration.
            num_training_steps (int): The total number of training steps.
            last_epoch (int): The index of the last epoch.

        Returns:
            lr_scheduler (Optional[Optimizer]): The learning rate scheduler.
        """
        if cfg_lr_scheduler is None:
            log.info(
                "No learning rate scheduler configured. Using constant learning rate."
            )
            return None

        # medtune: a layer-wise optimizer shares its per-parameter groups, so one scheduler
        # drives every parameter's learning rate
        lr_scheduler = config.instantiate(
            cfg_lr_scheduler,
            self._optimizer,
            num_training_steps=num_training_steps,
            last_epoch=last_epoch,
        )

        log.info("Learning rate scheduler is initialized.")
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
            num_replicas=1,
            rank=0,
            shuffle=shuffle,
            seed=0,
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
        )
        # medtune: torchtune 0.6.1 passes the saved position here but never loads it
        if dataloader_state_dict is not None:
            dataloader.load_state_dict(dataloader_state_dict)

        return dataloader

    def save_checkpoint(self, epoch: int) -> None:
        """
        Save state dict to file. The recipe save_checkpoint method is responsible for
        correctly creating the checkpoint dict and passing to the checkpointer.

        medtune: ``output_dir/epoch_<epoch>/``, with ``recipe_state.pt`` inside when more epochs
        follow.
        """
        self._write_checkpoint(
            epoch_folder_name(epoch), with_recipe_state=epoch + 1 < self.total_epochs, epoch_end=True
        )

    def _write_checkpoint(
        self, folder: str, with_recipe_state: bool, epoch_end: bool = False
    ) -> None:
        """medtune: HF weights (+ the recipe state a resume needs) in ``output_dir/<folder>``,
        written atomically (components.step_checkpoints)."""
        self._checkpoints.save(
            folder,
            lambda staging: write_with_checkpointer(
                self._checkpointer, staging, {training.MODEL_KEY: self._model.state_dict()}
            ),
            self._checkpoints.recipe_state(self, self._optimizer.state_dict(), epoch_end)
            if with_recipe_state
            else None,
        )

    def _loss_step(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
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
        loss = self._loss_fn(logits, labels)
        # free logits otherwise it peaks backward memory
        del logits

        return loss

    def train(self) -> None:
        """
        The core training loop. Supports training on subsets of the dataset using the
        ``max_steps_per_epoch``.
        """
        if self._compile:
            log.info(
                "NOTE: torch.compile is enabled and model is compiled in first forward. Expect a relatively slow first iteration."
            )
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
            pbar = tqdm(total=self._steps_per_epoch, initial=steps_in_epoch)
            self._dataloader.sampler.set_epoch(curr_epoch)
            # medtune: a resumed run's RNG continues the saved stream
            batches = self._checkpoints.epoch_batches(self._dataloader, steps_in_epoch)
            for idx, batch in enumerate(batches):
                # Start tracking CUDA memory for active steps for just the first epoch
                if (
                    curr_epoch == 0
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

                # Loss is normalized by default so we multiply by the number of tokens
                # This way we can normalize by the total number of tokens if we're accumulating gradients
                if self._optimizer_in_bwd:
                    # medtune: parameters step inside this backward, so it must already see the
                    # per-token gradient that the ordinary path gets from scale_grads below
                    token_loss = self._loss_step(batch)
                    running_loss += token_loss.detach() * current_num_tokens
                    token_loss.backward()
                else:
                    current_loss = self._loss_step(batch) * current_num_tokens
                    running_loss += current_loss
                    current_loss.backward()

                # Step with optimizer
                if (idx + 1) % self._gradient_accumulation_steps == 0:
                    # medtune: a NaN/inf loss stops the run here, before the optimizer step
                    loss_to_log = running_loss.item() / num_tokens
                    self._checkpoints.check_loss(loss_to_log, self.global_step + 1)
                    if self._optimizer_in_bwd:
                        # medtune: a no-op (parameters stepped in backward) that keeps the LR
                        # scheduler's "step before scheduler" bookkeeping right
                        self._optimizer.step()
                    else:
                        training.scale_grads(self._model, 1 / num_tokens)
                        if self._clip_grad_norm is not None:
                            grad_norm = torch.nn.utils.clip_grad_norm_(
                                self._model.parameters(),
                                max_norm=float(self._clip_grad_norm),
                            )
                        self._optimizer.step()
                        self._optimizer.zero_grad(set_to_none=True)

                    # Need to fix `lr_scheduler.step()` before `optimizer.step()` warning
                    if self._lr_scheduler is not None:
                        self._lr_scheduler.step()
                    self.global_step += 1
                    steps_in_epoch += 1

                    pbar.update(1)
                    pbar.set_description(
                        f"{curr_epoch + 1}|{self.global_step}|Loss: {loss_to_log}"
                    )

                    # Log per-step metrics
                    if self.global_step % self._log_every_n_steps == 0:
                        time_per_step = time.perf_counter() - t0
                        log_dict = {
                            "loss": loss_to_log,
                            # NOTE: for optim in backward, this assumes all optimizers have the same LR. This is currently
                            # true since we don't expose the ability to configure this yet.
                            "lr": get_lr(self._optimizer),
                            "tokens_per_second_per_gpu": num_tokens / time_per_step,
                        }
                        if self._device.type != "cpu" and self._log_peak_memory_stats:
                            log_dict.update(
                                training.get_memory_stats(device=self._device)
                            )
                        if self._device.type == "cpu" and self._log_cpu_peak_rss:
                            # medtune: peak resident memory of this process so far (Linux: KiB)
                            log_dict["peak_rss_gib"] = (
                                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
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

                    # medtune: step-based checkpoints (the epoch's last step gets the epoch one)
                    folder = self._checkpoints.due_step_folder(
                        self.global_step, steps_in_epoch, self._steps_per_epoch
                    )
                    if folder:
                        self._write_checkpoint(folder, with_recipe_state=True)
                    t0 = time.perf_counter()

                # Stop tracking CUDA memory now that active steps are complete
                if (
                    curr_epoch == 0
                    and self.profiler_profile_memory
                    and idx
                    == self.profiler_wait_steps
                    + self.profiler_warmup_steps
                    + self.profiler_active_steps
                    and self._device.type == "cuda"
                ):
                    torch.cuda.memory._record_memory_history(enabled=None)

                # Step the profiler
                # Note we are stepping each batch, which might not include optimizer step in the trace
                # if the schedule cycle doesn't align with gradient accumulation.
                self._profiler.step()

                # Check if we should stop training for this epoch
                # medtune: counted in optimizer steps, so a resumed epoch stops where it should
                if steps_in_epoch >= self._steps_per_epoch:
                    break

            self.epochs_run += 1
            self.save_checkpoint(epoch=curr_epoch)

        self._profiler.stop()

    def cleanup(self) -> None:
        self._metric_logger.close()


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
    config.log_config(recipe_name="GaLoreFinetuneRecipeSingleDevice", cfg=cfg)
    recipe = GaLoreFinetuneRecipeSingleDevice(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
