"""Backbones, the input normalisation layer and safe weight loading for fine-tuning.

Any ``nn.Module`` (e.g. ``torchvision.models.resnet18`` by ``class_path``) can be a backbone. ``RobustBenchModel``
builds a RobustBench model zoo entry (the optional extra ``robustbench``, imported when one is built).
"""

from confspec_lightning.models.digits import DigitsCNN
from confspec_lightning.models.normalize import Normalize
from confspec_lightning.models.resnet import PreActResNet18, ResNet18, WideResNet
from confspec_lightning.models.robustbench import RobustBenchModel
from confspec_lightning.models.weights import load_backbone_weights

__all__ = [
    "DigitsCNN",
    "Normalize",
    "PreActResNet18",
    "ResNet18",
    "RobustBenchModel",
    "WideResNet",
    "load_backbone_weights",
]
