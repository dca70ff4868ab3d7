"""Evaluation building blocks: AutoAttack predictions, per-class reports and comparison tables.

* :func:`autoattack_predictions` - the model's predictions on AutoAttack's adversarial examples.
* :class:`EvaluationReport` - per-class accuracy, average, worst, spread and ||C||_2 of every attack,
  written as JSON, Markdown and PNG figures.
* :func:`compare_reports` - one Markdown table comparing several reports (``confspec-compare``).
"""

from confspec_lightning.evaluation.autoattack import AUTOATTACK_ATTACKS, autoattack_predictions
from confspec_lightning.evaluation.compare import compare_reports
from confspec_lightning.evaluation.report import AttackResult, Divergence, EvaluationReport

__all__ = [
    "AUTOATTACK_ATTACKS",
    "AttackResult",
    "Divergence",
    "EvaluationReport",
    "autoattack_predictions",
    "compare_reports",
]
