"""Projected gradient descent (PGD) attacks in plain torch.

PGD (Madry et al., 2018) under an l_inf or l_2 budget, maximising the cross entropy with the label
(``"ce"``, uniform random start), the Carlini-Wagner margin max_{j != y} z_j - z_y (``"cw"``, uniform
random start; Carlini & Wagner, 2017, the "CW-20" evaluation of the robustness literature) or the TRADES
objective KL(p(x) || p(x_adv)) (``"trades_kl"``, start x + 0.001 N(0, 1); Zhang et al., 2019).

Properties every caller can rely on:

* the model is attacked in eval mode and every submodule's own ``training`` flag is restored after;
* input gradients come from ``torch.autograd.grad`` only: no parameter ``.grad`` is touched, no DDP
  hook fires;
* the attack works inside ``torch.inference_mode()`` / ``torch.no_grad()`` (validation, test): it
  re-enables autograd on a cloned batch;
* under ``bf16``/``fp16`` autocast the input gradient cannot underflow to zero: the backward pass is
  seeded with the objective's gradient at the logits, computed in float32 and normalised per sample
  (a positive per-sample factor leaves the sign and the l_2 direction of the step unchanged);
* the returned adversarial batch is detached and lies in ``[0, 1]`` within the budget.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Norm = Literal["linf", "l2"]
AttackObjective = Literal["ce", "cw", "trades_kl"]
NORMS: tuple[str, ...] = ("linf", "l2")
ATTACK_OBJECTIVES: tuple[str, ...] = ("ce", "cw", "trades_kl")


def check_choice(name: str, value: str, accepted: tuple[str, ...]) -> None:
    """Raise a ``ValueError`` naming ``name``, the bad ``value`` and the accepted strings."""
    if not isinstance(value, str) or value not in accepted:
        raise ValueError(f"{name}={value!r} is not accepted; choose one of {', '.join(map(repr, accepted))}.")


def check_real(name: str, value: object, ok: Callable[[float], bool], accepted: str) -> None:
    """Reject ``value`` unless it is a finite real number with ``ok(value)``; the error names ``name`` and the value.

    Args:
        name: the config field, e.g. ``"csr.alpha"``.
        value: the value given.
        ok: predicate on the (finite) value.
        accepted: what is accepted, e.g. ``"in [0, 1] (code default 0.3)"``.

    Raises:
        TypeError: ``value`` is not a real number (booleans and strings included).
        ValueError: ``value`` is NaN, infinite or fails ``ok``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} is not accepted; it must be a finite real number {accepted}.")
    if not (math.isfinite(value) and ok(value)):
        raise ValueError(f"{name}={value!r} is not accepted; it must be a finite number {accepted}.")


def check_int(name: str, value: object, minimum: int) -> None:
    """Reject ``value`` unless it is an integer (not a bool) >= ``minimum``, naming ``name`` and the value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}={value!r} is not accepted; it must be an integer >= {minimum}.")


def check_bool(name: str, value: object) -> None:
    """Reject ``value`` unless it is ``True`` or ``False``, naming ``name`` and the value."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not accepted; it must be true or false.")


@dataclass(frozen=True)
class AttackConfig:
    """A PGD threat model and budget (pixel units: inputs live in [0, 1]).

    Args:
        norm: ``"linf"`` or ``"l2"``.
        eps: radius of the perturbation ball (> 0), e.g. 8/255 for l_inf, 0.5 for l_2.
        step: step size of each PGD iteration (> 0), e.g. 2/255.
        steps: number of PGD iterations (>= 1).
        random_start: start from a random point (uniform in the ball for ``ce`` and ``cw``, x + 0.001 N(0, 1)
            for ``trades_kl``); ``False`` starts at x (deterministic attacks, e.g. for exact comparisons).
    """

    #: how errors name the config (subclasses: the module argument they are the type of)
    field_name: ClassVar[str] = "attack"

    norm: Norm = "linf"
    eps: float = 8 / 255
    step: float = 2 / 255
    steps: int = 10
    random_start: bool = True

    def __post_init__(self) -> None:
        name = self.field_name
        check_choice(f"{name}.norm", self.norm, NORMS)
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
        x: Tensor,
        target: Tensor,
        objective: AttackObjective = "ce",
        *,
        eps: float | Tensor | None = None,
        step: float | Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """:func:`pgd` with this threat model; ``eps``/``step`` (e.g. per-sample tensors) override it."""
        return pgd(
            model,
            x,
            target,
            eps=self.eps if eps is None else eps,
            step=self.step if step is None else step,
            steps=self.steps,
            norm=self.norm,
            objective=objective,
            random_start=self.random_start,
            generator=generator,
        )


