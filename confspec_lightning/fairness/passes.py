"""The extra passes fairness methods make over the data at an epoch's start or end (public Lightning APIs only).

CSR's ``epoch_pass`` and DAFA's fine-tuning statistics attack the training set; FRL, CFA's weight averaging and
WAT evaluate the validation split. Both run under the trainer's precision context, show a progress bar where the
trainer shows them, and leave the weights alone.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor


def training_batches(module: pl.LightningModule) -> Iterator[tuple[Tensor, Tensor]]:
    """A fresh pass over this rank's training batches (augmented, on device), under the precision context."""
    trainer = module.trainer
    limit = trainer.num_training_batches
    total = None if math.isinf(limit) else int(limit)
    batches = itertools.islice(trainer.train_dataloader, total)
    with trainer.precision_plugin.forward_context():
        for batch in progress(trainer, batches, total, f"epoch {trainer.current_epoch}: attack pass (train)"):
            x, target = trainer.strategy.batch_to_device(batch)  # the data module's transfer hooks run
            yield _formatted(module, x), target


def validation_batches(module: pl.LightningModule) -> Iterator[tuple[Tensor, Tensor]]:
    """This rank's share (samples rank, rank + W, ...) of the first validation loader's data set, on device.

    No padding, so the shares of all ranks partition the split and summed statistics equal a single process's.
    A :class:`~confspec_lightning.data.base.ClassificationDataModule` prepares the batches as validation batches
    (no augmentation: ``prepare_batch``); another data module's ``on_after_batch_transfer`` is applied as it is.
    """
    trainer = module.trainer
    datamodule = trainer.datamodule
    loaders = datamodule.val_dataloader() if datamodule is not None else trainer.val_dataloaders
    loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
    dataset = loader.dataset
    shard = torch.utils.data.Subset(dataset, range(trainer.global_rank, len(dataset), trainer.world_size))
    shard_loader = torch.utils.data.DataLoader(
        shard, batch_size=loader.batch_size or 256, shuffle=False, collate_fn=loader.collate_fn
    )
    description = f"epoch {trainer.current_epoch}: validation-split pass"
    with trainer.precision_plugin.forward_context():
        for batch in progress(trainer, shard_loader, len(shard_loader), description):
            batch = move_data_to_device(batch, module.device)
            if hasattr(datamodule, "prepare_batch"):
                batch = datamodule.prepare_batch(batch, augment=False)
            elif datamodule is not None:
                batch = datamodule.on_after_batch_transfer(batch, 0)
            x, target = batch
            yield _formatted(module, x), target


def _formatted(module: pl.LightningModule, x: Tensor) -> Tensor:
    format_input = getattr(module, "format_input", None)
    return format_input(x) if format_input is not None else x


def progress(trainer: pl.Trainer, batches: Iterable[Any], total: int | None, description: str) -> Iterable[Any]:
    """A progress bar over an extra pass (rank 0, when the trainer shows progress bars)."""
    bar = trainer.progress_bar_callback
    if bar is None or not bar.is_enabled or not trainer.is_global_zero:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, total=total, desc=description, leave=False, dynamic_ncols=True, unit="batch")
