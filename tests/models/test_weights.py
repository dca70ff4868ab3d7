"""Safe loading of backbone weights: wrapper prefixes, Lightning checkpoints, wrong architectures, hostile files."""

from __future__ import annotations

import pytest
import torch

from confspec_lightning.models import DigitsCNN, ResNet18, load_backbone_weights

from helpers import make_module, make_trainer


def test_load_plain_state_dict_with_wrapper_prefixes(tmp_path):
    source = DigitsCNN(width=8)
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    target = DigitsCNN(width=8)
    load_backbone_weights(target, path)
    for (k, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k)


def test_fine_tune_from_a_lightning_checkpoint(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from confspec_lightning.data import DigitsDataModule

    trained = make_module()
    cb = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    make_trainer(enable_checkpointing=True, callbacks=[cb]).fit(trained, DigitsDataModule(batch_size=32))
    tuned = make_module(backbone=DigitsCNN(width=8), init_weights=str(tmp_path / "last.ckpt"))
    for k, v in trained.backbone.state_dict().items():
        torch.testing.assert_close(tuned.backbone.state_dict()[k], v, msg=k)


def test_wrong_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(DigitsCNN(width=8).state_dict(), path)
    with pytest.raises(ValueError, match=r"does not fit the backbone DigitsCNN.*other shapes \[features.0.weight"):
        load_backbone_weights(DigitsCNN(width=16), path)
    with pytest.raises(
        ValueError, match=r"does not fit the backbone ResNet18: its layout is not one.*init_weights_layout"
    ):
        load_backbone_weights(ResNet18(), path)


class Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_objects_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": DigitsCNN(width=8).state_dict(), "extra": Payload()}, path)
    with pytest.raises(ValueError, match="pickled Python objects, which are refused"):
        load_backbone_weights(DigitsCNN(width=8), path)
    assert "pickled code ran" not in capsys.readouterr().out


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_backbone_weights(DigitsCNN(), tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    torch.save(DigitsCNN().state_dict(), bad)
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_backbone_weights(DigitsCNN(), bad)
