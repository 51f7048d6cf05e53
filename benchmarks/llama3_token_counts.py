"""Real Llama 3 tokens per training row (medAlpaca template, prompt included) and how many rows
the study's 256-token limit truncates, through the 3B config's own tokenizer and dataset sections.

    python benchmarks/llama3_token_counts.py [--small ../shared/data/medical_meadow_small.json]

Prints one JSON line per source: the shipped sample mix (components/data/sample/medical_meadow)
and, if given, a Medical Meadow JSON file.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import OmegaConf
from torchtune import config

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from components.models.llama3_vocab import llama3_tokenizer_model  # noqa: E402

CONFIG = REPO / "configs" / "llama3_2_3B" / "full_sft.yaml"
SAMPLE = REPO / "components" / "data" / "sample" / "medical_meadow"
DROP = object()  # an override that removes the config's key


def build(dataset_overrides: Dict[str, Any], max_seq_len: Optional[int]):
    """The config's tokenizer (real Llama 3 file, ``max_seq_len`` as given) and dataset section
    with ``dataset_overrides``, no holdout split (every row counted)."""
    cfg = OmegaConf.load(CONFIG)
    cfg.tokenizer.path = llama3_tokenizer_model()
    cfg.tokenizer.max_seq_len = max_seq_len
    cfg.dataset.holdout_fraction = None
    for key, value in dataset_overrides.items():
        if value is DROP:
            del cfg.dataset[key]
        else:
            cfg.dataset[key] = value
    tokenizer = config.instantiate(cfg.tokenizer)
    return config.instantiate(cfg.dataset, tokenizer)


def counts(name: str, dataset_overrides: Dict[str, Any]) -> Dict[str, Any]:
    """Token statistics of the untruncated rows, and what the study's 256 keeps of them."""
    full = build(dataset_overrides, None)
    lengths = sorted(len(full[i]["tokens"]) for i in range(len(full)))
    return {
        "source": name,
        "rows": len(lengths),
        "tokens": sum(lengths),
        "mean": round(statistics.mean(lengths), 1),
        "median": statistics.median(lengths),
        "p90": lengths[int(0.9 * (len(lengths) - 1))],
        "max": lengths[-1],
        "over_256": sum(n > 256 for n in lengths),
        "tokens_at_256": sum(min(n, 256) for n in lengths),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=Path, help="a Medical Meadow JSON file, e.g. ../shared/data/medical_meadow_small.json")
    args = parser.parse_args(argv)
    print(json.dumps(counts("sample mix (8 sets)", {"data_dir": str(SAMPLE)})))
    if args.small is not None:
        if not args.small.is_file():
            parser.error(f"{args.small}: no such file")
        overrides = {
            "_component_": "components.data.medical_meadow_dataset",
            "source": "json",
            "data_files": str(args.small),
            "sets": DROP,
        }
        print(json.dumps(counts(args.small.name, overrides)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
