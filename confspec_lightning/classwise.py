"""The one per-class result of the library: the accuracy of every class under one attack (or clean), its summary.

A core module: the fairness methods' statistics and the evaluation both use it (neither imports the other).

Training statistics (FRL's and CFA's validation passes), validation, test and the benchmarks all use
:class:`ClasswiseResult`, with one empty-class policy: **a class without samples has accuracy NaN** (undefined),
it is left out of the average, the worst class and the spread, and JSON writes it as ``null``. A consumer that
needs a number for such a class says which (FRL and CFA count it as error-free, as the papers' code does).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from confspec_lightning import functional as CF


def summarize(values: Sequence[float]) -> tuple[float, float, int | None, float]:
    """(average, worst, index of the worst class, spread = best - worst) over the classes with samples.

    NaN entries (classes without samples) are left out; all NaN gives (NaN, NaN, None, NaN).
    """
    t = torch.tensor(list(values), dtype=torch.float64)
    present = ~t.isnan()
    if not bool(present.any()):
        return math.nan, math.nan, None, math.nan
    worst_index = int(torch.where(present, t, torch.inf).argmin())
    worst = float(t[worst_index])
    return float(t[present].mean()), worst, worst_index, float(t[present].max()) - worst


def _float(value: float | None) -> float:
    """JSON null -> NaN."""
    return math.nan if value is None else float(value)


@dataclass
class ClasswiseResult:
    """Per-class accuracy of one evaluation (rates in [0, 1]; NaN for a class without samples).

    ``avg`` = mean of ``classwise_acc`` over the classes with samples (class-balanced accuracy), ``worst`` its
    minimum (class ``worst_class``), ``spread`` = best - worst, ``overall`` = accuracy over all samples.
    ``confusion`` (None for clean accuracy) holds the robust confusion matrix as per-true-class error rates
    (rows = predicted, columns = true class), so its column sums are the class-wise errors; ``diagnostics``
    what CSR targets (:func:`~confspec_lightning.functional.confusion_diagnostics`: ||C||_2 =
    ``confusion_spectral_norm``, sigma_2, sigma_1 / sigma_2, ||C||_1 = worst-class error, nu).
    """

    classwise_acc: list[float]
    avg: float
    worst: float
    worst_class: str | None
    spread: float
    overall: float
    confusion: list[list[float]] | None = None
    confusion_spectral_norm: float | None = None
    diagnostics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_accuracy(
        cls,
        accuracy: Tensor,
        class_names: Sequence[str],
        overall: float,
        errors: Tensor | None = None,
        counts: Tensor | None = None,
    ) -> ClasswiseResult:
        """From per-class accuracies (K,) (NaN: no samples) and, for a robust result, error and class counts."""
        values = accuracy.detach().double().cpu().tolist()
        avg, worst, worst_index, spread = summarize(values)
        confusion = norm = None
        diagnostics: dict[str, float] = {}
        if errors is not None and counts is not None:
            rates = CF.confusion_from_counts(errors.detach().cpu(), counts.detach().cpu(), normalize=True)
            confusion = rates.tolist()
            diagnostics = {key: float(value) for key, value in CF.confusion_diagnostics(rates).items()}
            norm = float(CF.spectral_norm(rates))
        return cls(
            classwise_acc=values,
            avg=avg,
            worst=worst,
            worst_class=None if worst_index is None else class_names[worst_index],
            spread=spread,
            overall=overall,
            confusion=confusion,
            confusion_spectral_norm=norm,
            diagnostics=diagnostics,
        )

    @classmethod
    def from_counts(cls, correct: Tensor, counts: Tensor, class_names: Sequence[str]) -> ClasswiseResult:
        """From per-class correct and sample counts (K,) (e.g. the statistics of a validation pass)."""
        correct, counts = correct.detach().double().cpu(), counts.detach().double().cpu()
        # per-class accuracy has one implementation: 1 - error rate from the counts (functional.classwise_error)
        accuracy = CF.classwise_accuracy((counts - correct)[None, :], counts)
        total = float(counts.sum())
        return cls.from_accuracy(accuracy, class_names, float(correct.sum()) / total if total else math.nan)

    @classmethod
    def from_confusion(
        cls, errors: Tensor, counts: Tensor, class_names: Sequence[str], with_confusion: bool = True
    ) -> ClasswiseResult:
        """From accumulated error counts (K, K) (rows = predicted) and class counts (K,).

        ``with_confusion``: keep the (robust) confusion matrix and its diagnostics (not for clean accuracy).
        """
        errors, counts = errors.detach().cpu(), counts.detach().cpu()
        total = float(counts.sum())
        overall = 1.0 - float(errors.sum()) / total if total else math.nan
        accuracy = CF.classwise_accuracy(errors, counts)
        if not with_confusion:
            return cls.from_accuracy(accuracy, class_names, overall)
        return cls.from_accuracy(accuracy, class_names, overall, errors, counts)

    @classmethod
    def from_predictions(
        cls, pred: Tensor, target: Tensor, class_names: Sequence[str], with_confusion: bool = True
    ) -> ClasswiseResult:
        """From predicted and true classes (N,)."""
        k = len(class_names)
        pred, target = pred.detach().cpu().long(), target.detach().cpu().long()
        counts = CF.counts_per_class(target, k)
        errors = CF.confusion_from_predictions(pred, target, k)
        overall = float((pred == target).double().mean()) if target.numel() else math.nan
        accuracy = CF.classwise_accuracy(errors, counts)
        if not with_confusion:
            return cls.from_accuracy(accuracy, class_names, overall)
        return cls.from_accuracy(accuracy, class_names, overall, errors, counts)

    def accuracy(self, empty: float | None = None) -> Tensor:
        """``classwise_acc`` as a float64 tensor; ``empty``, if given, replaces the NaN of classes without samples."""
        values = torch.tensor(self.classwise_acc, dtype=torch.float64)
        return values if empty is None else values.nan_to_num(empty)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClasswiseResult:
        """Inverse of the report's JSON (null -> NaN)."""
        return cls(
            classwise_acc=[_float(v) for v in data["classwise_acc"]],
            avg=_float(data["avg"]),
            worst=_float(data["worst"]),
            worst_class=data.get("worst_class"),
            spread=_float(data["spread"]),
            overall=_float(data["overall"]),
            confusion=data.get("confusion"),
            confusion_spectral_norm=data.get("confusion_spectral_norm"),
            diagnostics={k: _float(v) for k, v in (data.get("diagnostics") or {}).items()},
        )
