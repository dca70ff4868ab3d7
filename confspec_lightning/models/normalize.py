"""Input normalisation as the first layer of the model, so attack budgets are in pixel units, and the choice of it.

The choice (``input_normalization``: the data set's statistics, none, or the start file's own) is decided by
:func:`resolve_input_normalization`, which refuses a normalisation that contradicts what a start file records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from confspec_lightning.validation import check_choice


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


#: How the model's inputs are normalised (``input_normalization``): the data set's mean/std (``data``), none (raw
#: pixels in [0, 1]: ``none``), or what the starting file records (``checkpoint``: RobustBench's ``mu`` / ``sigma``,
#: a ``RobustFairLitModule`` checkpoint's ``net.normalize``).
InputNormalization = Literal["data", "none", "checkpoint"]


@dataclass(frozen=True)
class RecordedNormalization:
    """The input normalisation a weights file records: per-channel mean and std, or none (``mean is None``: raw inputs).

    Attributes:
        mean: per-channel mean, or None for raw [0, 1] inputs.
        std: per-channel std, or None.
        source: where in the file it was read (``mu/sigma``, ``net.normalize``, ...).
    """

    mean: list[float] | None
    std: list[float] | None
    source: str

    def describe(self) -> str:
        """In words, e.g. ``mean [0.4914, 0.4822, 0.4465], std [...] (mu/sigma)`` or ``none (raw [0, 1] inputs)``."""
        if self.mean is None:
            return f"none, raw [0, 1] inputs ({self.source})"
        return f"mean {_rounded(self.mean)}, std {_rounded(self.std or [])} ({self.source})"


def _rounded(values: Sequence[float]) -> list[float]:
    return [round(float(v), 4) for v in values]


def _same(a: Sequence[float] | None, b: Sequence[float] | None, tolerance: float = 1e-4) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return len(a) == len(b) and all(abs(float(x) - float(y)) <= tolerance for x, y in zip(a, b, strict=True))


def _describe(mean: Sequence[float] | None, std: Sequence[float] | None) -> str:
    return "none (raw [0, 1] inputs)" if mean is None else f"mean {_rounded(mean)}, std {_rounded(std or [])}"


#: Per source, the convention read in the public code (for the error that asks for a decision).
CONVENTIONS = (
    "none = raw [0, 1] for TRADES, MART, TRADES-AWP, DAFA, the CSR authors and every RobustBench model (those that "
    "normalise carry mu/sigma: checkpoint); data = the data set's mean/std for fast_adversarial, AT-AWP, Rice et al., "
    "HAT trained with --normalize and this library's own models; checkpoint = the mu/sigma or net.normalize the file "
    "carries"
)


def resolve_input_normalization(
    choice: InputNormalization | None,
    data_mean: Sequence[float] | None,
    data_std: Sequence[float] | None,
    *,
    weights_file: str | None = None,
    recorded: RecordedNormalization | None = None,
    foreign_layout: str | None = None,
    backbone_normalizes: bool = False,
) -> tuple[list[float] | None, list[float] | None, str]:
    """The model's input normalisation (mean, std; None = raw inputs) and why, from the choice and the start file.

    ``choice=None`` decides where nothing is in doubt: no start file, or this library's own layout, gives the data's;
    a file that records its normalisation gives it when it equals the data's. A normalisation that contradicts
    what the file records, or a public file that records nothing without a choice, is refused: a wrong input
    convention gives a wrong accuracy without any error.

    Args:
        choice: ``data``, ``none``, ``checkpoint`` or None (decide as above).
        data_mean: the data set's per-channel mean (linked from the data module), or None.
        data_std: the data set's per-channel std, or None.
        weights_file: the start file (``init_weights``), or None.
        recorded: the normalisation the file records, or None.
        foreign_layout: the file's layout when it is a public one (not this library's), else None.
        backbone_normalizes: the backbone normalises its inputs itself (a RobustBench model): raw inputs only.

    Raises:
        ValueError: a choice that contradicts the file or the backbone, or no choice where one is needed; the message
            names the values and the choices.
    """
    if choice is not None:
        check_choice("input_normalization", choice, InputNormalization)
    where = f"init_weights={weights_file!r}" if weights_file else "the model"
    if backbone_normalizes:
        if choice in (None, "none"):
            return None, None, "none: the backbone normalises its inputs itself (RobustBench model)"
        raise ValueError(
            f"input_normalization={choice!r} is not accepted with this backbone: it normalises its inputs itself "
            "(a RobustBench model takes raw [0, 1] pixels); set input_normalization: none (or leave it unset)."
        )
    data = (list(data_mean), list(data_std or [])) if data_mean is not None else (None, None)
    if choice == "checkpoint":
        if recorded is None:
            raise ValueError(
                f"input_normalization='checkpoint' is not accepted: {where} records no input normalisation "
                f"(no mu/sigma, no net.normalize). Choose none (raw [0, 1]) or data (the data set's mean/std): "
                f"{CONVENTIONS}."
            )
        return recorded.mean, recorded.std, f"checkpoint: {recorded.describe()}"
    if choice in ("none", "data"):
        mean, std = (None, None) if choice == "none" else data
        if recorded is not None and not (_same(recorded.mean, mean) and _same(recorded.std, std)):
            raise ValueError(
                f"input_normalization={choice!r} ({_describe(mean, std)}) contradicts {where}, whose model was "
                f"trained with {recorded.describe()}: set input_normalization: checkpoint to keep the file's."
            )
        return mean, std, f"{choice}: {_describe(mean, std)}"
    # choice None: decide only where nothing is in doubt
    if recorded is not None:
        if _same(recorded.mean, data[0]) and _same(recorded.std, data[1]):
            return recorded.mean, recorded.std, f"checkpoint (= data): {recorded.describe()}"
        raise ValueError(
            f"{where} records the input normalisation {recorded.describe()}, but the data gives "
            f"{_describe(*data)}: decide with input_normalization: checkpoint (keep the file's, usually right) or "
            "data."
        )
    if weights_file is not None and foreign_layout is not None:
        raise ValueError(
            f"{where} is a public checkpoint (layout {foreign_layout!r}) that records no input normalisation, and "
            "input_normalization is not set: decide with input_normalization: none or data (feeding a model "
            f"inputs normalised otherwise than in its training gives a wrong accuracy without an error): {CONVENTIONS}."
        )
    return data[0], data[1], f"data: {_describe(*data)}"
