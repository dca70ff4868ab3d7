"""The interface every fairness method (CSR, and the baselines) implements.

A method is a small ``nn.Module`` whose per-class state lives in buffers (so checkpoints carry it)
and which acts on training through a few hooks, all optional:

* :meth:`FairnessMethod.on_train_epoch_start` - refresh per-class state before an epoch (CSR's G,
  FRL's multipliers from the validation split, CFA's class-wise budgets);
* :meth:`FairnessMethod.attack_budget` - per-sample eps/step for the training attack;
* :meth:`FairnessMethod.loss_adjustment` - per-term weights and extra loss terms for the batch;
* :meth:`FairnessMethod.on_train_batch_end` - accumulate statistics from the batch;
* :meth:`FairnessMethod.on_train_epoch_end` - after an epoch's training, before its validation
  (WAT's cumulative validation losses, CFA's weight averaging);
* :meth:`FairnessMethod.evaluation_weights` - weights that validation/test/predict use instead of the
  trained ones (CFA's averaged model);
* :meth:`FairnessMethod.classwise_state` - per-class vectors to log (weights, eps multipliers).

``RobustFairLitModule`` calls them in that order; methods stack (weights multiply, terms add). Every
statistic a method uses is summed over DDP ranks first (:mod:`confspec_lightning.fairness.statistics`),
so all ranks hold the same state, equal to a single process's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import Tensor, nn

from confspec_lightning.attacks import Attack, AttackConfig, AttackObjective
from confspec_lightning.metrics import RobustConfusionMatrix
from confspec_lightning.objectives import BaseObjective, LossAdjustment, ObjectiveOutput


@dataclass
class EpochContext:
    """What a method may use at the start or end of a training epoch.

    Attributes:
        model: the network (pixels in [0, 1] -> logits), normalisation included.
        train_batches: returns a fresh iterable over this rank's training batches (augmented), on device
            and under the trainer's precision context.
        validation_batches: the same over this rank's share of the validation split (no augmentation, no
            padding: the shares of all ranks partition the split).
        attack: the training threat model (norm, eps, step, steps).
        training_attack: the training attack (an :class:`~confspec_lightning.attacks.Attack`; see
            :meth:`adversarial`).
        objective: the base objective (its attack loss and per-sample loss terms).
        epoch: the epoch about to start (``on_train_epoch_start``) or just trained (``on_train_epoch_end``).
        train_confusion: the training robust confusion (hard counts, no margin) of the adversarial predictions the
            training steps made, accumulated once per step by the module for every method: at an epoch's start it
            holds the previous epoch's (read it with ``synced_state()``, a collective: sums over DDP ranks).
    """

    model: nn.Module
    train_batches: Callable[[], Iterable[tuple[Tensor, Tensor]]]
    validation_batches: Callable[[], Iterable[tuple[Tensor, Tensor]]]
    attack: AttackConfig
    training_attack: Attack
    objective: BaseObjective
    epoch: int
    train_confusion: RobustConfusionMatrix | None = None

    def adversarial(self, x: Tensor, target: Tensor, loss: AttackObjective | None = None) -> Tensor:
        """The training attack on (x, target) with the training threat model, without per-sample budgets.

        ``loss``: the attack loss (default: the objective's); the methods' passes measure the model as training
        attacks it.
        """
        return self.training_attack.perturb(
            self.model, x, target, threat=self.attack, loss=loss or self.objective.attack_loss
        )


class FairnessMethod(nn.Module):
    """Base class of fairness methods; subclasses override the hooks they need.

    ``bind(num_classes, model)`` is called once by the LightningModule before training so that methods
    can be configured without repeating the class count; allocate per-class buffers there.

    Attributes:
        name: prefix of the method's logged values.
        required_terms: loss terms the base objective must have (e.g. ``("kl",)`` for TRADES-only methods).
    """

    name: str = "method"
    required_terms: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.num_classes: int | None = None

    def bind(self, num_classes: int, model: nn.Module | None = None) -> None:
        """Allocate per-class state for ``num_classes`` classes (``model``: the network to be trained)."""
        self.num_classes = num_classes

    def on_train_epoch_start(self, context: EpochContext) -> dict[str, Tensor]:
        """Refresh per-class state before the epoch; returns scalars to log (name -> value)."""
        return {}

    @property
    def sets_attack_budget(self) -> bool:
        """Whether :meth:`attack_budget` may set per-sample budgets (two such methods cannot be stacked)."""
        return False

    def attack_budget(self, target: Tensor, attack: AttackConfig) -> tuple[Tensor | None, Tensor | None]:
        """Per-sample (eps, step) for the training attack, or None to keep the configured ones."""
        return None, None

    def loss_adjustment(self, output: ObjectiveOutput, target: Tensor) -> LossAdjustment:
        """Per-term weights and extra terms for this batch."""
        return LossAdjustment()

    def on_train_batch_end(self, output: ObjectiveOutput, target: Tensor) -> None:
        """Accumulate statistics of the batch (detached)."""

    def on_train_epoch_end(self, context: EpochContext) -> dict[str, Tensor]:
        """Update state after the epoch's training (before its validation); returns scalars to log."""
        return {}

    def evaluation_weights(self) -> dict[str, Tensor] | None:
        """A state dict of the network that evaluation should use instead of the trained weights, or None."""
        return None

    def classwise_state(self) -> dict[str, Tensor]:
        """Per-class (K,) vectors of the method's current state, to log (name -> values)."""
        return {}
