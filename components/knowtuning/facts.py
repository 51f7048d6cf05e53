"""Splitting an answer into atomic knowledge statements ("facts"), deterministically.

KnowTuning asks an LLM to list an answer's atomic facts. Offline, medtune splits by rule:

1. Paragraphs and bullet items: MedQuAD answers hold bulleted lists written as runs of spaces or
   a newline before ``- ``; each bullet item is its own fact and keeps its ``- `` prefix.
2. Sentences: a ``.``, ``!`` or ``?`` (optionally followed by a closing quote or bracket) and
   whitespace, then a capital letter, digit, quote or bracket starts a new fact, unless the
   period ends a known abbreviation (``e.g.``, ``Dr.``, ``U.S.``, ...) or a single initial.
3. Clauses joined by ``;`` are separate facts.
4. An answer that is still a single fact is split once more before a clause connective
   (``, which``, ``, and``, ``because``, ``while``, ...) so that every answer of two or more
   clauses can be reordered and shortened.

Whitespace inside a fact is collapsed to single spaces, so ``join_facts(split_facts(a))`` is
``a`` with its whitespace normalised; the KC builder writes exactly that text as the chosen
answer, so chosen and rejected differ only by the disturbance, never by spacing.

A different splitter (e.g. an LLM prompt) can be passed to the builders as any callable
``str -> List[str]``.
"""

import re
from typing import Callable, List

Splitter = Callable[[str], List[str]]

# Abbreviations whose period does not end a sentence (compared case-insensitively, without the
# final period).
ABBREVIATIONS = frozenset(
    """e.g i.e etc vs dr mr mrs ms st no nos fig figs approx al jr sr inc co ltd
    u.s u.k ph.d m.d b.c a.m p.m ca cf resp dept est min max vol""".split()
)

_BULLET_BREAK = re.compile(r"(?:\n\s*|\s{2,})-\s+")
_PARAGRAPH_BREAK = re.compile(r"\s*\n\s*\n\s*|\n")
# a sentence end: terminal punctuation, optional closers, whitespace, then an opener
_SENTENCE_END = re.compile(r"([.!?][\"')\]]*)\s+(?=[A-Z0-9\"'(\[])")
_LAST_WORD = re.compile(r"(\S+)$")
_CONNECTIVE = re.compile(
    r"(?:,\s+(?=(?:which|and|but|while|although|whereas|so|since|because|as|when|where)\s)"
    r"|\s+(?=(?:because|although|whereas|while)\s))"
)
MIN_CLAUSE_WORDS = 4


def normalize_space(text: str) -> str:
    """``text`` with every run of whitespace made one space, stripped."""
    return " ".join(text.split())


def _ends_with_abbreviation(text: str) -> bool:
    match = _LAST_WORD.search(text)
    if not match:
        return False
    word = match.group(1).lstrip("(\"'").lower()
    if word in ABBREVIATIONS:
        return True
    return len(word) == 1 and word.isalpha()  # an initial, as in "A. Smith"


def split_sentences(text: str) -> List[str]:
    """Sentences of one paragraph (whitespace already normalised)."""
    sentences: List[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        if match.group(1).startswith(".") and _ends_with_abbreviation(text[start : match.start(1)]):
            continue
        sentences.append(text[start : match.end(1)].strip())
        start = match.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return [s for s in sentences if s]


def _split_clauses(sentence: str) -> List[str]:
    parts = [p.strip() for p in sentence.split("; ")]
    # keep a clause split only where every part is a statement of a few words
    if len(parts) > 1 and all(len(p.split()) >= 3 for p in parts):
        return [p if i == len(parts) - 1 else p + ";" for i, p in enumerate(parts)]
    return [sentence]


def _split_at_connectives(sentence: str) -> List[str]:
    """Split a sentence before clause connectives, where both sides keep a few words."""
    parts, start = [], 0
    for match in _CONNECTIVE.finditer(sentence):
        head, rest = sentence[start : match.start()], sentence[match.end() :]
        if len(head.split()) >= MIN_CLAUSE_WORDS and len(rest.split()) >= MIN_CLAUSE_WORDS:
            parts.append(sentence[start : match.end()].strip())
            start = match.end()
    parts.append(sentence[start:].strip())
    return [p for p in parts if p]


def split_facts(answer: str) -> List[str]:
    """The atomic facts of ``answer``, in order (see the module docstring for the rules)."""
    facts: List[str] = []
    for paragraph in _PARAGRAPH_BREAK.split(answer.strip()):
        pieces = _BULLET_BREAK.split(paragraph)
        for index, piece in enumerate(pieces):
            piece = normalize_space(piece)
            if not piece:
                continue
            if index > 0:  # a bullet item: one fact, marked as such
                facts.append("- " + piece)
                continue
            for sentence in split_sentences(piece):
                facts.extend(_split_clauses(sentence))
    if len(facts) == 1:
        facts = _split_at_connectives(facts[0])
    return facts


def join_facts(facts: List[str]) -> str:
    """The answer text of a list of facts: one space between facts."""
    return " ".join(f.strip() for f in facts if f.strip())
