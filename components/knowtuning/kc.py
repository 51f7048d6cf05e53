"""Stage 2 data, coarse-grained knowledge comparison (KC): preference pairs in torchtune's format.

For each ``{instruction, input, output}`` record the answer is split into facts
(:func:`~components.knowtuning.facts.split_facts`) and three negatives are made by rule
(:mod:`components.knowtuning.disturb`): ``completeness`` (facts deleted), ``factuality`` (facts
made false) and ``logicality`` (facts reordered). Each negative pairs with the positive; one
pair per line of JSON Lines, in the layout torchtune's ``preference_dataset`` reads::

    {"chosen":   [{"role": "user", "content": Q}, {"role": "assistant", "content": A}],
     "rejected": [{"role": "user", "content": Q}, {"role": "assistant", "content": A'}],
     "type": "factuality", "item": 12, "instruction": ..., "input": ...,
     "chosen_facts": [...], "rejected_facts": [...], "edits": [...]}

The chosen answer is the facts joined back (the original with its whitespace normalised), so
chosen and rejected are made the same way and differ only by the disturbance. The extra keys say
what the disturbance was; torchtune ignores them.

Determinism: each (record, negative type) draws from ``random.Random(f"{seed}:{index}:{type}")``,
so the same input and seed give the same file, byte for byte.

Length shortcut: a model must not be able to tell rejected from chosen by length alone.
:func:`length_stats` reports, per negative type and overall, the mean lengths, how often the
rejected answer is shorter / equal / longer, and the accuracy of the best length-only rule.
"""

import json
import random
import re
from collections import Counter
from pathlib import Path
from statistics import mean, median
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from components.knowtuning.disturb import (
    FALSIFIERS,
    delete_facts,
    falsify_facts,
    reorder_facts,
    symbols,
)
from components.knowtuning.facts import Splitter, join_facts, split_facts

NEGATIVE_TYPES = ("completeness", "factuality", "logicality")

#: ``rewriter(task, text, context) -> Optional[str]``; tasks: ``"falsify"`` (a fact -> a false
#: fact), ``"revise"`` (an answer's text -> the same facts, rephrased; applied to chosen and
#: rejected alike), and in stage 1 ``"question"``/``"answer"``. None or the same text falls back
#: to the rules.
Rewriter = Callable[[str, str, Mapping[str, Any]], Optional[str]]

_FOCUS_PATTERNS = [
    re.compile(r"^\s*what (?:is|are) \(are\) (?P<focus>.+?)\s*\?*\s*$", re.IGNORECASE),
    re.compile(r"^\s*do you have information about (?P<focus>.+?)\s*\??\s*$", re.IGNORECASE),
    re.compile(
        r"^\s*(?:what|how|who|which)\b.*?\b(?:of|for|about|with|to|by|from) (?P<focus>[^?]+?)\s*\?*\s*$",
        re.IGNORECASE,
    ),
    re.compile(r"^\s*(?:what|who) (?:is|are) (?P<focus>[^?]+?)\s*\?*\s*$", re.IGNORECASE),
]


def question_focus(question: str) -> Optional[str]:
    """The subject of a question: ``What is (are) Gilbert syndrome ?`` -> ``Gilbert syndrome``."""
    for pattern in _FOCUS_PATTERNS:
        match = pattern.match(question)
        if match:
            focus = match.group("focus").strip(" .?")
            focus = re.sub(r"^(?:the|a|an) ", "", focus, flags=re.IGNORECASE)
            return focus or None
    return None


def user_text(record: Mapping[str, Any]) -> str:
    """The user turn of a record: the instruction, then the input after a blank line."""
    instruction, inp = record["instruction"], record.get("input") or ""
    return f"{instruction}\n\n{inp}" if inp else instruction


