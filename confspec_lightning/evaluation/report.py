"""Per-class evaluation report of one model under several attacks: JSON, Markdown and PNG figures.

Built from per-sample predictions (clean, PGD-20, CW-20, AutoAttack, ...; method.md section 5): for every
attack the accuracy of each class, the average over classes, the worst class, the spread (best - worst),
the overall accuracy and, for every attack but ``clean``, the robust confusion matrix C as per-class error
rates (rows = predicted, columns = true class, zero diagonal) with its spectral norm ||C||_2.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from confspec_lightning import functional as CF
from confspec_lightning.io import atomic_write_text

CLEAN = "clean"
FORMAT = "confspec-evaluation/1"
JSON_NAME = "evaluation.json"
MARKDOWN_NAME = "evaluation.md"
CLASSWISE_FIGURE = "classwise_accuracy.png"
CONFUSION_FIGURE = "robust_confusion.png"


def _json_safe(value: Any) -> Any:
    """``value`` as plain JSON data: NaN / inf -> None, tensors and tuples -> lists, dataclasses -> dicts."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Tensor):
        return _json_safe(value.detach().cpu().tolist())
    if is_dataclass(value) and not isinstance(value, type):
        return _json_safe(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, numbers.Integral):  # numpy integers
        return int(value)
    if isinstance(value, numbers.Real):
        return _json_safe(float(value))
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def _float(value: float | None) -> float:
    """JSON null -> NaN (the inverse of :func:`_json_safe` for numbers that may be undefined)."""
    return math.nan if value is None else float(value)


def _floats(values: Sequence[float | None]) -> list[float]:
    return [_float(v) for v in values]


def _pct(value: float | None) -> str:
    """A rate as a percentage with 2 decimals, ``-`` when undefined."""
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _cell(text: str) -> str:
    """Escape the pipe so that ``text`` stays in one Markdown table cell."""
    return str(text).replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


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


def classwise_accuracy_from_predictions(pred: Tensor, target: Tensor, num_classes: int) -> list[float]:
    """Accuracy of every class (K,) from predicted and true labels; NaN for a class without samples."""
    errors = CF.confusion_from_predictions(pred.detach().cpu().long(), target.detach().cpu().long(), num_classes)
    return CF.classwise_accuracy(errors, CF.counts_per_class(target.detach().cpu(), num_classes)).tolist()


