"""What PGD maximises: one class per attack objective, with its gradient at the logits and its random start.

* ``ce`` (:class:`CrossEntropy`): CE(f(x_adv), y), uniform random start in the ball (Madry et al., 2018);
* ``cw`` (:class:`Margin`): the Carlini-Wagner margin max_{j != y} z_j - z_y, uniform start (Carlini & Wagner,
  2017; the "CW-20" evaluation of the robustness literature);
* ``trades_kl`` (:class:`TradesKL`): KL(p(x) || p(x_adv)), start x + 0.001 N(0, 1) (Zhang et al., 2019);
* ``mart_ce`` (:class:`MartCrossEntropy`): CE(f(x_adv), y) from x + 0.001 N(0, 1) (MART's attack, Wang et al., 2020).

The values are the library's per-sample losses (:mod:`confspec_lightning.losses`: one implementation each).
A new objective is a subclass registered in :data:`ATTACK_LOSSES` (its ``name`` is what configs give).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from confspec_lightning import losses
from confspec_lightning.attacks.noise import RandomSource, normal_like, uniform_like
from confspec_lightning.validation import check_choice

AttackObjective = Literal["ce", "cw", "trades_kl", "mart_ce"]


def l2_norm(t: Tensor) -> Tensor:
    """Per-sample l2 norm, broadcastable against ``t`` (B, 1, ..., 1)."""
    return t.flatten(1).norm(p=2, dim=1).reshape(-1, *([1] * (t.ndim - 1)))


class AttackLoss:
    """A per-sample objective PGD ascends; the gradient at the logits is taken in float32."""

    name: ClassVar[str] = "base"

    def prepare(self, model: nn.Module, x: Tensor) -> Any:
        """Whatever the objective needs from the clean batch (computed once per attack), e.g. p(x)."""
        return None

    def random_start(self, x: Tensor, eps: Tensor, norm: str, generator: RandomSource) -> Tensor:
        """The start's offset from x: uniform in the l_inf ball, uniform radius along a random l_2 direction.

        ``generator``: a ``torch.Generator`` (or None: the global one) or a :class:`~.noise.SampleNoise`.
        """
        if norm == "linf":
            return (2 * uniform_like(x, generator) - 1) * eps
        direction = normal_like(x, generator)
        radius = uniform_like(x, generator, tuple(eps.shape))
        return direction / l2_norm(direction).clamp_min(1e-12) * radius * eps

    def logit_grad(self, logits: Tensor, target: Tensor, prepared: Any) -> Tensor:
        """D objective / d logits per sample, float32 (B, K)."""
        raise NotImplementedError

    def value(self, logits: Tensor, target: Tensor, prepared: Any) -> Tensor:
        """The per-sample objective (B,), float32 (for tests and diagnostics)."""
        raise NotImplementedError


class CrossEntropy(AttackLoss):
    """CE(z, y); d/dz = softmax(z) - onehot(y)."""

    name = "ce"

    def logit_grad(self, logits: Tensor, target: Tensor, prepared: Any) -> Tensor:
        probs = logits.float().softmax(dim=1)
        return probs - F.one_hot(target, probs.shape[1]).to(probs.dtype)

    def value(self, logits: Tensor, target: Tensor, prepared: Any) -> Tensor:
        return losses.cross_entropy(logits, target)


class Margin(AttackLoss):
    """max_{j != y} z_j - z_y (> 0: misclassified); d/dz = onehot(j*) - onehot(y), j* the runner-up."""

    name = "cw"

    def logit_grad(self, logits: Tensor, target: Tensor, prepared: Any) -> Tensor:
        is_true = F.one_hot(target, logits.shape[1]).bool()
        runner_up = logits.detach().float().masked_fill(is_true, -torch.inf).argmax(dim=1)
        return F.one_hot(runner_up, logits.shape[1]).float() - is_true.float()

    def value(self, logits: Tensor, target: Tensor, prepared: Any) -> Tensor:
        return losses.margin(logits, target)


class TradesKL(AttackLoss):
    """KL(p(x) || softmax(z)); d/dz = softmax(z) - p(x); starts at x + 0.001 N(0, 1)."""

    name = "trades_kl"

    def prepare(self, model: nn.Module, x: Tensor) -> Tensor:
        return model(x).detach().float()  # the clean logits

    def random_start(self, x: Tensor, eps: Tensor, norm: str, generator: RandomSource) -> Tensor:
        return 0.001 * normal_like(x, generator)

    def logit_grad(self, logits: Tensor, target: Tensor, prepared: Tensor) -> Tensor:
        return logits.float().softmax(dim=1) - prepared.softmax(dim=1)

    def value(self, logits: Tensor, target: Tensor, prepared: Tensor) -> Tensor:
        return losses.kl_divergence(prepared, logits)


class MartCrossEntropy(CrossEntropy):
    """CE(z, y) ascended from x + 0.001 N(0, 1), as MART's attack (Wang et al., ICLR 2020; its reference code)."""

    name = "mart_ce"

    def random_start(self, x: Tensor, eps: Tensor, norm: str, generator: RandomSource) -> Tensor:
        return 0.001 * normal_like(x, generator)


#: name -> objective; ``pgd(objective=...)`` takes a name or an :class:`AttackLoss` instance.
ATTACK_LOSSES: dict[str, AttackLoss] = {
    loss.name: loss for loss in (CrossEntropy(), Margin(), TradesKL(), MartCrossEntropy())
}


def attack_loss(objective: str | AttackLoss) -> AttackLoss:
    """The :class:`AttackLoss` called ``objective`` (an instance is returned as it is)."""
    if isinstance(objective, AttackLoss):
        return objective
    check_choice("objective", objective, tuple(ATTACK_LOSSES))
    return ATTACK_LOSSES[objective]
