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
    Under DDP every rank writes its share to ``predictions_rank<r>.csv`` (a ``DistributedSampler`` may repeat
    a few samples to even out the ranks; the index tells them apart).

    Args:
        directory: where to write (default: the trainer's log directory, else the working directory).
    """

    def __init__(self, directory: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.directory = directory
        self.path: Path | None = None

    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any] | None,
    ) -> None:
        rows = []
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        indices = batch_indices[0] if batch_indices and isinstance(batch_indices[0], list) else batch_indices
        offset = 0
        for number, out in enumerate(batches):
            size = int(out["pred"].numel())
            index = indices[number] if indices and number < len(indices) and indices[number] else None
            index = list(index) if index is not None else list(range(offset, offset + size))
            offset += size
            label = out.get("target")
            adversarial = out.get("adv_pred")
            for i in range(size):
                rows.append(
                    (
                        int(index[i]),
                        "" if label is None else int(label[i]),
                        int(out["pred"][i]),
                        "" if adversarial is None else int(adversarial[i]),
                    )
                )
        rows.sort(key=lambda row: row[0])
        directory = Path(self.directory or trainer.log_dir or ".")
        name = "predictions.csv" if trainer.world_size == 1 else f"predictions_rank{trainer.global_rank}.csv"
        self.path = directory / name
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
        atomic_write_text(self.path, buffer.getvalue())
        print(f"predictions of {len(rows)} samples written to {self.path}", flush=True)


def read_predictions(path: str | Path) -> dict[str, torch.Tensor]:
    """The columns of a ``predictions.csv`` as int64 tensors (-1 where a value is empty)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {column: torch.tensor([int(r[column]) if r[column] != "" else -1 for r in rows]) for column in COLUMNS}
