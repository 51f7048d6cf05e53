"""Uncertainty of an accuracy: its standard error and a percentile bootstrap interval.

With about 120 questions per USMLE step, one question is 0.8 points of accuracy and the
standard error is about 0.045: the study's differences between methods (0.39 vs 0.42) sit well
inside a 95% interval. Every accuracy medtune reports carries both numbers.

The bootstrap resamples the per-question scores with replacement (``resamples`` times, fixed
``seed``, so a report is reproducible) and takes the 2.5th and 97.5th percentiles of the
resampled means. The standard error is the sample standard deviation over sqrt(n), the same
formula lm-eval uses for ``acc_stderr``.
"""

import math
from typing import Dict, Sequence, Tuple

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 1234
CONFIDENCE = 0.95


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean (sample std with n-1, over sqrt(n)); NaN below two values."""
    n = len(values)
    if n < 2:
        return float("nan")
    return float(np.std(np.asarray(values, dtype=float), ddof=1) / math.sqrt(n))


def bootstrap_interval(
    values: Sequence[float],
    confidence: float = CONFIDENCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``; (NaN, NaN) when empty."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    # Chunks keep memory at a few MB whatever the size of the set.
    chunk = max(1, 2_000_000 // x.size)
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        idx = rng.integers(0, x.size, size=(stop - start, x.size))
        means[start:stop] = x[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def ci95_low(values: Sequence[float]) -> float:
    """Lower end of the 95% bootstrap interval (an lm-eval aggregation)."""
    return bootstrap_interval(list(values))[0]


def ci95_high(values: Sequence[float]) -> float:
    """Upper end of the 95% bootstrap interval (an lm-eval aggregation)."""
    return bootstrap_interval(list(values))[1]


def summarize(values: Sequence[float]) -> Dict[str, float]:
    """``{n, correct, acc, stderr, ci95_low, ci95_high}`` for per-question 0/1 (or fractional) scores."""
    low, high = bootstrap_interval(values)
    n = len(values)
    return {
        "n": n,
        "correct": float(sum(values)),
        "acc": float(np.mean(values)) if n else float("nan"),
        "stderr": mean_stderr(values),
        "ci95_low": low,
        "ci95_high": high,
    }
