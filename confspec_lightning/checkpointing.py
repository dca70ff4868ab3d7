"""Reliable checkpoints: atomic writes, and a clean save-and-exit on preemption signals.

* :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file in the target's directory,
  flushes and fsyncs it, then ``os.replace``-s it onto the target: a crash (SIGKILL, power loss, a full
  disk) while a checkpoint is written leaves the previous file intact, never a truncated one. Lightning
  2.6's ``TorchCheckpointIO`` buffers the checkpoint in memory and writes it through an fsspec
  transaction whose temporary file lies in the system temp directory and is moved with ``shutil.move``
  (a copy onto the target when that directory is another file system, e.g. a tmpfs ``/tmp``), without
  fsync: a crash during that copy truncates the target.
* :class:`PreemptionCheckpoint` turns SIGTERM (and SIGUSR1, SLURM's ``--signal`` warning, unless
  Lightning's SLURM auto-requeue handles it) into: finish the current training batch, save
  ``last.ckpt`` (the path of the CLI's ``last_checkpoint``) on every rank together, exit with
  :data:`PREEMPTION_EXIT_CODE` (75, ``EX_TEMPFAIL``: "try again"; configurable, 0 allowed). The signal
  handler only sets a flag; the ranks agree on it with a max-reduction at the next batch end, so no rank
  waits in a collective that another one left. ``confspec fit --ckpt_path last`` then continues with
  the batches not yet seen, in the same order, with the same random state (this callback stores the
  torch/CUDA/numpy/python generator states of every rank in checkpoints and restores them at
  ``on_train_start``).

The ``confspec`` CLI uses both by default (``cli.py``).
"""

from __future__ import annotations

import contextlib
import os
import signal
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from confspec_lightning.io import atomic_writer

#: Exit status of a run stopped by :class:`PreemptionCheckpoint` after saving ``last.ckpt``
#: (``EX_TEMPFAIL`` of sysexits.h): a job script requeues on it, and resumes with ``--ckpt_path last``.
PREEMPTION_EXIT_CODE = 75

#: Key of the per-rank random generator states in a checkpoint.
RNG_STATES_KEY = "confspec_rng_states"


