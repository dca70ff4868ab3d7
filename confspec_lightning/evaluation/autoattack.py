"""AutoAttack (Croce & Hein, 2020) through ``pyautoattack``: the model's predictions on its adversarial examples.

Standard AutoAttack runs APGD-CE, APGD-T (targeted DLR), FAB-T and Square, each on the points the previous
ones did not break; a point counts as robust only if it survives all four. The standard version with
l_inf eps = 8/255 is the headline robustness number of method.md section 5.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import Tensor, nn

from confspec_lightning.attacks import NORMS, check_choice, eval_mode, grad_enabled

AutoAttackVersion = Literal["standard", "custom"]
AUTOATTACK_VERSIONS: tuple[str, ...] = ("standard", "custom")
AUTOATTACK_ATTACKS: tuple[str, ...] = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
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


def check_autoattack_options(version: str, attacks: list[str] | None) -> None:
    """Raise a ``ValueError`` naming the bad value unless ``version``/``attacks`` form a valid AutoAttack choice."""
    check_choice("autoattack version", version, AUTOATTACK_VERSIONS)
    if version == "custom":
        if not attacks:
            raise ValueError(
                f"attacks={attacks!r} is not accepted with version='custom'; give a non-empty list of "
                f"{', '.join(map(repr, AUTOATTACK_ATTACKS))}."
            )
        for attack in attacks:
            check_choice("attacks[]", attack, AUTOATTACK_ATTACKS)
    elif attacks is not None:
        raise ValueError(
            f"attacks={attacks!r} is not accepted with version={version!r}, which fixes its own attacks; "
            "use version='custom' to choose them."
        )


def autoattack_predictions(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    norm: Literal["linf", "l2"],
    eps: float,
    version: AutoAttackVersion = "standard",
    attacks: list[str] | None = None,
    batch_size: int = 256,
    seed: int = 0,
    log_path: str | None = None,
    progress: Callable[[str], None] | None = None,
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

    Returns:
        int64 predictions (B,) on the device of ``x``.
    """
    check_choice("norm", norm, NORMS)
    check_autoattack_options(version, attacks)
    if x.ndim != 4:
        raise ValueError(f"x must be a batch of images (B, C, H, W) in [0, 1]; got shape {tuple(x.shape)}.")
    if y.shape != x.shape[:1]:
        raise ValueError(f"y must have shape ({x.shape[0]},) to match x; got {tuple(y.shape)}.")
    if not eps > 0:
        raise ValueError(f"eps={eps!r} is not accepted; it must be > 0 (pixel units, e.g. 8/255).")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is not accepted; it must be an integer >= 1.")

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
        _, predictions = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    return predictions.detach().to(dtype=torch.long)
