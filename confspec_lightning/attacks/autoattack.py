"""AutoAttack (Croce & Hein, 2020) through ``pyautoattack``: the model's predictions on its adversarial examples.

Standard AutoAttack runs APGD-CE, APGD-T (targeted DLR), FAB-T and Square, each on the points the previous
ones did not break; a point counts as robust only if it survives all four. The standard version with
l_inf eps = 8/255 is the headline robustness number of docs/explanation/method.md §8.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import typing
import warnings
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import Tensor, nn

from confspec_lightning.attacks.base import Attack
from confspec_lightning.attacks.config import AttackConfig
from confspec_lightning.attacks.context import Norm, eval_mode, grad_enabled
from confspec_lightning.validation import check_choice, check_int, check_real

AutoAttackVersion = Literal["standard", "custom"]
AutoAttackPart = Literal["apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square"]
_PYAUTOATTACK_NORMS = {"linf": "Linf", "l2": "L2"}
_LOGGER_NAME = "auto-attack"  # the logger every pyautoattack component writes to


class _WarningsHandler(logging.Handler):
    """Re-issues pyautoattack's warnings (randomised / dynamic defence, zero gradients, ...) as Python warnings."""

    def emit(self, record: logging.LogRecord) -> None:
        warnings.warn(f"AutoAttack: {record.getMessage()}", RuntimeWarning, stacklevel=2)


class _ProgressHandler(logging.Handler):
    """Hands pyautoattack's progress messages (an attack starts, a chunk is done, robust accuracy after it) on."""

    PATTERN = re.compile(r"^(running |robust accuracy after |[\w-]+ - \d+/\d+ - )")

    def __init__(self, report: Callable[[str], None]) -> None:
        super().__init__(level=logging.DEBUG)
        self.report = report

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.PATTERN.match(message):
            self.report(message)


