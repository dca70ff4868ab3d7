"""Run directories and ``--ckpt_path best|last``: which run a command names, and which checkpoint file it means.

A run is the logger's directory ``<save_dir>/<name>/<version>/`` (TensorBoard events, ``config.yaml``,
``checkpoints/best-epochNNN.ckpt`` and ``checkpoints/last.ckpt``). A command names a run by

* the logger's ``name`` and ``version`` (``--trainer.logger.init_args.version 3`` or ``version_3``);
* a run directory given as ``--ckpt_path runs/digits_trades/version_3``;
* the logger's ``name`` alone, when only one run of that name has checkpoints.

``best`` is the checkpoint the run's ModelCheckpoint (the ``checkpoint`` section: highest worst-class robust
accuracy on validation) recorded as best, ``last`` the run's ``last.ckpt``. With several runs and no version the
command is refused with the list of runs, rather than taking the newest (a one-epoch experiment would otherwise
hijack ``best`` of a long run).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from confspec_lightning.models.weights import load_error

Which = Literal["best", "last"]


@dataclass(frozen=True)
class LoggerRuns:
    """Where a logger puts its runs: ``<save_dir>/<name>/<version>``."""

    save_dir: Path
    name: str
    version: int | str | None

    @property
    def root(self) -> Path:
        return self.save_dir / self.name

    def version_dir(self, version: int | str) -> Path:
        """``version_N`` for an integer (or digits), the string itself otherwise (as Lightning's loggers)."""
        if isinstance(version, int) or (isinstance(version, str) and version.isdigit()):
            return self.root / f"version_{int(version)}"
        return self.root / str(version)

    def runs_with_checkpoints(self) -> list[Path]:
        """Every run directory of this logger name that holds ``checkpoints/last.ckpt``, oldest first."""
        runs = [p.parent.parent for p in self.root.glob("*/checkpoints/last.ckpt")]
        return sorted(runs, key=lambda p: p.stat().st_mtime)


def logger_runs(logger: Any) -> LoggerRuns | None:
    """The run layout of a parsed ``trainer.logger`` config (a TensorBoard/CSV-like logger), else None."""
    if isinstance(logger, list | tuple):
        logger = logger[0] if logger else None
    init = getattr(logger, "init_args", None) if logger is not None else None
    if init is None:
        return None
    save_dir = getattr(init, "save_dir", None) if not isinstance(init, dict) else init.get("save_dir")
    if save_dir is None:
        return None
    name = (init.get("name") if isinstance(init, dict) else getattr(init, "name", None)) or "lightning_logs"
    version = init.get("version") if isinstance(init, dict) else getattr(init, "version", None)
    return LoggerRuns(Path(save_dir), str(name), version)


def best_checkpoint(run: Path) -> Path | None:
    """The best checkpoint a run's ModelCheckpoint recorded (from its ``last.ckpt``), if the file is there."""
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    for key, callback in state.get("callbacks", {}).items():
        if key.startswith("ModelCheckpoint") and callback.get("monitor") and callback.get("best_model_path"):
            best = Path(callback["best_model_path"])
            for candidate in (best, run / "checkpoints" / best.name):  # the run directory may have moved
                if candidate.is_file():
                    return candidate
    return None


def describe(run: Path) -> str:
    """One line about a run: its directory, epochs trained, best score and when it was last written."""
    last = run / "checkpoints" / "last.ckpt"
    try:
        state = torch.load(last, map_location="cpu", weights_only=True)
    except Exception:
        return f"{run} (last.ckpt unreadable)"
    score = None
    for key, callback in state.get("callbacks", {}).items():
        if key.startswith("ModelCheckpoint") and callback.get("best_model_score") is not None:
            score = float(callback["best_model_score"])
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(last.stat().st_mtime))
    best = "" if score is None else f", best {score:.4f}"
    return f"{run} ({state.get('epoch', -1) + 1} epochs{best}, {when})"


