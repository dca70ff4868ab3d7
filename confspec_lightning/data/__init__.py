"""Data modules. Each exposes ``num_classes``, ``class_names``, ``mean``, ``std`` and ``input_shape``."""

from confspec_lightning.data.digits import DigitsDataModule

__all__ = ["DigitsDataModule"]
