"""Fairness methods that compose with any base objective (CSR; baselines follow the same interface)."""

from confspec_lightning.fairness.base import EpochContext, FairnessMethod
from confspec_lightning.fairness.csr import CSR

__all__ = ["CSR", "EpochContext", "FairnessMethod"]
