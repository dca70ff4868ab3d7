"""The start model's accuracy before a fit from a file trains it: a wrong input convention shows at once.

``RobustFairLitModule.on_fit_start`` calls :func:`report_start_model` when the fit starts from a file
(``init_weights``, or a backbone that loads one, such as :class:`~.models.robustbench.RobustBenchModel`;
not when it resumes a checkpoint): clean and evaluation-PGD accuracy on the first ``start_model_check_batches``
validation batches of every rank (summed over DDP ranks by
:func:`~confspec_lightning.fairness.statistics.classwise_accuracy`: every rank runs the same collectives), printed
as one line and logged as ``start/clean_acc``, ``start/robust_acc`` (and their worst class). A model fed inputs
normalised otherwise than in its training is near chance here, not two epochs later. The attack's random starts
come from ``eval_seed`` in a forked RNG, so the check leaves the training's random stream as it was.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch

from confspec_lightning.classwise import ClasswiseResult

if TYPE_CHECKING:  # pragma: no cover
    from confspec_lightning.module import RobustFairLitModule


def evaluate_start_model(module: RobustFairLitModule, max_batches: int) -> tuple[ClasswiseResult, ClasswiseResult]:
    """Clean and ``eval_attack`` (PGD, CE) accuracy per class on ``max_batches`` validation batches per rank.

    A collective under DDP (every rank calls it).
    """
    from confspec_lightning.fairness import passes
    from confspec_lightning.fairness.statistics import classwise_accuracy

    devices = [module.device] if module.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(module.eval_seed)
        batches = itertools.islice(passes.validation_batches(module), max_batches)
        clean, robust = classwise_accuracy(module.net, batches, module.eval_attack, module.num_classes)
    return clean, robust


def start_model_line(module: RobustFairLitModule, clean: ClasswiseResult, robust: ClasswiseResult) -> str:
    """``start model: clean 84.9 %, PGD-20 55.1 % (...)``, with a hint when the clean accuracy is near chance."""
    name = f"PGD-{module.eval_attack.steps}"
    line = (
        f"start model: clean {100 * clean.avg:.1f} %, {name} {100 * robust.avg:.1f} % (class-balanced; worst class "
        f"{100 * clean.worst:.1f} % / {100 * robust.worst:.1f} %; input normalisation "
        f"{module.input_normalization_used}; {module.start_model_check_batches} validation batches per process)"
    )
    chance = 1.0 / module.num_classes
    if clean.avg <= 1.5 * chance:
        line += (
            f". The clean accuracy is near chance ({100 * chance:.1f} %): is the input convention right? "
            "See model.init_args.input_normalization (docs/how-to/public-models.md)."
        )
    return line


def report_start_model(module: RobustFairLitModule, max_batches: int) -> tuple[ClasswiseResult, ClasswiseResult]:
    """Evaluate the start model (:func:`evaluate_start_model`), print the line (rank 0) and log it to every logger."""
    clean, robust = evaluate_start_model(module, max_batches)
    values = {
        "start/clean_acc": clean.avg,
        "start/robust_acc": robust.avg,
        "start/clean_acc_worst": clean.worst,
        "start/robust_acc_worst": robust.worst,
    }
    for logger in module.loggers:  # the values are global (summed over ranks); loggers write on rank 0
        logger.log_metrics(values, step=module.global_step)
    if module.trainer.is_global_zero:
        print(start_model_line(module, clean, robust), flush=True)
    return clean, robust
