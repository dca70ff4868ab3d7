"""Backbones (output shapes at 32x32 and 64x64) and safe weight loading for fine-tuning."""

from __future__ import annotations

import pytest
import torch
import torchvision

from confspec_lightning.models import DigitsCNN, PreActResNet18, ResNet18, WideResNet, load_backbone_weights

from helpers import make_module, make_trainer


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "build,params",
    [
        (lambda k: ResNet18(k), 11_173_962),
        (lambda k: PreActResNet18(k), 11_172_170),  # with the final BN of Rice et al. (2020)
        (lambda k: WideResNet(k, depth=28, widen_factor=10), 36_479_194),
        (lambda k: WideResNet(k, depth=34, widen_factor=10), 46_160_474),
        (lambda k: torchvision.models.resnet18(num_classes=k), None),
    ],
    ids=["resnet18", "preact18", "wrn28-10", "wrn34-10", "torchvision-resnet18"],
)
@pytest.mark.parametrize("size", [32, 64])
def test_backbone_output_shapes(build, params, size):
    torch.manual_seed(0)
    model = build(10).eval()
    if params is not None:
        assert n_params(model) == params  # the standard definitions (10 classes)
    with torch.no_grad():
        assert model(torch.rand(2, 3, size, size)).shape == (2, 10)
    assert build(200).eval()(torch.rand(1, 3, size, size)).shape == (1, 200)


def test_wideresnet_rejects_bad_depth():
    with pytest.raises(ValueError, match=r"depth=30.*6n \+ 4"):
        WideResNet(depth=30)


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
    with pytest.raises(ValueError, match=r"does not fit the backbone ResNet18.*missing"):
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
