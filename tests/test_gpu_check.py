"""benchmarks/gpu_check.sh --dry: the GPU check's whole chain (build, our recipe, the HF Trainer
peer, the table) at the tiny shape on CPU; same weights and batch give the same first loss."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT


def test_dry_run_prints_the_table(tmp_path):
    env = dict(os.environ, METHODS="lora", PYTHON=sys.executable,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry", str(tmp_path)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[0].startswith("| method | config | steps | ours tok/s | peer tok/s | ours / peer")
    (row,) = [line for line in table[2:]]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:3] == ["lora", "lora", "2"]
    assert float(cells[3]) > 0 and float(cells[4]) > 0 and float(cells[5]) > 0
    ours_loss, peer_loss = (float(x) for x in cells[8].split("/"))
    assert abs(ours_loss - peer_loss) < 1e-3  # same random weights, same first batch, both fp32
    assert abs(ours_loss - math.log(128_256)) < 0.5
    ours = json.loads((tmp_path / "ours.jsonl").read_text())
    assert ours["command"] == "tune run recipes/lora_finetune_single_device.py --config configs/llama3_2_3B/lora.yaml"
    assert "shuffle=False" in ours["overrides"]
    peer = json.loads((tmp_path / "peer" / "lora.json").read_text())
    assert peer["steps"] == 2 and len(peer["label_tokens"]) == 2
