"""Threat models: ``AttackConfig`` (norm, eps, step, steps, random start) and its training/evaluation variants.

``AttackConfig.perturb`` runs :func:`~confspec_lightning.attacks.pgd.pgd` with the threat model (``pgd`` knows nothing
of this module: no import cycle).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from confspec_lightning.attacks.context import Norm
from confspec_lightning.attacks.noise import RandomSource
from confspec_lightning.attacks.pgd import pgd
from confspec_lightning.validation import check_bool, check_choice, check_int, check_real


@dataclass(frozen=True)
class AttackConfig:
    """A PGD threat model and budget (pixel units: inputs live in [0, 1]).

    Args:
        norm: ``"linf"`` or ``"l2"``.
        eps: radius of the perturbation ball (> 0), e.g. 8/255 for l_inf, 0.5 for l_2 (l_inf: at most 1).
        step: step size of each PGD iteration (> 0), e.g. 2/255.
        steps: number of PGD iterations (>= 1).
        random_start: start from a random point (the objective's start: uniform in the ball for ``ce`` and
            ``cw``, x + 0.001 N(0, 1) for ``trades_kl``); ``False`` starts at x (deterministic attacks).
    """

    #: how errors name the config (subclasses: the module argument they are the type of)
    field_name: ClassVar[str] = "attack"

    norm: Norm = "linf"
    eps: float = 8 / 255
    step: float = 2 / 255
    steps: int = 10
    random_start: bool = True

    @classmethod
    def coerce(cls, name: str, value: AttackConfig | dict) -> AttackConfig:
        """``value`` as a ``cls``: an AttackConfig, or a dict of its fields (as checkpoints store it)."""
        if isinstance(value, dict):
            try:
                return cls(**value)
            except TypeError as error:
                raise ValueError(
                    f"{name}={value!r} is not accepted; its fields are norm, eps, step, steps, random_start ({error})."
                ) from error
        if not isinstance(value, AttackConfig):
            raise TypeError(f"{name}={value!r} is not accepted; it must be an AttackConfig or a dict of its fields.")
        return value

    def __post_init__(self) -> None:
        name = self.field_name
        check_choice(f"{name}.norm", self.norm, Norm)
        check_real(f"{name}.eps", self.eps, lambda v: v > 0, "> 0 (pixel units, e.g. 8/255)")
        if self.norm == "linf":
            check_real(
                f"{name}.eps", self.eps, lambda v: v <= 1, "in (0, 1] for linf (pixels lie in [0, 1]; e.g. 8/255)"
            )
        check_real(f"{name}.step", self.step, lambda v: v > 0, "> 0 (e.g. 2/255)")
        check_int(f"{name}.steps", self.steps, 1)
        check_bool(f"{name}.random_start", self.random_start)

    def perturb(
        self,
        model: nn.Module,
        x: torch.Tensor,
        target: torch.Tensor,
        objective: object = "ce",
        *,
        eps: float | torch.Tensor | None = None,
        step: float | torch.Tensor | None = None,
        generator: RandomSource = None,
    ) -> torch.Tensor:
        """:func:`~confspec_lightning.attacks.pgd` with this threat model; ``eps``/``step`` (per-sample) override it."""
        return pgd(
            model,
            x,
            target,
            eps=self.eps if eps is None else eps,
            step=self.step if step is None else step,
            steps=self.steps,
            norm=self.norm,
            objective=objective,  # type: ignore[arg-type]
            random_start=self.random_start,
            generator=generator,
        )

    def describe(self, name: str = "PGD") -> str:
        """E.g. ``PGD-20 linf eps=0.0314 step=0.0078``."""
        return f"{name}-{self.steps} {self.norm} eps={self.eps:.4f} step={self.step:.4f}"


@dataclass(frozen=True)
class TrainAttackConfig(AttackConfig):
    """The training attack's threat model (``RobustFairLitModule(train_attack=...)``; errors name ``train_attack``)."""

    field_name: ClassVar[str] = "train_attack"


@dataclass(frozen=True)
class EvalAttackConfig(AttackConfig):
    """The evaluation PGD's threat model, PGD-20 by default (errors name ``eval_attack``)."""

    field_name: ClassVar[str] = "eval_attack"
    steps: int = 20
