"""Worst-class adversarial training (WAT; Li & Liu, 2023): exponential weights on validation losses.

After every epoch (docs/explanation/method.md §7), the base objective's per-sample loss (TRADES: CE + beta KL,
with its own attack; PGD-AT: CE on PGD) is averaged per class on the validation split, plus one
"average" entry over all samples; these K + 1 numbers are added to a cumulative vector C_v. Weights

    w = K softmax(eta C_v)        (K + 1 entries, eta = 0.1)

and the loss is (1/B) sum_i w[y_i] l_i + w[K] (1/B) sum_i l_i: every base term gets the per-sample
weight w[y_i] + w[K]. Statistics are summed over DDP ranks; C_v is a float64 buffer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from confspec_lightning.fairness.base import EpochContext, FairnessMethod
from confspec_lightning.fairness.statistics import classwise_objective_loss
from confspec_lightning.objectives import LossAdjustment, ObjectiveOutput
from confspec_lightning.validation import check_real


def wat_weights(cumulative_loss: Tensor, eta: float = 0.1) -> Tensor:
    """Weights w = K softmax(eta C_v) over the K + 1 entries (the last one is the average entry).

    Computed stably: eta (C_v - max C_v) <= 0, so huge cumulative losses (or a huge eta) cannot overflow.
    """
    num_classes = cumulative_loss.numel() - 1
    shifted = cumulative_loss.to(torch.float64)
    shifted = shifted - shifted.max()
    if eta == 0:  # uniform (0 * -inf would be NaN where the shift overflowed)
        return torch.full_like(shifted, num_classes / shifted.numel())
    return num_classes * torch.softmax(eta * shifted, dim=0)


def wat_loss_vector(loss_sum: Tensor, counts: Tensor) -> Tensor:
    """Per-class mean loss (0 for a class without samples) followed by the mean over all samples."""
    per_class = torch.where(counts > 0, loss_sum / counts.clamp(min=1), 0.0)
    return torch.cat([per_class, (loss_sum.sum() / counts.sum().clamp(min=1))[None]])


class WAT(FairnessMethod):
    """WAT exponential class weights from cumulative validation losses (see the module docstring).

    Args:
        eta: learning rate of the exponential weights (0.1).
    """

    name = "wat"

    cumulative_loss: Tensor

    def __init__(self, eta: float = 0.1) -> None:
        super().__init__()
        check_real("wat.eta", eta, lambda v: v >= 0, ">= 0 (paper: 0.1)")
        self.eta = eta

    def bind(self, num_classes: int, model: nn.Module | None = None) -> None:
        """C_v: K + 1 cumulative validation losses (float64, zeros: uniform weights)."""
        super().bind(num_classes, model)
        self.register_buffer("cumulative_loss", torch.zeros(num_classes + 1, dtype=torch.float64))

    def weights(self) -> Tensor:
        """The weights w (K + 1,), float64."""
        return wat_weights(self.cumulative_loss, self.eta)

    def on_train_epoch_end(self, context: EpochContext) -> dict[str, Tensor]:
        """Add this epoch's per-class validation losses to C_v."""
        loss_sum, counts = classwise_objective_loss(
            context.model, context.validation_batches(), context.objective, self.num_classes, context.adversarial
        )
        losses = wat_loss_vector(loss_sum, counts)
        if not bool(torch.isfinite(losses).all()):  # once per epoch: C_v would carry NaN/inf forever
            bad = [i for i in range(self.num_classes + 1) if not math.isfinite(float(losses[i]))]
            names = ", ".join("average" if i == self.num_classes else f"class {i}" for i in bad)
            raise FloatingPointError(
                f"wat: the validation loss of {names} is not finite ({float(losses[bad[0]])}) after epoch "
                f"{context.epoch}, so the class weights cannot be updated; the model diverged: lower the learning "
                "rate, use precision bf16-mixed instead of 16-mixed, or enable gradient clipping."
            )
        self.cumulative_loss += losses
        return {"wat/val_loss_worst": losses[:-1].max(), "wat/weight_average_entry": self.weights()[-1]}

    def loss_adjustment(self, output: ObjectiveOutput, target: Tensor) -> LossAdjustment:
        """w[y_i] + w[K] on every base term."""
        w = self.weights().float()
        per_sample = w[target] + w[-1]
        return LossAdjustment(term_weights={role: per_sample for role in output.terms})

    def classwise_state(self) -> dict[str, Tensor]:
        return {"weight": self.weights()[:-1].float()}

    def extra_repr(self) -> str:
        return f"eta={self.eta}"
