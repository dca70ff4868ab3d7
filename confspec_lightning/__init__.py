"""confspec-lightning: robust and class-fair adversarial training for PyTorch Lightning.

The pure-torch core (``attacks``, ``objectives``, ``functional``, ``metrics``, ``fairness``) is usable
without a Trainer; :class:`RobustFairLitModule` wires it into Lightning and ``confspec`` drives it.
"""

__version__ = "0.1.0"

from confspec_lightning.attacks import AttackConfig, pgd
from confspec_lightning.fairness import CSR, FairnessMethod
from confspec_lightning.metrics import RobustConfusionMatrix
from confspec_lightning.module import RobustFairLitModule

__all__ = [
    "CSR",
    "AttackConfig",
    "FairnessMethod",
    "RobustConfusionMatrix",
    "RobustFairLitModule",
    "__version__",
    "pgd",
]
