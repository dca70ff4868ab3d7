"""Base adversarial-training objectives (one file each), their per-sample terms, and adversarial weight perturbation.

* :mod:`~.base`: :class:`BaseObjective` (the interface), :class:`ObjectiveOutput`, :class:`LossAdjustment`,
  :func:`combine_terms`;
* :class:`TRADES` (Zhang et al., 2019), :class:`PGDAT` (Madry et al., 2018), :class:`MART` (Wang et al., 2020);
* :class:`AWP` (Wu et al., 2020): a weight perturbation around any of them.

A config chooses the objective by name (``objective: trades``, ``beta`` sets TRADES's and MART's weight) or by
``class_path`` (``objective: {class_path: confspec_lightning.objectives.MART, init_args: {beta: 6.0}}``), a user's
own subclass included.
"""

from __future__ import annotations

from typing import Literal

from confspec_lightning.losses import cross_entropy, kl_divergence
from confspec_lightning.objectives.awp import AWP
from confspec_lightning.objectives.base import BaseObjective, LossAdjustment, ObjectiveOutput, combine_terms
from confspec_lightning.objectives.mart import MART
from confspec_lightning.objectives.pgd_at import PGDAT
from confspec_lightning.objectives.trades import TRADES
from confspec_lightning.validation import check_choice

ObjectiveName = Literal["trades", "pgd_at", "mart"]

#: The names of the 0.1 API.
TRADESObjective = TRADES
PGDATObjective = PGDAT


def build_objective(objective: ObjectiveName | BaseObjective, beta: float = 6.0) -> BaseObjective:
    """The objective called ``objective`` (``beta`` for TRADES and MART), or the given instance."""
    if isinstance(objective, BaseObjective):
        return objective
    check_choice("objective", objective, ObjectiveName)
    if objective == "trades":
        return TRADES(beta=beta)
    if objective == "mart":
        return MART(beta=beta)
    return PGDAT()


__all__ = [
    "AWP",
    "MART",
    "PGDAT",
    "TRADES",
    "BaseObjective",
    "LossAdjustment",
    "ObjectiveName",
    "ObjectiveOutput",
    "PGDATObjective",
    "TRADESObjective",
    "build_objective",
    "combine_terms",
    "cross_entropy",
    "kl_divergence",
]
