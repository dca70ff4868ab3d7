"""Per-class statistics for fairness methods, summed over DDP ranks (pure torch, no Lightning).

Every method updates its state from these sums, so every rank holds the same state, equal to what a
single process computes on the whole data.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from confspec_lightning.attacks import AttackConfig, eval_mode
from confspec_lightning.classwise import ClasswiseResult
from confspec_lightning.objectives import BaseObjective


def sum_across_ranks(tensor: Tensor) -> Tensor:
    """``tensor`` summed over all DDP ranks (a collective: every rank calls it); itself without DDP."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def world_size() -> int:
    """The number of DDP ranks (1 without an initialised process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def classwise_sum(values: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """(K,) float64 sums of per-sample ``values`` (B,) by true class: out[c] = sum_{i: y_i = c} values_i."""
    out = torch.zeros(num_classes, dtype=torch.float64, device=values.device)
    return out.index_add_(0, target, values.detach().to(torch.float64))


def _model_device(model: nn.Module) -> torch.device:
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _check_nonempty(counts: Tensor, what: str) -> None:
    if float(counts.sum()) == 0:  # the same on every rank (summed), so all ranks raise together
        raise RuntimeError(f"the {what} gave no samples; fairness methods that use it need data.")


def classwise_accuracy(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], attack: AttackConfig, num_classes: int
) -> tuple[ClasswiseResult, ClasswiseResult]:
    """Clean and PGD (CE, ``attack``) accuracy per class over ``batches``, summed over ranks (eval mode).

    Returns:
        ``(clean, robust)``; a class without samples has accuracy NaN (the one empty-class policy: the caller
        says what it counts as, e.g. ``result.accuracy(empty=1.0)``).
    """
    sums = torch.zeros(3, num_classes, dtype=torch.float64, device=_model_device(model))
    for x, y in batches:
        x_adv = attack.perturb(model, x, y, "ce")
        with torch.no_grad(), eval_mode(model):
            clean = (model(x).argmax(dim=1) == y).double()
            robust = (model(x_adv).argmax(dim=1) == y).double()
        sums[0] += classwise_sum(clean, y, num_classes)
        sums[1] += classwise_sum(robust, y, num_classes)
        sums[2] += classwise_sum(torch.ones_like(clean), y, num_classes)
    sums = sum_across_ranks(sums)
    _check_nonempty(sums[2], "validation split")
    names = [str(c) for c in range(num_classes)]
    return ClasswiseResult.from_counts(sums[0], sums[2], names), ClasswiseResult.from_counts(sums[1], sums[2], names)


def classwise_objective_loss(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    objective: BaseObjective,
    num_classes: int,
    adversarial: Callable[[Tensor, Tensor], Tensor],
) -> tuple[Tensor, Tensor]:
    """Per-class sums of the base objective's per-sample loss sum_t c_t term_t, and class counts.

    The adversarial examples come from ``adversarial(x, y)`` (the training attack on the objective's attack loss:
    :meth:`~confspec_lightning.fairness.base.EpochContext.adversarial`); everything runs in eval mode without a
    weight update. Summed over ranks; float64 (K,) each.
    """
    sums = torch.zeros(2, num_classes, dtype=torch.float64, device=_model_device(model))
    for x, y in batches:
        x_adv = adversarial(x, y)
        with torch.no_grad(), eval_mode(model):
            per_sample = objective(model, x, x_adv, y).per_sample_loss()
        sums[0] += classwise_sum(per_sample, y, num_classes)
        sums[1] += classwise_sum(torch.ones_like(y, dtype=torch.float64), y, num_classes)
    sums = sum_across_ranks(sums)
    _check_nonempty(sums[1], "validation split")
    return sums[0], sums[1]
