"""Argument checks, one place for all of them: every error names the field, shows the value, says what is accepted.

String options are ``Literal`` types; :func:`choices` derives the accepted strings from the type itself, so a
list of choices is never kept by hand beside it.
"""

from __future__ import annotations

import math
import numbers
import typing
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor


def choices(literal: Any) -> tuple[str, ...]:
    """The strings a ``Literal[...]`` type accepts (``typing.get_args``), e.g. ``choices(Norm) == ("linf", "l2")``."""
    values = typing.get_args(literal)
    if not values:
        raise TypeError(f"{literal!r} is not a Literal type.")
    return tuple(values)


def check_choice(name: str, value: object, accepted: Any) -> None:
    """Raise a ``ValueError`` naming ``name``, the bad ``value`` and the accepted strings.

    ``accepted``: a ``Literal`` type or a sequence of strings.
    """
    options = tuple(accepted) if isinstance(accepted, list | tuple) else choices(accepted)
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name}={value!r} is not accepted; choose one of {', '.join(map(repr, options))}.")


def check_real(name: str, value: object, ok: Callable[[float], bool], accepted: str) -> None:
    """Reject ``value`` unless it is a finite real number with ``ok(value)``; the error names ``name`` and the value.

    Args:
        name: the config field, e.g. ``"csr.alpha"``.
        value: the value given.
        ok: predicate on the (finite) value.
        accepted: what is accepted, e.g. ``"in [0, 1] (code default 0.3)"``.

    Raises:
        TypeError: ``value`` is not a real number (booleans and strings included).
        ValueError: ``value`` is NaN, infinite or fails ``ok``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} is not accepted; it must be a finite real number {accepted}.")
    if not (math.isfinite(value) and ok(value)):
        raise ValueError(f"{name}={value!r} is not accepted; it must be a finite number {accepted}.")


def check_int(name: str, value: object, minimum: int) -> None:
    """Reject ``value`` unless it is an integer (not a bool) >= ``minimum``, naming ``name`` and the value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}={value!r} is not accepted; it must be an integer >= {minimum}.")


def check_bool(name: str, value: object) -> None:
    """Reject ``value`` unless it is ``True`` or ``False``, naming ``name`` and the value."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not accepted; it must be true or false.")


def check_numbers(name: str, values: object, positive: bool = False) -> None:
    """A non-empty list of finite numbers (> 0 with ``positive``), e.g. per-channel means and stds."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence) or len(values) == 0:
        raise ValueError(
            f"{name}={values!r} is not accepted; it must be a non-empty list of numbers (one per channel)."
        )
    for i, value in enumerate(values):
        check_real(
            f"{name}[{i}]", value, (lambda v: v > 0) if positive else (lambda v: True), "> 0" if positive else ""
        )


def check_labels(name: str, labels: object, num_classes: int) -> None:
    """Integer class indices (bool excluded); values in [0, K) checked for CPU tensors (no sync on accelerators)."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a tensor of class indices; got {type(labels).__name__} {labels!r}.")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name} must hold integer class indices; got dtype={labels.dtype}.")
    if labels.device.type == "cpu" and labels.numel() > 0:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise ValueError(
                f"{name} holds the class index {bad!r}, outside [0, num_classes={num_classes}) (values {low}..{high})."
            )


#: Upper bound of num_classes: a typo such as 1e9 would otherwise try to allocate K x K statistics.
MAX_NUM_CLASSES = 100_000


def check_num_classes(num_classes: object) -> None:
    """An integer K in [2, :data:`MAX_NUM_CLASSES`] (per-class state and K x K statistics grow with it)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 2 <= num_classes <= MAX_NUM_CLASSES:
        raise ValueError(
            f"num_classes={num_classes!r} is not accepted; it must be an integer in [2, {MAX_NUM_CLASSES}] "
            "(per-class state and the K x K confusion statistics grow with it)."
        )


def check_normalization(mean: object, std: object) -> None:
    """Per-channel ``input_mean`` and ``input_std`` (> 0): both with one entry per channel, or neither."""
    for name, values, positive in (("input_mean", mean, False), ("input_std", std, True)):
        if values is not None:
            check_numbers(name, values, positive)
    if (mean is None) != (std is None) or (mean is not None and len(mean) != len(std)):  # type: ignore[arg-type]
        raise ValueError(
            f"input_mean={mean!r} and input_std={std!r} are not accepted; give both, with one entry "
            "per channel each (the same length), or neither."
        )


def check_compile_backend(backend: object) -> None:
    """A ``torch.compile`` backend this torch knows (``torch.compiler.list_backends``)."""
    known = torch.compiler.list_backends(exclude_tags=())
    if backend not in known:
        raise ValueError(f"compile_backend={backend!r} is not accepted; choose one of {', '.join(map(repr, known))}.")
