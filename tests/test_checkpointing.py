"""Reliability: atomic checkpoints, preemption (SIGTERM/SIGUSR1) and exact resume after a crash.

The process tests run real ``python -m confspec_lightning fit`` subprocesses on the digits and signal them at
fixed points (a helper callback stops at a chosen batch and waits for the parent), then compare the end of
the interrupted-and-resumed run with an uninterrupted one: weights, optimizer state, the fairness method's
state, the random generator state, the batches seen (in order) and the per-class validation report.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from confspec_lightning.checkpointing import (
    PREEMPTION_EXIT_CODE,
    AtomicCheckpointIO,
    PreemptionCheckpoint,
    atomic_torch_save,
    with_atomic_checkpoint_io,
)
from confspec_lightning.cli import build_cli

from helpers import ROOT


def test_atomic_checkpoint_io_is_the_cli_default_and_user_plugins_still_work(tmp_path):
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

    config = "digits/trades"
    cli = build_cli(["--config", config, "--trainer.accelerator", "cpu"], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert any(isinstance(cb, PreemptionCheckpoint) for cb in cli.trainer.callbacks)
    cli = build_cli(
        [
            "--config",
            config,
            "--trainer.accelerator",
            "cpu",
            "--trainer.plugins+=lightning.fabric.plugins.environments.LightningEnvironment",
        ],
        run=False,
    )
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert isinstance(cli.trainer._accelerator_connector.cluster_environment, LightningEnvironment)

    environment = LightningEnvironment()
    plugins = with_atomic_checkpoint_io([environment])
    assert plugins[0] is environment and isinstance(plugins[1], AtomicCheckpointIO)
    own = TorchCheckpointIO()
    assert with_atomic_checkpoint_io(own) == [own]  # the user's explicit choice is kept
    wrapped = with_atomic_checkpoint_io([AsyncCheckpointIO()])
    assert isinstance(wrapped[0].checkpoint_io, AtomicCheckpointIO)

    path = tmp_path / "sub" / "x.ckpt"
    AtomicCheckpointIO().save_checkpoint({"a": torch.ones(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["x.ckpt"]  # no temporary file left


WRITER = textwrap.dedent(
    """
    import os, sys, time
    import torch
    from confspec_lightning.checkpointing import AtomicCheckpointIO

    target, mode, marker = sys.argv[1:4]

    def stop_here():
        open(marker, "w").write(str(os.getpid()))
        time.sleep(600)

    good = torch.load(target, weights_only=True)  # the good checkpoint loads
    state = {"state_dict": {"w": torch.full((2 * 2**20,), 7.0)}, "epoch": good["epoch"] + 1}  # 8 MB
    if mode == "pickling":  # killed before a byte of the new checkpoint is written
        class Stall:
            def __reduce__(self):
                stop_here()
        state["stall"] = Stall()
    elif mode == "mid-write":  # killed with half of the new checkpoint in the file
        real_fdopen = os.fdopen
        class HalfWritten:
            def __init__(self, handle):
                self.handle, self.written = handle, 0
            def write(self, data):
                if self.written + len(data) > 4 * 2**20:
                    self.handle.write(bytes(data)[: 4 * 2**20 - self.written + 1024])
                    self.handle.flush()
                    stop_here()
                self.written += len(data)
                return self.handle.write(data)
            def __getattr__(self, name):
                return getattr(self.handle, name)
            def __enter__(self):
                return self
            def __exit__(self, *exc):
                return self.handle.__exit__(*exc)
        os.fdopen = lambda *a, **k: HalfWritten(real_fdopen(*a, **k))
    elif mode == "before-rename":  # killed with the whole new checkpoint written, not yet renamed
        os.fsync = lambda fd: stop_here()
    AtomicCheckpointIO().save_checkpoint(state, target)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("kill_point", ["pickling", "mid-write", "before-rename"])
