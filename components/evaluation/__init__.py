"""Evaluation: lm-eval tasks' logic (USMLE, MedQuAD), scoring, uncertainty, replay, the CLI.

- :mod:`~components.evaluation.parsing`: the option letter of a generated answer.
- :mod:`~components.evaluation.stats`: standard error and bootstrap interval of an accuracy.
- :mod:`~components.evaluation.text_metrics`: ROUGE-L and token F1.
- :mod:`~components.evaluation.bertscore`: BERTScore with an offline model choice.
- :mod:`~components.evaluation.usmle`, :mod:`~components.evaluation.medquad`: the task code
  that ``evals/tasks/*/utils.py`` exposes to lm-eval.
- :mod:`~components.evaluation.replay`: the ``replay`` lm-eval model (stored generations).
- :mod:`~components.evaluation.runner`: run tasks, summarise, write results and samples.
- :mod:`~components.evaluation.cli`: ``medtune eval`` and ``medtune score``.
"""

from components.evaluation.parsing import first_option_letter
from components.evaluation.stats import bootstrap_interval, mean_stderr, summarize

__all__ = ["bootstrap_interval", "first_option_letter", "mean_stderr", "summarize"]
