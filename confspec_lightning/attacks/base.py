"""Attacks: one interface for training, validation and test, chosen by ``class_path`` like fairness methods.

An :class:`Attack` makes adversarial batches (:meth:`Attack.perturb`: the training attack, the validation attack,
the fairness methods' passes) and gives the model's predictions on them (:meth:`Attack.predictions`: what
``confspec test`` runs on every test batch; a point AutoAttack does not break keeps its clean prediction). Its
:meth:`Attack.key` names its column in reports (``pgd20``, ``cw20``, ``autoattack``). The threat model (norm, eps,
step, steps) is the module's ``train_attack`` or ``eval_attack`` unless the attack sets its own. A new attack (APGD,
FAB, ...) is one file with a subclass and one config line::

    test_attacks:
      - class_path: confspec_lightning.attacks.PGD
      - class_path: my_package.MyAttack
        init_args: {...}
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import ClassVar

import torch
from torch import Tensor, nn

from confspec_lightning.attacks.config import AttackConfig
from confspec_lightning.attacks.context import eval_mode
from confspec_lightning.attacks.losses import AttackLoss, AttackObjective, attack_loss
from confspec_lightning.attacks.noise import RandomSource
from confspec_lightning.validation import check_int


class Attack:
    """Base class of attacks: one interface for training, validation and test.

    :meth:`perturb` makes the adversarial batch (training, validation, the methods' passes, predict);
    :meth:`predictions` gives the model's predictions on it (``confspec test``), which an attack that only reports
    predictions (AutoAttack) overrides instead.

    Attributes:
        name: the report column's prefix (``key`` adds the step count where it has one).
    """

    name: ClassVar[str] = "attack"

    def key(self, threat: AttackConfig) -> str:
        """The attack's column in reports."""
        return self.name

    def perturb(
        self,
        model: nn.Module,
        x: Tensor,
        target: Tensor,
        *,
        threat: AttackConfig,
        loss: AttackObjective | AttackLoss | None = None,
        eps: float | Tensor | None = None,
        step: float | Tensor | None = None,
        generator: RandomSource = None,
    ) -> Tensor:
        """The adversarial batch (detached, in [0, 1], within the budget).

        Args:
            model: maps [0, 1] images to logits (attacked in eval mode).
            x: clean batch in [0, 1].
            target: labels.
            threat: the threat model (norm, eps, step, steps, random start): ``train_attack`` or ``eval_attack``.
            loss: what to maximise (the attack's own when None; training passes the objective's).
            eps: per-sample budgets (B,) overriding ``threat.eps`` (fairness methods' budgets).
            step: per-sample step sizes (B,) overriding ``threat.step``.
            generator: the random starts' source: the evaluation's :class:`~.noise.SampleNoise` (each sample's noise
                keyed by its index in the split: the same whatever the batch or process), a generator, or None.
        """
        raise NotImplementedError(
            f"{type(self).__name__} reports predictions only (confspec test); it cannot make a training or "
            "validation batch: use PGD or CW there."
        )

    def predictions(
        self,
        model: nn.Module,
        x: Tensor,
        target: Tensor,
        *,
        threat: AttackConfig,
        generator: RandomSource = None,
        seed: int = 0,
        progress: Callable[[str], None] | None = None,
    ) -> Tensor:
        """Predictions (B,) of ``model`` (eval mode) on the adversarial examples of ``(x, target)``.

        Args:
            model: maps [0, 1] images to logits (evaluated in eval mode).
            x: clean batch in [0, 1].
            target: labels.
            threat: the module's ``eval_attack`` (norm, eps, step, steps).
            generator: as in :meth:`perturb`.
            seed: a seed for attacks that seed themselves (AutoAttack).
            progress: called with progress messages, for attacks that take long.
        """
        x_adv = self.perturb(model, x, target, threat=threat, generator=generator)
        with torch.no_grad(), eval_mode(model):
            return model(x_adv).argmax(dim=1)


class PGD(Attack):
    """PGD (Madry et al., 2018) on ``objective`` (``ce``: CE, the default) with the threat model's budget.

    Args:
        steps: iterations overriding the threat model's (e.g. a PGD-50 test beside the PGD-20 validation).
    """

    name = "pgd"
    objective: ClassVar[AttackObjective] = "ce"

    def __init__(self, steps: int | None = None) -> None:
        if steps is not None:
            check_int(f"{self.name}.steps", steps, 1)
        self.steps = steps
        attack_loss(self.objective)

    def _threat(self, threat: AttackConfig) -> AttackConfig:
        return threat if self.steps is None else replace(threat, steps=self.steps)

    def key(self, threat: AttackConfig) -> str:
        return f"{self.name}{self._threat(threat).steps}"

    def perturb(
        self,
        model: nn.Module,
        x: Tensor,
        target: Tensor,
        *,
        threat: AttackConfig,
        loss: AttackObjective | AttackLoss | None = None,
        eps: float | Tensor | None = None,
        step: float | Tensor | None = None,
        generator: RandomSource = None,
    ) -> Tensor:
        return self._threat(threat).perturb(
            model, x, target, loss or self.objective, eps=eps, step=step, generator=generator
        )

    def adversarial(
        self, model: nn.Module, x: Tensor, target: Tensor, *, threat: AttackConfig, generator: RandomSource
    ) -> Tensor:
        """The adversarial batch on the attack's own loss (as :meth:`perturb`)."""
        return self.perturb(model, x, target, threat=threat, generator=generator)


class CW(PGD):
    """PGD on the Carlini-Wagner margin max_{j != y} z_j - z_y ("CW-20" with a 20-step threat model)."""

    name = "cw"
    objective = "cw"
