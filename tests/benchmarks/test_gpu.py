"""benchmarks/gpu/run.py: the GPU checks' script, dry-run on the CPU so that it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from archives import write_cifar10_archive
from helpers import ROOT


@pytest.mark.slow
def test_gpu_script_dry_run_on_cpu(tmp_path):
    """benchmarks/gpu/run.py --smoke: the same steps on the CPU with tiny settings, a summary with every step.

    The data is a small archive in the real format (12 training and 4 test images per class): the commands
    are the GPU run's, only the decode of 60 000 JPEGs in each process is spared. Of the fine-tuning runs only
    CSR's (fit + test) runs: the TRADES control is the same commands with another config.
    """
    from confspec_lightning.data.cifar import CIFAR10_ARCHIVE

    archive = tmp_path / "data" / CIFAR10_ARCHIVE
    write_cifar10_archive(archive, train_per_class=12, test_per_class=4)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "benchmarks/gpu/run.py"), "--smoke", "--out", str(tmp_path)]
    command += ["--data", str(archive.parent), "--steps", "throughput", "finetune", "--pretrain-epochs", "1"]
    command += ["--finetune-epochs", "1", "--val-per-class", "2", "--test-per-class", "2", "--budget", "900"]
    command += ["--finetune-methods", "finetune_trades_csr"]  # the control's commands differ only by the config
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert all(step["status"] == "ok" for step in summary["steps"].values()), summary["steps"]
    assert set(summary["finetune"]) == {"pretrain_trades", "finetune_trades_csr"}
    assert "autoattack" in summary["finetune"]["finetune_trades_csr"]
    assert (tmp_path / "throughput.json").is_file() and "finetune_trades_csr" in (tmp_path / "SUMMARY.md").read_text()
