"""Backbones and the input normalisation layer."""

from confspec_lightning.models.digits import DigitsCNN
from confspec_lightning.models.normalize import Normalize

__all__ = ["DigitsCNN", "Normalize"]
