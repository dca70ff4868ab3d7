"""Per-class evaluation reports: the numbers, a printable table and a JSON file."""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

from confspec_lightning import functional as CF
from confspec_lightning.evaluation.report import Divergence, summarize
from confspec_lightning.io import atomic_write_text

#: Printed per-class tables with more classes show the TABLE_EXTREMES worst and best ones (by robust accuracy).
MAX_TABLE_CLASSES = 20
TABLE_EXTREMES = 5


def format_mean_std(values: list[float], *, scale: float = 1.0, digits: int = 2, signed: bool = False) -> str:
    """``"mean ± std"`` of ``scale * values`` over runs (e.g. seeds; sample std), the mean alone for one run.

    ``scale=100`` turns fractions into percent; ``signed`` writes the mean with its sign (differences).
    """
    scaled = [scale * v for v in values]
    mean = round(statistics.mean(scaled), digits) + 0.0  # + 0.0: a mean that rounds to zero is not "-0.00"
    text = f"{mean:{'+' if signed else ''}.{digits}f}"
    if len(scaled) > 1:
        text += f" ± {statistics.stdev(scaled):.{digits}f}"
    return text


def _nan_to_none(values: list[float]) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values]


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def diagnostics_from_rates(rates: Tensor) -> dict[str, float]:
    """:func:`~confspec_lightning.functional.confusion_diagnostics` as plain floats."""
    return {key: float(value) for key, value in CF.confusion_diagnostics(rates).items()}


