"""The fairness benchmark runner: time-budget chunks, and finished runs are never redone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow
RUNNER = ROOT / "benchmarks/fairness/run.py"
QUICK = [
    "--extra=--trainer.max_epochs=1",
    "--extra=--trainer.limit_train_batches=2",
    "--extra=--model.init_args.train_attack.steps=1",
    "--extra=--model.init_args.eval_attack.steps=1",
    "--extra=--model.init_args.autoattack_attacks=[apgd-ce]",
    "--extra=--data.init_args.test_fraction=0.05",
]


def runner(out, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(RUNNER), "--protocol", "digits", "--out", str(out), *args, *QUICK]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_budget_exit_then_resume_without_redoing(tmp_path):
    spent = runner(tmp_path, "--methods", "wat", "--seeds", "0", "--time-budget", "1")
    assert spent.returncode == 3, spent.stdout + spent.stderr
    assert "time budget spent" in spent.stdout
    assert not (tmp_path / "digits/wat_seed0/result.json").exists()

    done = runner(tmp_path, "--methods", "wat", "--seeds", "0")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "digits/wat_seed0/result.json").read_text())
    assert result["method"] == "wat" and result["epochs"] == 1
    assert set(result["evaluation"]["attacks"]) >= {"clean", "pgd1", "autoattack"}
    log = (tmp_path / "digits/wat_seed0/log.txt").read_text()

    again = runner(tmp_path, "--methods", "wat", "--seeds", "0")
    assert again.returncode == 0
    assert (tmp_path / "digits/wat_seed0/log.txt").read_text() == log  # read back, not run again
    assert "not recorded in results.json" in again.stdout
