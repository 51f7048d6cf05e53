"""torchtune's TensorBoardLogger through a real tiny ``tune run`` (the README's override), and no
torchao cpp-extension notice in its output (components/torchao_notice.py)."""

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util.tensor_util import make_ndarray

from components.torchao_notice import NOTICE
from tests.helpers import run_cli

STEPS = 3


def test_tensorboard_logger_writes_the_losses_and_tune_run_prints_no_torchao_notice(tmp_path):
    log_dir = tmp_path / "tb"
    proc = run_cli("tune", [
        "run", "recipes/lora_finetune_single_device.py", "--config", "configs/tiny/lora.yaml",
        f"output_dir={tmp_path / 'run'}", f"max_steps_per_epoch={STEPS}", "tokenizer.max_seq_len=128",
        "metric_logger._component_=torchtune.training.metric_logging.TensorBoardLogger",
        f"metric_logger.log_dir={log_dir}",
    ])
    events = sorted(Path(log_dir).rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {log_dir}"
    accumulator = EventAccumulator(str(events[0].parent), size_guidance={"tensors": 0})
    accumulator.Reload()  # SummaryWriter.add_scalar is stored as a scalar tensor by current tensorboard
    losses = accumulator.Tensors("loss")
    assert [e.step for e in losses] == list(range(1, STEPS + 1))
    assert all(0 < float(make_ndarray(e.tensor_proto)) < 20 for e in losses)
    assert NOTICE not in proc.stdout + proc.stderr


def test_medtune_help_and_torchao_import_print_no_notice():
    for program, args in (("medtune", ["--help"]), ("python", ["-c", "import torchao, torchtune"])):
        proc = run_cli(program, args)
        assert NOTICE not in proc.stdout + proc.stderr, program
