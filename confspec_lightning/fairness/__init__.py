"""Fairness methods that compose with any base objective: CSR and the baselines FRL, FAAL, CFA, WAT, DAFA."""

from confspec_lightning.fairness.base import EpochContext, FairnessMethod
from confspec_lightning.fairness.cfa import CFA
from confspec_lightning.fairness.csr import CSR
from confspec_lightning.fairness.dafa import DAFA
from confspec_lightning.fairness.faal import FAAL
from confspec_lightning.fairness.frl import FRL
from confspec_lightning.fairness.wat import WAT

__all__ = ["CFA", "CSR", "DAFA", "FAAL", "FRL", "WAT", "EpochContext", "FairnessMethod"]