@dataclass
class ClasswiseReport:
    """Clean and robust accuracy of every class, and the robust confusion matrix of one split.

    ``avg`` is the mean over classes (class-balanced accuracy), ``worst`` the minimum over classes,
    ``spread`` = best - worst class. The confusion matrix holds per-true-class error rates, so its
    column sums are the class-wise robust errors and ``confusion_spectral_norm`` = ||C||_2 is
    comparable across splits of different sizes. ``diagnostics`` holds what CSR targets
    (:func:`~confspec_lightning.functional.confusion_diagnostics`: ||C||_2, sigma_2, sigma_1 / sigma_2,
    ||C||_1 = worst-class robust error, nu = ||C||_1 / ||C||_2); ``history`` (fit only) one entry per
    evaluated epoch with these diagnostics of this split and of the training-set robust confusion.
    """

    stage: str
    epoch: int
    attack: str
    class_names: list[str]
    clean_acc: list[float]
    robust_acc: list[float]
    class_counts: list[int]
    confusion: list[list[float]]
    confusion_spectral_norm: float
    divergence: Divergence | None = None
    diagnostics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_state(
        cls,
        stage: str,
        epoch: int,
        attack: str,
        class_names: list[str],
        clean_acc: Tensor,
        robust_errors: Tensor,
        class_counts: Tensor,
    ) -> ClasswiseReport:
        """Build the report from synced metric state (clean per-class accuracy, robust error counts)."""
        rates = CF.confusion_from_counts(robust_errors, class_counts, normalize=True)
        return cls(
            stage=stage,
            epoch=epoch,
            attack=attack,
            class_names=list(class_names),
            clean_acc=clean_acc.double().cpu().tolist(),
            robust_acc=CF.classwise_accuracy(robust_errors, class_counts).cpu().tolist(),
            class_counts=class_counts.cpu().tolist(),
            confusion=rates.cpu().tolist(),
            confusion_spectral_norm=float(CF.spectral_norm(rates)),
            diagnostics=diagnostics_from_rates(rates),
        )

    def _name(self, index: int | None) -> str:
        return "-" if index is None else self.class_names[index]

    def scalars(self) -> dict[str, float]:
        """Headline numbers, named ``<stage>/<metric>`` (the names logged to TensorBoard)."""
        out: dict[str, float] = {}
        for kind, values in (("clean_acc", self.clean_acc), ("robust_acc", self.robust_acc)):
            avg, worst, _, spread = summarize(values)
            out[f"{self.stage}/{kind}"] = avg
            out[f"{self.stage}/{kind}_worst"] = worst
            out[f"{self.stage}/{kind}_spread"] = spread
        out[f"{self.stage}/confusion_spectral_norm"] = self.confusion_spectral_norm
        for key in ("sigma_2", "sigma_ratio", "l1_norm", "nu"):
            if key in self.diagnostics:
                out[f"{self.stage}/confusion_{key}"] = self.diagnostics[key]
        return out

    def classwise_scalars(self) -> dict[str, float]:
        """Per-class accuracies named ``<stage>/<kind>_class/<name>``."""
        out: dict[str, float] = {}
        for kind, values in (("clean_acc", self.clean_acc), ("robust_acc", self.robust_acc)):
            for name, value in zip(self.class_names, values, strict=True):
                out[f"{self.stage}/{kind}_class/{name}"] = value
        return out

    def format_table(self) -> str:
        """A plain-text per-class table with average, worst class, spread and ||C||_2."""
        width = max([5, *(len(n) for n in self.class_names)])
        lines = [
            f"Per-class accuracy ({self.stage} split, epoch {self.epoch}; robust = {self.attack})",
            f"{'class':<{width}}  {'n':>5}  {'clean %':>8}  {'robust %':>8}",
        ]
        rows = list(zip(self.class_names, self.class_counts, self.clean_acc, self.robust_acc, strict=True))
        shown = range(len(rows))
        if len(rows) > MAX_TABLE_CLASSES:  # the worst and best few by robust accuracy; all of them in the JSON
            order = sorted(range(len(rows)), key=lambda i: (math.isnan(rows[i][3]), rows[i][3]))
            shown = [*order[:TABLE_EXTREMES], None, *order[-TABLE_EXTREMES:]]
        for index in shown:
            if index is None:
                lines.append(f"{'...':<{width}}  ({len(rows) - 2 * TABLE_EXTREMES} classes not shown; all in the JSON)")
                continue
            name, n, clean, robust = rows[index]
            lines.append(f"{name:<{width}}  {n:>5}  {100 * clean:>8.2f}  {100 * robust:>8.2f}")
        c_avg, c_worst, c_idx, c_spread = summarize(self.clean_acc)
        r_avg, r_worst, r_idx, r_spread = summarize(self.robust_acc)
        lines += [
            "-" * (width + 29),
            f"{'avg':<{width}}  {'':>5}  {100 * c_avg:>8.2f}  {100 * r_avg:>8.2f}",
            f"{'worst':<{width}}  {'':>5}  {100 * c_worst:>8.2f}  {100 * r_worst:>8.2f}"
            f"   (clean: class {self._name(c_idx)}, robust: class {self._name(r_idx)})",
            f"{'spread':<{width}}  {'':>5}  {100 * c_spread:>8.2f}  {100 * r_spread:>8.2f}",
            f"||C||_2 of the robust confusion matrix (per-class error rates): {self.confusion_spectral_norm:.4f}",
        ]
        if self.diagnostics:
            d = self.diagnostics
            lines.append(
                f"||C||_1 (worst-class robust error) {d['l1_norm']:.4f}, sigma_1 / sigma_2 {d['sigma_ratio']:.3f}, "
                f"nu = ||C||_1 / ||C||_2 {d['nu']:.3f}"
            )
        if self.divergence is not None:
            train_avg, _, _, _ = summarize(self.divergence.train_acc)
            lines.append(
                f"Kendall tau of per-class robust accuracy, train subset vs {self.stage}: "
                f"{self.divergence.describe_tau()} (train subset robust avg {100 * train_avg:.2f} %)"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN accuracies of absent classes become null) with the headline scalars."""
        data = asdict(self)
        data["clean_acc"] = _nan_to_none(self.clean_acc)
        data["robust_acc"] = _nan_to_none(self.robust_acc)
        data["summary"] = {k.split("/", 1)[1]: _finite_or_none(v) for k, v in self.scalars().items()}
        data["diagnostics"] = {k: _finite_or_none(v) for k, v in self.diagnostics.items()}
        data["history"] = [
            {
                key: ({k: _finite_or_none(v) for k, v in value.items()} if isinstance(value, dict) else value)
                for key, value in entry.items()
            }
            for entry in self.history
        ]
        if self.divergence is not None:
            data["divergence"] = {
                k: (_nan_to_none(v) if isinstance(v, list) else (None if isinstance(v, float) and math.isnan(v) else v))
                for k, v in data["divergence"].items()
            }
        return data

    def write_json(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
