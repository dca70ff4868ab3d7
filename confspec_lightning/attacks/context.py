"""The two contexts every attack runs in (eval mode, autograd on) and the threat model's norm."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

Norm = Literal["linf", "l2"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own ``training`` flag afterwards.

    A blanket ``model.train()`` afterwards would unfreeze submodules the user froze on purpose
    (e.g. BatchNorm layers of a fine-tuned backbone); this restores them one by one.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def grad_enabled() -> Iterator[None]:
    """Enable autograd even inside ``torch.inference_mode()`` or ``torch.no_grad()``."""
    with torch.inference_mode(False), torch.enable_grad():
        yield
