"""TRADES (Zhang et al., ICML 2019): L = (1/B) sum_k [CE(f(x_k), y_k) + beta KL(p(x_k) || p(x_adv_k))]."""

from __future__ import annotations

from torch import Tensor, nn

from confspec_lightning.losses import cross_entropy, kl_divergence
from confspec_lightning.objectives.base import BaseObjective, ObjectiveOutput
from confspec_lightning.validation import check_real


class TRADES(BaseObjective):
    """TRADES: x_adv maximises KL(p(x) || p(x_adv)) from x + 0.001 N(0, 1); the clean branch is not detached.

    Args:
        beta: weight of the boundary term (6.0).
    """

    name = "trades"
    attack_loss = "trades_kl"
    terms = ("ce", "kl")

    def __init__(self, beta: float = 6.0) -> None:
        check_real("beta", beta, lambda v: v >= 0, ">= 0 (TRADES default 6.0)")
        self.beta = beta

    def __call__(self, model: nn.Module, x: Tensor, x_adv: Tensor, target: Tensor) -> ObjectiveOutput:
        clean_logits = model(x)
        adv_logits = model(x_adv)
        return ObjectiveOutput(
            terms={"ce": cross_entropy(clean_logits, target), "kl": kl_divergence(clean_logits, adv_logits)},
            coefficients={"ce": 1.0, "kl": self.beta},
            adv_logits=adv_logits,
            adv_ce=cross_entropy(adv_logits, target),
            clean_logits=clean_logits,
        )
