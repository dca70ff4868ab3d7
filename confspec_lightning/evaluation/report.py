"""Per-class evaluation report of one model on one split under several attacks: table, JSON, Markdown, figures.

One report type for validation (clean and the evaluation PGD, every epoch; ``classwise_val.json``) and test
(clean, PGD-20, CW-20, AutoAttack, ...; ``evaluation/``): for every attack a
:class:`~confspec_lightning.classwise.ClasswiseResult` (the accuracy of each class, the average over
classes, the worst class, the spread, the overall accuracy and, for every attack but ``clean``, the robust
confusion matrix C as per-class error rates with what CSR targets: ||C||_2, sigma_1 / sigma_2, ||C||_1, nu).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from confspec_lightning import functional as CF
from confspec_lightning.classwise import ClasswiseResult, summarize
from confspec_lightning.io import atomic_write_text
from confspec_lightning.validation import check_labels

CLEAN = "clean"
FORMAT = "confspec-evaluation/2"
#: Printed tables with more classes show the TABLE_EXTREMES worst and best ones (by the robust accuracy).
MAX_TABLE_CLASSES = 20
TABLE_EXTREMES = 5
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


def _accuracy(pred: Tensor, target: Tensor, num_classes: int) -> list[float]:
    errors = CF.confusion_from_predictions(pred.detach().cpu().long(), target.detach().cpu().long(), num_classes)
    return CF.classwise_accuracy(errors, CF.counts_per_class(target.detach().cpu(), num_classes)).tolist()


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
            _accuracy(train_pred, train_target, num_classes),
            _accuracy(test_pred, test_target, num_classes),
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
    """Per-class evaluation of one model on one split under several attacks (``docs/explanation/method.md`` §8).

    ``attacks`` maps an attack name to its :class:`ClasswiseResult`, in the order given, weakest first: the
    last attack other than ``clean`` is taken as the strongest (its confusion matrix is plotted).
    ``robust_attack`` names the evaluation PGD (the ``robust_acc`` of logged scalars and of the printed table);
    ``history`` (validation during fit) holds one entry per evaluated epoch with the diagnostics of this split's
    robust confusion and of the training set's.
    """

    name: str
    class_names: list[str]
    class_counts: list[int]
    attacks: dict[str, ClasswiseResult]
    settings: dict[str, Any] = field(default_factory=dict)
    divergence: Divergence | None = None
    stage: str = "test"
    epoch: int | None = None
    robust_attack: str | None = None
    description: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    #: what the run ran with (package versions, commit, device: ``confspec_lightning.environment``)
    environment: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_predictions(
        cls,
        name: str,
        class_names: list[str],
        target: Tensor,
        predictions: Mapping[str, Tensor],
        settings: Mapping[str, Any] | None = None,
        divergence: Divergence | None = None,
        **fields: Any,
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
            **fields: ``stage``, ``epoch``, ``robust_attack``, ``description``.
        """
        k = len(class_names)
        if k < 2:
            raise ValueError(f"class_names={class_names!r} is not accepted; give at least 2 class names.")
        if not predictions:
            raise ValueError("predictions={} is not accepted; give at least one attack name -> predictions (N,).")
        target = target.detach().cpu().long()
        if target.ndim != 1:
            raise ValueError(f"target must be a 1-D tensor of labels; got shape {tuple(target.shape)}.")
        check_labels("target", target, k)
        if divergence is not None and not len(divergence.train_acc) == len(divergence.test_acc) == k:
            raise ValueError(
                f"divergence has {len(divergence.train_acc)} train / {len(divergence.test_acc)} test accuracies; "
                f"it needs one per class ({k})."
            )
        results: dict[str, ClasswiseResult] = {}
        for attack, pred in predictions.items():
            pred = pred.detach().cpu().long()
            if pred.shape != target.shape:
                raise ValueError(
                    f"predictions[{attack!r}] must have shape {tuple(target.shape)} like target; "
                    f"got {tuple(pred.shape)}."
                )
            check_labels(f"predictions[{attack!r}]", pred, k)
            results[attack] = ClasswiseResult.from_predictions(
                pred, target, class_names, with_confusion=attack != CLEAN
            )
        return cls(
            name=name,
            class_names=list(class_names),
            class_counts=CF.counts_per_class(target, k).tolist(),
            attacks=results,
            settings=dict(settings or {}),
            divergence=divergence,
            **fields,
        )

    @property
    def strongest_attack(self) -> str | None:
        """The last attack other than ``clean`` (None if there is none)."""
        robust = [attack for attack in self.attacks if attack != CLEAN]
        return robust[-1] if robust else None

    @property
    def robust(self) -> ClasswiseResult | None:
        """The result of the evaluation PGD (``robust_attack``), else of the strongest attack."""
        key = self.robust_attack if self.robust_attack in self.attacks else self.strongest_attack
        return None if key is None else self.attacks[key]

    # ------------------------------------------------------------- logging
    def scalars(self) -> dict[str, float]:
        """Headline numbers named ``<stage>/<metric>`` (the names logged to TensorBoard).

        ``clean_acc``, ``robust_acc`` (the evaluation PGD) with ``_worst`` and ``_spread``, the robust confusion's
        ``confusion_spectral_norm``, ``confusion_sigma_2``, ``confusion_sigma_ratio``, ``confusion_l1_norm`` and
        ``confusion_nu``, and ``<attack>_acc`` / ``<attack>_acc_worst`` of every other attack.
        """
        out: dict[str, float] = {}
        robust_key = self.robust_attack if self.robust_attack in self.attacks else self.strongest_attack
        for attack, result in self.attacks.items():
            kind = "clean_acc" if attack == CLEAN else "robust_acc" if attack == robust_key else f"{attack}_acc"
            out[f"{self.stage}/{kind}"] = result.avg
            out[f"{self.stage}/{kind}_worst"] = result.worst
            if kind in ("clean_acc", "robust_acc"):
                out[f"{self.stage}/{kind}_spread"] = result.spread
        robust = self.robust
        if robust is not None and robust.diagnostics:
            out[f"{self.stage}/confusion_spectral_norm"] = robust.confusion_spectral_norm
            for key in ("sigma_2", "sigma_ratio", "l1_norm", "nu"):
                out[f"{self.stage}/confusion_{key}"] = robust.diagnostics[key]
        return out

    def classwise_scalars(self) -> dict[str, float]:
        """Per-class accuracies named ``<stage>/<kind>_class/<name>`` (clean and the evaluation PGD)."""
        out: dict[str, float] = {}
        pairs = [("clean_acc", self.attacks.get(CLEAN)), ("robust_acc", self.robust)]
        for kind, result in pairs:
            if result is None:
                continue
            for name, value in zip(self.class_names, result.classwise_acc, strict=True):
                out[f"{self.stage}/{kind}_class/{name}"] = value
        return out

    def format_table(self) -> str:
        """A plain-text per-class table (one column per attack) with average, worst class, spread, ||C||_2.

        With more than :data:`MAX_TABLE_CLASSES` classes only the worst and best :data:`TABLE_EXTREMES` (by the
        robust accuracy) are shown; the JSON holds them all.
        """
        width = max([5, *(len(n) for n in self.class_names)])
        attacks = list(self.attacks)
        cell = max(9, *(len(a) + 2 for a in attacks))
        epoch = "" if self.epoch is None else f", epoch {self.epoch}"
        robust = f"; robust = {self.description}" if self.description else ""
        lines = [
            f"Per-class accuracy ({self.stage} split{epoch}{robust})",
            f"{'class':<{width}}  {'n':>5}  " + "  ".join(f"{a + ' %':>{cell}}" for a in attacks),
        ]
        sort_by = self.robust or next(iter(self.attacks.values()))
        shown: list[int | None] = list(range(len(self.class_names)))
        if len(shown) > MAX_TABLE_CLASSES:
            order = sorted(shown, key=lambda i: (math.isnan(sort_by.classwise_acc[i]), sort_by.classwise_acc[i]))
            shown = [*order[:TABLE_EXTREMES], None, *order[-TABLE_EXTREMES:]]
        for index in shown:
            if index is None:
                hidden = len(self.class_names) - 2 * TABLE_EXTREMES
                lines.append(f"{'...':<{width}}  ({hidden} classes not shown; all in the JSON)")
                continue
            values = "  ".join(f"{_pct(self.attacks[a].classwise_acc[index]):>{cell}}" for a in attacks)
            lines.append(f"{self.class_names[index]:<{width}}  {self.class_counts[index]:>5}  {values}")
        lines.append("-" * (width + 9 + (cell + 2) * len(attacks)))
        for label, key in (("avg", "avg"), ("worst", "worst"), ("spread", "spread")):
            values = "  ".join(f"{_pct(getattr(self.attacks[a], key)):>{cell}}" for a in attacks)
            lines.append(f"{label:<{width}}  {'':>5}  {values}")
        worst = ", ".join(f"{a}: class {r.worst_class}" for a, r in self.attacks.items() if r.worst_class is not None)
        if worst:
            lines.append(f"worst classes: {worst}")
        result = self.robust
        if result is not None and result.diagnostics:
            d = result.diagnostics
            lines += [
                f"||C||_2 of the robust confusion matrix (per-class error rates): {result.confusion_spectral_norm:.4f}",
                f"||C||_1 (worst-class robust error) {d['l1_norm']:.4f}, sigma_1 / sigma_2 {d['sigma_ratio']:.3f}, "
                f"nu = ||C||_1 / ||C||_2 {d['nu']:.3f}",
            ]
        if self.divergence is not None:
            train_avg, _, _, _ = summarize(self.divergence.train_acc)
            lines.append(
                f"Kendall tau of per-class robust accuracy, train subset vs {self.stage}: "
                f"{self.divergence.describe_tau()} (train subset robust avg {100 * train_avg:.2f} %)"
            )
        return "\n".join(lines)

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; undefined numbers (NaN, e.g. the accuracy of a class without samples) become null."""
        return _json_safe(
            {
                "format": FORMAT,
                "name": self.name,
                "stage": self.stage,
                "epoch": self.epoch,
                "class_names": self.class_names,
                "class_counts": self.class_counts,
                "robust_attack": self.robust_attack,
                "description": self.description,
                "attacks": {attack: asdict(result) for attack, result in self.attacks.items()},
                "summary": {k.split("/", 1)[1]: v for k, v in self.scalars().items()},
                "divergence": None if self.divergence is None else asdict(self.divergence),
                "settings": self.settings,
                "history": self.history,
                "environment": self.environment,
            }
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationReport:
        """Inverse of :meth:`to_dict` (null -> NaN for undefined numbers); reads format 1 reports too."""
        if data.get("format") not in (FORMAT, "confspec-evaluation/1"):
            raise ValueError(f"format={data.get('format')!r} is not accepted; expected {FORMAT!r}.")
        divergence = data.get("divergence")
        return cls(
            name=data["name"],
            class_names=list(data["class_names"]),
            class_counts=list(data["class_counts"]),
            attacks={attack: ClasswiseResult.from_dict(result) for attack, result in data["attacks"].items()},
            settings=dict(data.get("settings") or {}),
            divergence=None if divergence is None else Divergence.from_dict(divergence),
            stage=data.get("stage", "test"),
            epoch=data.get("epoch"),
            robust_attack=data.get("robust_attack"),
            description=data.get("description", ""),
            history=list(data.get("history") or []),
            environment=dict(data.get("environment") or {}),
        )

    def write_json(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` atomically (temporary file + rename)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load_json(cls, path: str | os.PathLike[str]) -> EvaluationReport:
        """Read a report written by :meth:`write_json`."""
        return cls.from_dict(json.loads(Path(path).read_text()))

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
        if self.environment:
            lines += ["", "## Environment", "", "Results repeat exactly with the same code, versions and device.", ""]
            lines += [f"- `{key}`: {value}" for key, value in self.environment.items()]
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
