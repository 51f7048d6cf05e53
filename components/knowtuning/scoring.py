"""Log-probabilities of answers under a torchtune model: fact perplexities (stage 1) and
preference margins (checking stage 2).

Both score a response given its prompt, tokenized exactly as training tokenizes it (the same
template through :func:`components.data.templates.model_transform_for`), in padded batches
sorted by length, under ``torch.no_grad``.
"""

import math
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torchtune import config as tt_config
from torchtune import training
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from components.data.templates import InstructToMessages, model_transform_for


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence ``(sum, number of tokens)`` of the labels' log-probabilities.

    ``labels[:, t]`` is predicted from position ``t - 1`` (torchtune's convention: labels are the
    input ids with ignored positions set to ``CROSS_ENTROPY_IGNORE_IDX``).
    """
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :].float()
    mask = labels != CROSS_ENTROPY_IGNORE_IDX
    labels[~mask] = 0
    logps = torch.gather(logits.log_softmax(-1), 2, labels.unsqueeze(2)).squeeze(2)
    return (logps * mask).sum(-1), mask.sum(-1)


def _batches(n: int, lengths: Sequence[int], batch_size: int) -> Iterable[List[int]]:
    order = sorted(range(n), key=lambda i: lengths[i], reverse=True)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


@torch.no_grad()
def sequence_log_probs(
    model: nn.Module,
    examples: Sequence[Tuple[List[int], List[int]]],
    *,
    pad_id: int = 0,
    batch_size: int = 8,
    device: Union[str, torch.device] = "cpu",
) -> List[Tuple[float, int]]:
    """``(sum of log-probs, token count)`` of each ``(tokens, labels)`` example, in input order."""
    results: List[Optional[Tuple[float, int]]] = [None] * len(examples)
    model.eval()
    for batch in _batches(len(examples), [len(t) for t, _ in examples], batch_size):
        tokens = pad_sequence([torch.tensor(examples[i][0]) for i in batch], batch_first=True, padding_value=pad_id)
        labels = pad_sequence(
            [torch.tensor(examples[i][1]) for i in batch], batch_first=True, padding_value=CROSS_ENTROPY_IGNORE_IDX
        )
        logits = model(tokens.to(device))
        sums, counts = token_log_probs(logits, labels.to(device))
        for row, i in enumerate(batch):
            results[i] = (float(sums[row]), int(counts[row]))
    return results  # type: ignore[return-value]


def encode_response(
    tokenizer: ModelTokenizer,
    template: str,
    instruction: str,
    input: str,
    response: str,
    *,
    add_end_tokens: bool = False,
) -> Tuple[List[int], List[int]]:
    """``(tokens, labels)`` of ``response`` after the prompt, labels on the response only."""
    messages = InstructToMessages(template=template, train_on_input=False)(
        {"instruction": instruction, "input": input, "output": response}
    )["messages"]
    tokens, mask = model_transform_for(template, tokenizer).tokenize_messages(messages, add_end_tokens=add_end_tokens)
    labels = [CROSS_ENTROPY_IGNORE_IDX if m else t for t, m in zip(tokens, mask)]
    return tokens, labels


def fact_perplexities(
    model: nn.Module,
    tokenizer: ModelTokenizer,
    items: Sequence[Tuple[str, str, str]],
    *,
    template: str = "medalpaca",
    batch_size: int = 8,
    device: Union[str, torch.device] = "cpu",
) -> List[float]:
    """Perplexity of each fact given its question: ``exp(-mean log p(fact tokens | prompt))``.

    ``items`` are ``(instruction, input, fact)``; a fact truncated away entirely scores ``nan``.
    """
    examples = [encode_response(tokenizer, template, q, i, fact) for q, i, fact in items]
    scores = sequence_log_probs(model, examples, pad_id=tokenizer.pad_id, batch_size=batch_size, device=device)
    return [math.exp(-total / count) if count else float("nan") for total, count in scores]


# --- loading a model the way a config describes it -------------------------------------------


def load_config(path: Union[str, Path], overrides: Sequence[str] = ()) -> DictConfig:
    """A torchtune YAML config with ``key=value`` overrides applied and interpolations resolved."""
    cfg = OmegaConf.load(path)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    OmegaConf.resolve(cfg)
    return cfg


def load_model(
    cfg: DictConfig,
    *,
    checkpoint_dir: Optional[Union[str, Path]] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: str = "fp32",
) -> Tuple[nn.Module, ModelTokenizer]:
    """The config's model (LoRA adapters, if any, left at their identity init) with the weights
    its checkpointer reads, and its tokenizer.

    ``checkpoint_dir``, when given, replaces the config's checkpointer by torchtune's
    ``FullModelHFCheckpointer`` over that Hugging Face directory (every ``*.safetensors`` in it,
    ``model_type`` from the config's checkpointer or ``LLAMA3_2``): the way to score a stage-1 or
    stage-2 output.
    """
    device = torch.device(device)
    with tempfile.TemporaryDirectory(prefix="medtune-knowtuning-") as scratch:
        if checkpoint_dir is not None:
            files = sorted(p.name for p in Path(checkpoint_dir).glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors in {checkpoint_dir}")
            checkpointer = training.FullModelHFCheckpointer(
                checkpoint_dir=str(checkpoint_dir),
                checkpoint_files=files,
                model_type=cfg.checkpointer.get("model_type", "LLAMA3_2"),
                output_dir=scratch,
            )
        else:
            checkpointer = tt_config.instantiate(cfg.checkpointer, output_dir=scratch)
        state = checkpointer.load_checkpoint()[training.MODEL_KEY]
    with training.set_default_dtype(training.get_dtype(dtype, device=device)), device:
        model = tt_config.instantiate(cfg.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "lora" not in k and "magnitude" not in k]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tokenizer = tt_config.instantiate(cfg.tokenizer)
    return model.eval(), tokenizer


def preference_log_probs(
    model: nn.Module,
    tokenizer: ModelTokenizer,
    pairs: Sequence[Mapping[str, Any]],
    *,
    template: str = "medalpaca",
    batch_size: int = 8,
    device: Union[str, torch.device] = "cpu",
) -> List[Tuple[float, float]]:
    """``(log p(chosen), log p(rejected))`` of each pair, tokenized as stage 2 trains on it
    (the answer and its end token, given the prompt)."""
    from components.knowtuning.datasets import KCMessages

    transform = KCMessages(template=template)
    text_tokenizer = model_transform_for(template, tokenizer)
    examples = []
    for pair in pairs:
        messages = transform(pair)
        for side in ("chosen", "rejected"):
            tokens, mask = text_tokenizer.tokenize_messages(messages[side])
            examples.append((tokens, [CROSS_ENTROPY_IGNORE_IDX if m else t for t, m in zip(tokens, mask)]))
    scores = sequence_log_probs(model, examples, pad_id=tokenizer.pad_id, batch_size=batch_size, device=device)
    return [(scores[2 * i][0], scores[2 * i + 1][0]) for i in range(len(pairs))]


def margin_report(pairs: Sequence[Mapping[str, Any]], logps: Sequence[Tuple[float, float]]) -> Dict[str, Dict[str, float]]:
    """Mean ``log p(chosen) - log p(rejected)`` and the share of pairs with a positive margin,
    per negative type and over all pairs."""
    groups: Dict[str, List[float]] = {}
    for pair, (chosen, rejected) in zip(pairs, logps):
        groups.setdefault(pair.get("type", "all"), []).append(chosen - rejected)
        if "type" in pair:
            groups.setdefault("all", []).append(chosen - rejected)
    if "all" in groups:
        groups["all"] = groups.pop("all")  # last
    return {
        name: {
            "pairs": len(margins),
            "mean_margin": sum(margins) / len(margins),
            "chosen_preferred": sum(m > 0 for m in margins) / len(margins),
        }
        for name, margins in groups.items()
    }
