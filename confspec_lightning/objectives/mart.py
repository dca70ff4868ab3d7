"""MART (Wang, Zou, Yi, Bailey, Ma, Gu, ICLR 2020): misclassification-aware adversarial training.

Per sample, with x_adv from PGD on CE starting at x + 0.001 N(0, I) (its reference code):

    L_k = BCE_k + beta KL(p(x_k) || p(x_adv_k)) (1 - p_{y_k}(x_k)),
    BCE_k = CE(f(x_adv_k), y_k) - log(1.0001 - max_{j != y_k} p_j(x_adv_k)).

Roles: ``"ce"`` is the boosted adversarial CE (BCE), ``"kl"`` the misclassification-weighted KL with coefficient
beta (6). Composed with CSR's code form, (1 - alpha) scales the BCE and alpha w_k CE(f(x_adv_k), y_k) is added
(the adversarial CE itself, as with PGD-AT); FAAL, WAT and DAFA reweight the terms per sample as for TRADES.
"""

from __future__ import annotations

from torch import Tensor, nn

from confspec_lightning.losses import cross_entropy, kl_divergence, mart_boosted_ce
from confspec_lightning.objectives.base import BaseObjective, ObjectiveOutput
from confspec_lightning.validation import check_real


class MART(BaseObjective):
    """MART (see the module docstring).

    Args:
        beta: weight lambda of the misclassification-aware KL term (6.0, the reference code's).
    """

    name = "mart"
    attack_loss = "mart_ce"
    terms = ("ce", "kl")

    def __init__(self, beta: float = 6.0) -> None:
        check_real("beta", beta, lambda v: v >= 0, ">= 0 (MART default 6.0)")
        self.beta = beta

    def __call__(self, model: nn.Module, x: Tensor, x_adv: Tensor, target: Tensor) -> ObjectiveOutput:
        clean_logits = model(x)
        adv_logits = model(x_adv)
        true_probability = clean_logits.float().softmax(dim=1).gather(1, target[:, None]).squeeze(1)
        kl = kl_divergence(clean_logits, adv_logits) * (1.0 - true_probability)
        return ObjectiveOutput(
            terms={"ce": mart_boosted_ce(adv_logits, target), "kl": kl},
            coefficients={"ce": 1.0, "kl": self.beta},
            adv_logits=adv_logits,
            adv_ce=cross_entropy(adv_logits, target),
            clean_logits=clean_logits,
        )
