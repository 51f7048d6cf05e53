"""Model-free overlap metrics for free-text answers: ROUGE-L F1 and token F1.

- :func:`rouge_l` is ROUGE-L F-measure from Google's ``rouge_score`` package (lm-eval depends
  on it), with its default tokenizer and the Porter stemmer.
- :func:`token_f1` is SQuAD's token F1: lower case, punctuation and the articles a/an/the
  removed, whitespace split, then F1 of the bag-of-tokens overlap. The study's baseline MedQuAD
  generations score about 0.35 on it, against 0.56 BERTScore F1: the study's MedQuAD numbers
  are BERTScore, not token overlap.
"""

import re
import string
from collections import Counter
from functools import lru_cache
from typing import List

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> List[str]:
    return normalize_answer(text).split()


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 of ``prediction`` against ``reference`` (1.0 when both are empty)."""
    pred, ref = answer_tokens(prediction), answer_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (``rouge_score``, stemmed)."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)