@dataclass
class AttackResult:
    """Per-class numbers of one attack (rates in [0, 1]).

    ``avg`` = mean of ``classwise_acc`` over classes, ``worst`` = its minimum (class ``worst_class``),
    ``spread`` = best - worst, ``overall`` = accuracy over all samples. ``confusion`` (None for ``clean``)
    holds per-true-class error rates, so its column sums are the class-wise errors;
    ``confusion_spectral_norm`` = ||C||_2 = sigma_max(C).
    """

    classwise_acc: list[float]
    avg: float
    worst: float
    worst_class: str | None
    spread: float
    overall: float
    confusion: list[list[float]] | None = None
    confusion_spectral_norm: float | None = None

    @classmethod
    def from_predictions(
        cls, pred: Tensor, target: Tensor, class_names: Sequence[str], with_confusion: bool = True
    ) -> AttackResult:
        """Numbers of one attack from its predictions (N,) and the labels (N,)."""
        k = len(class_names)
        pred, target = pred.detach().cpu().long(), target.detach().cpu().long()
        accuracy = classwise_accuracy_from_predictions(pred, target, k)
        avg, worst, worst_index, spread = summarize(accuracy)
        confusion = norm = None
        if with_confusion:
            rates = CF.confusion_from_predictions(pred, target, k, normalize=True).double()
            confusion, norm = rates.tolist(), float(CF.spectral_norm(rates))
        return cls(
            classwise_acc=accuracy,
            avg=avg,
            worst=worst,
            worst_class=None if worst_index is None else class_names[worst_index],
            spread=spread,
            overall=float((pred == target).double().mean()) if target.numel() else math.nan,
            confusion=confusion,
            confusion_spectral_norm=norm,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AttackResult:
        """Inverse of ``to_dict`` (null -> NaN)."""
        return cls(
            classwise_acc=_floats(data["classwise_acc"]),
            avg=_float(data["avg"]),
            worst=_float(data["worst"]),
            worst_class=data.get("worst_class"),
            spread=_float(data["spread"]),
            overall=_float(data["overall"]),
            confusion=data.get("confusion"),
            confusion_spectral_norm=data.get("confusion_spectral_norm"),
        )


@dataclass
class Divergence:
    """Train/test divergence of per-class robust accuracy (rates in [0, 1]).

    ``kendall_tau`` is Kendall's tau-b between ``train_acc`` (a train subset) and ``test_acc`` (the test
    split), see :func:`confspec_lightning.functional.kendall_tau`: 1 when the classes rank the same on both.
    """

    attack: str
    train_acc: list[float]
    test_acc: list[float]
    kendall_tau: float
    train_size: int | None = None

    @classmethod
    def from_accuracies(
        cls,
        attack: str,
        train_acc: Tensor | Sequence[float],
        test_acc: Tensor | Sequence[float],
        train_size: int | None = None,
    ) -> Divergence:
        """From per-class robust accuracies (K,) on the train subset and on the test split."""
        train = torch.as_tensor(train_acc, dtype=torch.float64).detach().cpu()
        test = torch.as_tensor(test_acc, dtype=torch.float64).detach().cpu()
        if train.ndim != 1 or train.shape != test.shape:
            raise ValueError(
                f"train_acc and test_acc must be per-class vectors of the same length; "
                f"got shapes {tuple(train.shape)} and {tuple(test.shape)}."
            )
        return cls(attack, train.tolist(), test.tolist(), CF.kendall_tau(train, test), train_size)

    @classmethod
    def from_predictions(
        cls,
        attack: str,
        num_classes: int,
        train_target: Tensor,
        train_pred: Tensor,
        test_target: Tensor,
        test_pred: Tensor,
    ) -> Divergence:
        """From robust predictions and labels on the train subset and on the test split."""
        return cls.from_accuracies(
            attack,
            classwise_accuracy_from_predictions(train_pred, train_target, num_classes),
            classwise_accuracy_from_predictions(test_pred, test_target, num_classes),
            train_size=int(train_target.numel()),
        )

    def describe_tau(self, digits: int = 3) -> str:
        """Kendall's tau as text; why it is undefined when it is (e.g. every class at 0 % on one split)."""
        if not math.isnan(self.kendall_tau):
            return f"{self.kendall_tau:.{digits}f}"
        for split, values in (("train subset", self.train_acc), ("test split", self.test_acc)):
            present = {v for v in values if not math.isnan(v)}
            if len(present) == 1:
                return f"undefined (every class at {100 * present.pop():.0f} % on the {split})"
        return "undefined (fewer than 2 classes with samples)"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Divergence:
        """Inverse of ``asdict`` after :func:`_json_safe` (null -> NaN)."""
        return cls(
            attack=data["attack"],
            train_acc=_floats(data["train_acc"]),
            test_acc=_floats(data["test_acc"]),
            kendall_tau=_float(data["kendall_tau"]),
            train_size=data.get("train_size"),
        )


@dataclass
class EvaluationReport:
    """Per-class evaluation of one model under several attacks (method.md section 5).

    ``attacks`` maps an attack name to its :class:`AttackResult`, in the order given, weakest first: the
    last attack other than ``clean`` is taken as the strongest (its confusion matrix is plotted).
    """

    name: str
    class_names: list[str]
    class_counts: list[int]
    attacks: dict[str, AttackResult]
    settings: dict[str, Any] = field(default_factory=dict)
    divergence: Divergence | None = None

    @classmethod
    def from_predictions(
        cls,
        name: str,
        class_names: list[str],
        target: Tensor,
        predictions: Mapping[str, Tensor],
        settings: Mapping[str, Any] | None = None,
        divergence: Divergence | None = None,
    ) -> EvaluationReport:
        """Build the report from the labels (N,) and, per attack, the predicted classes (N,).

        Args:
            name: method / run name (a row of ``confspec-compare``).
            class_names: K class names.
            target: true classes (N,).
            predictions: attack name (``"clean"``, ``"pgd20"``, ``"cw20"``, ``"autoattack"``, ...) -> (N,)
                predicted classes, weakest attack first.
            settings: free-form description of the evaluation (threat model, checkpoint, ...), kept as is.
            divergence: optional train/test divergence (:class:`Divergence`).
        """
        k = len(class_names)
        if k < 2:
            raise ValueError(f"class_names={class_names!r} is not accepted; give at least 2 class names.")
        if not predictions:
            raise ValueError("predictions={} is not accepted; give at least one attack name -> predictions (N,).")
        target = target.detach().cpu().long()
        if target.ndim != 1:
            raise ValueError(f"target must be a 1-D tensor of labels; got shape {tuple(target.shape)}.")
        _check_labels("target", target, k)
        if divergence is not None and not len(divergence.train_acc) == len(divergence.test_acc) == k:
            raise ValueError(
                f"divergence has {len(divergence.train_acc)} train / {len(divergence.test_acc)} test accuracies; "
                f"it needs one per class ({k})."
            )
        results: dict[str, AttackResult] = {}
        for attack, pred in predictions.items():
            pred = pred.detach().cpu().long()
            if pred.shape != target.shape:
                raise ValueError(
                    f"predictions[{attack!r}] must have shape {tuple(target.shape)} like target; "
                    f"got {tuple(pred.shape)}."
                )
            _check_labels(f"predictions[{attack!r}]", pred, k)
            results[attack] = AttackResult.from_predictions(pred, target, class_names, with_confusion=attack != CLEAN)
        return cls(
            name=name,
            class_names=list(class_names),
            class_counts=CF.counts_per_class(target, k).tolist(),
            attacks=results,
            settings=dict(settings or {}),
            divergence=divergence,
        )

    @property
    def strongest_attack(self) -> str | None:
        """The last attack other than ``clean`` (None if there is none)."""
        robust = [attack for attack in self.attacks if attack != CLEAN]
        return robust[-1] if robust else None

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; undefined numbers (NaN, e.g. the accuracy of a class without samples) become null."""
        return _json_safe(
            {
                "format": FORMAT,
                "name": self.name,
                "class_names": self.class_names,
                "class_counts": self.class_counts,
                "attacks": {attack: asdict(result) for attack, result in self.attacks.items()},
                "divergence": None if self.divergence is None else asdict(self.divergence),
                "settings": self.settings,
            }
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationReport:
        """Inverse of :meth:`to_dict` (null -> NaN for undefined numbers)."""
        if data.get("format") != FORMAT:
            raise ValueError(f"format={data.get('format')!r} is not accepted; expected {FORMAT!r}.")
        divergence = data.get("divergence")
        return cls(
            name=data["name"],
            class_names=list(data["class_names"]),
            class_counts=list(data["class_counts"]),
            attacks={attack: AttackResult.from_dict(result) for attack, result in data["attacks"].items()},
            settings=dict(data.get("settings") or {}),
            divergence=None if divergence is None else Divergence.from_dict(divergence),
        )

    def write_json(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` atomically (temporary file + rename)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load_json(cls, path: str | os.PathLike[str]) -> EvaluationReport:
        """Read a report written by :meth:`write_json`."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (KeyError, TypeError, ValueError) as error:
            message = f"{os.fspath(path)!r} is not an evaluation report written by write_json: {error}"
            raise ValueError(message) from error

    # ---------------------------------------------------------------- Markdown
    def to_markdown(self, figures: Mapping[str, str] | None = None) -> str:
        """The report as Markdown (percentages with 2 decimals).

        Sections: headline table (attack x avg, worst (class), spread, ||C||_2, overall), per-class table
        (one column per attack), the figures (``figures`` maps a caption to a relative path), the train/test
        divergence if present, then the settings.
        """
        lines = [f"# Evaluation: {self.name}", "", "## Summary", ""]
        rows = []
        for attack, r in self.attacks.items():
            worst = _pct(r.worst) + ("" if r.worst_class is None else f" ({_cell(r.worst_class)})")
            norm = "-" if r.confusion_spectral_norm is None else f"{r.confusion_spectral_norm:.4f}"
            rows.append([_cell(attack), _pct(r.avg), worst, _pct(r.spread), norm, _pct(r.overall)])
        header = ["attack", "avg %", "worst % (class)", "spread %", "\\|\\|C\\|\\|_2", "overall %"]
        lines += _table(header, rows)
        lines += [
            "",
            "avg = mean of the per-class accuracies, worst = lowest class, spread = best - worst class; "
            "||C||_2 = spectral norm of the robust confusion matrix (per-class error rates; rows = predicted, "
            "columns = true class).",
            "",
            "## Per-class accuracy (%)",
            "",
        ]
        header = ["class", "n", *(f"{_cell(attack)}" for attack in self.attacks)]
        rows = [
            [_cell(class_name), str(count), *(_pct(r.classwise_acc[index]) for r in self.attacks.values())]
            for index, (class_name, count) in enumerate(zip(self.class_names, self.class_counts, strict=True))
        ]
        lines += _table(header, rows)
        if figures:
            lines += ["", "## Figures", ""]
            for caption, path in figures.items():
                lines += [f"![{caption}]({path})", ""]
            lines.pop()
        if self.divergence is not None:
            d = self.divergence
            size = "" if d.train_size is None else f" ({d.train_size} samples)"
            tau = d.describe_tau(4)
            lines += [
                "",
                "## Train/test divergence",
                "",
                f"Per-class robust accuracy ({_cell(d.attack)}) on a train subset{size} and on the test split; "
                f"Kendall's tau-b rank correlation = {tau}.",
                "",
            ]
            rows = []
            for class_name, train, test in zip(self.class_names, d.train_acc, d.test_acc, strict=True):
                gap = "-" if math.isnan(train) or math.isnan(test) else f"{100 * (train - test):.2f}"
                rows.append([_cell(class_name), _pct(train), _pct(test), gap])
            lines += _table(["class", "train %", "test %", "train - test (points)"], rows)
        if self.settings:
            lines += ["", "## Settings", ""]
            for key, value in self.settings.items():
                text = value if isinstance(value, str) else json.dumps(_json_safe(value))
                lines.append(f"- `{key}`: {text}")
        return "\n".join(lines) + "\n"

    # ---------------------------------------------------------------- files
    def write(self, directory: str | os.PathLike[str]) -> dict[str, Path]:
        """Write ``evaluation.json``, ``evaluation.md`` and the PNG figures into ``directory``.

        Figures: ``classwise_accuracy.png`` (per-class bars, clean and each attack) and, when there is a
        robust attack, ``robust_confusion.png`` (heatmap of the strongest attack's C). The Markdown embeds
        them by relative path. Every file is written atomically.

        Returns:
            ``{"json": ..., "markdown": ..., "classwise_accuracy": ..., "robust_confusion": ...}`` paths.
        """
        from confspec_lightning.plotting import classwise_bars, confusion_heatmap

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written: dict[str, Path] = {}
        figures: dict[str, str] = {}
        fig, _ = classwise_bars(
            {attack: r.classwise_acc for attack, r in self.attacks.items()},
            class_names=self.class_names,
            title=f"{self.name}: per-class accuracy",
        )
        written["classwise_accuracy"] = _save_figure(fig, directory / CLASSWISE_FIGURE)
        figures["per-class accuracy"] = CLASSWISE_FIGURE
        strongest = self.strongest_attack
        confusion = None if strongest is None else self.attacks[strongest].confusion
        if strongest is not None and confusion is not None:
            fig, _ = confusion_heatmap(
                torch.tensor(confusion, dtype=torch.float64),
                class_names=self.class_names,
                title=f"robust confusion ({strongest})",
            )
            written["robust_confusion"] = _save_figure(fig, directory / CONFUSION_FIGURE)
            figures[f"robust confusion matrix ({strongest})"] = CONFUSION_FIGURE
        written["json"] = directory / JSON_NAME
        self.write_json(written["json"])
        written["markdown"] = directory / MARKDOWN_NAME
        atomic_write_text(written["markdown"], self.to_markdown(figures))
        return written


def _check_labels(name: str, labels: Tensor, num_classes: int) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{name} holds labels in [{int(labels.min())}, {int(labels.max())}]; "
            f"they must lie in [0, {num_classes - 1}] (one per class name)."
        )


def _save_figure(fig: Any, path: Path) -> Path:
    """Save a matplotlib figure as PNG through a temporary file and an atomic rename, then close it."""
    import matplotlib.pyplot as plt

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            fig.savefig(handle, format="png", dpi=120)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path
