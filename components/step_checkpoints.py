"""Step checkpointing and resume of one training run, the same in every medtune recipe.

`StepCheckpointClient` (after torchtune 0.6.1's `CheckpointClient`, built from the recipe's
config) owns what the recipes used to copy: where a resume starts and what it loads, what a
recipe state holds (one device, or every rank's dataloader position and RNG streams gathered
to rank 0), when a step checkpoint is due, the atomic save and pruning, the non-finite loss
check, the refusal to start over beside an earlier run's steps, and a Ctrl-C that ends with
the resume command instead of a traceback. The folder layout itself is components.checkpointing's.
"""

import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Union

import torch
from torchtune import training, utils

from components.checkpointing import (
    GLOBAL_STEP_KEY,
    RNG_STATE_KEY,
    adapter_checkpoint_file,
    check_finite_loss,
    check_positive,
    find_resume_dir,
    is_step_folder,
    load_recipe_state,
    prune_step_checkpoints,
    resumable_checkpoints,
    restore_rng_state,
    rng_state,
    save_recipe_state,
    step_folder_name,
    write_atomically,
)

log = utils.get_logger("DEBUG")

# Recipe-state keys of the distributed recipes: each rank has its own dataloader position and
# RNG streams, gathered by rank 0 into one list indexed by rank.
LR_SCHEDULER_KEY = "lr_scheduler"
RANK_STATES_KEY = "rank_states"
DATALOADER_STATE = training.DATALOADER_KEY

# The exit status of a run stopped by Ctrl-C (128 + SIGINT), as a shell reports it.
INTERRUPTED_EXIT_CODE = 130


def gather_rank_states(state: Dict[str, Any], world_size: int, is_rank_zero: bool):
    """Every rank's ``state``, as a list indexed by rank, on rank 0 (None elsewhere)."""
    gathered = [None] * world_size if is_rank_zero else None
    torch.distributed.gather_object(state, gathered, dst=0)
    return gathered


def own_rank_state(
    ckpt_dict: Dict[str, Any], rank: int, world_size: int
) -> Optional[Dict[str, Any]]:
    """This rank's saved dataloader position and RNG states (None: start them afresh).

    A mid-epoch checkpoint needs the world size it was written with (each rank's position is
    in its own shard of the data); at an epoch's end only the RNG streams are lost.
    """
    rank_states = ckpt_dict[RANK_STATES_KEY]
    if len(rank_states) == world_size:
        return rank_states[rank]
    if any(state[DATALOADER_STATE] is not None for state in rank_states):
        raise ValueError(
            f"this checkpoint was written mid-epoch by {len(rank_states)} processes; resume it "
            f"with --nproc_per_node {len(rank_states)} (not {world_size}), or resume from an "
            "epoch_N/ checkpoint, which any number of processes can continue"
        )
    if rank == 0:
        log.warning(
            f"resuming a {len(rank_states)}-process checkpoint with {world_size} processes: "
            "the weights, optimizer and schedule continue, but the random streams start afresh"
        )
    return None


def resume_command(argv: Optional[list] = None, nproc_per_node: Optional[int] = None) -> str:
    """The `tune run` command of this process (``sys.argv`` as `tune run` leaves it: the recipe,
    then its arguments) with ``resume_from_checkpoint=True`` in place of any value it had."""
    recipe, *args = list(sys.argv if argv is None else argv)
    # `tune run recipes/x.py` runs the module `recipes.x` (torchrun: the absolute path): name
    # the file as typed, relative to the current directory
    as_file = Path(*recipe.split(".")).with_suffix(".py")
    if not recipe.endswith(".py") and as_file.is_file():
        recipe = str(as_file)
    elif Path(recipe).is_absolute() and Path(recipe).is_relative_to(Path.cwd()):
        recipe = str(Path(recipe).relative_to(Path.cwd()))
    args = [arg for arg in args if not arg.startswith("resume_from_checkpoint=")]
    launcher = ["--nproc_per_node", str(nproc_per_node)] if nproc_per_node else []
    return shlex.join(["tune", "run", *launcher, recipe, *args, "resume_from_checkpoint=True"])


