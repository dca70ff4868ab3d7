"""Confusional spectral regularisation (CSR; Jin et al., ICLR 2025), as a composable fairness method.

With a base objective whose classification term is ``"ce"`` (method.md section 3):

    L = (1 - alpha) * [ce term] + [other base terms] + alpha * (1/B) sum_k w_k CE(f(x_adv_k), y_k),
    w_k = G[yhat_k, y_k],  G = spectral_direction(C),  yhat_k = argmax f(x_adv_k).

For TRADES this is (1 - alpha) CE(f(x)) + beta KL + alpha w CE(f(x_adv)); for PGD-AT it is
(1 - alpha) CE(f(x_adv)) + alpha w CE(f(x_adv)). The robust confusion matrix C comes from

* ``epoch_pass`` (authors' code): at the start of every epoch, PGD (CE, the training budget) over
  this rank's training data in eval mode, no weight update; G is computed once and kept;
* ``streaming``: C accumulates from the adversarial predictions training already makes during
  epoch e; its G is used in epoch e + 1 (epoch 0 uses G = ones).

C is summed over DDP ranks before the SVD (torchmetrics sum reduction), so every rank uses the same G.
G and C are buffers/persistent metric state: checkpoints carry them and ``fit --ckpt_path`` resumes
with them.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from confspec_lightning import functional as CF
from confspec_lightning.attacks import check_bool, check_choice, check_real, eval_mode
from confspec_lightning.fairness.base import EpochContext, FairnessMethod
from confspec_lightning.functional import MARGINS, Margin
from confspec_lightning.metrics import RobustConfusionMatrix
from confspec_lightning.objectives import LossAdjustment, ObjectiveOutput

ConfusionSource = Literal["epoch_pass", "streaming"]
CONFUSION_SOURCES: tuple[str, ...] = ("epoch_pass", "streaming")


class CSR(FairnessMethod):
    """Confusional spectral regulariser.

    Args:
        alpha: weight of the spectral term, in [0, 1] (code default 0.3).
        gamma: confusion margin in [0, 1) (default 0.0; the paper also uses 0.1).
        margin: ``"relative"`` (authors' code: true logit scaled by 1 - gamma) or ``"additive"``
            (paper: wrong logits raised by gamma).
        confusion_source: ``"epoch_pass"`` (authors' code) or ``"streaming"`` (free; see module doc).
        include_diagonal: correctly classified samples get G[y, y] (code, default) or 0 (paper).
        rescale: rescale G to [0.01, 2.01] (code, default) or use u1 v1^T as it is.
        normalize: normalise C per true class before the SVD (default off = raw counts, as the code).
    """

    name = "csr"

    direction: Tensor

    def __init__(
        self,
        alpha: float = 0.3,
        gamma: float = 0.0,
        margin: Margin = "relative",
        confusion_source: ConfusionSource = "epoch_pass",
        include_diagonal: bool = True,
        rescale: bool = True,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        check_real("csr.alpha", alpha, lambda v: 0.0 <= v <= 1.0, "in [0, 1] (code default 0.3)")
        check_real("csr.gamma", gamma, lambda v: 0.0 <= v < 1.0, "in [0, 1) (default 0.0)")
        for name, flag in (
            ("csr.include_diagonal", include_diagonal),
            ("csr.rescale", rescale),
            ("csr.normalize", normalize),
        ):
            check_bool(name, flag)
        check_choice("csr.margin", margin, MARGINS)
        check_choice("csr.confusion_source", confusion_source, CONFUSION_SOURCES)
        self.alpha = alpha
        self.gamma = gamma
        self.margin = margin
        self.confusion_source = confusion_source
        self.include_diagonal = include_diagonal
        self.rescale = rescale
        self.normalize = normalize

    def bind(self, num_classes: int, model: nn.Module | None = None) -> None:
        """Allocate G (ones) and the confusion accumulator for ``num_classes`` classes."""
        super().bind(num_classes, model)
        self.register_buffer("direction", torch.ones(num_classes, num_classes, dtype=torch.float32))
        self.confusion = RobustConfusionMatrix(num_classes, gamma=self.gamma, margin=self.margin)
        self.confusion.persistent(True)

    def on_train_epoch_start(self, context: EpochContext) -> dict[str, Tensor]:
        """Recompute G: from an attack pass over the training data, or from last epoch's stream."""
        if self.confusion_source == "epoch_pass":
            self.confusion.reset()
            for x, y in context.train_batches():
                self.confusion.update(self._attacked_logits(context, x, y), y)
        errors, counts = self.confusion.synced_state()
        if int(counts.sum()) == 0:  # nothing accumulated yet (streaming, epoch 0): keep G
            return {}
        confusion = CF.confusion_from_counts(errors, counts, normalize=self.normalize)
        self.direction.copy_(CF.spectral_direction(confusion, rescale=self.rescale))
        if self.confusion_source == "streaming":
            self.confusion.reset()  # start this epoch's stream; epoch_pass keeps the C that made G
        rates = CF.confusion_from_counts(errors, counts, normalize=True)
        return {
            "csr/train_confusion_spectral_norm": CF.spectral_norm(rates),
            "csr/train_robust_acc_worst": CF.classwise_accuracy(errors, counts).nan_to_num(1.0).min(),
        }

    @staticmethod
    def _attacked_logits(context: EpochContext, x: Tensor, y: Tensor) -> Tensor:
        x_adv = context.attack.perturb(context.model, x, y, "ce")
        # no graph needed; safe under autocast: this pass has its own autocast context, so the cast-weight
        # cache it fills is dropped before the training step's forwards
        with torch.no_grad(), eval_mode(context.model):
            return context.model(x_adv)

    def loss_adjustment(self, output: ObjectiveOutput, target: Tensor) -> LossAdjustment:
        """(1 - alpha) on the ce term, plus alpha (1/B) sum_k w_k CE(f(x_adv_k), y_k)."""
        weights = CF.csr_weights(self.direction, output.adv_logits, target, self.include_diagonal)
        return LossAdjustment(
            term_weights={"ce": 1.0 - self.alpha},
            extra_terms={"csr": self.alpha * (weights * output.adv_ce).mean()},
        )

    def on_train_batch_end(self, output: ObjectiveOutput, target: Tensor) -> None:
        """Streaming source: add the batch's adversarial predictions to C (device only, no sync)."""
        if self.confusion_source == "streaming":
            self.confusion.update(output.adv_logits.detach(), target)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, gamma={self.gamma}, margin={self.margin!r}, "
            f"confusion_source={self.confusion_source!r}, include_diagonal={self.include_diagonal}, "
            f"rescale={self.rescale}, normalize={self.normalize}"
        )
