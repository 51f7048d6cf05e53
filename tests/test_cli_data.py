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


def test_data_cache_lists_and_removes_only_what_is_unused(capsys, tmp_path):
    """Two caches (one unused for 10 days), a killed build's folder, a live build's folder and a
    folder that is not ours: listing changes nothing; removal takes the unused cache and the
    leftover, never a live build or a foreign folder; a cache hit counts as a use."""
    from components.data import medical_meadow_mixture
    from components.data.cache_store import host_name
    from components.models import tiny_llama3_2_tokenizer

    tokenizer = tiny_llama3_2_tokenizer(max_seq_len=128)
    sample = Path(__file__).resolve().parent.parent / "components" / "data" / "sample" / "medical_meadow"
    recent = medical_meadow_mixture(tokenizer, data_dir=str(sample), sets=["mmmlu"], cache_dir=str(tmp_path)).cache_dir
    old = medical_meadow_mixture(tokenizer, data_dir=str(sample), sets=["mediqa"], cache_dir=str(tmp_path)).cache_dir
    ten_days_ago = os.stat(old).st_mtime - 10 * 86400
    os.utime(old, (ten_days_ago, ten_days_ago))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".tmp-abc123-{int(gone.stdout)}-0badf00d-{host_name()}"
    live = tmp_path / f".tmp-abc123-{os.getpid()}-0badf00d-{host_name()}"
    foreign = tmp_path / "notes"
    for folder in (dead, live, foreign):
        folder.mkdir()
        (folder / "x").write_bytes(b"x" * 1000)
    everything = {recent, old, dead, live, foreign}

    def listed(*args):
        code, out, err = run(capsys, "data", "cache", "--cache-dir", str(tmp_path), *args)
        assert code == 0, err
        return out

    out = listed()
    assert out.splitlines()[0].startswith(f"cache: {tmp_path} (4 folders, ")
    assert f"  {recent.name}  " in out and "rows, 0 packed; last used" in out
    assert "10.0 days ago" in out and f"  {dead.name}  0.0 MiB  left by a killed build" in out
    assert f"  {live.name}  0.0 MiB  build in progress" in out and "notes" not in out
    assert set(tmp_path.iterdir()) - {p for p in tmp_path.iterdir() if p.name.startswith(".lock-")} == everything

    out = listed("--remove-unused-days", "5", "--dry-run")
    assert f"would remove {old.name}" in out and f"would remove {dead.name}" in out and "nothing removed" in out
    assert recent.name not in out.split("would remove", 1)[1] and old.exists() and dead.exists()

    out = listed("--remove-unused-days", "5")
    assert f"removed {old.name}" in out and f"removed {dead.name}" in out
    assert not old.exists() and not dead.exists() and recent.exists() and live.exists() and foreign.exists()

    os.utime(recent, (ten_days_ago, ten_days_ago))  # a cache hit is a use
    medical_meadow_mixture(tokenizer, data_dir=str(sample), sets=["mmmlu"], cache_dir=str(tmp_path))
    assert "removed" not in listed("--remove-unused-days", "5")

    out = listed("--clear")
    assert f"removed {recent.name}" in out
    assert not recent.exists() and live.exists() and foreign.exists()
    code, _, err = run(capsys, "data", "cache", "--cache-dir", str(tmp_path), "--remove-unused-days", "-1")
    assert code == 2 and "--remove-unused-days must be 0 or more, got -1" in err


@pytest.mark.parametrize("text, where", [
    # the comma between records 0 and 1 is missing: the error is on line 7, not "in record 0"
    ('[\n  {\n    "instruction": "a",\n    "input": "",\n    "output": "b"\n  }\n  {"instruction": "c", "input": "", "output": "d"}\n]\n',
     "expected ',' or ']' at line 7 column 3, after the record on lines 2-6"),
    ('[\n  {\n    "instruction": "a",\n    "input": "",\n    "output": "b"\n  },\n  {"instruction": "c", "input": "", "instruction": "d"}\n]\n',
     "duplicate key 'instruction' in an object (the record starting on line 7)"),
    ('[\n  {\n    "instruction": "a",\n    "input": "",\n    "output": "b"\n  },\n  7\n]\n',
     "expected a JSON object, got int (line 7)"),
    ('{"instruction": "a", "input": "", "output": "b"}\n\n\n7\n', "expected a JSON object, got int (line 4)"),
])
def test_a_broken_json_file_names_the_line(capsys, tmp_path, text, where):
    path = tmp_path / "broken.json"
    path.write_text(text)
    code, out, err = run(capsys, "data", "stats", f"meadow:{path}")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith(f"medtune: error: {path}: record ") and where in line