def _messages(prompt: str, answer: str) -> List[Dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def build_kc_pairs(
    records: Sequence[Mapping[str, Any]],
    *,
    seed: int = 42,
    types: Sequence[str] = NEGATIVE_TYPES,
    delete_ratio: float = 0.3,
    falsify_ratio: float = 0.3,
    splitter: Splitter = split_facts,
    rewriter: Optional[Rewriter] = None,
    falsifiers: Optional[Sequence[str]] = None,
) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Preference pairs (see the module docstring) and a report of what was built and skipped.

    Args:
        records: ``{instruction, input, output}`` mappings (a ``focus`` key, as MedQuAD records
            have, names the subject; otherwise it is read from the question).
        seed: seed of every random choice. Default 42.
        types: which negatives to make. Default all three.
        delete_ratio: fraction of the facts after the first that a completeness negative drops
            (at least one). Default 0.3.
        falsify_ratio: fraction of the facts a factuality negative changes (at least one).
            Default 0.3.
        splitter: answer -> facts. Default :func:`~components.knowtuning.facts.split_facts`.
        rewriter: optional :data:`Rewriter` (e.g. a local model) for falsifying and revising.
        falsifiers: names of the rule falsifiers to use (default all of
            :data:`~components.knowtuning.disturb.FALSIFIERS`).

    Returns:
        ``(pairs, report)``; the report counts pairs per type, the falsifiers used, the items
        that could not yield a type (with the reason), and :func:`length_stats`.
    """
    unknown = set(types) - set(NEGATIVE_TYPES)
    if unknown:
        raise ValueError(f"unknown negative type(s) {sorted(unknown)}; expected {NEGATIVE_TYPES}")
    chosen_falsifiers = dict(FALSIFIERS)
    if falsifiers is not None:
        missing = set(falsifiers) - set(FALSIFIERS)
        if missing:
            raise ValueError(f"unknown falsifier(s) {sorted(missing)}; expected {sorted(FALSIFIERS)}")
        chosen_falsifiers = {name: FALSIFIERS[name] for name in falsifiers}

    facts_per_item = [splitter(r["output"]) for r in records]
    foci = [r.get("focus") or question_focus(r["instruction"]) for r in records]
    item_symbols = [sorted(set(symbols(r["output"]))) for r in records]
    all_foci = sorted({f for f in foci if f})
    all_symbols = sorted({s for group in item_symbols for s in group})

    pairs: List[Dict[str, Any]] = []
    skipped: List[Dict[str, Any]] = []
    ops: Counter = Counter()
    for index, (record, facts) in enumerate(zip(records, facts_per_item)):
        prompt = user_text(record)
        chosen_text = join_facts(facts)
        context = {
            "question": prompt,
            "focus": foci[index],
            "foci": [f for f in all_foci if f != foci[index]],
            "own_symbols": item_symbols[index],
            "symbols": [s for s in all_symbols if s not in item_symbols[index]],
        }
        for kind in types:
            rng = random.Random(f"{seed}:{index}:{kind}")
            if kind == "completeness":
                negative = delete_facts(facts, rng, delete_ratio)
            elif kind == "factuality":
                negative = falsify_facts(facts, rng, context, falsify_ratio, chosen_falsifiers, rewriter)
            else:
                negative = reorder_facts(facts, rng)
            if negative is None:
                skipped.append({"item": index, "type": kind, "facts": len(facts), "reason": _why(kind, facts)})
                continue
            chosen, rejected = chosen_text, join_facts(negative.facts)
            if rewriter is not None:
                chosen = _revise(rewriter, chosen, context) or chosen
                rejected = _revise(rewriter, rejected, context) or rejected
            if rejected == chosen:
                skipped.append({"item": index, "type": kind, "facts": len(facts), "reason": "negative equals the answer"})
                continue
            ops.update(edit["op"] for edit in negative.edits)
            pairs.append(
                {
                    "id": f"{index}-{kind}",
                    "item": index,
                    "type": kind,
                    "instruction": record["instruction"],
                    "input": record.get("input") or "",
                    "chosen": _messages(prompt, chosen),
                    "rejected": _messages(prompt, rejected),
                    "chosen_facts": list(facts),
                    "rejected_facts": negative.facts,
                    "edits": negative.edits,
                }
            )
    report = {
        "items": len(records),
        "seed": seed,
        "pairs": len(pairs),
        "pairs_per_type": {kind: sum(p["type"] == kind for p in pairs) for kind in types},
        "facts_per_item": _summary([len(f) for f in facts_per_item]),
        "edits": dict(sorted(ops.items())),
        "skipped": skipped,
        "length": length_stats(pairs),
    }
    return pairs, report


def _why(kind: str, facts: Sequence[str]) -> str:
    if kind in ("completeness", "logicality") and len(facts) < 2:
        return f"{len(facts)} fact(s): nothing to {'delete' if kind == 'completeness' else 'reorder'}"
    if kind == "logicality":
        return "all facts are the same text"
    return "no falsifier applies to any fact"


def _revise(rewriter: Rewriter, text: str, context: Mapping[str, Any]) -> Optional[str]:
    revised = rewriter("revise", text, context)
    return revised.strip() if revised and revised.strip() else None


def _summary(values: Sequence[float]) -> Dict[str, float]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "mean": round(mean(values), 2), "median": median(values), "min": min(values), "max": max(values)}


def answer_text(messages: Sequence[Mapping[str, str]]) -> str:
    """The last assistant turn of a message list."""
    return [m["content"] for m in messages if m["role"] == "assistant"][-1]


def length_stats(pairs: Iterable[Mapping[str, Any]], unit: str = "words") -> Dict[str, Any]:
    """Chosen vs rejected answer lengths, per negative type and over all pairs.

    For each group: mean chosen and rejected length (in ``unit``: ``"words"`` or ``"chars"``),
    the mean and median of rejected/chosen, the share of pairs whose rejected answer is shorter,
    equal or longer, and ``length_only_accuracy``: how often the better of the two rules
    "the shorter answer is rejected" / "the longer answer is rejected" is right (a tie counts
    half). 0.5 means length says nothing; 1.0 means length alone separates the pairs.
    """
    measure = (lambda t: len(t.split())) if unit == "words" else len
    groups: Dict[str, List[Tuple[int, int]]] = {}
    for pair in pairs:
        lengths = (measure(answer_text(pair["chosen"])), measure(answer_text(pair["rejected"])))
        groups.setdefault(pair.get("type", "all"), []).append(lengths)
        if pair.get("type") is not None:
            groups.setdefault("all", []).append(lengths)
    stats = {}
    for name, lengths in groups.items():
        n = len(lengths)
        shorter = sum(r < c for c, r in lengths) / n
        equal = sum(r == c for c, r in lengths) / n
        longer = sum(r > c for c, r in lengths) / n
        ratios = [r / c for c, r in lengths if c]
        stats[name] = {
            "pairs": n,
            "unit": unit,
            "chosen_mean": round(mean(c for c, _ in lengths), 2),
            "rejected_mean": round(mean(r for _, r in lengths), 2),
            "ratio_mean": round(mean(ratios), 4) if ratios else None,
            "ratio_median": round(median(ratios), 4) if ratios else None,
            "rejected_shorter": round(shorter, 4),
            "rejected_equal": round(equal, 4),
            "rejected_longer": round(longer, 4),
            "length_only_accuracy": round(max(shorter, longer) + equal / 2, 4),
        }
    if "all" in stats:
        stats["all"] = stats.pop("all")
    return stats


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: Union[str, Path]) -> int:
    """Write rows as JSON Lines (UTF-8, keys in insertion order); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count
