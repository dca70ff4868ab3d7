"""Shared builders for tests: a module and a Trainer, objective outputs, real ``confspec`` processes, paths."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from confspec_lightning import CSR, AttackConfig, RobustFairLitModule
from confspec_lightning.data import DigitsDataModule
from confspec_lightning.models import DigitsCNN
from confspec_lightning.objectives import ObjectiveOutput
from confspec_lightning.recipes import recipe_names

ROOT = Path(__file__).resolve().parents[1]
#: every shipped recipe name (a base plus overlays) and the stand-alone audit configs
CONFIGS = [*recipe_names(), "audit/robustbench_cifar10", "audit/checkpoint_cifar10"]
QUICK_ATTACK = AttackConfig(eps=0.1, step=0.04, steps=3)


def load_script(path: Path, name: str):
    """A script of the repository (``benchmarks/*/run.py``: not a package) as a module, loaded once per ``name``."""
    import importlib.util

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def run_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """``build(folder)`` once per test session, for every test that needs its output (pytest-xdist workers share it:
    the first one to need it builds it under a file lock, the others wait and read it); the folder."""
    import fcntl
    import shutil

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = shared / name
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (out / ".done").exists():
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                build(out)
                (out / ".done").touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


def make_module(fairness: list | None = None, cls: type | None = None, **kwargs: Any) -> RobustFairLitModule:
    torch.manual_seed(0)
    defaults: dict[str, Any] = dict(
        backbone=DigitsCNN(width=8),
        num_classes=10,
        train_attack=QUICK_ATTACK,
        eval_attack=QUICK_ATTACK,
        fairness=fairness if fairness is not None else [CSR()],
        optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9),
        input_mean=DigitsDataModule.mean,
        input_std=DigitsDataModule.std,
    )
    defaults.update(kwargs)
    return (cls or RobustFairLitModule)(**defaults)


def make_trainer(**kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=1,
        limit_test_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


class DirectionRecorder(pl.Callback):
    """Records CSR's G at the first batch of every epoch (after the epoch-start refresh)."""

    def __init__(self) -> None:
        self.directions: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.directions[trainer.current_epoch] = pl_module.fairness[0].direction.detach().clone()


class CleanTrainingModule(RobustFairLitModule):
    """Skips the training attack (standard training): a quick way to get an accurate, non-robust model."""

    calls = 0

    def generate_adversarial(self, x, target):
        CleanTrainingModule.calls += 1
        return x


def trades_output(batch: int = 6, classes: int = 3, seed: int = 0) -> tuple[ObjectiveOutput, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    target = torch.arange(batch) % classes
    ce = torch.rand(batch, generator=gen) + 0.1
    kl = torch.rand(batch, generator=gen) + 0.1
    adv_logits = torch.randn(batch, classes, generator=gen)
    output = ObjectiveOutput(
        terms={"ce": ce, "kl": kl}, coefficients={"ce": 1.0, "kl": 6.0}, adv_logits=adv_logits, adv_ce=ce
    )
    return output, target


# ------------------------------------------------------------ real confspec processes
PGD_ONLY = "--model.init_args.test_attacks=[{class_path: confspec_lightning.attacks.PGD}]"


CLI_QUICK = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--model.init_args.train_attack.steps=1",
    "--model.init_args.eval_attack.steps=1",
]


def run_confspec(*args: str, cwd, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    command = [sys.executable, "-m", "confspec_lightning", *args]
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)


#: ends each command's output in :func:`run_confspec_sequence` (on stdout and on stderr), with its exit status
_COMMAND_END = "@@ confspec command ended with status "
_SEQUENCE = """
import json, os, sys, traceback
sys.argv = ["confspec"]  # as a process started as ``confspec ARGS`` sees it
from confspec_lightning.__main__ import main
for args in json.loads(os.environ["CONFSPEC_TEST_COMMANDS"]):
    code = 0
    try:
        main(args)
    except SystemExit as stop:
        code = 0 if stop.code is None else stop.code if isinstance(stop.code, int) else 1
    except Exception:  # what a process of its own would print before exiting with status 1
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
        stream.write("\\n" + END + str(code) + " @@\\n")
        stream.flush()
"""


def run_confspec_sequence(*commands: list[str], cwd, env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """Several ``confspec ARGS`` commands one after another in ONE new interpreter, each through the entry point's
    ``main`` and with the process's real stdout and stderr (Lightning's log handlers included), split per command.

    The real-process checks of :func:`run_confspec` with the start-up (importing torch and Lightning: seconds)
    paid once: the first command runs in a fresh process, the next ones after it (as in
    :func:`run_confspec_in_process`). A command after one that killed the interpreter gets its exit status."""
    import json

    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    environment["CONFSPEC_TEST_COMMANDS"] = json.dumps([list(c) for c in commands])
    script = _SEQUENCE.replace("END", repr(_COMMAND_END))
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, env=environment, capture_output=True, text=True, timeout=1200
    )
    outs, errs = proc.stdout.split(_COMMAND_END), proc.stderr.split(_COMMAND_END)
    results = []
    for index, args in enumerate(commands):
        out, err = (parts[index] if index < len(parts) else "" for parts in (outs, errs))
        if index > 0:  # drop the previous command's status line
            out, err = (text.split(" @@\n", 1)[-1] for text in (out, err))
        ended = index + 1 < len(outs)
        code = int(outs[index + 1].split(" @@", 1)[0]) if ended else (proc.returncode or 1)
        results.append(subprocess.CompletedProcess(["confspec", *args], code, out, err))
    return results


def run_confspec_in_process(*args: str, cwd) -> subprocess.CompletedProcess:
    """``confspec ARGS`` through :func:`confspec_lightning.__main__.main` in this process (exit status, stdout
    and stderr captured): the same code path as :func:`run_confspec` without a new interpreter, for the many
    variants of one check; each check keeps one real-process test beside it."""
    import contextlib
    import io

    from confspec_lightning.__main__ import main

    out, err, previous, code = io.StringIO(), io.StringIO(), os.getcwd(), 0
    argv, sys.argv = sys.argv, ["confspec"]  # as a process started as ``confspec ARGS`` sees it
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 1
            except Exception:  # what a real process would print before exiting with status 1
                import traceback

                traceback.print_exc()
                code = 1
    finally:
        os.chdir(previous)
        sys.argv = argv
    return subprocess.CompletedProcess(["confspec", *args], code, out.getvalue(), err.getvalue())


def assert_one_paragraph(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, no traceback, the error one line and the last, naming every fragment."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 6, proc.stderr  # at most Lightning's start-up lines before it
    last = lines[-1]
    assert last.startswith("confspec"), last
    for fragment in fragments:
        assert fragment in last, (fragment, last)
    return last


# ------------------------------------------------------------ torchrun-style DDP jobs
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(script: Path, world_size: int, out: Path, args: list[str], timeout: float) -> list[str]:
    """Run ``python SCRIPT ARGS`` as ``world_size`` ranks with the environment torchrun sets (Lightning then joins
    their process group instead of launching processes), in ``out``; the ranks' logs (``out/rank<r>.log``). A rank
    that fails, or is still running ``timeout`` + 60 s later, fails the test with every rank's log."""
    import time

    import pytest

    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    processes, logs = [], []
    for rank in range(world_size):
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(world_size),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "NODE_RANK": "0",
        }
        log = out / f"rank{rank}.log"
        logs.append(log)
        with open(log, "w") as handle:
            command = [sys.executable, str(script), *args]
            processes.append(subprocess.Popen(command, cwd=out, env=env, stdout=handle, stderr=handle))
    deadline = time.monotonic() + timeout + 60
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            process.kill()
            codes.append(process.wait())
    texts = [log.read_text() for log in logs]
    if any(codes):
        ranks = enumerate(zip(codes, texts, strict=True))
        report = "\n".join(f"--- rank {r} (exit {c}) ---\n{t[-6000:]}" for r, (c, t) in ranks)
        pytest.fail(f"a DDP rank failed or hung:\n{report}")
    return texts
