"""``confspec predict`` output: one CSV row per sample (index, label, clean and adversarial prediction)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from confspec_lightning.io import atomic_write_text

#: Columns of ``predictions.csv``; ``label`` and ``adversarial`` are empty for unlabelled batches.
COLUMNS = ("index", "label", "clean", "adversarial")


class PredictionWriter(BasePredictionWriter):
    """Writes the predictions of ``predict`` to ``predictions.csv`` in the run directory and says where.

    ``index`` is the sample's position in the predict data set (the test split for the shipped data modules).
    Under DDP the ranks' rows are gathered and rank 0 writes the one file, sorted by index (the shipped data
    modules deal whole batches to the ranks, so each sample appears once; another loader's repeated samples keep
    one row each).

    Args:
        directory: where to write (default: the trainer's log directory, else the working directory).
    """

    def __init__(self, directory: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.directory = directory
        self.path: Path | None = None
        self._rows: list[tuple[int, int | str, int, int | str]] = []

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rows = []

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        size = int(prediction["pred"].numel())
        if batch_indices is None or len(batch_indices) != size:  # a sampler Lightning cannot track: positions
            start = len(self._rows)
            batch_indices = range(start, start + size)
        label, clean, adversarial = prediction.get("target"), prediction["pred"].tolist(), prediction.get("adv_pred")
        labels = label.tolist() if label is not None else [""] * size
        adversarials = adversarial.tolist() if adversarial is not None else [""] * size
        self._rows += [(int(i), y, c, a) for i, y, c, a in zip(batch_indices, labels, clean, adversarials, strict=True)]

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        directory = Path(self.directory or trainer.log_dir or ".")  # log_dir: a collective under DDP
        target = getattr(pl_module, "prediction_file", None)  # confspec's choice for a run's checkpoint
        rows = self._rows
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)  # every rank: a collective
            rows = [row for part in gathered for row in part]
        if not trainer.is_global_zero:
            return
        unique = {row[0]: row for row in rows}  # a repeated (padded) sample keeps one row
        self.path = Path(target) if target is not None and self.directory is None else directory / "predictions.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(COLUMNS)
        writer.writerows(sorted(unique.values(), key=lambda row: row[0]))
        atomic_write_text(self.path, buffer.getvalue())
        print(f"predictions of {len(unique)} samples written to {self.path}", flush=True)


def read_predictions(path: str | Path) -> dict[str, torch.Tensor]:
    """The columns of a ``predictions.csv`` as int64 tensors (-1 where a value is empty)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {column: torch.tensor([int(r[column]) if r[column] != "" else -1 for r in rows]) for column in COLUMNS}