class StepCheckpointClient:
    """Step checkpoints and resume for a recipe, from its config keys of the same names (the
    recipe reads them, so that components.config_check knows them).

    ``distributed``: the recipe runs one process per rank (its recipe state keeps every rank's
    dataloader position and RNG streams, and saves are collective); otherwise one process.
    Building it refuses (exit 2, one line) to start afresh in an ``output_dir`` that holds an
    earlier run's step checkpoints, and finds the checkpoint to resume from, if any.
    """

    def __init__(
        self,
        output_dir: Union[str, Path],
        resume_from_checkpoint: bool = False,
        resume_from: Optional[Union[str, Path]] = None,
        save_every_n_steps: Optional[int] = None,
        keep_last_n_checkpoints: Optional[int] = None,
        distributed: bool = False,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.distributed = distributed
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self.is_rank_zero = self.rank == 0
        self.save_every_n_steps = check_positive("save_every_n_steps", save_every_n_steps)
        self.keep_last_n_checkpoints = check_positive(
            "keep_last_n_checkpoints", keep_last_n_checkpoints
        )
        self.resume_dir: Optional[Path] = None
        self.rank_state: Optional[Dict[str, Any]] = None
        self._resumed_rng: Optional[Dict[str, Any]] = None
        if resume_from_checkpoint:
            self.resume_dir = find_resume_dir(self.output_dir, resume_from)
        else:
            self._refuse_to_start_beside_old_steps()

    # ---- starting ---------------------------------------------------------------------------
    def _refuse_to_start_beside_old_steps(self) -> None:
        steps = [folder for _, folder in resumable_checkpoints(self.output_dir) if is_step_folder(folder)]
        if not steps:
            return
        if self.is_rank_zero:
            print(
                f"{self.output_dir} holds resumable step checkpoints of an earlier run (newest: "
                f"{steps[-1].name}): add resume_from_checkpoint=True to continue it, or choose "
                "another output_dir (or delete its step_N folders) to start over. Nothing was run.",
                file=sys.stderr,
            )
        raise SystemExit(2)

    def exit_cleanly_on_interrupt(self) -> None:
        """From now on Ctrl-C (SIGINT) ends the run with exit status 130 and, instead of a
        traceback, two lines: the last complete checkpoint, and the command resuming it."""
        signal.signal(signal.SIGINT, self._interrupted)

    def _interrupted(self, signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not cut this short
        if self.is_rank_zero:
            print(self.interrupted_message(), file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED_EXIT_CODE)

    def interrupted_message(self) -> str:
        """What a Ctrl-C leaves: the newest complete checkpoint and how to resume from it."""
        found = resumable_checkpoints(self.output_dir) if self.output_dir.is_dir() else []
        if not found:
            return (
                f"Interrupted before any resumable checkpoint was written to {self.output_dir}: "
                "nothing to resume; run the same command to start over."
            )
        step, folder = found[-1]
        command = resume_command(nproc_per_node=self.world_size if self.distributed else None)
        return (
            f"Interrupted. The last complete checkpoint is {folder} (step {step}); resume with:\n"
            f"  {command}"
        )

    # ---- resuming ---------------------------------------------------------------------------
    @property
    def resuming(self) -> bool:
        return self.resume_dir is not None

    def point_at_resume_weights(self, checkpointer: Any) -> None:
        """When resuming, have a full-weight HF checkpointer load the resume folder's shards
        (``model-*.safetensors``, else ``model-*.bin``) instead of the configured files."""
        if self.resume_dir is None:
            return
        shards = sorted(self.resume_dir.glob("model-*.safetensors")) or sorted(
            self.resume_dir.glob("model-*.bin")
        )
        if not hasattr(checkpointer, "_checkpoint_paths") or not shards:
            raise ValueError(
                f"cannot resume from {self.resume_dir}: this recipe resumes Hugging Face format "
                "checkpoints (torchtune.training.FullModelHFCheckpointer) written by itself"
            )
        checkpointer._checkpoint_paths = shards
        utils.log_rank_zero(log, f"Resuming from {self.resume_dir}")

    def load_adapter(self) -> Dict[str, torch.Tensor]:
        """The resume folder's LoRA adapter (torchtune keys)."""
        adapter_file = adapter_checkpoint_file(self.resume_dir)
        utils.log_rank_zero(log, f"Resuming from {self.resume_dir} (adapter: {adapter_file})")
        return torch.load(adapter_file, map_location="cpu", weights_only=True)

    def load_state(self) -> Dict[str, Any]:
        """The resume folder's recipe state. Keeps this process's RNG states for
        `epoch_batches` / `restore_rng`; a distributed one also its dataloader position,
        as ``rank_state`` (raising if a mid-epoch checkpoint had another world size)."""
        state = load_recipe_state(self.resume_dir)
        if self.distributed:
            self.rank_state = own_rank_state(state, self.rank, self.world_size)
            self._resumed_rng = None if self.rank_state is None else self.rank_state[RNG_STATE_KEY]
        else:
            self._resumed_rng = state[RNG_STATE_KEY]
        return state

    def resumed_dataloader_state(self) -> Optional[Dict[str, Any]]:
        """Distributed: this rank's saved dataloader position (None: start the epoch afresh)."""
        return None if self.rank_state is None else self.rank_state[DATALOADER_STATE]

    def restore_rng(self) -> None:
        """Continue this process's random streams where the saved run left them (once)."""
        rng, self._resumed_rng = self._resumed_rng, None
        if rng is not None:
            restore_rng_state(rng)

    def epoch_batches(self, dataloader: Any, steps_in_epoch: int) -> Iterator:
        """``iter(dataloader)`` for an epoch. A resumed run's RNG continues the saved stream:
        starting an epoch's iterator draws a seed from it, so it is restored before that at an
        epoch boundary and after it mid-epoch (where the saved run had already drawn it)."""
        rng, self._resumed_rng = self._resumed_rng, None
        if rng is not None and steps_in_epoch == 0:
            restore_rng_state(rng)
        batches = iter(dataloader)
        if rng is not None and steps_in_epoch > 0:
            restore_rng_state(rng)
        return batches

    # ---- training ---------------------------------------------------------------------------
    def check_loss(self, loss: Any, step: int) -> None:
        """Before the optimizer step of ``step``: a NaN/inf loss stops the run, naming the
        step and the last good checkpoint, before it reaches the weights or a checkpoint."""
        check_finite_loss(float(loss), step, self.output_dir)

    def due_step_folder(self, global_step: int, steps_in_epoch: int, steps_per_epoch: int) -> Optional[str]:
        """``step_<global_step>`` when a step checkpoint is due after this optimizer step
        (every ``save_every_n_steps``; an epoch's last step gets the epoch checkpoint instead)."""
        if (
            self.save_every_n_steps
            and global_step % self.save_every_n_steps == 0
            and steps_in_epoch < steps_per_epoch
        ):
            return step_folder_name(global_step)
        return None

    def recipe_state(
        self,
        recipe: Any,
        optimizer_state: Dict[str, Any],
        epoch_end: bool,
        lr_scheduler: Any = None,
    ) -> Optional[Dict[str, Any]]:
        """Everything a resumed run needs besides the weights, loadable with weights_only=True:
        the recipe's ``seed``, ``epochs_run``, ``total_epochs``, ``max_steps_per_epoch``,
        ``global_step``, the optimizer state, the dataloader position (none at an epoch's end:
        the next epoch starts afresh) and the RNG states. Distributed: every rank must call it
        (collective gather); rank 0 gets the state with every rank's position and RNG streams
        and the LR scheduler's state, the others None."""
        position = None if epoch_end else recipe._dataloader.state_dict()
        state = {
            training.SEED_KEY: recipe.seed,
            training.EPOCHS_KEY: recipe.epochs_run,
            training.TOTAL_EPOCHS_KEY: recipe.total_epochs,
            training.MAX_STEPS_KEY: recipe.max_steps_per_epoch,
            training.OPT_KEY: optimizer_state,
            GLOBAL_STEP_KEY: recipe.global_step,
        }
        if not self.distributed:
            state.update({training.DATALOADER_KEY: position, RNG_STATE_KEY: rng_state()})
            return state
        rank_states = gather_rank_states(
            {DATALOADER_STATE: position, RNG_STATE_KEY: rng_state()},
            self.world_size,
            self.is_rank_zero,
        )
        if not self.is_rank_zero:
            return None
        state[LR_SCHEDULER_KEY] = lr_scheduler.state_dict() if lr_scheduler is not None else None
        state[RANK_STATES_KEY] = rank_states
        return state

    def save(
        self,
        folder: str,
        write: Callable[[Path], None],
        recipe_state: Optional[Dict[str, Any]] = None,
    ) -> None:
        """Write ``output_dir/<folder>`` atomically on rank 0: ``write(staging)`` puts the
        weights in the staging folder, then the recipe state (if any) joins them, then the
        rename. After a step folder, old ones are pruned to ``keep_last_n_checkpoints``.
        Distributed: every rank waits for it."""
        if self.is_rank_zero:
            start = time.perf_counter()

            def write_all(staging: Path) -> None:
                write(staging)
                if recipe_state is not None:
                    save_recipe_state(staging, recipe_state)

            target = write_atomically(self.output_dir, folder, write_all)
            if is_step_folder(target):
                prune_step_checkpoints(self.output_dir, self.keep_last_n_checkpoints)
            log.info(
                f"Checkpoint written to {target}"
                + (" (resumable)" if recipe_state is not None else "")
                + f" in {time.perf_counter() - start:.2f} secs"
            )
        if self.distributed:
            torch.distributed.barrier()
