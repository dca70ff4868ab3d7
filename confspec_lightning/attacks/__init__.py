"""Attacks in plain torch: threat models, PGD with its objectives, and the evaluation attacks of ``confspec test``.

* :mod:`~.context`: :func:`eval_mode`, :func:`grad_enabled` (the contexts every attack runs in);
* :mod:`~.config`: :class:`AttackConfig` (norm, eps, step, steps, random start);
* :mod:`~.losses`: what PGD maximises (``ce``, ``cw``, ``trades_kl``; one class each);
* :mod:`~.pgd`: :func:`pgd`;
* :mod:`~.base`: the evaluation :class:`Attack` interface, :class:`PGD` and :class:`CW`;
* :mod:`~.autoattack`: :class:`AutoAttack` (pyautoattack, imported on first use).
"""

from confspec_lightning.attacks.autoattack import AutoAttack, autoattack_predictions
from confspec_lightning.attacks.base import CW, PGD, Attack
from confspec_lightning.attacks.config import AttackConfig, EvalAttackConfig, TrainAttackConfig
from confspec_lightning.attacks.context import Norm, eval_mode, grad_enabled
from confspec_lightning.attacks.losses import ATTACK_LOSSES, AttackLoss, AttackObjective, attack_loss
from confspec_lightning.attacks.pgd import attack_objective_value, pgd

__all__ = [
    "ATTACK_LOSSES",
    "CW",
    "PGD",
    "Attack",
    "AttackConfig",
    "AttackLoss",
    "AttackObjective",
    "AutoAttack",
    "EvalAttackConfig",
    "Norm",
    "TrainAttackConfig",
    "attack_loss",
    "attack_objective_value",
    "autoattack_predictions",
    "eval_mode",
    "grad_enabled",
    "pgd",
]
