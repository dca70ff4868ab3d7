"""Fair Robust Learning (FRL; Xu et al., ICML 2021): reweight (RW) and reweight + remargin (RWRM).

Before every epoch, on the validation split (docs/explanation/method.md §7), per class c:
clean error e_nat[c] and boundary error e_bndy[c] = clean acc[c] - PGD-20 acc[c]; violations
g = e - mean(e) - tau. Multipliers (all 0 at the start):

    lam_nat  <- P(lam_nat  + r_nat  g_nat),   lam_bndy <- P(lam_bndy + r_bndy g_bndy)
    P(l) = max(l, 0), scaled down so that sum(l) <= 0.5;   rates halve every 40 epochs
    w[c] = 1/K + lam[c] - mean(lam)
    RWRM: lam_mrg <- lam_mrg + r_mrg g_bndy, eps_c = eps * clamp(exp(2 lam_mrg[c]), 0.98, 3.0)

Loss (TRADES base, beta 1.5 in the paper's setting):
sum_i w_nat[y_i] CE_i / sum_i w_nat[y_i] + beta sum_i w_bndy[y_i] KL_i / sum_i w_bndy[y_i],
with the TRADES attack run at per-sample eps (RWRM) and step = max eps of the batch * (step / eps).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
from torch import Tensor, nn

from confspec_lightning.attacks import AttackConfig
from confspec_lightning.fairness.base import EpochContext, FairnessMethod
from confspec_lightning.fairness.statistics import classwise_accuracy, sum_across_ranks
from confspec_lightning.objectives import LossAdjustment, ObjectiveOutput
from confspec_lightning.validation import check_choice, check_int, check_real

FRLMode = Literal["reweight", "reweight_remargin"]
#: tau of the paper's settings: 0.1 for reweight, 0.07 for reweight + remargin.
DEFAULT_TAU = {"reweight": 0.1, "reweight_remargin": 0.07}


def frl_violations(errors: Tensor, tau: float) -> Tensor:
    """g[c] = e[c] - mean(e) - tau: how far class c's error exceeds the average by more than tau."""
    return errors - errors.mean() - tau


def frl_multiplier_step(multipliers: Tensor, violations: Tensor, rate: float, max_sum: float = 0.5) -> Tensor:
    """One projected ascent step: l <- max(l + rate g, 0), then scaled so that sum(l) <= max_sum."""
    updated = (multipliers + rate * violations).clamp(min=0.0)
    total = updated.sum()
    return torch.where(total > max_sum, updated * (max_sum / total.clamp(min=1e-30)), updated)


def frl_class_weights(multipliers: Tensor) -> Tensor:
    """w[c] = 1/K + l[c] - mean(l) (sums to 1)."""
    return 1.0 / multipliers.numel() + multipliers - multipliers.mean()


def frl_eps_multiplier(margin_multipliers: Tensor, scale: float = 2.0, low: float = 0.98, high: float = 3.0) -> Tensor:
    """Per-class eps multiplier clamp(exp(scale * lam_mrg), low, high) (RWRM)."""
    return torch.exp(scale * margin_multipliers).clamp(low, high)


def self_normalized(weights: Tensor) -> Tensor:
    """Per-sample weights W with mean(W * t) = sum(w t) / sum(w): W = B w / sum(w).

    Under DDP, B and sum(w) are those of the global batch (summed over ranks), so that the average of the
    ranks' means is the global sum(w t) / sum(w), as with one process.
    """
    totals = sum_across_ranks(
        torch.stack(
            [weights.sum().double(), torch.tensor(float(weights.numel()), dtype=torch.float64, device=weights.device)]
        )
    )
    return weights * (totals[1] / totals[0].clamp(min=1e-30)).to(weights.dtype)


