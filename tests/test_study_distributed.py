"""`medtune study` runs that ask for several processes (nproc_per_node) or machines (nnodes).

A run with `nproc_per_node` launches its recipe's distributed counterpart through torchrun's
options of `tune run`; a recipe without one is refused before any work; the dry run prints the
very command; a real two-process CPU training in a study records its processes in the manifest.
"""

import json
import os
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from components.metric_logs import latest_log, step_losses
from components.study.cli import study
from components.study.runner import StudyRunner
from components.study.spec import StudyError, load_study
from tests.helpers import BIN, REPO_ROOT, run_cli

TINY_LORA = ["max_steps_per_epoch=2", "batch_size=2", "tokenizer.max_seq_len=128"]


def write_study(folder: Path, runs: str) -> Path:
    path = folder / "study.yaml"
    path.write_text(f"name: scaled\noutput_dir: {folder / 'out'}\nruns:\n" + textwrap.indent(textwrap.dedent(runs), "  "))
    return path


@pytest.fixture
def at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # the runner resolves recipes and configs from the working folder


def test_dry_run_prints_the_distributed_recipe_with_torchrun_options(tmp_path, at_repo_root, capsys):
    path = write_study(
        tmp_path,
        """
        one_node:
          recipe: recipes/lora_finetune_single_device.py
          config: configs/tiny/lora.yaml
          nproc_per_node: 8
        two_nodes:
          recipe: recipes/full_finetune_single_device.py
          config: configs/tiny/full_sft.yaml
          nproc_per_node: 8
          nnodes: 2
          rdzv_endpoint: node0.example.org:29400
        already_distributed:
          recipe: recipes/lora_finetune_distributed.py
          config: configs/tiny/qlora.yaml
          nproc_per_node: 2
        one_device:
          recipe: recipes/lora_finetune_single_device.py
          config: configs/tiny/lora.yaml
        """,
    )
    assert study(str(path), dry_run=True) == 0
    out = tmp_path / "out" / "runs"
    assert capsys.readouterr().out.splitlines() == [
        f"tune run --nproc_per_node 8 recipes/lora_finetune_distributed.py --config configs/tiny/lora.yaml output_dir={out}/one_node",
        "tune run --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint node0.example.org:29400 "
        f"recipes/full_finetune_distributed.py --config configs/tiny/full_sft.yaml output_dir={out}/two_nodes",
        f"tune run --nproc_per_node 2 recipes/lora_finetune_distributed.py --config configs/tiny/qlora.yaml output_dir={out}/already_distributed",
        f"tune run recipes/lora_finetune_single_device.py --config configs/tiny/lora.yaml output_dir={out}/one_device",
    ]


def test_a_recipe_without_a_distributed_counterpart_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """In a folder of its own (recipes/ and configs/ as in the repository), so the test holds
    whichever distributed recipes the repository has."""
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "galore_finetune_single_device.py").write_text("")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "galore.yaml").write_text("epochs: 1\n")
    monkeypatch.chdir(tmp_path)
    path = write_study(
        tmp_path,
        """
        galore: {recipe: recipes/galore_finetune_single_device.py, config: configs/galore.yaml, nproc_per_node: 2}
        """,
    )
    assert study(str(path), dry_run=True) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [
        f"medtune study: {path}: runs.galore: nproc_per_node: 2 needs a distributed recipe and "
        "recipes/galore_finetune_single_device.py has none (recipes/galore_finetune_distributed.py does "
        "not exist); drop nproc_per_node to run it on one device"
    ]
    (tmp_path / "recipes" / "galore_finetune_distributed.py").write_text("")
    assert StudyRunner(load_study(str(path))).recipe_of("galore") == "recipes/galore_finetune_distributed.py"


@pytest.mark.parametrize(
    "fields, message",
    [
        ("nproc_per_node: 0", r"runs.a.nproc_per_node: 0 is not a whole number >= 1"),
        ("nproc_per_node: two", r"runs.a.nproc_per_node: 'two' is not a whole number >= 1"),
        ("nnodes: 2, rdzv_endpoint: 'h:1'", r"runs.a: nnodes needs nproc_per_node"),
        ("nproc_per_node: 2, nnodes: 2", r"runs.a: nnodes: 2 and rdzv_endpoint go together"),
        ("nproc_per_node: 2, rdzv_endpoint: 'h:1'", r"runs.a: nnodes: 1 and rdzv_endpoint go together"),
        ("nproc_per_node: 2, nnodes: 2, rdzv_endpoint: node0", r"runs.a.rdzv_endpoint: 'node0' is not HOST:PORT"),
        ("nproc_per_node: 2, nnodes: 2, rdzv_endpoint: 'h:70000'", r"'h:70000' is not HOST:PORT"),
        ("nproc_per_node: 2, nnodes: 1.5, rdzv_endpoint: 'h:1'", r"runs.a.nnodes: 1.5 is not a whole number"),
    ],
)
def test_bad_process_settings_are_refused_naming_the_run(tmp_path, fields, message):
    path = write_study(tmp_path, f"a: {{recipe: r_single_device.py, config: c.yaml, {fields}}}\n")
    with pytest.raises(StudyError, match=message):
        load_study(str(path))


def test_a_command_step_cannot_ask_for_processes(tmp_path):
    path = write_study(tmp_path, "a: {command: [python, -c, pass], nproc_per_node: 2}\n")
    with pytest.raises(StudyError, match=r"runs.a: nproc_per_node is for trainings \(recipe \+ config\), not a command"):
        load_study(str(path))


