"""``--ckpt_path best|last|<run dir>`` within the run a command names; a resumed fit continues its run.

Every test runs ``python -m confspec_lightning`` as a real process (variants of a check: in-process, same entry point).
"""

from __future__ import annotations

import shutil

import pytest
import torch

from helpers import CLI_QUICK, PGD_ONLY, run_confspec, run_confspec_in_process


# ------------------------------------------------------------------------- runs named by --ckpt_path
@pytest.mark.slow
def test_best_and_last_resolve_within_the_named_run(tmp_path):
    assert run_confspec_in_process("fit", "--config", "digits/trades", *CLI_QUICK, cwd=tmp_path).returncode == 0
    # a second run of the same name (what a second fit writes: version_1 with its own checkpoints)
    shutil.copytree(tmp_path / "runs/digits_trades/version_0", tmp_path / "runs/digits_trades/version_1")
    proc = run_confspec("test", "--config", "digits/trades", *CLI_QUICK, "--ckpt_path=best", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "--ckpt_path best is ambiguous: 2 runs" in proc.stderr  # refused, rather than taking the newest
    assert "version_0 (1 epochs" in proc.stderr and "version_1 (1 epochs" in proc.stderr
    assert "--trainer.logger.init_args.version" in proc.stderr
    proc = run_confspec_in_process(  # the same entry point, without a third interpreter start
        "test", "--config", "digits/trades", *CLI_QUICK, "--ckpt_path=best", "--trainer.logger.init_args.version=0",
        PGD_ONLY, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--ckpt_path best -> runs/digits_trades/version_0/checkpoints/best-epoch000.ckpt" in proc.stdout
    run_dir = tmp_path / "runs/digits_trades/version_0"
    proc = run_confspec_in_process(
        "test", "--config", "digits/trades", *CLI_QUICK, f"--ckpt_path={run_dir}", PGD_ONLY,
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0 and f"--ckpt_path {run_dir} -> " in proc.stdout
    assert "version_0/checkpoints/best-epoch000.ckpt" in proc.stdout


@pytest.mark.slow
def test_fit_resume_continues_the_same_run(tmp_path):
    assert run_confspec_in_process("fit", "--config", "digits/trades", *CLI_QUICK, cwd=tmp_path).returncode == 0
    proc = run_confspec(
        "fit", "--config", "digits/trades", *CLI_QUICK, "--trainer.max_epochs=2", "--ckpt_path=last", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming the run runs/digits_trades/version_0 (logger version 0)" in proc.stdout
    assert "dirpath has changed" not in proc.stderr and "exists and is not empty" not in proc.stderr
    runs = sorted(p.name for p in (tmp_path / "runs/digits_trades").iterdir())
    assert runs == ["version_0"]
    state = torch.load(tmp_path / "runs/digits_trades/version_0/checkpoints/last.ckpt", weights_only=True)
    assert state["epoch"] == 1
    (best,) = [v for k, v in state["callbacks"].items() if k.startswith("ModelCheckpoint") and v["monitor"]]
    assert best["best_model_score"] is not None  # kept across the resume (same directory)
