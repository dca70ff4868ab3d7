"""Input normalisation as the first layer of the model, so attack budgets are in pixel units."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Normalize(nn.Module):
    """(x - mean) / std per channel, for inputs in [0, 1] of shape (B, C, ...)."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or len(mean) == 0:
            raise ValueError(f"mean {list(mean)} and std {list(std)} must be non-empty and of the same length.")
        if any(s <= 0 for s in std):
            raise ValueError(f"std={list(std)} is not accepted; every entry must be > 0.")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.mean.shape[1]:
            raise ValueError(
                f"the input has {x.shape[1]} channels but the normalisation has {self.mean.shape[1]} "
                f"(mean={self.mean.flatten().tolist()})."
            )
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