def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one_intact(kill_point, tmp_path):
    target = tmp_path / "checkpoints" / "last.ckpt"
    atomic_torch_save({"state_dict": {"w": torch.arange(5.0)}, "epoch": 3}, target)
    good_bytes = target.read_bytes()
    marker = tmp_path / "marker"
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(target), kill_point, str(marker)], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert process.poll() is None, f"the writer exited with {process.returncode} before the kill point"
            assert time.monotonic() < deadline, "the writer never reached the kill point"
            time.sleep(0.02)
        temporaries = list(target.parent.glob(".last.ckpt.*.tmp"))
        assert len(temporaries) == 1  # the new checkpoint goes to a temporary file next to the target
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
    assert target.read_bytes() == good_bytes
    loaded = torch.load(target, weights_only=True)
    assert loaded["epoch"] == 3 and torch.equal(loaded["state_dict"]["w"], torch.arange(5.0))
    size = temporaries[0].stat().st_size
    if kill_point == "mid-write":
        assert 4 * 2**20 < size < 8 * 2**20  # a truncated new checkpoint, left aside
    elif kill_point == "before-rename":
        assert size > 8 * 2**20
    assert sorted(p.name for p in target.parent.glob("*.ckpt")) == ["last.ckpt"]


PROBE = textwrap.dedent(
    '''
    """Loaded by the fit subprocesses: --trainer.callbacks+=resume_probe.ResumeProbe."""
    import json, os, time
    from pathlib import Path

    import torch
    from lightning.pytorch import Callback


    class ResumeProbe(Callback):
        """Logs the batches, stops once at (epoch, batch) for the parent to signal, dumps the final state."""

        def __init__(self, out: str, epoch: int = -1, batch: int = 0, wait: str = "kill", at: str = "batch") -> None:
            self.out, self.epoch, self.batch, self.wait, self.at = Path(out), epoch, batch, wait, at

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            record = {"epoch": trainer.current_epoch, "batch": batch_idx, "labels": batch[1].tolist()}
            with open(self.out / f"batches{trainer.global_rank}.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\\n")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.at == "batch" and (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
                self._stop(trainer)

        def on_validation_end(self, trainer, pl_module):
            if self.at == "validation" and trainer.current_epoch == self.epoch and not trainer.sanity_checking:
                self._stop(trainer)

        def _stop(self, trainer):
            if (self.out / "marker").exists():
                return
            if trainer.global_rank != 0:  # rank 0 alone stops (and gets the signal); the others go on and wait
                return
            (self.out / "marker").write_text(str(os.getpid()))
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:  # "kill": sleep until SIGKILLed
                if self.wait == "signal" and any(
                    getattr(cb, "signal_received", None) is not None for cb in trainer.callbacks
                ):
                    return  # the handler has run: the PreemptionCheckpoint acts at its next check
                time.sleep(0.01)
            raise RuntimeError("the parent never signalled")

        def on_fit_end(self, trainer, pl_module):
            torch.save(
                {
                    "model": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
                    "optimizer": trainer.optimizers[0].state_dict(),
                    "global_step": trainer.global_step,
                    "epoch": trainer.current_epoch,
                    "rng": torch.get_rng_state(),
                },
                self.out / f"final{trainer.global_rank}.pt",
            )
    '''
)


METHODS = {
    # TRADES-AWP + CSR: AWP's perturbation is never in a checkpoint, and the resumed fit is exact with it
    "csr": ("digits/trades_awp_csr", ["fairness.0.direction", "fairness.0.confusion.errors"]),
    "wat": ("digits/wat", ["fairness.0.cumulative_loss"]),
}


#: TensorBoard figures cost matplotlib's import and a render per validation; the per-class JSON report compared
#: below does not depend on them (they are checked in tests/evaluation)
NO_FIGURES = (
    "--model.init_args.evaluator",
    '{"class_path": "confspec_lightning.evaluation.Evaluator", "init_args": {"figures": false}}',
)


