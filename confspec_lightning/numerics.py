"""The NaN/inf guard of the training step: a non-finite loss never reaches the optimizer unnoticed."""

from __future__ import annotations

import math

import torch
from torch import Tensor

NONFINITE_HINT = (
    "what to try: a lower learning rate (model.init_args.optimizer.init_args.lr), precision bf16-mixed instead of "
    "16-mixed, gradient clipping (trainer.gradient_clip_val), smaller fairness-method rates, and a check of the data "
    "for NaN/inf inputs"
)


class NonFiniteGuard:
    """Checks the loss and its terms every step; raises ``FloatingPointError`` naming the term, epoch and batch.

    Every step computes a device-side flag. Read at once (``deferred=False``: the CPU, or an interval of 1) a
    non-finite step raises before ``backward``. Deferred, the flag is read every ``interval`` steps only (no
    per-step host-device sync on an accelerator) and the error names the first bad step since the last read.
    """

    def __init__(self) -> None:
        self._record: tuple[list[str], Tensor, Tensor, Tensor, Tensor] | None = None

    def check(
        self,
        loss: Tensor,
        parts: dict[str, Tensor],
        *,
        epoch: int,
        batch_idx: int,
        global_step: int,
        interval: int,
        deferred: bool,
    ) -> None:
        """Raise (now, or at the next read) if ``loss`` or a term in ``parts`` is NaN/inf."""
        names = ["loss", *parts]
        values = torch.stack(
            [loss.detach().float().reshape(()), *(v.detach().float().reshape(()) for v in parts.values())]
        )
        bad = ~torch.isfinite(values)
        if not deferred:
            if bool(bad.any()):
                raise nonfinite_error(names, values, epoch, batch_idx, updated=False)
            return
        record = self._record
        if record is None or record[0] != names:
            seen = torch.zeros((), dtype=torch.bool, device=values.device)
            zero = torch.zeros_like(seen, dtype=torch.long)
            record = (names, seen, values.clone(), zero, zero.clone())
        _, seen, first_values, first_epoch, first_batch = record
        new = bad.any() & ~seen
        record = (
            names,
            seen | new,
            torch.where(new, values, first_values),
            torch.where(new, epoch, first_epoch),
            torch.where(new, batch_idx, first_batch),
        )
        self._record = record
        if (global_step + 1) % max(1, interval) == 0:
            self._record = None
            if bool(record[1]):
                first = (int(record[3]), int(record[4]))
                raise nonfinite_error(names, record[2], *first, updated=first != (epoch, batch_idx))


def nonfinite_error(names: list[str], values: Tensor, epoch: int, batch_idx: int, updated: bool) -> FloatingPointError:
    """The error naming the non-finite term(s), their values, the epoch and batch, and what to try."""
    host = values.cpu().tolist()
    bad_terms = [(n, v) for n, v in zip(names[1:], host[1:], strict=True) if not math.isfinite(v)]
    if len(bad_terms) == 1:
        what = f"the loss term {bad_terms[0][0]!r} is not finite ({bad_terms[0][1]})"
    elif bad_terms:
        what = f"the loss terms {', '.join(f'{n!r} ({v})' for n, v in bad_terms)} are not finite"
    else:
        what = f"the loss (sum of the finite terms {', '.join(map(repr, names[1:]))}) is not finite ({host[0]})"
    return FloatingPointError(
        f"{what} at epoch {epoch}, batch {batch_idx}; training stopped "
        + ("(steps since then updated the weights)" if updated else "before this step's weight update")
        + f". {NONFINITE_HINT}."
    )
