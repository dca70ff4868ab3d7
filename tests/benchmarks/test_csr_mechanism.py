"""benchmarks/csr_mechanism/run.py end to end on a tiny digits model."""

from __future__ import annotations

import json
import runpy
import sys

import pytest

from confspec_lightning.evaluation.alignment import (
    PENALTIES,
)

from helpers import ROOT, run_confspec_in_process


@pytest.mark.slow
def test_mechanism_benchmark_end_to_end(tmp_path, monkeypatch):
    """Train a tiny digits model with confspec, run the check on its checkpoint, read the table (both in this
    process: the script as ``python run.py ARGS`` runs it)."""
    config = str(ROOT / "configs/digits/trades.yaml")
    quick = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--model.init_args.train_attack.steps=1"]
    fit = ["fit", "--config", config, *quick]
    fit += [f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
    proc = run_confspec_in_process(*fit, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoint = tmp_path / "digits_trades/version_0/checkpoints/last.ckpt"
    script = tmp_path / "mechanism" / "run.py"  # a copy, so that results stay out of the repository
    script.parent.mkdir()
    script.write_text((ROOT / "benchmarks/csr_mechanism/run.py").read_text())
    check = [str(script), "--name", "tiny", "--config", config, "--checkpoint", str(checkpoint)]
    check += ["--probe-size", "60", "--extra=--model.init_args.eval_attack.steps=2"]
    monkeypatch.setattr(sys, "argv", check)
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(script), run_name="__main__")
    result = json.loads((script.parent / "results.json").read_text())["tiny"]
    assert set(result["cosines"]) == set(PENALTIES)
    assert set(result["steps"]) >= {"kl", "soft", "counts-weighted CE", "CE", "C_T=0.05", "random 0"}
    table = (script.parent / "RESULTS.md").read_text()
    assert "| kl |" in table and "| random |" in table and (script.parent / "tiny_alignment.png").is_file()