def lora_study(tmp_path: Path, **processes) -> Path:
    fields = "".join(f"\n  {key}: {value}" for key, value in processes.items())
    overrides = ", ".join(o.replace("=", ": ") for o in TINY_LORA)
    return write_study(
        tmp_path,
        f"""
        lora:
          recipe: recipes/lora_finetune_single_device.py
          config: configs/tiny/lora.yaml
          overrides: {{{overrides}}}""" + textwrap.indent(fields, "        ") + "\n",
    )


@pytest.mark.slow
def test_a_two_process_cpu_training_in_a_study_is_recorded_in_the_manifest(tmp_path):
    """The real thing: `medtune study` runs the tiny LoRA as 2 gloo processes (FSDP2); 45 s on
    the shared 2-core machine, hence slow (the recipe itself is tested in test_recipes_distributed.py)."""
    path = lora_study(tmp_path, nproc_per_node=2)
    run_cli("medtune", ["study", str(path)])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    (step,) = manifest["steps"]
    run_dir = tmp_path / "out" / "runs" / "lora"
    assert step["status"] == "done"
    assert step["command"] == [
        "tune", "run", "--nproc_per_node", "2", "recipes/lora_finetune_distributed.py",
        "--config", "configs/tiny/lora.yaml", *TINY_LORA, f"output_dir={run_dir}",
    ]
    assert step["processes"] == {"nproc_per_node": 2, "nnodes": 1, "rdzv_endpoint": None}
    assert step["checkpoint"] == str(run_dir / "epoch_0")
    assert sorted(step_losses(latest_log(run_dir))) == [1, 2]
    log = (run_dir / "medtune_step.log").read_text()
    assert "Running with torchrun" in log and "Running LoRAFinetuneRecipeDistributed" in log, log[-2000:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_machines_meet_at_the_rendezvous(tmp_path):
    """Two "machines" on localhost: the study runs on the first, the second runs the training
    line the dry run prints; c10d pairs them into one 2-process job."""
    path = lora_study(tmp_path, nproc_per_node=1, nnodes=2, rdzv_endpoint=f"127.0.0.1:{free_port()}")
    line = run_cli("medtune", ["study", str(path), "--dry-run"]).stdout.strip()
    assert line.startswith("tune run --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:")
    second = subprocess.Popen(
        [str(BIN / "tune"), *line.split()[1:]], cwd=REPO_ROOT, env=dict(os.environ),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        run_cli("medtune", ["study", str(path)])
    finally:
        output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output[-3000:]
    (step,) = json.loads((tmp_path / "out" / "manifest.json").read_text())["steps"]
    assert step["status"] == "done" and step["processes"]["nnodes"] == 2
    assert sorted(step_losses(latest_log(tmp_path / "out" / "runs" / "lora"))) == [1, 2]


def test_papers_commented_multi_gpu_variant_dry_runs(tmp_path, at_repo_root, capsys):
    """configs/studies/paper.yaml's commented variant, put in place of its runs, is a valid study
    whose trainings launch the distributed recipes on 8 GPUs with the study's global batch."""
    paper = REPO_ROOT / "configs" / "studies" / "paper.yaml"
    text = paper.read_text()
    block = text[text.index("# multi-GPU variant (begin)\n") : text.index("# multi-GPU variant (end)")]
    variant = yaml.safe_load("\n".join(line[1:] for line in block.splitlines()[1:]))
    study_file = yaml.safe_load(text)
    assert set(variant) <= set(study_file["runs"])
    study_file["runs"].update(variant)
    path = tmp_path / "paper_multi_gpu.yaml"
    path.write_text(yaml.safe_dump(study_file, sort_keys=False))
    assert study(str(path), dry_run=True, output_dir=str(tmp_path)) == 0
    lines = {line.split("output_dir=")[-1]: line for line in capsys.readouterr().out.splitlines() if "tune run" in line}
    runs = tmp_path / "runs"
    assert lines[f"{runs}/full_sft"] == (
        "tune run --nproc_per_node 8 recipes/full_finetune_distributed.py --config configs/llama3_2_3B/full_sft.yaml "
        f"batch_size=3 gradient_accumulation_steps=1 output_dir={runs}/full_sft"
    )
    assert lines[f"{runs}/qlora"].startswith("tune run --nproc_per_node 8 recipes/lora_finetune_distributed.py --config configs/llama3_2_3B/qlora.yaml")
    assert lines[f"{runs}/knowtuning_ka"].startswith(
        "tune run --nproc_per_node 8 recipes/lora_finetune_distributed.py --config configs/llama3_2_3B/knowtuning_ka.yaml "
        f"dataset.data_files={runs}/knowtuning_data_ka/ka.jsonl gradient_accumulation_steps=1"
    )
    assert lines[f"{runs}/galore"].startswith(
        "tune run --nproc_per_node 8 recipes/galore_finetune_distributed.py --config configs/llama3_2_3B/galore.yaml "
        "batch_size=3 gradient_accumulation_steps=1"
    )
    assert lines[f"{runs}/knowtuning"].startswith(
        "tune run --nproc_per_node 8 recipes/knowtuning_dpo_distributed.py --config configs/llama3_2_3B/knowtuning_kc.yaml"
    ) and "batch_size=2" in lines[f"{runs}/knowtuning"]
