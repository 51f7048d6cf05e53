"""``medtune data stats|export``, in process through ``main`` and once as the installed command."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from components.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_medquad_stats(capsys, shared_data):
    code, out, _ = run(capsys, "data", "stats", f"medquad:{shared_data / 'medquad'}")
    assert code == 0
    lines = out.splitlines()
    for line in ("files: 11274", "pairs: 47457", "answered: 16423", "skipped (no answer): 31034",
                 "older <doc> schema: 4 files, 16 pairs", "  2_GARD_QA: 2685, 5394, 5389, 5",
                 "  10_MPlus_ADAM_QA: 4366, 17348, 0, 17348"):
        assert line in lines


def test_meadow_stats_with_split_and_decontamination(capsys, shared_data):
    code, out, _ = run(
        capsys, "data", "stats", f"meadow:{shared_data / 'medical_meadow_small.json'}",
        "--holdout-fraction", "0.1", "--decontaminate", f"usmle={shared_data / 'usmle'}",
    )
    assert code == 0
    assert "rows: 5942" in out
    assert "holdout: 5347 train / 595 validation (fraction 0.1, seed 42); kept train" in out
    assert "decontamination (13-grams): 0 of 5347 removed" in out
    assert "final: 5347" in out


def test_usmle_stats_and_json(capsys, shared_data):
    code, out, _ = run(capsys, "data", "stats", f"usmle:{shared_data / 'usmle'}")
    assert code == 0
    assert "step 2: 120 questions, 10 with an image" in out and "no options: step 2 no. 119" in out
    code, out, _ = run(capsys, "data", "stats", f"usmle:{shared_data / 'usmle'}", "--json")
    assert json.loads(out)["questions"] == {"1": 119, "2": 120, "3": 137}


def test_mixture_stats(capsys, shared_data, tmp_path):
    rows = json.loads((shared_data / "medical_meadow_small.json").read_text())
    (tmp_path / "mediqa.json").write_text(json.dumps(rows[:30]))
    (tmp_path / "medqa.jsonl").write_text("\n".join(json.dumps(r) for r in rows[30:50]))
    code, out, _ = run(capsys, "data", "stats", f"mixture:{tmp_path}", "--set", "mediqa=10", "--set", "medqa")
    assert code == 0
    assert "  mediqa: 10 / 30; 2208" in out and "  medqa: 20 / 20; 10178" in out and "final: 30" in out


def test_export_with_template(capsys, shared_data, tmp_path):
    out_file = tmp_path / "out" / "test.jsonl"
    test = shared_data / "knowtuning_medquad" / "medquad_test.json"
    code, out, _ = run(capsys, "data", "export", f"meadow:{test}", "--out", str(out_file), "--template", "alpaca")
    assert code == 0 and "wrote 200 records" in out
    lines = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(lines) == 200
    source = json.loads(test.read_text())
    assert lines[0]["output"] == lines[0]["response"] == source[0]["output"]
    assert lines[0]["prompt"] == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        f"the request.\n\n### Instruction:\n{source[0]['instruction']}\n\n### Response:\n"
    )


def test_export_usmle_and_medquad_validation(capsys, shared_data, tmp_path):
    out_file = tmp_path / "usmle.jsonl"
    assert run(capsys, "data", "export", f"usmle:{shared_data / 'usmle'}", "--out", str(out_file))[0] == 0
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(records) == 376 and records[0]["answer"] == "B"
    code, _, err = run(capsys, "data", "export", f"usmle:{shared_data / 'usmle'}", "--out", str(out_file), "--template", "medalpaca")
    assert code == 2 and "--template applies to instruction data" in err


def test_errors_are_one_line_naming_the_file(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "i", "input": "", "output": "o"}, {"instruction": "i", "input": ""}]')
    code, _, err = run(capsys, "data", "stats", f"meadow:{bad}")
    assert code == 2
    assert err.strip() == f"medtune: error: {bad}: record 1: missing field 'output' (fields present: input, instruction)"
    code, _, err = run(capsys, "data", "export", f"meadow:{bad}", "--out", str(tmp_path / "o.jsonl"), "--template", "vicuna")
    assert code == 2 and "unknown template 'vicuna'" in err
    with pytest.raises(SystemExit) as info:
        main(["data", "stats", "nonsense:x"])
    assert info.value.code == 2
    assert "invalid SPEC 'nonsense:x'" in capsys.readouterr().err


def test_an_unreachable_hub_id_is_one_line_not_a_traceback(capsys):
    """Tests run with HF_HUB_OFFLINE=1: a Hub id cannot be fetched, as on a machine without network."""
    code, _, err = run(capsys, "data", "stats", "medquad:lavita/MedQuAD")
    assert code == 2
    assert err.startswith("medtune: error: Couldn't reach 'lavita/MedQuAD' on the Hub"), err
    assert err.rstrip().endswith("offline, name a local copy instead (a path after the kind:)")
    assert len(err.strip().splitlines()) == 1


def test_installed_console_script(shared_data):
    exe = Path(sys.executable).with_name("medtune")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [str(exe), "data", "stats", f"usmle:{shared_data / 'usmle'}"], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "total: 376 questions" in result.stdout
