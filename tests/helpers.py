"""Shared builders for tests: a module and a Trainer, objective outputs, real ``confspec`` processes, paths."""

from __future__ import annotations

import os
import subprocess
import sys
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