def _fit(method: str, out: Path, *extra: str, devices: int = 1) -> subprocess.Popen:
    config, _ = METHODS[method]
    out.mkdir(parents=True, exist_ok=True)
    (out / "resume_probe.py").write_text(PROBE)
    args = [
        *("fit", "--config", config),
        *("--trainer.accelerator", "cpu", "--trainer.max_epochs", "3", "--trainer.devices", str(devices)),
        *(("--trainer.strategy", "ddp") if devices > 1 else ()),
        # the recipe's batch of 64 halved (the same steps, half the work); one validation batch of 64 images
        *("--data.init_args.batch_size", str(32 // devices), "--data.init_args.eval_batch_size", "64"),
        *("--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "1"),
        *("--trainer.deterministic", "true", "--trainer.enable_progress_bar", "false"),
        *("--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", str(out / "runs")),
        *("--model.init_args.train_attack.steps", "2", "--model.init_args.eval_attack.steps", "2"),
        *NO_FIGURES,
        *("--trainer.callbacks+=resume_probe.ResumeProbe", "--trainer.callbacks.out", str(out)),
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(out), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    with open(out / "log.txt", "a") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "confspec_lightning", *args], cwd=out, env=env, stdout=log, stderr=log
        )


def _finish(process: subprocess.Popen, out: Path, expected: int = 0) -> None:
    code = process.wait(timeout=600)
    assert code == expected, f"exit status {code}, expected {expected}:\n{(out / 'log.txt').read_text()[-3000:]}"


def _interrupt(
    method: str, out: Path, sig: signal.Signals, *extra: str, batch: int = 2, devices: int = 1, at: str = "batch"
) -> int:
    """Start a fit, signal it after batch ``batch`` of epoch 1 (or its validation: ``at``), return its exit status."""
    wait = "kill" if sig == signal.SIGKILL else "signal"
    process = _fit(method, out, "--trainer.callbacks.epoch", "1", "--trainer.callbacks.batch", str(batch),
                   "--trainer.callbacks.wait", wait, "--trainer.callbacks.at", at, *extra, devices=devices)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (out / "marker").exists():
            assert process.poll() is None, f"fit ended early:\n{(out / 'log.txt').read_text()[-3000:]}"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(sig)
        return process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()


def _uninterrupted(method: str, tmp_path_factory) -> Path:
    """The uninterrupted reference fit of ``method``, run once per test session (shared by pytest-xdist
    workers: the first one to need it runs it under a file lock, the others wait and read it)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = shared / f"uninterrupted_{method}"
    with open(shared / f"uninterrupted_{method}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (out / "done").exists():
                shutil.rmtree(out, ignore_errors=True)
                _finish(_fit(method, out), out)
                (out / "done").touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


def _records(out: Path, rank: int = 0) -> list[dict]:
    return [json.loads(line) for line in (out / f"batches{rank}.jsonl").read_text().splitlines()]


def _classwise(out: Path) -> dict:
    """The last validation report, without its ``environment`` (the commit can move between the two runs)."""
    reports = sorted((out / "runs").glob("*/version_*/classwise_val.json"), key=lambda p: p.parent.name)
    report = json.loads(reports[-1].read_text())
    assert report.pop("environment")["torch"] == torch.__version__
    return report


def _assert_same_end(method: str, reference: Path, resumed: Path, rank: int = 0) -> None:
    a = torch.load(reference / f"final{rank}.pt", weights_only=True)
    b = torch.load(resumed / f"final{rank}.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 12 and a["epoch"] == b["epoch"]
    assert a["model"].keys() == b["model"].keys()
    for key in METHODS[method][1]:
        assert key in a["model"]  # the method's state is compared below
    different = [key for key in a["model"] if not torch.equal(a["model"][key], b["model"][key])]
    assert not different, f"differ after the resume: {different}"
    for key, value in a["optimizer"]["state"].items():
        assert torch.equal(value["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert torch.equal(a["rng"], b["rng"])  # the attack's random stream went on exactly
    if rank == 0:
        assert _classwise(reference) == _classwise(resumed)  # per-class validation report, ||C||_2 included


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, sig", [("csr", signal.SIGTERM), ("wat", signal.SIGUSR1)], ids=["csr-SIGTERM", "wat-SIGUSR1"]
)
def test_preemption_signal_saves_mid_epoch_and_the_resumed_fit_equals_an_uninterrupted_one(
    method, sig, tmp_path, tmp_path_factory
):
    reference = _uninterrupted(method, tmp_path_factory)
    out = tmp_path / "preempted"
    assert _interrupt(method, out, sig) == PREEMPTION_EXIT_CODE
    log = (out / "log.txt").read_text()
    assert f"{sig.name} received: saved" in log and "global step 7" in log
    last = next((out / "runs").glob("*/version_0/checkpoints/last.ckpt"))
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 7 and state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "batches": 3, "batch_size": 32}
    ]
    assert len(state["confspec_rng_states"]) == 1
    _finish(_fit(method, out, "--ckpt_path", "last"), out)
    # the batches not yet seen, in the same order: the two processes together saw exactly the reference's
    assert _records(out) == _records(reference)
    _assert_same_end(method, reference, out)
    # the resumed fit continued the same run, so it kept the best checkpoint an uninterrupted fit keeps
    assert [p.name for p in (out / "runs").glob("*/*")] == ["version_0"]
    assert _best(out) == _best(reference)


def _best(out: Path) -> tuple[str, float]:
    """(file name, score) of the best checkpoint the run's ModelCheckpoint recorded."""
    state = torch.load(next((out / "runs").glob("*/version_0/checkpoints/last.ckpt")), weights_only=True)
    (best,) = [v for k, v in state["callbacks"].items() if k.startswith("ModelCheckpoint") and v.get("monitor")]
    assert Path(best["best_model_path"]).is_file()
    return Path(best["best_model_path"]).name, float(best["best_model_score"])


@pytest.mark.slow
def test_sigterm_during_validation_exits_at_the_next_epoch_start_and_resumes_exactly(tmp_path, tmp_path_factory):
    """The signal comes during epoch 1's validation: no new checkpoint is needed (the epoch-end one is current)."""
    reference = _uninterrupted("csr", tmp_path_factory)
    out = tmp_path / "preempted"
    assert _interrupt("csr", out, signal.SIGTERM, at="validation") == PREEMPTION_EXIT_CODE
    assert "the epoch-end checkpoint is current" in (out / "log.txt").read_text()
    assert [(r["epoch"], r["batch"]) for r in _records(out)][-1] == (1, 3)  # epoch 2 not started
    _finish(_fit("csr", out, "--ckpt_path", "last"), out)
    assert _records(out) == _records(reference)
    _assert_same_end("csr", reference, out)


@pytest.mark.slow
@pytest.mark.parametrize(
    "every_n_steps, resumed_from", [(None, (1, 0)), (2, (1, 2))], ids=["epoch-end-checkpoint", "mid-epoch-checkpoint"]
)
def test_sigkill_mid_epoch_then_resume_from_last_equals_an_uninterrupted_fit(
    every_n_steps, resumed_from, tmp_path, tmp_path_factory
):
    """CSR (its direction and running confusion resume too); a method's state across a resume is the same
    checkpoint path for every method (WAT's: the SIGUSR1 preemption test)."""
    method = "csr"
    reference = _uninterrupted(method, tmp_path_factory)
    out = tmp_path / "killed"
    extra = [] if every_n_steps is None else ["--last_checkpoint.every_n_train_steps", str(every_n_steps)]
    assert _interrupt(method, out, signal.SIGKILL, *extra, batch=2) == -signal.SIGKILL
    killed_records = _records(out)
    assert [(r["epoch"], r["batch"]) for r in killed_records][-1] == (1, 2)
    _finish(_fit(method, out, "--ckpt_path", "last", *extra), out)
    records, expected = _records(out), _records(reference)
    # the killed run saw the reference's batches up to the kill; the resumed one repeats those after
    # the last checkpoint (the epoch start, or the mid-epoch step), then goes on identically
    assert killed_records == expected[: len(killed_records)]
    restart = next(i for i, r in enumerate(expected) if (r["epoch"], r["batch"]) == resumed_from)
    assert records[len(killed_records) :] == expected[restart:]
    _assert_same_end(method, reference, out)


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_sigterm_to_rank_zero_saves_on_both_ranks_and_the_resumed_fit_equals_an_uninterrupted_one(tmp_path):
    """2 gloo processes, SIGTERM to rank 0 only: both ranks agree (max-reduce), save, exit 75, resume exactly."""
    reference = tmp_path / "uninterrupted"
    _finish(_fit("csr", reference, devices=2), reference)
    out = tmp_path / "preempted"
    assert _interrupt("csr", out, signal.SIGTERM, batch=1, devices=2) == PREEMPTION_EXIT_CODE
    state = torch.load(next((out / "runs").glob("*/version_0/checkpoints/last.ckpt")), weights_only=True)
    assert state["global_step"] == 6 and len(state["confspec_rng_states"]) == 2
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 2, "batch_size": 16}]
    _finish(_fit("csr", out, "--ckpt_path", "last", devices=2), out)
    for rank in (0, 1):
        assert _records(out, rank) == _records(reference, rank)
        _assert_same_end("csr", reference, out, rank)
