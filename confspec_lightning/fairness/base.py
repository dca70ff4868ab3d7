"""The interface every fairness method (CSR, and the baselines) implements.

A method is a small ``nn.Module`` whose per-class state lives in buffers (so checkpoints carry it)
and which acts on training through a few hooks, all optional:

* :meth:`FairnessMethod.on_train_epoch_start` - refresh per-class state (e.g. CSR's direction G);
* :meth:`FairnessMethod.attack_budget` - per-sample eps/step for the training attack;
* :meth:`FairnessMethod.loss_adjustment` - per-term weights and extra loss terms for the batch;
* :meth:`FairnessMethod.on_train_batch_end` - accumulate statistics from the batch.

``RobustFairLitModule`` calls them in that order; methods stack (weights multiply, terms add).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import Tensor, nn

from confspec_lightning.attacks import AttackConfig
from confspec_lightning.objectives import LossAdjustment, ObjectiveOutput


@dataclass
class EpochContext:
    """What a method may use at the start of a training epoch.

    Attributes:
        model: the network (pixels in [0, 1] -> logits), normalisation included.
        train_batches: returns a fresh iterable over this rank's training batches, already on device
            and under the trainer's precision context.
        attack: the training threat model (norm, eps, step, steps).
        epoch: the epoch about to start (0-based).
    """

    model: nn.Module
    train_batches: Callable[[], Iterable[tuple[Tensor, Tensor]]]
    attack: AttackConfig
    epoch: int


class FairnessMethod(nn.Module):
    """Base class of fairness methods; subclasses override the hooks they need.

    ``bind(num_classes)`` is called once by the LightningModule before training so that methods can
    be configured without repeating the class count; allocate per-class buffers there.
    """

    name: str = "method"

    def __init__(self) -> None:
        super().__init__()
        self.num_classes: int | None = None

    def bind(self, num_classes: int) -> None:
        """Allocate per-class state for ``num_classes`` classes."""
        self.num_classes = num_classes

    def on_train_epoch_start(self, context: EpochContext) -> dict[str, Tensor]:
        """Refresh per-class state before the epoch; returns scalars to log (name -> value)."""
        return {}

    def attack_budget(self, target: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Per-sample (eps, step) for the training attack, or None to keep the configured ones."""
        return None, None

    def loss_adjustment(self, output: ObjectiveOutput, target: Tensor) -> LossAdjustment:
        """Per-term weights and extra terms for this batch."""
        return LossAdjustment()

    def on_train_batch_end(self, output: ObjectiveOutput, target: Tensor) -> None:
        """Accumulate statistics of the batch (detached)."""