def resolve_checkpoint(ckpt_path: str, which_for_directory: Which, runs: LoggerRuns | None) -> tuple[str, Path | None]:
    """The checkpoint file ``ckpt_path`` means, and the run directory it belongs to (None: not one of ours).

    ``ckpt_path``: ``best``, ``last``, a run directory (its ``which_for_directory`` checkpoint) or a file.

    Raises:
        FileNotFoundError: the run, or its checkpoint, does not exist.
        ValueError: ``best``/``last`` with several runs and no version to choose one.
    """
    if ckpt_path not in ("best", "last"):
        path = Path(ckpt_path)
        if path.is_dir():
            return _checkpoint_of(path, which_for_directory), path
        if not path.is_file():
            raise FileNotFoundError(f"--ckpt_path {ckpt_path!r}: no such file or run directory.")
        run = path.parent.parent if path.parent.name == "checkpoints" else None
        return str(path), run
    if runs is None:
        raise FileNotFoundError(
            f"--ckpt_path {ckpt_path}: the logger gives no run directory; pass the path of a .ckpt file or of a run."
        )
    if runs.version is not None:
        run = runs.version_dir(runs.version)
        if not (run / "checkpoints").is_dir():
            raise FileNotFoundError(
                f"--ckpt_path {ckpt_path}: the run {run} (logger version {runs.version!r}) has no checkpoints/ "
                "folder; run `confspec fit` with this config and version first."
            )
        return _checkpoint_of(run, ckpt_path), run  # type: ignore[arg-type]
    candidates = runs.runs_with_checkpoints()
    if not candidates:
        raise FileNotFoundError(
            f"--ckpt_path {ckpt_path}: no earlier run with checkpoints was found under {runs.root}/*/checkpoints; "
            "run `confspec fit` with the same config first, or pass the path of a .ckpt file."
        )
    if len(candidates) > 1:
        listing = "\n".join(f"  {describe(run)}" for run in candidates)
        raise ValueError(
            f"--ckpt_path {ckpt_path} is ambiguous: {len(candidates)} runs of {runs.root} have checkpoints:\n"
            f"{listing}\n"
            f"name one with --trainer.logger.init_args.version (e.g. {_version_of(candidates[-1])!r}) or pass its "
            f"directory as --ckpt_path."
        )
    return _checkpoint_of(candidates[0], ckpt_path), candidates[0]  # type: ignore[arg-type]


def _checkpoint_of(run: Path, which: Which) -> str:
    last = run / "checkpoints" / "last.ckpt"
    if which == "last":
        if not last.is_file():
            raise FileNotFoundError(
                f"the run {run} has no checkpoints/last.ckpt (written after every training epoch): it never finished "
                "an epoch; pass a .ckpt file as --ckpt_path."
            )
        return str(last)
    if not last.is_file():  # the best checkpoint is recorded in last.ckpt; without it, a single best-*.ckpt will do
        bests = sorted((run / "checkpoints").glob("best-*.ckpt"))
        if len(bests) == 1:
            return str(bests[0])
        found = ", ".join(p.name for p in bests) or "no best-*.ckpt"
        raise FileNotFoundError(
            f"the run {run} has no best checkpoint to take: checkpoints/ holds {found}, and checkpoints/last.ckpt, "
            "which records the best one, is missing; pass the .ckpt file to evaluate as --ckpt_path."
        )
    best = best_checkpoint(run)
    if best is None:
        raise FileNotFoundError(
            f"the run {run} recorded no best checkpoint (validation never ran?); use --ckpt_path last or a file."
        )
    return str(best)


def _version_of(run: Path) -> int | str:
    match = re.fullmatch(r"version_(\d+)", run.name)
    return int(match.group(1)) if match else run.name


def run_version(run: Path, runs: LoggerRuns) -> int | str | None:
    """The logger version that writes into ``run`` (None when ``run`` is not under this logger's name)."""
    if run.resolve().parent != runs.root.resolve():
        return None
    return _version_of(run)


def check_checkpoint_file(path: str) -> None:
    """Refuse a file ``torch.load(weights_only=True)`` cannot read (random, truncated, pickled objects), naming it."""
    try:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            torch.load(path, map_location="cpu", weights_only=True)  # a legacy (non-zip) file
    except Exception as error:
        raise load_error("--ckpt_path", path, error) from error


def report_taken(subcommand: str) -> tuple[str, ...]:
    """The files whose presence makes a report folder taken for ``subcommand`` (its own reports)."""
    return ("classwise_val.json",) if subcommand == "validate" else ("evaluation.json",)


def free_path(folder: Path, stem: str, suffix: str, taken: tuple[str, ...] = ()) -> Path:
    """``folder/<stem><suffix>``, or with ``-2``, ``-3``, ... the first that is free: never an earlier result.

    A file path is free when it does not exist; a folder (``suffix`` ""), when it holds none of ``taken``.
    """
    for n in range(1, 10_000):
        candidate = folder / f"{stem}{'' if n == 1 else f'-{n}'}{suffix}"
        if suffix and not candidate.exists():
            return candidate
        if not suffix and not any((candidate / name).exists() for name in taken):
            return candidate
    raise FileExistsError(f"{folder}: 10000 reports named {stem}* already; clean it up.")


def latest_report(run: Path, checkpoint: str | None = None, name: str = "evaluation.json") -> Path:
    """The newest ``evaluation/<checkpoint name>[-n]/<name>`` of a run (``checkpoint``: a checkpoint's file stem).

    Raises:
        FileNotFoundError: the run has no such report.
    """
    pattern = f"{checkpoint}*/{name}" if checkpoint else f"*/{name}"
    found = sorted((run / "evaluation").glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"{run}/evaluation/{pattern}: no report (run `confspec test` on the run first).")
    return found[-1]
