"""confspec-lightning: robust and class-fair adversarial training for PyTorch Lightning.

The pure-torch core (``attacks``, ``objectives``, ``functional``, ``metrics``, ``fairness``) is usable
without a Trainer; :class:`RobustFairLitModule` wires it into Lightning and ``confspec`` drives it.
The names below are imported on first use, so ``import confspec_lightning`` itself is instant.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "AttackConfig": "confspec_lightning.attacks",
    "pgd": "confspec_lightning.attacks",
    "CSR": "confspec_lightning.fairness",
    "FairnessMethod": "confspec_lightning.fairness",
    "RobustConfusionMatrix": "confspec_lightning.metrics",
    "RobustFairLitModule": "confspec_lightning.module",
}

__all__ = [
    "CSR",
    "AttackConfig",
    "FairnessMethod",
    "RobustConfusionMatrix",
    "RobustFairLitModule",
    "__version__",
    "pgd",
]

if TYPE_CHECKING:  # pragma: no cover
    from confspec_lightning.attacks import AttackConfig, pgd
    from confspec_lightning.fairness import CSR, FairnessMethod
    from confspec_lightning.metrics import RobustConfusionMatrix
    from confspec_lightning.module import RobustFairLitModule


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'confspec_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
