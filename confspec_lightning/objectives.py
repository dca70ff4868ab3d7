"""Base adversarial-training objectives with per-sample loss terms.

A base objective generates the adversarial batch and returns its loss as named per-sample terms,
so that fairness methods can reweight each term per sample and add terms of their own
(``confspec_lightning.fairness``); :func:`combine_terms` assembles the scalar loss.

Term roles (shared by every objective, so methods compose without special cases):

* ``"ce"`` - the classification term: CE(f(x), y) for TRADES, CE(f(x_adv), y) for PGD-AT.
* ``"kl"`` - the TRADES boundary term KL(p(x) || p(x_adv)) (TRADES only), coefficient beta.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from confspec_lightning.attacks import AttackConfig, AttackObjective
from confspec_lightning.validation import check_choice, check_real

ObjectiveName = Literal["trades", "pgd_at"]


def kl_divergence(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """Per-sample KL(softmax(p_logits) || softmax(q_logits)) in float32; gradients flow through both."""
    log_p = p_logits.float().log_softmax(dim=1)
    log_q = q_logits.float().log_softmax(dim=1)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=1)


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Per-sample cross entropy in float32."""
    return F.cross_entropy(logits.float(), target, reduction="none")


@dataclass
class ObjectiveOutput:
    """What a base objective computed for one batch.

    Attributes:
        terms: per-sample (B,) unweighted loss terms by role (``"ce"``, ``"kl"``).
        coefficients: global coefficient of each term (e.g. ``{"ce": 1.0, "kl": beta}``).
        adv_logits: f(x_adv) in train mode, with its graph (shared by every term that needs it).
        adv_ce: per-sample CE(f(x_adv), y), with its graph (the CSR term reuses it).
        clean_logits: f(x) in train mode, where the objective computed it.
    """

    terms: dict[str, Tensor]
    coefficients: dict[str, float]
    adv_logits: Tensor
    adv_ce: Tensor
    clean_logits: Tensor | None = None


@dataclass
class LossAdjustment:
    """A fairness method's change to the loss: per-term weights (multiplied) and extra terms (added).

    Attributes:
        term_weights: role -> weight, a float or a per-sample (B,) tensor; missing roles keep weight 1.
        extra_terms: name -> scalar tensor added to the loss.
    """

    term_weights: dict[str, Tensor | float] = field(default_factory=dict)
    extra_terms: dict[str, Tensor] = field(default_factory=dict)


def combine_terms(
    output: ObjectiveOutput, adjustments: list[LossAdjustment] | tuple[LossAdjustment, ...] = ()
) -> tuple[Tensor, dict[str, Tensor]]:
    """L = sum_t c_t (1/B) sum_k W_{t,k} term_{t,k} + sum of extra terms.

    W_t is the product of every adjustment's weight for role t (methods stack by multiplying).

    Returns:
        ``(loss, parts)`` where ``parts`` maps each term and extra term to its (detached) contribution.
    """
    weights: dict[str, Tensor | float] = {role: 1.0 for role in output.terms}
    extras: dict[str, Tensor] = {}
    for adjustment in adjustments:
        for role, weight in adjustment.term_weights.items():
            if role not in weights:
                raise KeyError(
                    f"a fairness method weights the term {role!r}, but the objective has only {sorted(weights)}."
                )
            weights[role] = weights[role] * weight
        for name, term in adjustment.extra_terms.items():
            extras[name] = extras[name] + term if name in extras else term
    parts: dict[str, Tensor] = {}
    loss = torch.zeros((), device=output.adv_logits.device)
    for role, per_sample in output.terms.items():
        contribution = output.coefficients.get(role, 1.0) * (weights[role] * per_sample).mean()
        parts[role] = contribution.detach()
        loss = loss + contribution
    for name, term in extras.items():
        parts[name] = term.detach()
        loss = loss + term
    return loss, parts


class BaseObjective:
    """A base objective: how the training attack is made and which per-sample terms the loss has.

    Subclass it (or override ``RobustFairLitModule.generate_adversarial``/``compute_objective``) to
    change the attack or the loss without copying the rest.
    """

    name: str = "base"
    attack_objective: AttackObjective = "ce"
    #: the roles of the per-sample terms it returns
    terms: tuple[str, ...] = ("ce",)

    def __init__(self, attack: AttackConfig) -> None:
        self.attack_config = attack

    def attack(
        self,
        model: nn.Module,
        x: Tensor,
        target: Tensor,
        eps: Tensor | float | None = None,
        step: Tensor | float | None = None,
    ) -> Tensor:
        """Adversarial batch for training (eps/step override the config, e.g. per sample)."""
        return self.attack_config.perturb(model, x, target, self.attack_objective, eps=eps, step=step)

    def __call__(self, model: nn.Module, x: Tensor, x_adv: Tensor, target: Tensor) -> ObjectiveOutput:
        """Per-sample loss terms of the batch (forwards in the model's current mode)."""
        raise NotImplementedError


class PGDATObjective(BaseObjective):
    """PGD-AT (Madry et al., 2018): L = (1/B) sum_k CE(f(x_adv_k), y_k), x_adv = PGD on CE."""

    name = "pgd_at"
    attack_objective: AttackObjective = "ce"

    def __call__(self, model: nn.Module, x: Tensor, x_adv: Tensor, target: Tensor) -> ObjectiveOutput:
        adv_logits = model(x_adv)
        adv_ce = cross_entropy(adv_logits, target)
        return ObjectiveOutput(terms={"ce": adv_ce}, coefficients={"ce": 1.0}, adv_logits=adv_logits, adv_ce=adv_ce)


class TRADESObjective(BaseObjective):
    """TRADES (Zhang et al., 2019): L = (1/B) sum_k [CE(f(x_k), y_k) + beta KL(p(x_k) || p(x_adv_k))].

    x_adv maximises the KL (start x + 0.001 N(0, 1)); the clean branch is not detached.
    """

    name = "trades"
    attack_objective: AttackObjective = "trades_kl"
    terms = ("ce", "kl")

    def __init__(self, attack: AttackConfig, beta: float = 6.0) -> None:
        super().__init__(attack)
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


def build_objective(name: ObjectiveName, attack: AttackConfig, beta: float = 6.0) -> BaseObjective:
    """The base objective called ``name`` (``"trades"`` or ``"pgd_at"``)."""
    check_choice("objective", name, ObjectiveName)
    if name == "trades":
        return TRADESObjective(attack, beta=beta)
    return PGDATObjective(attack)
