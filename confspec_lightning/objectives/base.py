"""The interface of base objectives, their per-sample terms, and how fairness methods adjust the loss.

A base objective says which attack loss its adversarial batch maximises (``attack_loss``) and returns its loss as
named per-sample terms, so that fairness methods reweight each term per sample and add terms of their own
(:mod:`confspec_lightning.fairness`); :func:`combine_terms` assembles the scalar loss.

Term roles (shared by every objective, so methods compose without special cases):

* ``"ce"`` - the classification term: CE(f(x), y) for TRADES, CE(f(x_adv), y) for PGD-AT, MART's boosted CE;
* ``"kl"`` - the boundary term: TRADES's KL(p(x) || p(x_adv)), MART's KL weighted by 1 - p_y(x); coefficient beta.

A new objective is one file: a subclass with ``name``, ``attack_loss``, ``terms`` and ``__call__``, chosen in a
config by ``class_path`` (``model.init_args.objective``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from confspec_lightning.attacks.losses import AttackObjective


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

    def per_sample_loss(self) -> Tensor:
        """sum_t c_t term_t per sample (B,), float32: the base objective's loss of each sample."""
        return sum(self.coefficients.get(role, 1.0) * term.float() for role, term in self.terms.items())


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
    """A base objective: the attack loss its adversarial batch maximises and its per-sample loss terms.

    The module makes the adversarial batch (its training attack, the threat model ``train_attack``, this
    objective's ``attack_loss``, per-sample budgets from fairness methods), then calls the objective on it.
    """

    name: ClassVar[str] = "base"
    #: what the training attack maximises (:data:`~confspec_lightning.attacks.losses.ATTACK_LOSSES`)
    attack_loss: ClassVar[AttackObjective] = "ce"
    #: the roles of the per-sample terms it returns
    terms: ClassVar[tuple[str, ...]] = ("ce",)

    def __call__(self, model: nn.Module, x: Tensor, x_adv: Tensor, target: Tensor) -> ObjectiveOutput:
        """Per-sample loss terms of the batch (forwards in the model's current mode)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"
