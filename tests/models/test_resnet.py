"""The backbones: output shapes and parameter counts of the literature's definitions."""

from __future__ import annotations

import pytest
import torch
import torchvision

from confspec_lightning.models import PreActResNet18, ResNet18, WideResNet


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
