"""Distance-aware fair adversarial training (DAFA; Lee et al., ICLR 2024).

Plain base training for ``warmup_epochs``; during the last warm-up epoch the mean softmax of the
training-step adversarial predictions is recorded per true class, P[i, j] = mean over class-i samples of
p_j(x_adv) (summed over DDP ranks). At its end the class weights are computed once and frozen:

    W_i = 1 + lambda * sum_{j != i} ( P[i, j] P[j, j]   if P[i, i] < P[j, j]   (class i is the harder one)
                                     -P[j, i] P[i, i]   otherwise ),

so a class takes margin from the easier classes it is confused with (lambda = 1.0 for CIFAR-10, 1.5 for
CIFAR-100). W is clamped below at ``min_weight`` (a warning says so). After the warm-up the training attack
uses the per-sample budget W[y] eps, step W[y] step, and the loss reweights only the natural CE:

    (1/B) sum_i W[y_i] CE(f(x_i), y_i) + beta (1/B) sum_i KL(p(x_i) || p(x_adv_i)).

``warmup_epochs: 0`` (fine-tuning) takes the statistics from one pass over the training set with the
starting model before the first epoch (the objective's training attack, eval mode, no weight update): not the
paper's schedule, which has no pretrained model. P, W and whether W is frozen are in the checkpoint.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from confspec_lightning.attacks import AttackConfig, eval_mode
from confspec_lightning.fairness.base import EpochContext, FairnessMethod
from confspec_lightning.metrics import ClassProbabilityMatrix
from confspec_lightning.objectives import LossAdjustment, ObjectiveOutput
from confspec_lightning.validation import check_int, check_real


def dafa_weights(probabilities: Tensor, lam: float = 1.0) -> Tensor:
    """W (K,) float64 from P (K, K), rows = true class (the module docstring's formula, before the clamp)."""
    p = probabilities.to(torch.float64)
    diag = p.diagonal()
    harder = diag[:, None] < diag[None, :]  # [i, j]: class i is harder than class j
    gain = p * diag[None, :]  # P[i, j] P[j, j]
    loss = p.t() * diag[:, None]  # P[j, i] P[i, i]
    terms = torch.where(harder, gain, -loss)
    terms.fill_diagonal_(0.0)
    return 1.0 + lam * terms.sum(dim=1)


class DAFA(FairnessMethod):
    """DAFA class weights for the attack budget and the natural CE (see the module docstring).

    Args:
        warmup_epochs: epochs of plain training; the statistics come from the last of them (paper: 70 of 110;
            0 = one statistics pass before the first epoch, for fine-tuning).
        lam: lambda of the weight update (1.0 for CIFAR-10, 1.5 for CIFAR-100).
        min_weight: lower clamp of W (> 0): a class weight must stay positive.
    """

    name = "dafa"
    required_terms = ("kl",)

    weights: Tensor
    frozen: Tensor

    def __init__(self, warmup_epochs: int = 70, lam: float = 1.0, min_weight: float = 0.1) -> None:
        super().__init__()
        check_int("dafa.warmup_epochs", warmup_epochs, 0)
        check_real("dafa.lam", lam, lambda v: v >= 0, ">= 0 (paper: 1.0 for CIFAR-10, 1.5 for CIFAR-100)")
        check_real("dafa.min_weight", min_weight, lambda v: v > 0, "> 0 (default 0.1)")
        self.warmup_epochs = warmup_epochs
        self.lam = lam
        self.min_weight = min_weight
        self._recording = False
        self._active = False  # = frozen, kept on the host (no device read per step)

    def bind(self, num_classes: int, model: nn.Module | None = None) -> None:
        """W (ones until computed), the frozen flag and the class-probability accumulator."""
        super().bind(num_classes, model)
        self.register_buffer("weights", torch.ones(num_classes, dtype=torch.float64))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        self.probabilities = ClassProbabilityMatrix(num_classes)
        self.probabilities.persistent(True)

    def on_train_epoch_start(self, context: EpochContext) -> dict[str, Tensor]:
        """Start recording in the last warm-up epoch (or run the fine-tuning statistics pass)."""
        frozen = self._active = bool(self.frozen)
        self._recording = not frozen and context.epoch == self.warmup_epochs - 1
        if not frozen and self.warmup_epochs == 0:
            self.probabilities.reset()
            for x, y in context.train_batches():
                x_adv = context.adversarial(x, y)
                with torch.no_grad(), eval_mode(context.model):
                    self.probabilities.update(context.model(x_adv), y)
            return self._freeze()
        return {"dafa/active": torch.tensor(float(frozen))}

    def _freeze(self) -> dict[str, Tensor]:
        """Compute W from the recorded P (summed over ranks), clamp it, freeze it."""
        probabilities = self.probabilities.compute()  # a collective under DDP
        weights = dafa_weights(probabilities, self.lam)
        if bool((weights < self.min_weight).any()):
            low = ", ".join(f"class {c}: {float(weights[c]):.3f}" for c in torch.nonzero(weights < self.min_weight))
            warnings.warn(
                f"dafa: class weights below dafa.min_weight={self.min_weight} were clamped to it ({low}); "
                "a lower dafa.lam keeps them positive.",
                stacklevel=2,
            )
        self.weights.copy_(weights.clamp_min(self.min_weight))
        self.frozen.fill_(True)
        self.probabilities.reset()
        self._recording = False
        self._active = True
        return {"dafa/active": torch.tensor(1.0), "dafa/weight_max": self.weights.max()}

    def on_train_batch_end(self, output: ObjectiveOutput, target: Tensor) -> None:
        """In the last warm-up epoch: add the batch's adversarial softmax to P (device only, no sync)."""
        if self._recording:
            self.probabilities.update(output.adv_logits.detach(), target)

    def on_train_epoch_end(self, context: EpochContext) -> dict[str, Tensor]:
        """At the end of the last warm-up epoch: compute and freeze W."""
        if not self._active and self.warmup_epochs > 0 and context.epoch == self.warmup_epochs - 1:
            return self._freeze()
        return {}

    @property
    def sets_attack_budget(self) -> bool:
        return True

    def attack_budget(self, target: Tensor, attack: AttackConfig) -> tuple[Tensor | None, Tensor | None]:
        """After the warm-up: eps W[y] and step W[y] per sample."""
        if not self._active:
            return None, None
        scale = self.weights.float()[target]
        return scale * attack.eps, scale * attack.step

    def loss_adjustment(self, output: ObjectiveOutput, target: Tensor) -> LossAdjustment:
        """After the warm-up: W[y_i] on the natural CE term only."""
        if not self._active:
            return LossAdjustment()
        return LossAdjustment(term_weights={"ce": self.weights.float()[target]})

    def classwise_state(self) -> dict[str, Tensor]:
        return {"weight": self.weights.float()}

    def extra_repr(self) -> str:
        return f"warmup_epochs={self.warmup_epochs}, lam={self.lam}, min_weight={self.min_weight}"
