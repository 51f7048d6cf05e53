"""Deterministic, rule-based disturbances of an answer's facts (KnowTuning's negatives, offline).

KnowTuning builds three negatives from an answer's atomic facts with an LLM; here every one is
made by rule, from a ``random.Random`` the caller seeds:

- completeness: :func:`delete_facts` drops some facts (never the first, the one that usually
  names the subject);
- factuality: :func:`falsify_facts` turns some facts false with one of the :data:`FALSIFIERS`:
  ``number`` (a different number), ``unit`` (a different unit: days -> weeks, mg -> g, ...),
  ``antonym`` (increase -> decrease, dominant -> recessive, hyper- -> hypo-, ...),
  ``negation`` (is -> is not, cannot -> can, ...) and ``entity`` (a gene, an abbreviation or the
  question's subject swapped for one drawn from *other* answers);
- logicality: :func:`reorder_facts` shuffles the facts into a different order.

Each returns the new fact list and a record of what changed, so a test (or a user) can check
that a negative differs from its positive exactly as its type says.
"""

import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

# --- numbers -------------------------------------------------------------------------------

_NUMBER = re.compile(r"(?<![\w.,/-])(\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?)(?![\w]|,\d{3}|\.\d)")


def _format_int(value: int, like: str) -> str:
    return f"{value:,}" if "," in like else str(value)