class FRL(FairnessMethod):
    """FRL reweight / reweight + remargin (see the module docstring). Needs the TRADES base objective.

    Args:
        mode: ``"reweight"`` (RW) or ``"reweight_remargin"`` (RWRM, also per-class eps).
        tau: tolerated excess error; None = the paper's 0.1 (RW) or 0.07 (RWRM).
        rate_nat: step size of the clean-error multipliers (0.05).
        rate_bndy: step size of the boundary-error multipliers (0.1).
        rate_margin: step size of the margin multipliers (RWRM, 0.2).
        rate_halving_epochs: the rates halve every this many epochs (40).
        max_multiplier_sum: each multiplier vector is scaled down to sum to at most this (0.5).
        margin_scale: eps multiplier exp(margin_scale * lam_mrg) (2.0).
        eps_multiplier_min: lower clamp of the eps multiplier (0.98).
        eps_multiplier_max: upper clamp of the eps multiplier (3.0).
        eval_steps: PGD steps of the validation attack that measures boundary errors (20).
    """

    name = "frl"
    required_terms = ("kl",)

    multiplier_nat: Tensor
    multiplier_bndy: Tensor
    multiplier_margin: Tensor

    def __init__(
        self,
        mode: FRLMode = "reweight_remargin",
        tau: float | None = None,
        rate_nat: float = 0.05,
        rate_bndy: float = 0.1,
        rate_margin: float = 0.2,
        rate_halving_epochs: int = 40,
        max_multiplier_sum: float = 0.5,
        margin_scale: float = 2.0,
        eps_multiplier_min: float = 0.98,
        eps_multiplier_max: float = 3.0,
        eval_steps: int = 20,
    ) -> None:
        super().__init__()
        check_choice("frl.mode", mode, FRLMode)
        if tau is not None:
            check_real("frl.tau", tau, lambda v: True, "or null (paper: 0.1 for reweight, 0.07 for reweight_remargin)")
        for name, value in (
            ("frl.rate_nat", rate_nat),
            ("frl.rate_bndy", rate_bndy),
            ("frl.rate_margin", rate_margin),
            ("frl.margin_scale", margin_scale),
            ("frl.eps_multiplier_min", eps_multiplier_min),
        ):
            check_real(name, value, lambda v: v >= 0, ">= 0")
        # w[c] = 1/K + lam[c] - mean(lam) >= (1 - sum(lam)) / K: a sum above 1 could make class weights negative
        check_real(
            "frl.max_multiplier_sum",
            max_multiplier_sum,
            lambda v: 0.0 <= v <= 1.0,
            "in [0, 1] (paper: 0.5; above 1 class weights could turn negative)",
        )
        check_real(
            "frl.eps_multiplier_max",
            eps_multiplier_max,
            lambda v: v >= eps_multiplier_min,
            f">= frl.eps_multiplier_min={eps_multiplier_min!r}",
        )
        check_int("frl.rate_halving_epochs", rate_halving_epochs, 1)
        check_int("frl.eval_steps", eval_steps, 1)
        self.mode = mode
        self.tau = DEFAULT_TAU[mode] if tau is None else tau
        self.rate_nat = rate_nat
        self.rate_bndy = rate_bndy
        self.rate_margin = rate_margin
        self.rate_halving_epochs = rate_halving_epochs
        self.max_multiplier_sum = max_multiplier_sum
        self.margin_scale = margin_scale
        self.eps_multiplier_min = eps_multiplier_min
        self.eps_multiplier_max = eps_multiplier_max
        self.eval_steps = eval_steps

    @property
    def remargin(self) -> bool:
        return self.mode == "reweight_remargin"

    def bind(self, num_classes: int, model: nn.Module | None = None) -> None:
        """Multipliers lam_nat, lam_bndy, lam_mrg (float64 buffers, all 0)."""
        super().bind(num_classes, model)
        for name in ("multiplier_nat", "multiplier_bndy", "multiplier_margin"):
            self.register_buffer(name, torch.zeros(num_classes, dtype=torch.float64))

    def update_multipliers(self, clean_acc: Tensor, robust_acc: Tensor, epoch: int) -> None:
        """The FRL step from per-class clean and robust validation accuracy (float64 (K,), all ranks equal)."""
        nat_error = 1.0 - clean_acc
        bndy_error = clean_acc - robust_acc
        decay = 0.5 ** (epoch // self.rate_halving_epochs)
        g_nat = frl_violations(nat_error, self.tau)
        g_bndy = frl_violations(bndy_error, self.tau)
        self.multiplier_nat.copy_(
            frl_multiplier_step(self.multiplier_nat, g_nat, decay * self.rate_nat, self.max_multiplier_sum)
        )
        self.multiplier_bndy.copy_(
            frl_multiplier_step(self.multiplier_bndy, g_bndy, decay * self.rate_bndy, self.max_multiplier_sum)
        )
        if self.remargin:
            self.multiplier_margin.add_(decay * self.rate_margin * g_bndy)

    def on_train_epoch_start(self, context: EpochContext) -> dict[str, Tensor]:
        """Measure clean and boundary errors per class on the validation split; update the multipliers."""
        attack = replace(context.attack, steps=self.eval_steps)
        clean, robust = classwise_accuracy(context.model, context.validation_batches(), attack, self.num_classes)
        # a class without validation samples counts as error-free (no violation)
        device = self.multiplier_nat.device
        clean_acc, robust_acc = clean.accuracy(empty=1.0).to(device), robust.accuracy(empty=1.0).to(device)
        self.update_multipliers(clean_acc, robust_acc, context.epoch)
        return {
            "frl/val_clean_error_worst": (1.0 - clean_acc).max(),
            "frl/val_boundary_error_worst": (clean_acc - robust_acc).max(),
        }

    def class_weights(self) -> tuple[Tensor, Tensor]:
        """(w_nat, w_bndy), float32 (K,)."""
        return frl_class_weights(self.multiplier_nat).float(), frl_class_weights(self.multiplier_bndy).float()

    def eps_multiplier(self) -> Tensor:
        """Per-class eps multiplier (all ones for RW), float32 (K,)."""
        if not self.remargin:
            return torch.ones_like(self.multiplier_margin, dtype=torch.float32)
        mult = frl_eps_multiplier(
            self.multiplier_margin, self.margin_scale, self.eps_multiplier_min, self.eps_multiplier_max
        )
        return mult.float()

    @property
    def sets_attack_budget(self) -> bool:
        return self.remargin

    def attack_budget(self, target: Tensor, attack: AttackConfig) -> tuple[Tensor | None, Tensor | None]:
        """RWRM: eps_i = eps * m[y_i], one step = max_i eps_i * (step / eps) for the batch."""
        if not self.remargin:
            return None, None
        eps = attack.eps * self.eps_multiplier()[target]
        return eps, eps.max() * (attack.step / attack.eps)

    def loss_adjustment(self, output: ObjectiveOutput, target: Tensor) -> LossAdjustment:
        """Self-normalised class weights on the CE and the KL term."""
        w_nat, w_bndy = self.class_weights()
        return LossAdjustment(
            term_weights={"ce": self_normalized(w_nat[target]), "kl": self_normalized(w_bndy[target])}
        )

    def classwise_state(self) -> dict[str, Tensor]:
        w_nat, w_bndy = self.class_weights()
        state = {"weight_nat": w_nat, "weight_bndy": w_bndy}
        if self.remargin:
            state["eps_multiplier"] = self.eps_multiplier()
        return state

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, tau={self.tau}, eval_steps={self.eval_steps}"
