"""The evaluation component: what it publishes to TensorBoard, and its options."""

from __future__ import annotations

import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from confspec_lightning.data import DigitsDataModule
from confspec_lightning.evaluation import Evaluator

from helpers import make_module, make_trainer


@pytest.mark.parametrize(("figures", "max_scalars"), [(True, 20), (False, 3)])
def test_options_decide_the_tensorboard_images_and_scalars_not_the_report(figures, max_scalars, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = make_module(fairness=[], evaluator=Evaluator(figures=figures, max_classwise_scalars=max_scalars))
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    make_trainer(max_epochs=1, limit_train_batches=1, logger=logger).fit(module, DigitsDataModule(batch_size=32))
    (events,) = (tmp_path / "run/version_0").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    images = set(accumulator.Tags()["images"])
    assert images == ({"val/classwise_accuracy", "val/robust_confusion"} if figures else set())
    scalars = set(accumulator.Tags()["scalars"])
    # per-class scalars only up to max_classwise_scalars classes (10 here); the summaries always
    per_class = {tag for tag in scalars if tag.startswith(("val/robust_acc_class/", "val/clean_acc_class/"))}
    assert len(per_class) == (20 if max_scalars >= 10 else 0) and "val/robust_acc_worst" in scalars
    assert len(module.evaluator.reports["val"].robust.classwise_acc) == 10