@dataclass(frozen=True)
class TrainAttackConfig(AttackConfig):
    """The training attack's threat model (``RobustFairLitModule(train_attack=...)``; errors name ``train_attack``)."""

    field_name: ClassVar[str] = "train_attack"


@dataclass(frozen=True)
class EvalAttackConfig(AttackConfig):
    """The evaluation PGD's threat model, PGD-20 by default (errors name ``eval_attack``)."""

    field_name: ClassVar[str] = "eval_attack"
    steps: int = 20


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own ``training`` flag afterwards.

    A blanket ``model.train()`` afterwards would unfreeze submodules the user froze on purpose
    (e.g. BatchNorm layers of a fine-tuned backbone); this restores them one by one.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def grad_enabled() -> Iterator[None]:
    """Enable autograd even inside ``torch.inference_mode()`` or ``torch.no_grad()``."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _per_sample(value: float | Tensor, reference: Tensor) -> Tensor:
    """Broadcastable (B, 1, ..., 1) float32 tensor from a scalar or a (B,) tensor."""
    value = torch.as_tensor(value, dtype=torch.float32, device=reference.device)
    if value.ndim == 0:
        value = value.expand(reference.shape[0])
    if value.shape != reference.shape[:1]:
        raise ValueError(
            f"per-sample eps/step must have shape ({reference.shape[0]},) to match the batch; got {tuple(value.shape)}."
        )
    return value.reshape(-1, *([1] * (reference.ndim - 1)))


def _l2_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(p=2, dim=1).reshape(-1, *([1] * (t.ndim - 1)))


def _project(x_adv: Tensor, x: Tensor, eps: Tensor, norm: Norm) -> Tensor:
    """Project x_adv onto the ``norm`` ball of radius eps around x, then onto [0, 1]."""
    delta = x_adv - x
    if norm == "linf":
        delta = torch.maximum(torch.minimum(delta, eps), -eps)
    else:
        delta = delta * torch.clamp(eps / _l2_norm(delta).clamp_min(1e-12), max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def objective_logit_grad(
    logits: Tensor, target: Tensor, objective: AttackObjective, clean_probs: Tensor | None
) -> Tensor:
    """Gradient of the per-sample attack objective with respect to the logits, in float32.

    ``ce``: d CE(z, y) / dz = softmax(z) - onehot(y).
    ``cw``: d (max_{j != y} z_j - z_y) / dz = onehot(j*) - onehot(y), j* = argmax_{j != y} z_j.
    ``trades_kl``: d KL(p_clean || softmax(z)) / dz = softmax(z) - p_clean.
    """
    if objective == "cw":
        is_true = F.one_hot(target, logits.shape[1]).bool()
        runner_up = logits.detach().float().masked_fill(is_true, -torch.inf).argmax(dim=1)
        return F.one_hot(runner_up, logits.shape[1]).float() - is_true.float()
    probs = logits.float().softmax(dim=1)
    if objective == "ce":
        return probs - F.one_hot(target, probs.shape[1]).to(probs.dtype)
    assert clean_probs is not None
    return probs - clean_probs


def pgd(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    *,
    eps: float | Tensor = 8 / 255,
    step: float | Tensor = 2 / 255,
    steps: int = 10,
    norm: Norm = "linf",
    objective: AttackObjective = "ce",
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Projected gradient ascent on ``objective`` within an ``norm`` ball of radius ``eps`` around ``x``.

    x_{t+1} = Proj_{B(x, eps) ∩ [0,1]^d}(x_t + step * s(g_t)), s = sign (l_inf) or g / ||g||_2 (l_2),
    g_t = ∇_x objective(f(x_t)). ``eps`` and ``step`` may be per-sample (B,) tensors.

    Args:
        model: maps [0, 1] images to logits (normalisation inside). Attacked in eval mode.
        x: clean batch in [0, 1], shape (B, ...).
        target: labels (B,), used by ``ce`` and ``cw``.
        eps: radius (scalar or (B,)).
        step: step size (scalar or (B,)).
        steps: number of iterations.
        norm: ``"linf"`` or ``"l2"``.
        objective: ``"ce"``, ``"cw"`` (both uniform random start) or ``"trades_kl"`` (start x + 0.001 N(0, 1)).
        random_start: use the random start above; ``False`` starts at x.
        generator: optional RNG for the random start.

    Returns:
        The detached adversarial batch, same shape and dtype as ``x``.
    """
    check_choice("norm", norm, NORMS)
    check_choice("objective", objective, ATTACK_OBJECTIVES)
    if steps < 1:
        raise ValueError(f"steps={steps!r} is not accepted; it must be an integer >= 1.")
    with grad_enabled(), eval_mode(model):
        x = x.detach().clone()
        target = target.detach().clone()
        eps_t = _per_sample(eps, x)
        step_t = _per_sample(step, x)
        clean_probs = None
        if objective == "trades_kl":
            clean_probs = model(x).detach().float().softmax(dim=1)
        x_adv = x
        if random_start:
            if objective == "trades_kl":
                noise = 0.001 * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            elif norm == "linf":
                noise = (2 * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 1) * eps_t
            else:
                direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                radius = torch.rand(eps_t.shape, generator=generator, device=x.device, dtype=x.dtype)
                noise = direction / _l2_norm(direction).clamp_min(1e-12) * radius * eps_t
            x_adv = _project(x + noise, x, eps_t, norm)
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            logits = model(x_adv)
            seed = objective_logit_grad(logits, target, objective, clean_probs)
            # Normalise per sample: keeps the step direction, keeps fp16 backward out of underflow.
            seed = seed / seed.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
            (grad,) = torch.autograd.grad(logits, [x_adv], grad_outputs=seed.to(logits.dtype))
            grad = grad.float()
            if norm == "linf":
                direction = grad.sign()
            else:
                direction = grad / _l2_norm(grad).clamp_min(1e-12)
            x_adv = _project(x_adv.detach() + step_t * direction.to(x.dtype), x, eps_t, norm)
    return x_adv.detach()


def attack_objective_value(
    model: nn.Module, x: Tensor, x_adv: Tensor, target: Tensor, objective: AttackObjective
) -> Tensor:
    """Per-sample value of the attack objective at ``x_adv`` (for tests and diagnostics), eval mode.

    ``ce``: CE(f(x_adv), y); ``cw``: max_{j != y} z_j - z_y with z = f(x_adv) (> 0: misclassified);
    ``trades_kl``: KL(p(x) || p(x_adv)).
    """
    with torch.no_grad(), eval_mode(model):
        logits = model(x_adv).float()
        if objective == "ce":
            return F.cross_entropy(logits, target, reduction="none")
        if objective == "cw":
            is_true = F.one_hot(target, logits.shape[1]).bool()
            true_logit = logits.gather(1, target.long().unsqueeze(1)).squeeze(1)
            return logits.masked_fill(is_true, -torch.inf).amax(dim=1) - true_logit
        clean_log_probs = model(x).float().log_softmax(dim=1)
        return F.kl_div(logits.log_softmax(dim=1), clean_log_probs, reduction="none", log_target=True).sum(1)
