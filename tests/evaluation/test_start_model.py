"""The start model's evaluation before a fit from a file: printed and logged, and a wrong input convention shows."""

from __future__ import annotations

import re

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from confspec_lightning.data import DigitsDataModule
from confspec_lightning.models import DigitsCNN

from helpers import CleanTrainingModule, make_module, make_trainer

LINE = re.compile(r"start model: clean ([\d.]+) %, PGD-3 ([\d.]+) % \(class-balanced; worst class")


@pytest.fixture(scope="module")
def trained_digits_file(tmp_path_factory):
    """A small trained model: a DigitsCNN trained (clean) on the normalised digits, saved as a plain state dict."""
    module = make_module(fairness=[], cls=CleanTrainingModule)
    make_trainer(max_epochs=6, limit_train_batches=1.0, limit_val_batches=0).fit(
        module, DigitsDataModule(batch_size=64)
    )
    path = tmp_path_factory.mktemp("start") / "digits_cnn.pt"
    torch.save(module.backbone.state_dict(), path)
    return path


def _fit_from(path, tmp_path, choice, capsys, **kwargs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = make_module(
        fairness=[], backbone=DigitsCNN(width=8), init_weights=str(path), input_normalization=choice, **kwargs
    )
    logger = TensorBoardLogger(str(tmp_path), name=choice, version=0)
    make_trainer(max_epochs=1, limit_train_batches=1, logger=logger).fit(module, DigitsDataModule(batch_size=32))
    out = capsys.readouterr().out
    (events,) = (tmp_path / choice / "version_0").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    logged = {tag: accumulator.Scalars(tag)[0].value for tag in accumulator.Tags()["scalars"] if "start/" in tag}
    return out, logged


def test_start_model_is_printed_and_logged_and_a_wrong_normalisation_shows(trained_digits_file, tmp_path, capsys):
    out, logged = _fit_from(trained_digits_file, tmp_path, "data", capsys)
    assert "read layout 'native'" in out and "model input normalisation: data: mean [0.3053]" in out
    match = LINE.search(out)
    assert match, out
    clean, robust = float(match.group(1)), float(match.group(2))
    assert clean > 80.0 and robust < clean
    assert set(logged) == {"start/clean_acc", "start/robust_acc", "start/clean_acc_worst", "start/robust_acc_worst"}
    assert logged["start/clean_acc"] == pytest.approx(clean / 100, abs=6e-4)
    # the same weights fed raw pixels (the wrong convention for this model): the line shows it before training
    wrong_out, wrong_logged = _fit_from(trained_digits_file, tmp_path, "none", capsys)
    wrong_clean = float(LINE.search(wrong_out).group(1))
    assert wrong_clean < clean - 20.0, (clean, wrong_clean)
    assert wrong_logged["start/clean_acc"] < logged["start/clean_acc"] - 0.2


def test_start_model_check_can_be_turned_off_and_leaves_training_randomness_alone(
    trained_digits_file, tmp_path, capsys
):
    outputs = {}
    for batches in (0, 2):
        torch.manual_seed(0)
        module = make_module(
            fairness=[],
            backbone=DigitsCNN(width=8),
            init_weights=str(trained_digits_file),
            start_model_check_batches=batches,
        )
        make_trainer(max_epochs=1, limit_train_batches=2).fit(module, DigitsDataModule(batch_size=32))
        outputs[batches] = {k: v.clone() for k, v in module.backbone.state_dict().items()}
        out = capsys.readouterr().out
        assert ("start model:" in out) == (batches > 0)
    for key, value in outputs[0].items():  # the check draws its noise from a forked RNG
        torch.testing.assert_close(outputs[2][key], value, msg=key)
    with pytest.raises(ValueError, match=r"start_model_check_batches=-1 is not accepted"):
        make_module(fairness=[], start_model_check_batches=-1)


def test_no_start_file_no_start_model_line(tmp_path, capsys):
    module = make_module(fairness=[])
    make_trainer(max_epochs=1, limit_train_batches=1).fit(module, DigitsDataModule(batch_size=32))
    assert "start model:" not in capsys.readouterr().out