# ---------------------------------------------------------------------------- atomic files
def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_writer`: all or nothing."""
    with atomic_writer(path, "wb") as handle:
        torch.save(obj, handle)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (temporary file, fsync, ``os.replace``).

    Remote paths (``s3://`` and other fsspec URLs) keep Lightning's own transaction. Loading and removing
    are ``TorchCheckpointIO``'s.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                "`Trainer.save_checkpoint(..., storage_options=...)` is not supported by AtomicCheckpointIO; "
                "implement a CheckpointIO for storage options."
            )
        if "://" in str(path) and not str(path).startswith("file://"):
            super().save_checkpoint(checkpoint, path)
            return
        local = str(path)[len("file://") :] if str(path).startswith("file://") else path
        atomic_torch_save(checkpoint, local)


def with_atomic_checkpoint_io(plugins: Any) -> list[Any]:
    """A trainer ``plugins`` value with :class:`AtomicCheckpointIO` unless the user chose a checkpoint IO.

    ``None`` becomes ``[AtomicCheckpointIO()]``; a single plugin becomes a list; a wrapping IO without an
    inner one (``AsyncCheckpointIO()``) gets ``AtomicCheckpointIO`` inside; any other user ``CheckpointIO``
    is kept as it is (the user's choice); precision plugins, cluster environments etc. are kept.
    """
    if plugins is None:
        plugins = []
    elif not isinstance(plugins, list | tuple):
        plugins = [plugins]
    plugins = list(plugins)
    ios = [plugin for plugin in plugins if isinstance(plugin, CheckpointIO)]
    if not ios:
        return [*plugins, AtomicCheckpointIO()]
    for plugin in ios:
        if hasattr(plugin, "_checkpoint_io") and getattr(plugin, "_checkpoint_io", None) is None:
            plugin.checkpoint_io = AtomicCheckpointIO()  # e.g. AsyncCheckpointIO(): atomic inside
    return plugins


# ------------------------------------------------------------------------------ RNG states
def collect_rng_states() -> dict[str, Any]:
    """The torch (CPU and CUDA), numpy and python generator states as plain values (``weights_only``-loadable)."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 - the legacy global generator is what we save
    version, state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": int(version), "state": list(state), "gauss": gauss},
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`collect_rng_states` returned."""
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    cuda = states.get("torch.cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    numpy_state = states["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached"],
        )
    )
    python_state = states["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss"]))


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# ------------------------------------------------------------------------------ stuck runs
class StuckRunWatchdog:
    """Ends the process when a stop signal arrives while the main thread is stuck in one native call.

    Python runs a signal handler only between bytecodes of the main thread: a process waiting in a collective that
    another rank never joins (or in any other blocking native call) ignores SIGTERM and Ctrl-C, and only SIGKILL
    stops it, without a word. This watchdog sees the signal at once (``signal.set_wakeup_fd``: the interpreter's
    C-level handler writes the signal number to a socket a daemon thread reads), then samples the main thread's
    current frame (``sys._current_frames``). If that frame and its instruction stay the same for ``timeout``
    seconds after the signal, the main thread is stuck: the watchdog prints what it saw and the stacks of every
    thread (``faulthandler``) to stderr and exits with status 128 + the signal number, without saving (a checkpoint
    needs the other ranks). A main thread that keeps running Python (the normal preemption path: finish the batch,
    save, exit) is left alone. Signals other than ``signals`` are passed on to a wakeup fd set before.

    Args:
        timeout: seconds the main thread must stay in one call after the signal before the process is ended.
        signals: the signals watched (default SIGTERM, SIGINT, SIGUSR1).
    """

    def __init__(self, timeout: float = 60.0, signals: tuple[int, ...] | None = None) -> None:
        self.timeout = float(timeout)
        self.signals = signals or tuple(
            int(getattr(signal, name)) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name)
        )
        self._sockets: tuple[Any, Any] | None = None
        self._previous_fd = -1
        self._thread: Any = None
        self._stopped = False

    def start(self) -> bool:
        """Start watching (main thread only; False elsewhere or when already watching)."""
        import socket
        import threading

        if self._sockets is not None or threading.current_thread() is not threading.main_thread():
            return False
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        try:
            self._previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        except (ValueError, OSError):  # not the main interpreter, or wakeup fds unsupported
            reader.close()
            writer.close()
            return False
        self._sockets = (reader, writer)
        self._stopped = False
        self._main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._run, name="confspec-stuck-watchdog", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        """Stop watching and restore the previous wakeup fd."""
        if self._sockets is None:
            return
        self._stopped = True
        with contextlib.suppress(ValueError, OSError):
            signal.set_wakeup_fd(self._previous_fd)
        reader, writer = self._sockets
        self._sockets = None
        with contextlib.suppress(OSError):
            writer.close()
        with contextlib.suppress(OSError):
            reader.shutdown(2)  # wakes the thread's recv
        self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            reader.close()

    def _run(self) -> None:
        reader = self._sockets[0] if self._sockets is not None else None
        while reader is not None and not self._stopped:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if self._previous_fd != -1 and signum not in self.signals:
                    with contextlib.suppress(OSError):
                        os.write(self._previous_fd, bytes([signum]))
                if signum in self.signals and not self._stopped:
                    self._watch(signum)
                    return

    def _sample(self) -> tuple[int, int] | None:
        import sys

        frame = sys._current_frames().get(self._main)
        return None if frame is None else (id(frame), frame.f_lasti)

    def _watch(self, signum: int) -> None:
        import time

        last, since = self._sample(), time.monotonic()
        while not self._stopped:
            time.sleep(min(0.5, self.timeout / 4))
            current = self._sample()
            if current is None or current != last:
                last, since = current, time.monotonic()
                continue
            if time.monotonic() - since >= self.timeout:
                self._exit(signum)

    def _exit(self, signum: int) -> None:
        import faulthandler
        import sys

        name = signal.Signals(signum).name
        sys.stderr.write(
            f"\nconfspec: {name} received, but the main thread has been stuck in one call for {self.timeout:g} s "
            "(under DDP: a collective that another process never joined); ending the process without saving "
            f"(exit status {128 + signum}). The last checkpoint on disk is intact. Stacks of this process's threads:\n"
        )
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(128 + signum)


# ------------------------------------------------------------------------------ preemption
class PreemptedExit(SystemExit):
    """Raised on every rank after :class:`PreemptionCheckpoint` saved its checkpoint; exits the process."""


class PreemptionCheckpoint(Callback):
    """Save ``last.ckpt`` and exit when the job is told to stop (SIGTERM, SLURM's SIGUSR1); resume exactly.

    * The handlers (installed at ``on_train_start``, replacing Lightning's SIGTERM notifier for the fit,
      restored afterwards) only record the signal.
    * At the next ``on_train_batch_end`` all ranks max-reduce the flag (one tiny collective every
      ``check_every_n_batches`` batches under DDP; nothing with one process), then together save
      ``<dirpath>/<filename>.ckpt`` (``dirpath`` of the ``ModelCheckpoint`` whose filename is ``filename``:
      the CLI's ``last_checkpoint``, i.e. ``<run>/checkpoints/last.ckpt``) and raise :class:`PreemptedExit`
      with ``exit_code``. A signal during validation or the epoch end is seen at the next
      ``on_train_epoch_start``: if that ``ModelCheckpoint`` has just written the epoch-end state the process
      exits at once (before, e.g., CSR's epoch pass), else at the epoch's first batch end, after saving.
    * Lightning is not told to stop (``trainer.should_stop``): mid-epoch that would run validation and the
      epoch-end hooks (fairness state updates, ``ModelCheckpoint`` saves) on a partial epoch and overwrite
      the checkpoint just written. The process exits instead, through Lightning's exception path (loggers
      are finalised, ``on_exception`` hooks run).
    * Every checkpoint (this one and the ``ModelCheckpoint`` ones) carries the random generator states of
      every rank (``confspec_rng_states``); a resumed fit restores this rank's at ``on_train_start``, after
      data loaders are set up, so the attack's random starts continue the interrupted stream.

    With the training loader of :class:`~confspec_lightning.data.base.ClassificationDataModule` (stateful:
    its position is in ``loops.fit_loop.state_dict.combined_loader``) ``fit --ckpt_path last`` continues
    with the batch after the last one trained, and ends with the weights of an uninterrupted run.

    Args:
        signals: signal names to handle; ``[]`` disables the handling (checkpoints still carry RNG states).
            SIGUSR1 is left to Lightning when its SLURM auto-requeue is on (it saves an ``hpc_ckpt`` and
            requeues).
        exit_code: exit status after the save (default :data:`PREEMPTION_EXIT_CODE` = 75, ``EX_TEMPFAIL``;
            0 for schedulers that requeue on their own).
        filename: name (without ``.ckpt``) of the checkpoint written; the directory is that of the
            ``ModelCheckpoint`` with this filename, else of the first ``ModelCheckpoint``, else
            ``<default_root_dir>/checkpoints``.
        check_every_n_batches: under DDP, reduce the flag every this many training batches.
        stuck_timeout: a stop signal (SIGTERM, SIGINT, SIGUSR1) that finds the main thread stuck in one native
            call (a collective another rank never joins) for this many seconds ends the process with status
            128 + the signal, printing the threads' stacks (:class:`StuckRunWatchdog`; every subcommand). 0: off.
    """

    def __init__(
        self,
        signals: list[str] | None = None,
        exit_code: int = PREEMPTION_EXIT_CODE,
        filename: str = "last",
        check_every_n_batches: int = 1,
        stuck_timeout: float = 60.0,
    ) -> None:
        super().__init__()
        self.signals = ["SIGTERM", "SIGUSR1"] if signals is None else list(signals)
        for name in self.signals:
            if not isinstance(getattr(signal, name, None), signal.Signals):
                raise ValueError(f"preemption.signals: {name!r} is not a signal of this platform.")
        if isinstance(exit_code, bool) or not isinstance(exit_code, int) or not 0 <= exit_code <= 255:
            raise ValueError(f"preemption.exit_code={exit_code!r} is not accepted; it must be an integer in [0, 255].")
        if isinstance(check_every_n_batches, bool) or not isinstance(check_every_n_batches, int):
            raise ValueError(f"preemption.check_every_n_batches={check_every_n_batches!r} must be an integer >= 1.")
        if check_every_n_batches < 1:
            raise ValueError(f"preemption.check_every_n_batches={check_every_n_batches!r} must be an integer >= 1.")
        if isinstance(stuck_timeout, bool) or not isinstance(stuck_timeout, int | float) or not stuck_timeout >= 0:
            raise ValueError(f"preemption.stuck_timeout={stuck_timeout!r} must be a number of seconds >= 0 (0: off).")
        self.stuck_timeout = float(stuck_timeout)
        self._watchdog: StuckRunWatchdog | None = None
        self.exit_code = exit_code
        self.filename = filename
        self.check_every_n_batches = check_every_n_batches
        #: the signal received (a number), or None
        self.signal_received: int | None = None
        self.saved_path: str | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._rng_to_restore: dict[str, Any] | None = None

    # ------------------------------------------------------------------ signals
    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.signal_received = signum  # only a flag: the work happens at the next batch end

    def _install_handlers(self, trainer: pl.Trainer) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("PreemptionCheckpoint: not in the main thread; signals are not handled.")
            return
        # the strategy's cluster environment (multi-process strategies); one process under SLURM: Lightning's default
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if environment is None and SLURMEnvironment.detect():
            environment = SLURMEnvironment()
        slurm_requeue = isinstance(environment, SLURMEnvironment) and environment.auto_requeue
        for name in self.signals:
            signum = getattr(signal, name)
            if slurm_requeue and signum == (environment.requeue_signal or signal.SIGUSR1):
                continue  # Lightning's auto-requeue owns it
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handler)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            with contextlib.suppress(ValueError, TypeError):  # not the main thread / handler not restorable
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    # -------------------------------------------------------------- the checks
    def _stop_requested(self, trainer: pl.Trainer) -> bool:
        flag = self.signal_received is not None
        if trainer.world_size > 1 and _distributed():
            value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=trainer.strategy.root_device)
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
            flag = bool(value.item())
        return flag

    def _last_checkpoint_callback(self, trainer: pl.Trainer) -> ModelCheckpoint | None:
        callbacks = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
        named = [cb for cb in callbacks if cb.filename == self.filename]
        return (named or callbacks or [None])[0]

    def checkpoint_path(self, trainer: pl.Trainer) -> str:
        """Where the preemption checkpoint goes (see the class docstring)."""
        chosen = self._last_checkpoint_callback(trainer)
        directory = chosen.dirpath if chosen is not None else os.path.join(trainer.default_root_dir, "checkpoints")
        return os.path.join(directory, f"{self.filename}{ModelCheckpoint.FILE_EXTENSION}")

    def _exit(self, trainer: pl.Trainer, path: str, saved: bool) -> None:
        received = self.signal_received
        name = signal.Signals(received).name if received is not None else "another rank's signal"
        what = "saved" if saved else "the epoch-end checkpoint is current:"
        rank_zero_info(
            f"\n{name} received: {what} {path} at epoch {trainer.current_epoch}, global step {trainer.global_step}; "
            f"exiting with status {self.exit_code}. Resume with `confspec fit ... --ckpt_path last`."
        )
        raise PreemptedExit(self.exit_code)

    def _save_and_exit(self, trainer: pl.Trainer) -> None:
        path = self.checkpoint_path(trainer)
        # every rank: the dump has collectives; rank 0 writes (atomically); the callbacks too (weights_only=False)
        trainer.save_checkpoint(path, weights_only=False)
        self.saved_path = path
        self._exit(trainer, path, saved=True)

    # -------------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.stuck_timeout > 0 and self._watchdog is None:
            watchdog = StuckRunWatchdog(self.stuck_timeout)
            if watchdog.start():
                self._watchdog = watchdog

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None
        self.signal_received = None
        self._install_handlers(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A signal during validation or the epoch end: stop before the next epoch's work (e.g. CSR's pass) when
        # the epoch-end last.ckpt holds the current state (nothing has run since it was written). A checkpoint
        # written here would not do: Lightning 2.6 resumes it with the epoch's batches counted as done. Else
        # the flag stays set and the first batch end saves.
        if not self._stop_requested(trainer):
            return
        saver = self._last_checkpoint_callback(trainer)
        step = getattr(saver, "_last_global_step_saved", None)
        if (
            saver is not None
            and saver.filename == self.filename
            and trainer.global_step > 0
            and step == trainer.global_step
        ):
            self.saved_path = self.checkpoint_path(trainer)
            self._exit(trainer, self.saved_path, saved=False)
        # else: the signalled rank keeps its flag, and the reduction at the first batch end makes every rank save

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (batch_idx + 1) % self.check_every_n_batches != 0 and not trainer.is_last_batch:
            return
        if self._stop_requested(trainer):
            self._save_and_exit(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    # ------------------------------------------------------------- checkpoints
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Store every rank's RNG states (a collective under DDP: every rank dumps checkpoints)."""
        states = collect_rng_states()
        if trainer.world_size > 1 and _distributed():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, states)
        else:
            gathered = [states]
        checkpoint[RNG_STATES_KEY] = gathered

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Keep this rank's RNG states for ``on_train_start`` (not restored for validate/test/predict)."""
        states = checkpoint.get(RNG_STATES_KEY)
        if not states or trainer.state.fn != "fit":
            return
        if len(states) != trainer.world_size:
            rank_zero_warn(
                f"the checkpoint holds random states of {len(states)} processes, this run has {trainer.world_size}: "
                "the random states are not restored (training continues, not bit-exactly)."
            )
            return
        self._rng_to_restore = states[trainer.global_rank]
