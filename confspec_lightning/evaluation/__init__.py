"""Evaluation: the module's evaluator component, the one per-class result type, reports and comparisons.

* :class:`Evaluator` - validation, test and predict of :class:`~confspec_lightning.RobustFairLitModule`, and
  the publishing of their results (a Lightning callback the module returns from ``configure_callbacks``).
* :class:`ClasswiseResult` - the accuracy of every class under one attack (or clean), average, worst,
  spread, overall, and the robust confusion matrix with what CSR targets.
* :class:`EvaluationReport` - the results of one split under several attacks: table, JSON, Markdown, PNG.
* :func:`compare_reports` - one Markdown table comparing several reports (``confspec-compare``).
"""

from confspec_lightning.classwise import ClasswiseResult, summarize
from confspec_lightning.evaluation.compare import compare_reports
from confspec_lightning.evaluation.evaluator import Evaluator
from confspec_lightning.evaluation.report import Divergence, EvaluationReport, format_mean_std

__all__ = [
    "ClasswiseResult",
    "Divergence",
    "EvaluationReport",
    "Evaluator",
    "compare_reports",
    "format_mean_std",
    "summarize",
]
