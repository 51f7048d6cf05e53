"""Reading the chosen option letter out of a generated answer.

The study (medAlpaca's ``eval_usmle.py`` protocol) prompted with ``The Answer to the question
is:`` and took the first character of the generation after stripping leading punctuation, so its
generations read ``C``, ``C<|end_of_text`` or ``C\\nExplanation: ...``. :func:`first_option_letter`
gives the same letter on every such generation and also reads the forms other models and APIs
write: ``C.``, ``C: text``, ``(C)``, ``**C**``, ``Answer: C``, ``The answer is (c)``, ``c``.

Rules, first match wins:

1. The answer starts with a letter that stands alone (not the start of a word, and not a
   word of prose such as "I think ..." or "A patient ..."): ``C``, ``C.``, ``(C)``, ``c)``,
   ``C: text``, ``C<|end_of_text|>``. Lower case counts here only when
   followed by end of text or by ``.``, ``:``, ``)``, ``]`` or a line break, so the article in
   "a 45-year-old man..." is not read as a choice.
2. An explicit statement anywhere: ``answer``/``option``/``choice`` (optionally "to the question",
   "is", "would be", a colon or dash) followed by a standalone letter in either case.
3. The first standalone upper-case letter anywhere in the text.

Only letters in ``letters`` are choices (default ``A``-``I``, the letters the USMLE set uses);
no match gives ``None``, which scores as wrong: every question counts.
"""

import re
from typing import Iterable, Optional

DEFAULT_LETTERS = "ABCDEFGHI"
_SPECIAL_TOKEN = re.compile(r"<\|[^|>]*\|?>?")
_LEAD = r"^[\s\"'*_`>#\-\(\[{]*"
_STATEMENT = (
    r"\b(?:answer|option|choice)\b(?:\s+to\s+the\s+question)?(?:\s+(?:is|would\s+be|:))?"
    r"\s*[:\-=]?\s*[\"'*_`\(\[]*\s*([LETTERS])(?![A-Za-z0-9])"
)


def _letter_class(letters: Iterable[str]) -> str:
    chars = sorted({c.upper() for c in letters if len(c) == 1 and c.isalpha()})
    if not chars:
        raise ValueError(f"no option letters given: {letters!r}")
    return "".join(chars)


def first_option_letter(text: Optional[str], letters: Iterable[str] = DEFAULT_LETTERS) -> Optional[str]:
    """The option letter a generated answer chooses, upper case, or ``None`` if it names none."""
    if not text:
        return None
    upper = _letter_class(letters)
    lower = upper.lower()
    # A stop token may be glued on (``C<|end_of_text|>``): it ends the answer like a space.
    text = _SPECIAL_TOKEN.sub(" ", text)

    start = re.match(_LEAD + rf"([{upper}])(?![A-Za-z0-9])(?![ \t]+[a-z])", text)
    if start:
        return start.group(1)
    start = re.match(_LEAD + rf"([{lower}])(?=$|[.:\)\]]|\s*\n)", text)
    if start:
        return start.group(1).upper()

    statement = re.search(_STATEMENT.replace("LETTERS", upper + lower), text, flags=re.IGNORECASE)
    if statement:
        return statement.group(1).upper()

    anywhere = re.search(rf"(?<![A-Za-z0-9])([{upper}])(?![A-Za-z0-9])", text)
    return anywhere.group(1) if anywhere else None
