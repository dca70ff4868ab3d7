"""Projected gradient descent (PGD; Madry et al., 2018) in plain torch, for any :mod:`~.losses` objective.

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

import torch
from torch import Tensor, nn

from confspec_lightning.attacks.context import Norm, eval_mode, grad_enabled
from confspec_lightning.attacks.losses import AttackLoss, AttackObjective, attack_loss, l2_norm
from confspec_lightning.attacks.noise import RandomSource
from confspec_lightning.validation import check_choice, check_int


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


def _project(x_adv: Tensor, x: Tensor, eps: Tensor, norm: Norm) -> Tensor:
    """Project x_adv onto the ``norm`` ball of radius eps around x, then onto [0, 1]."""
    delta = x_adv - x
    if norm == "linf":
        delta = torch.maximum(torch.minimum(delta, eps), -eps)
    else:
        delta = delta * torch.clamp(eps / l2_norm(delta).clamp_min(1e-12), max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def pgd(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    *,
    eps: float | Tensor = 8 / 255,
    step: float | Tensor = 2 / 255,
    steps: int = 10,
    norm: Norm = "linf",
    objective: AttackObjective | AttackLoss = "ce",
    random_start: bool = True,
    generator: RandomSource = None,
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
        objective: ``"ce"``, ``"cw"``, ``"trades_kl"`` or an :class:`~confspec_lightning.attacks.losses.AttackLoss`.
        random_start: start at the objective's random start; ``False`` starts at x.
        generator: the random start's source: a ``torch.Generator`` (None: the global one) or a
            :class:`~confspec_lightning.attacks.noise.SampleNoise` (noise keyed by sample index).

    Returns:
        The detached adversarial batch, same shape and dtype as ``x``.
    """
    check_choice("norm", norm, Norm)
    check_int("steps", steps, 1)
    loss = attack_loss(objective)
    with grad_enabled(), eval_mode(model):
        x = x.detach().clone()
        target = target.detach().clone()
        eps_t = _per_sample(eps, x)
        step_t = _per_sample(step, x)
        prepared = loss.prepare(model, x)
        x_adv = x
        if random_start:
            x_adv = _project(x + loss.random_start(x, eps_t, norm, generator), x, eps_t, norm)
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            logits = model(x_adv)
            seed = loss.logit_grad(logits, target, prepared)
            # Normalise per sample: keeps the step direction, keeps fp16 backward out of underflow.
            seed = seed / seed.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
            (grad,) = torch.autograd.grad(logits, [x_adv], grad_outputs=seed.to(logits.dtype))
            grad = grad.float()
            direction = grad.sign() if norm == "linf" else grad / l2_norm(grad).clamp_min(1e-12)
            x_adv = _project(x_adv.detach() + step_t * direction.to(x.dtype), x, eps_t, norm)
    return x_adv.detach()


def attack_objective_value(
    model: nn.Module, x: Tensor, x_adv: Tensor, target: Tensor, objective: AttackObjective | AttackLoss
) -> Tensor:
    """Per-sample value of the attack objective at ``x_adv`` (for tests and diagnostics), eval mode."""
    loss = attack_loss(objective)
    with torch.no_grad(), eval_mode(model):
        return loss.value(model(x_adv), target, loss.prepare(model, x))
