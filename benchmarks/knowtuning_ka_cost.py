"""What `medtune knowtuning build-ka` costs at the Llama 3.2 3B shape on the real MedQuAD: counted, timed, projected.

    python benchmarks/shape_check.py build --shape 3b --out /tmp/Llama-3.2-3B-random
    python benchmarks/knowtuning_ka_cost.py --model-dir /tmp/Llama-3.2-3B-random \\
        --medquad ../shared/data/medquad --timed-facts 32 --out benchmarks/knowtuning_ka_cost_results.jsonl

The records are what the paper study's build-ka line reads (`medquad:` with the KnowTuning test
split decontaminated away), loaded by the command's own code from the local MedQuAD XML. Every
candidate fact (`build_ka_records`' own split and word cut-off) is encoded as the scorer encodes
it (configs/llama3_2_3B/knowtuning_ka.yaml's template and the real Llama 3 tokenizer, max 256),
and the tokens of its padded batches are counted (the scorer sorts facts by length, batch 8).
Then the scorer itself (`fact_perplexities`, the command's) runs at the 3B shape (random weights
in `tune download`'s layout, bf16, CPU) on the first `--timed-facts` facts, which gives this
CPU's padded tokens per second. The whole run is projected from it, and for a GPU from the
forward FLOPs (2 x parameters x padded tokens) at an assumed share of a card's bf16 peak: a
projection, not a measurement.
"""

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from galore_fsdp_memory import emit  # noqa: E402 - benchmarks/ is on sys.path when run as a script

CONFIG = REPO / "configs" / "llama3_2_3B" / "knowtuning_ka.yaml"
PARAMETERS_3B = 3.21e9  # Llama 3.2 3B, tied embeddings
H100_BF16_DENSE_TFLOPS = 989.0


def study_records(medquad: Path, medquad_test: Path):
    """The records of the paper's build-ka line, read by the command's own loader."""
    from components.cli import build_parser
    from components.knowtuning.cli import _records

    with tempfile.TemporaryDirectory() as scratch:
        args = build_parser().parse_args([
            "knowtuning", "build-ka", f"medquad:{medquad}", "--config", str(CONFIG),
            "--out", f"{scratch}/ka.jsonl", "--decontaminate", f"medquad_test={medquad_test}",
        ])
        return _records(args)


def candidate_facts(records):
    """(instruction, input, fact) of every fact build_ka_records would score."""
    from components.knowtuning.ka import build_ka_records

    seen = []

    def counting_scorer(items):
        seen.extend(items)
        return [1.0] * len(items)

    build_ka_records(records, counting_scorer)
    return seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="shape_check.py build --shape 3b")
    parser.add_argument("--medquad", type=Path, default=REPO.parent / "shared" / "data" / "medquad")
    parser.add_argument("--medquad-test", type=Path,
                        default=REPO.parent / "shared" / "data" / "knowtuning_medquad" / "medquad_test.json")
    parser.add_argument("--timed-facts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8, help="the command's default")
    parser.add_argument("--gpu-utilisation", type=float, default=0.4, help="assumed share of the bf16 peak")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch
    from omegaconf import OmegaConf
    from torchtune import config as tt_config

    from components.knowtuning.scoring import _batches, encode_response, fact_perplexities, load_model

    records = study_records(args.medquad, args.medquad_test)
    facts = candidate_facts(records)
    cfg = OmegaConf.load(CONFIG)
    cfg.tokenizer.path = str(args.model_dir / "original" / "tokenizer.model")
    tokenizer = tt_config.instantiate(cfg.tokenizer)
    template = cfg.dataset.get("template", "medalpaca")
    lengths = [len(encode_response(tokenizer, template, q, i, f)[0]) for q, i, f in facts]
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in _batches(len(facts), lengths, args.batch_size))

    files = sorted(p.name for p in args.model_dir.glob("*.safetensors"))
    cfg.checkpointer.checkpoint_dir = str(args.model_dir)
    cfg.checkpointer.checkpoint_files = files
    model, tokenizer = load_model(cfg, dtype="bf16")
    timed = facts[: args.timed_facts]
    timed_lengths = lengths[: args.timed_facts]
    timed_padded = sum(
        max(timed_lengths[i] for i in batch) * len(batch) for batch in _batches(len(timed), timed_lengths, args.batch_size)
    )
    start = time.perf_counter()
    with torch.inference_mode():
        fact_perplexities(model, tokenizer, timed, template=template, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    cpu_tokens_per_s = timed_padded / seconds
    gpu_seconds = 2 * PARAMETERS_3B * padded / (H100_BF16_DENSE_TFLOPS * 1e12 * args.gpu_utilisation)
    result = {
        "records": len(records), "facts": len(facts), "fact_tokens": sum(lengths), "padded_tokens": padded,
        "mean_fact_tokens": round(sum(lengths) / len(lengths), 1), "batch_size": args.batch_size,
        "timed_facts": len(timed), "timed_padded_tokens": timed_padded, "timed_seconds": round(seconds, 1),
        "cpu_tokens_per_s": round(cpu_tokens_per_s, 1), "cpu_threads": torch.get_num_threads(),
        "projected_cpu_hours": round(padded / cpu_tokens_per_s / 3600, 1),
        "projected_h100_minutes": round(gpu_seconds / 60, 1), "assumed_gpu_utilisation": args.gpu_utilisation,
    }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
