"""Data modules. Each exposes ``num_classes``, ``class_names``, ``mean``, ``std`` and ``input_shape``."""

from confspec_lightning.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from confspec_lightning.data.digits import DigitsDataModule
from confspec_lightning.data.tinyimagenet import TinyImageNetDataModule

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule", "DigitsDataModule", "TinyImageNetDataModule"]