@contextlib.contextmanager
def _quiet_autoattack_logger(log_path: str | None, progress: Callable[[str], None] | None = None) -> Iterator[None]:
    """Route pyautoattack's log to ``log_path`` (all levels) or nowhere; its warnings become Python warnings.

    ``progress``, if given, receives its progress messages (which attack runs, chunks done, accuracy after each).

    The logger's handlers, level and propagation are restored afterwards.
    """
    logger = logging.getLogger(_LOGGER_NAME)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    handlers: list[logging.Handler] = [_WarningsHandler(level=logging.WARNING)]
    if log_path is not None:
        file_handler = logging.FileHandler(log_path, mode="a", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handlers.append(file_handler)
    if progress is not None:
        handlers.append(_ProgressHandler(progress))
    logger.handlers = handlers
    logger.setLevel(logging.DEBUG if log_path is not None or progress is not None else logging.WARNING)
    logger.propagate = False  # nothing reaches the root logger's (or logging's last-resort) handlers
    try:
        yield
    finally:
        for handler in handlers:
            handler.close()
        logger.handlers, logger.level, logger.propagate = saved[0], saved[1], saved[2]


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the CPU RNG and the RNG of ``device`` inside a fork: the caller's RNG states are restored after.

    pyautoattack seeds the global CPU and CUDA generators itself; the fork keeps that from leaking out.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        fork = torch.random.fork_rng(devices=[index], device_type="cuda")
    else:
        fork = torch.random.fork_rng(devices=[])
    with fork:
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _keep_trace() -> Iterator[None]:
    """Restore the trace function (debugger, coverage) that pyautoattack's dynamic-defence check resets."""
    trace = sys.gettrace()
    try:
        yield
    finally:
        sys.settrace(trace)


def check_autoattack_options(version: str, attacks: list[str] | None, n_iter: int | None = None) -> None:
    """Raise a ``ValueError`` naming the bad value unless ``version``/``attacks``/``n_iter`` form a valid choice."""
    check_choice("autoattack.version", version, AutoAttackVersion)
    if n_iter is not None:
        check_int("autoattack.n_iter", n_iter, 1)
    if version == "custom":
        if not attacks:
            raise ValueError(
                f"autoattack.attacks={attacks!r} is not accepted with version='custom'; give a non-empty list of "
                f"{', '.join(map(repr, typing.get_args(AutoAttackPart)))}."
            )
        for attack in attacks:
            check_choice("autoattack.attacks[]", attack, AutoAttackPart)
    elif attacks is not None:
        raise ValueError(
            f"autoattack.attacks={attacks!r} is not accepted with version={version!r}, which fixes its own attacks; "
            "use version='custom' to choose them."
        )


def autoattack_predictions(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    norm: Norm,
    eps: float,
    version: AutoAttackVersion = "standard",
    attacks: list[str] | None = None,
    batch_size: int = 256,
    seed: int = 0,
    log_path: str | None = None,
    progress: Callable[[str], None] | None = None,
    n_iter: int | None = None,
) -> Tensor:
    """Predictions of ``model`` on AutoAttack's adversarial examples of ``(x, y)``.

    A point AutoAttack breaks gets the (wrong) prediction on its adversarial example; every other point
    keeps its clean prediction, so accuracy of the result = AutoAttack robust accuracy <= clean accuracy.
    The model runs in eval mode (each submodule's own ``training`` flag is restored afterwards) on the
    device of ``x``, with autograd enabled even inside ``torch.inference_mode()`` / ``torch.no_grad()``.
    The run is seeded (``seed``) inside a forked RNG, so the caller's global RNG state is left untouched.

    Args:
        model: maps [0, 1] images to logits (normalisation inside).
        x: clean images in [0, 1], shape (B, C, H, W).
        y: labels (B,).
        norm: ``"linf"`` or ``"l2"``.
        eps: radius of the perturbation ball (pixel units), e.g. 8/255 (l_inf) or 0.5 (l_2).
        version: ``"standard"`` (APGD-CE, APGD-T, FAB-T, Square) or ``"custom"`` (the ``attacks`` given).
        attacks: with ``version="custom"``, a non-empty list of pyautoattack attack names
            (``"apgd-ce"``, ``"apgd-dlr"``, ``"apgd-t"``, ``"fab"``, ``"fab-t"``, ``"square"``), run in order.
        batch_size: attack batch size.
        seed: seed of every random start.
        log_path: if given, pyautoattack's log is appended to this file; otherwise it prints nothing.
            Its warnings (e.g. "it seems to be a randomized defense") are always issued as ``RuntimeWarning``.
        progress: called with each progress message (attack started, chunk done, robust accuracy after it).
        n_iter: iterations per restart of APGD (CE, DLR, targeted) and FAB; ``None`` keeps AutoAttack's 100.
            Fewer make a weaker attack, for quick pipeline checks only (Square keeps its 5000 queries).

    Returns:
        int64 predictions (B,) on the device of ``x``.
    """
    check_choice("norm", norm, Norm)
    check_autoattack_options(version, attacks, n_iter)
    if x.ndim != 4:
        raise ValueError(f"x must be a batch of images (B, C, H, W) in [0, 1]; got shape {tuple(x.shape)}.")
    if y.shape != x.shape[:1]:
        raise ValueError(f"y must have shape ({x.shape[0]},) to match x; got {tuple(y.shape)}.")
    check_real("eps", eps, lambda v: v > 0, "> 0 (pixel units, e.g. 8/255)")
    check_int("batch_size", batch_size, 1)

    from pyautoattack import AutoAttack  # imported on first use: it is slow to import

    device = x.device
    logger = _quiet_autoattack_logger(log_path, progress)
    with grad_enabled(), eval_mode(model), logger, _seeded(device, seed), _keep_trace():
        x = x.detach().clone()
        y = y.detach().clone().to(device=device, dtype=torch.long)
        adversary = AutoAttack(
            model,
            norm=_PYAUTOATTACK_NORMS[norm],
            eps=float(eps),
            version=version,
            attacks=list(attacks) if version == "custom" else None,
            seed=seed,
            device=device,
        )
        if n_iter is not None:
            for part in (adversary.apgd, adversary.apgd_targeted, adversary.fab):
                part.n_iter = n_iter
        _, predictions = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    return predictions.detach().to(dtype=torch.long)


class AutoAttack(Attack):
    """AutoAttack (pyautoattack) with the threat model's norm and eps, seeded per test batch.

    Args:
        version: ``"standard"`` (APGD-CE, APGD-T, FAB-T, Square: the headline robustness number) or ``"custom"``.
        attacks: the parts of the ``"custom"`` version, run in order (e.g. ``["apgd-ce", "apgd-t"]``).
        n_iter: iterations per restart of APGD and FAB; ``None`` (default) keeps AutoAttack's 100. Fewer make a
            weaker attack: for quick pipeline checks only; reports name it.
    """

    name = "autoattack"

    def __init__(
        self,
        version: AutoAttackVersion = "standard",
        attacks: list[AutoAttackPart] | None = None,
        n_iter: int | None = None,
    ) -> None:
        check_autoattack_options(version, attacks, n_iter)
        self.version = version
        self.attacks = list(attacks) if attacks is not None else None
        self.n_iter = n_iter

    def describe(self) -> str:
        """E.g. ``standard``, ``custom ['apgd-ce', 'apgd-t']`` or ``standard n_iter=5`` (for report settings)."""
        iterations = f" n_iter={self.n_iter}" if self.n_iter is not None else ""
        return f"{self.version} {self.attacks or ''}".strip() + iterations

    def predictions(self, model, x, target, *, threat: AttackConfig, generator=None, seed=0, progress=None) -> Tensor:
        return autoattack_predictions(
            model,
            x,
            target,
            norm=threat.norm,
            eps=threat.eps,
            version=self.version,
            attacks=self.attacks,
            batch_size=x.shape[0],
            seed=seed,
            progress=progress,
            n_iter=self.n_iter,
        )
