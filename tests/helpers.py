"""Shared builders for tests that use a real Lightning Trainer."""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch

from confspec_lightning import CSR, AttackConfig, RobustFairLitModule
from confspec_lightning.data import DigitsDataModule
from confspec_lightning.models import DigitsCNN

QUICK_ATTACK = AttackConfig(eps=0.1, step=0.04, steps=3)


def make_module(fairness: list | None = None, cls: type | None = None, **kwargs: Any) -> RobustFairLitModule:
    torch.manual_seed(0)
    defaults: dict[str, Any] = dict(
        backbone=DigitsCNN(width=8),
        num_classes=10,
        train_attack=QUICK_ATTACK,
        eval_attack=QUICK_ATTACK,
        fairness=fairness if fairness is not None else [CSR()],
        optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9),
        input_mean=DigitsDataModule.mean,
        input_std=DigitsDataModule.std,
    )
    defaults.update(kwargs)
    return (cls or RobustFairLitModule)(**defaults)


def make_trainer(**kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=1,
        limit_test_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


class DirectionRecorder(pl.Callback):
    """Records CSR's G at the first batch of every epoch (after the epoch-start refresh)."""

    def __init__(self) -> None:
        self.directions: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.directions[trainer.current_epoch] = pl_module.fairness[0].direction.detach().clone()


class CleanTrainingModule(RobustFairLitModule):
    """Skips the training attack (standard training): a quick way to get an accurate, non-robust model."""

    calls = 0

    def generate_adversarial(self, x, target):
        CleanTrainingModule.calls += 1
        return x
