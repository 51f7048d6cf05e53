"""SmolLM2-135M in torchtune: the builder reads the converted checkpoint and gives transformers'
logits; the QLoRA builder quantizes exactly the NF4-compatible (MLP) weights."""

import pytest
import torch
from torchao.dtypes.nf4tensor import NF4Tensor

from components.models import smollm2_checkpoint as sc
from components.models.smollm2 import qlora_smollm2_135m, smollm2_135m, smollm2_135m_checkpointer
from tests.test_smollm2_checkpoint import smollm2_session_cache, smollm2_session_wheel

# float32 on both sides; differences come only from operation order (attention, RMSNorm)
LOGIT_ATOL = 1e-3


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    """The session's converted checkpoint (built here if no other SmolLM2 test built it yet)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDTUNE_CACHE_DIR", str(smollm2_session_cache(tmp_path_factory)))
        mp.setenv(sc.WHEEL_ENV, str(smollm2_session_wheel(tmp_path_factory)))
        sc.smollm2_checkpoint_dir()
        yield mp


def test_torchtune_logits_equal_transformers(smollm2_cache, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpointer = smollm2_135m_checkpointer(output_dir=str(tmp_path))
    model = smollm2_135m()
    model.load_state_dict(checkpointer.load_checkpoint()["model"])
    model.eval()
    folder = sc.smollm2_checkpoint_dir()
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(folder)(
        "Question: Which vitamin deficiency causes scurvy? Answer:", return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.shape == theirs.shape == (1, ids.shape[1], 49152)
    assert (ours - theirs).abs().max().item() < LOGIT_ATOL
    assert torch.equal(ours[0, -1].argmax(), theirs[0, -1].argmax())


def test_qlora_quantizes_the_mlp_and_nothing_else():
    model = qlora_smollm2_135m(lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=4)
    nf4 = {name for name, p in model.named_parameters() if isinstance(p, NF4Tensor)}
    assert len(nf4) == 30 * 3
    assert all(name.split(".")[2] == "mlp" for name in nf4)
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.dim() == 2 and name not in nf4:
            assert "lora" in name or "tok_embeddings" in name or p.numel() % 16_384 != 0, name
