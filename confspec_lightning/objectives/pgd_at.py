"""PGD-AT (Madry et al., ICLR 2018): L = (1/B) sum_k CE(f(x_adv_k), y_k), x_adv = PGD on CE from a uniform start."""

from __future__ import annotations

from torch import Tensor, nn

from confspec_lightning.losses import cross_entropy
from confspec_lightning.objectives.base import BaseObjective, ObjectiveOutput


class PGDAT(BaseObjective):
    """PGD adversarial training: the adversarial CE is the whole loss (its ``"ce"`` term)."""

    name = "pgd_at"
    attack_loss = "ce"
    terms = ("ce",)

    def __call__(self, model: nn.Module, x: Tensor, x_adv: Tensor, target: Tensor) -> ObjectiveOutput:
        adv_logits = model(x_adv)
        adv_ce = cross_entropy(adv_logits, target)
        return ObjectiveOutput(terms={"ce": adv_ce}, coefficients={"ce": 1.0}, adv_logits=adv_logits, adv_ce=adv_ce)