def change_number(fact: str, rng: random.Random, context: Mapping[str, Any]) -> Optional[Tuple[str, Dict]]:
    """Replace one number with a different, plausible-looking one: years move by years,
    percentages stay percentages (5 to 95), small counts stay small (2 to 12)."""
    matches = list(_NUMBER.finditer(fact))
    if not matches:
        return None
    match = rng.choice(matches)
    text = match.group(1)
    if "." in text:
        decimals = len(text.split(".")[1])
        value = float(text)
        new_value = value * rng.choice([2.0, 3.0]) if value < 50 else value / rng.choice([2.0, 4.0])
        new = f"{new_value:.{decimals}f}"
        if new == text:
            new = f"{value + 1:.{decimals}f}"
    elif re.match(r"\s*(%|percent\b)", fact[match.end(1) :]) and int(text.replace(",", "")) <= 100:
        value = int(text)
        new = str(rng.choice([v for v in (5, 10, 15, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 95) if v != value]))
    else:
        value = int(text.replace(",", ""))
        if 1800 <= value <= 2100 and "," not in text:  # a year
            new_value = value + rng.choice([-1, 1]) * rng.randint(5, 40)
        elif value < 2:
            new_value = rng.randint(2, 9)
        elif value <= 12:
            new_value = rng.choice([v for v in range(2, 13) if v != value])
        else:
            new_value = rng.choice([value * 2, value * 10, max(2, value // 3)])
            if new_value == value:
                new_value = value * 2
        new = _format_int(new_value, text)
    return fact[: match.start(1)] + new + fact[match.end(1) :], {"from": text, "to": new}


# --- units ---------------------------------------------------------------------------------

UNIT_SWAPS = {
    "seconds": "minutes", "minutes": "hours", "hours": "days", "days": "weeks",
    "weeks": "months", "months": "years", "years": "months", "decades": "years",
    "second": "minute", "minute": "hour", "hour": "day", "day": "week", "week": "month",
    "month": "year", "year": "month", "decade": "year",
    "mg": "g", "g": "mg", "mcg": "mg", "µg": "mg", "kg": "g", "ml": "L", "mL": "L", "L": "mL",
    "mg/dL": "mmol/L", "mmol/L": "mg/dL", "cm": "mm", "mm": "cm", "inches": "feet",
    "feet": "inches", "pounds": "ounces", "ounces": "pounds", "percent": "per thousand",
}
_UNIT = re.compile(
    r"(?<=\d)(\s*|-)(" + "|".join(re.escape(u) for u in sorted(UNIT_SWAPS, key=len, reverse=True)) + r")(?![\w/])"
)
_TIME_WORD = re.compile(r"\b(seconds|minutes|hours|days|weeks|months|years|decades)\b")


def change_unit(fact: str, rng: random.Random, context: Mapping[str, Any]) -> Optional[Tuple[str, Dict]]:
    """Swap a unit after a number (``3 days`` -> ``3 weeks``), else a plural time word."""
    matches = list(_UNIT.finditer(fact)) or list(_TIME_WORD.finditer(fact))
    if not matches:
        return None
    match = rng.choice(matches)
    group = match.lastindex
    unit = match.group(group)
    new = UNIT_SWAPS[unit]
    return fact[: match.start(group)] + new + fact[match.end(group) :], {"from": unit, "to": new}


# --- antonyms ------------------------------------------------------------------------------

_ANTONYM_PAIRS = [
    ("increase", "decrease"), ("increased", "decreased"), ("increases", "decreases"),
    ("increasing", "decreasing"), ("high", "low"), ("higher", "lower"), ("highest", "lowest"),
    ("more", "less"), ("most", "least"), ("common", "rare"), ("commonly", "rarely"),
    ("dominant", "recessive"), ("benign", "malignant"), ("acute", "chronic"),
    ("mild", "severe"), ("milder", "more severe"), ("male", "female"), ("males", "females"),
    ("men", "women"), ("boys", "girls"), ("before", "after"), ("early", "late"),
    ("earlier", "later"), ("upper", "lower"), ("left", "right"), ("always", "never"),
    ("large", "small"), ("larger", "smaller"), ("big", "small"), ("long", "short"),
    ("longer", "shorter"), ("fast", "slow"), ("faster", "slower"), ("children", "adults"),
    ("child", "adult"), ("often", "rarely"), ("gain", "loss"), ("excess", "lack"),
    ("overactive", "underactive"), ("inherited", "acquired"), ("congenital", "acquired"),
    ("internal", "external"), ("inside", "outside"), ("above", "below"), ("first", "last"),
    ("maximum", "minimum"), ("positive", "negative"), ("strong", "weak"), ("stronger", "weaker"),
    ("improve", "worsen"), ("improves", "worsens"), ("improved", "worsened"), ("easy", "hard"),
    ("younger", "older"), ("young", "old"), ("abnormal", "normal"), ("abnormally", "normally"),
    ("slowly", "rapidly"), ("gradually", "suddenly"), ("rarely", "frequently"),
    ("treatable", "untreatable"), ("curable", "incurable"), ("contagious", "not contagious"),
    ("infectious", "non-infectious"), ("hereditary", "sporadic"), ("fatal", "harmless"),
]
ANTONYMS: Dict[str, str] = {}
for _a, _b in _ANTONYM_PAIRS:
    ANTONYMS.setdefault(_a, _b)
    ANTONYMS.setdefault(_b, _a)
_ANTONYM = re.compile(r"\b(" + "|".join(sorted(map(re.escape, ANTONYMS), key=len, reverse=True)) + r")\b", re.IGNORECASE)
_HYPER_HYPO = re.compile(r"\b(hyper|hypo)(?=[a-z]{4,})", re.IGNORECASE)


def _match_case(new: str, old: str) -> str:
    if old.isupper() and len(old) > 1:
        return new.upper()
    if old[:1].isupper():
        return new[:1].upper() + new[1:]
    return new


def flip_antonym(fact: str, rng: random.Random, context: Mapping[str, Any]) -> Optional[Tuple[str, Dict]]:
    """Replace a word by its opposite (``dominant`` -> ``recessive``, ``hyperthyroidism`` -> ``hypothyroidism``)."""
    candidates = [(m, ANTONYMS[m.group(1).lower()]) for m in _ANTONYM.finditer(fact)]
    candidates += [(m, "hypo" if m.group(1).lower() == "hyper" else "hyper") for m in _HYPER_HYPO.finditer(fact)]
    if not candidates:
        return None
    match, new = rng.choice(candidates)
    old = match.group(1)
    new = _match_case(new, old)
    return fact[: match.start(1)] + new + fact[match.end(1) :], {"from": old, "to": new}


# --- negation ------------------------------------------------------------------------------

# (pattern, replacement) applied to one match; removals first so that "is not" becomes "is"
_NEGATIONS = [
    (re.compile(r"\b(is|are|was|were|does|do|did|has|have|will|should|may|might|could|would) not\b"), r"\1"),
    (re.compile(r"\b(Is|Are|Does|Do|Will|May) not\b"), r"\1"),
    (re.compile(r"\bcannot\b"), "can"),
    (re.compile(r"\b(is|are|was|were|does|do|did|has|have)n't\b"), r"\1"),
    (re.compile(r"\bno longer\b"), "still"),
    (re.compile(r"\b(is|are|was|were|will|may|might|should|could|would)\b(?! not\b)"), r"\1 not"),
    (re.compile(r"\bcan\b"), "cannot"),
]


def flip_negation(fact: str, rng: random.Random, context: Mapping[str, Any]) -> Optional[Tuple[str, Dict]]:
    """Negate an affirmative verb (``is`` -> ``is not``, ``can`` -> ``cannot``) or drop a negation."""
    for pattern, replacement in _NEGATIONS:
        matches = list(pattern.finditer(fact))
        if matches:
            match = rng.choice(matches)
            new = match.expand(replacement)
            return fact[: match.start()] + new + fact[match.end() :], {"from": match.group(0), "to": new}
    return None


# --- entities ------------------------------------------------------------------------------

_SYMBOL = re.compile(r"\b([A-Z][A-Z0-9]{1,9}(?:-[A-Z0-9]+)?)\b")
_NOT_ENTITIES = frozenset({"I", "II", "III", "IV", "V", "VI", "OR", "AND", "THE", "A", "NOT", "US"})


def symbols(text: str) -> List[str]:
    """Gene symbols and abbreviations in ``text`` (``UGT1A1``, ``PRKAR1A``, ``MFDM``, ``LDL``)."""
    return [s for s in _SYMBOL.findall(text) if s not in _NOT_ENTITIES and not s.isdigit()]


def _kind(symbol: str) -> str:
    return "gene" if any(c.isdigit() for c in symbol) else "abbreviation"


def swap_entity(fact: str, rng: random.Random, context: Mapping[str, Any]) -> Optional[Tuple[str, Dict]]:
    """Swap the answer's subject, a gene symbol or an abbreviation for one from another answer.

    ``context`` holds ``focus`` (this answer's subject, e.g. "Gilbert syndrome"), ``foci`` (the
    subjects of the other answers) and ``symbols`` (symbols of the other answers).
    """
    candidates: List[Tuple[int, int, str, str]] = []
    focus = (context.get("focus") or "").strip()
    own = {focus.lower()} | {s.lower() for s in context.get("own_symbols", ())}
    if focus and len(focus) >= 3:
        for m in re.finditer(re.escape(focus), fact, re.IGNORECASE):
            others = [f for f in context.get("foci", ()) if f.lower() not in own]
            if others:
                new = rng.choice(others)
                candidates.append((m.start(), m.end(), m.group(0), _match_case(new, m.group(0))))
    pool = [s for s in context.get("symbols", ()) if s.lower() not in own]
    for m in _SYMBOL.finditer(fact):
        symbol = m.group(1)
        if symbol in _NOT_ENTITIES or symbol.isdigit():
            continue
        same_kind = [s for s in pool if _kind(s) == _kind(symbol) and s != symbol]
        if same_kind:
            candidates.append((m.start(1), m.end(1), symbol, rng.choice(same_kind)))
    if not candidates:
        return None
    start, end, old, new = rng.choice(candidates)
    return fact[:start] + new + fact[end:], {"from": old, "to": new}


Falsifier = Callable[[str, random.Random, Mapping[str, Any]], Optional[Tuple[str, Dict]]]

#: The factuality disturbances, by name, in the order they are tried when several apply.
FALSIFIERS: Dict[str, Falsifier] = {
    "number": change_number,
    "unit": change_unit,
    "antonym": flip_antonym,
    "entity": swap_entity,
    "negation": flip_negation,
}


# --- the three negatives -------------------------------------------------------------------


@dataclass
class Disturbance:
    """A negative answer's facts and what was done to the positive's facts to get them."""

    facts: List[str]
    edits: List[Dict[str, Any]] = field(default_factory=list)


def _count(ratio: float, available: int) -> int:
    return max(1, min(available, round(ratio * available)))


def delete_facts(facts: Sequence[str], rng: random.Random, ratio: float = 0.3) -> Optional[Disturbance]:
    """Drop ``round(ratio * (n - 1))`` (at least one) of the facts after the first, keeping order."""
    if len(facts) < 2:
        return None
    eligible = list(range(1, len(facts)))
    drop = sorted(rng.sample(eligible, _count(ratio, len(eligible))))
    kept = [f for i, f in enumerate(facts) if i not in drop]
    return Disturbance(kept, [{"op": "delete", "fact": i, "text": facts[i]} for i in drop])


def falsify_facts(
    facts: Sequence[str],
    rng: random.Random,
    context: Mapping[str, Any],
    ratio: float = 0.3,
    falsifiers: Optional[Mapping[str, Falsifier]] = None,
    rewriter: Optional[Callable[[str, str, Mapping[str, Any]], Optional[str]]] = None,
) -> Optional[Disturbance]:
    """Turn ``round(ratio * n)`` (at least one) facts false, each with one applicable falsifier.

    The falsifier for a fact is drawn at random among those that apply to it; a ``rewriter``, when
    given, is asked first (``rewriter("falsify", fact, context)``) and the rules are the fallback.
    """
    falsifiers = dict(FALSIFIERS if falsifiers is None else falsifiers)
    options: Dict[int, Dict[str, Tuple[str, Dict]]] = {}
    for index, fact in enumerate(facts):
        applicable = {}
        base = rng.random()
        for name, falsify in falsifiers.items():
            # each falsifier draws from its own stream, so one's draws do not shift another's
            result = falsify(fact, random.Random(f"{base}:{name}"), context)
            if result is not None and result[0] != fact:
                applicable[name] = result
        if applicable:
            options[index] = applicable
    eligible = list(range(len(facts))) if rewriter is not None else sorted(options)
    if not eligible:
        return None
    targets = sorted(rng.sample(eligible, min(len(eligible), _count(ratio, len(facts)))))
    new_facts, edits = list(facts), []
    for index in targets:
        rewritten = rewriter("falsify", facts[index], {**context, "fact_index": index}) if rewriter else None
        if rewritten and rewritten.strip() and rewritten.strip() != facts[index]:
            new_facts[index] = rewritten.strip()
            edits.append({"op": "rewriter", "fact": index, "from": facts[index], "to": new_facts[index]})
            continue
        if index not in options:
            continue
        name = rng.choice(sorted(options[index]))
        new_facts[index], detail = options[index][name]
        edits.append({"op": name, "fact": index, **detail})
    if not edits:
        return None
    return Disturbance(new_facts, edits)


def reorder_facts(facts: Sequence[str], rng: random.Random) -> Optional[Disturbance]:
    """Shuffle the facts into an order whose text differs from the original."""
    if len(set(facts)) < 2:
        return None
    order = list(range(len(facts)))
    for _ in range(100):
        rng.shuffle(order)
        if [facts[i] for i in order] != list(facts):
            break
    else:  # pragma: no cover - only with pathological repeats
        return None
    return Disturbance([facts[i] for i in order], [{"op": "reorder", "order": order}])
