"""Stage 1 data, fine-grained knowledge augmentation (KA).

KnowTuning splits each gold answer into atomic facts, scores every fact by its perplexity under
the model given the question, and turns the hardest ones (highest perplexity) into extra QA
records; stage 1 fine-tunes on the original records plus these. KnowTuning has an LLM rewrite
each hard fact into a question and an answer; offline, medtune keeps the fact as the answer and
asks for it with a fixed instruction built from the question (:data:`FACT_INSTRUCTION`), unless a
``rewriter`` is given (``rewriter("question", fact, context)`` and ``rewriter("answer", fact,
context)``; None falls back to the rule).

Output rows are ``{instruction, input, output}`` (what every medtune SFT builder reads) plus
``kind`` (``original`` or ``fact``), ``item``, and for facts ``fact_index`` and ``perplexity``.
"""

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from components.knowtuning.facts import Splitter, split_facts
from components.knowtuning.kc import Rewriter, _summary, question_focus

#: ``items -> perplexities``; each item is ``(instruction, input, fact)``.
Scorer = Callable[[Sequence[Tuple[str, str, str]]], List[float]]

FACT_INSTRUCTION = "{instruction} State one specific fact."


def build_ka_records(
    records: Sequence[Mapping[str, Any]],
    scorer: Scorer,
    *,
    top_fraction: float = 0.5,
    include_original: bool = True,
    fact_instruction: str = FACT_INSTRUCTION,
    min_fact_words: int = 3,
    splitter: Splitter = split_facts,
    rewriter: Optional[Rewriter] = None,
) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """The KA records of ``records`` and a report.

    Args:
        records: ``{instruction, input, output}`` mappings.
        scorer: perplexity of each ``(instruction, input, fact)``, e.g.
            ``functools.partial(fact_perplexities, model, tokenizer, template=...)``; it gets all
            facts of all records in one call (it batches them itself).
        top_fraction: share of each answer's facts kept as hard facts, rounded up (at least one).
            Default 0.5.
        include_original: also write the original records (KnowTuning trains on both). Default True.
        fact_instruction: instruction of a fact record; ``{instruction}``, ``{input}`` and
            ``{focus}`` are filled in. Default :data:`FACT_INSTRUCTION`.
        min_fact_words: facts shorter than this (in words) are not candidates. Default 3.
        splitter: answer -> facts. Default :func:`~components.knowtuning.facts.split_facts`.
        rewriter: optional :data:`~components.knowtuning.kc.Rewriter` for the question and answer
            of each fact record.
    """
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    candidates: List[Tuple[int, int, str]] = []
    facts_per_item = []
    for index, record in enumerate(records):
        facts = splitter(record["output"])
        facts_per_item.append(len(facts))
        for fact_index, fact in enumerate(facts):
            text = fact[2:] if fact.startswith("- ") else fact
            if len(text.split()) >= min_fact_words:
                candidates.append((index, fact_index, text))
    scores = scorer([(records[i]["instruction"], records[i].get("input") or "", text) for i, _, text in candidates])
    if len(scores) != len(candidates):
        raise ValueError(f"scorer returned {len(scores)} scores for {len(candidates)} facts")
    per_item: Dict[int, List[Tuple[float, int, str]]] = {}
    for (index, fact_index, text), score in zip(candidates, scores):
        per_item.setdefault(index, []).append((score, fact_index, text))

    rows: List[Dict[str, Any]] = []
    chosen_ppl, all_ppl = [], [s for s in scores if not math.isnan(s)]
    for index, record in enumerate(records):
        instruction, inp = record["instruction"], record.get("input") or ""
        if include_original:
            rows.append({"instruction": instruction, "input": inp, "output": record["output"], "kind": "original", "item": index})
        scored = per_item.get(index, [])
        # highest perplexity first; unscorable (nan) facts last; ties by position
        scored.sort(key=lambda s: (math.isnan(s[0]), -s[0] if not math.isnan(s[0]) else 0.0, s[1]))
        keep = scored[: math.ceil(top_fraction * len(scored))]
        focus = record.get("focus") or question_focus(instruction) or instruction
        for score, fact_index, text in sorted(keep, key=lambda s: s[1]):
            context = {"question": instruction, "input": inp, "focus": focus, "answer": record["output"], "fact_index": fact_index}
            question = (rewriter("question", text, context) if rewriter else None) or fact_instruction.format(
                instruction=instruction, input=inp, focus=focus
            )
            answer = (rewriter("answer", text, context) if rewriter else None) or text
            rows.append(
                {
                    "instruction": question.strip(),
                    "input": inp if "{input}" not in fact_instruction else "",
                    "output": answer.strip(),
                    "kind": "fact",
                    "item": index,
                    "fact_index": fact_index,
                    "perplexity": round(score, 4) if not math.isnan(score) else None,
                }
            )
            if not math.isnan(score):
                chosen_ppl.append(score)
    report = {
        "items": len(records),
        "facts_per_item": _summary(facts_per_item),
        "candidate_facts": len(candidates),
        "hard_facts": sum(r["kind"] == "fact" for r in rows),
        "original_records": sum(r["kind"] == "original" for r in rows),
        "rows": len(rows),
        "top_fraction": top_fraction,
        "perplexity_all": _summary([round(s, 3) for s in all_ppl]),
        "perplexity_kept": _summary([round(s, 3) for s in chosen_ppl]),
    }
    return rows, report
