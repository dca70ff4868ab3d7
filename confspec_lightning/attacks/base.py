"""Evaluation attacks: what ``confspec test`` runs on every test batch, chosen by ``class_path`` like fairness methods.

An :class:`Attack` maps a model and a batch to the model's predictions on its adversarial examples (a point it
does not break keeps its clean prediction where the attack says so, as AutoAttack does). Its :meth:`Attack.key`
names its column in reports (``pgd20``, ``cw20``, ``autoattack``). The threat model (norm, eps, step, steps)
is the module's ``eval_attack`` unless the attack sets its own. A new attack (APGD, FAB, ...) is one file with a
subclass and one config line::

    test_attacks:
      - class_path: confspec_lightning.attacks.PGD
      - class_path: my_package.MyAttack
        init_args: {...}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from torch import Tensor, nn

from confspec_lightning.attacks.config import AttackConfig
from confspec_lightning.attacks.losses import AttackObjective, attack_loss
from confspec_lightning.attacks.noise import RandomSource
from confspec_lightning.validation import check_int


class Attack:
    """Base class of evaluation attacks.

    Attributes:
        name: the report column's prefix (``key`` adds the step count where it has one).
    """

    name: ClassVar[str] = "attack"

    def key(self, threat: AttackConfig) -> str:
        """The attack's column in reports."""
        return self.name

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
        """Predictions (B,) of ``model`` on the adversarial examples of ``(x, target)``.

        Args:
            model: maps [0, 1] images to logits (evaluated in eval mode).
            x: clean batch in [0, 1].
            target: labels.
            threat: the module's ``eval_attack`` (norm, eps, step, steps).
            generator: the random starts' source: the evaluation's :class:`~.noise.SampleNoise` (each sample's noise
                keyed by its index in the split: the same whatever the batch or process), or a generator.
            seed: a seed for attacks that seed themselves (AutoAttack).
            progress: called with progress messages, for attacks that take long.
        """
        raise NotImplementedError


class PGD(Attack):
    """PGD on ``objective`` (``ce``: CE, the default) with the threat model's budget; ``steps`` overrides its steps."""

    name = "pgd"
    objective: ClassVar[AttackObjective] = "ce"

    def __init__(self, steps: int | None = None) -> None:
        if steps is not None:
            check_int(f"{self.name}.steps", steps, 1)
        self.steps = steps
        attack_loss(self.objective)

    def _threat(self, threat: AttackConfig) -> AttackConfig:
        if self.steps is None:
            return threat
        from dataclasses import replace

        return replace(threat, steps=self.steps)

    def key(self, threat: AttackConfig) -> str:
        return f"{self.name}{self._threat(threat).steps}"

    def adversarial(
        self, model: nn.Module, x: Tensor, target: Tensor, *, threat: AttackConfig, generator: RandomSource
    ) -> Tensor:
        """The adversarial batch (detached)."""
        return self._threat(threat).perturb(model, x, target, self.objective, generator=generator)

    def predictions(self, model, x, target, *, threat, generator=None, seed=0, progress=None) -> Tensor:
        return model(self.adversarial(model, x, target, threat=threat, generator=generator)).argmax(dim=1)


class CW(PGD):
    """PGD on the Carlini-Wagner margin max_{j != y} z_j - z_y ("CW-20" with a 20-step threat model)."""

    name = "cw"
    objective = "cw"
