"""benchmarks/csr_mechanism/run.py end to end on a tiny digits model."""

from __future__ import annotations

import json
import runpy
import sys

import pytest
import torch

from confspec_lightning.evaluation.alignment import (
    PENALTIES,
)

from helpers import ROOT, run_confspec_in_process


@pytest.mark.slow
def test_mechanism_benchmark_end_to_end(tmp_path, monkeypatch):
    """Train a tiny digits model with confspec, run the check on its checkpoint, read the table (both in this
    process: the script as ``python run.py ARGS`` runs it)."""
    config = "digits/trades"
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


def load_displacement():
    import importlib.util

    spec = importlib.util.spec_from_file_location("csr_displacement", ROOT / "benchmarks/csr_mechanism/displacement.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_displacement_hand_computed(tmp_path, capsys):
    """theta_0 = (3, 4) (norm 5); run a = (3, 4) + (0.3, 0.4) -> 0.5 / 5 = 10 %; run b = (3, 4) + (-0.3, 0)
    -> 6 %; a vs b: ||(0.6, 0.4)|| / 5 = sqrt(0.52) / 5. Running statistics and integer buffers are left out,
    a checkpoint's backbone is read from ``net.backbone.*``, a bare state dict as it is."""
    displacement = load_displacement()
    start = {"w": torch.tensor([3.0]), "b": torch.tensor([4.0]), "bn.running_mean": torch.tensor([100.0])}
    start["bn.num_batches_tracked"] = torch.tensor(7)
    torch.save(start, tmp_path / "start.pt")
    run_a = {"net.backbone.w": torch.tensor([3.3]), "net.backbone.b": torch.tensor([4.4])}
    run_a["net.backbone.bn.running_mean"] = torch.tensor([-50.0])
    run_a["net.normalize.mean"] = torch.tensor([9.0])
    torch.save({"state_dict": run_a, "epoch": 1}, tmp_path / "a.ckpt")
    torch.save({"w": torch.tensor([2.7]), "b": torch.tensor([4.0])}, tmp_path / "b.pt")
    displacement.main(
        ["--start", str(tmp_path / "start.pt"), "--runs", f"a={tmp_path / 'a.ckpt'}", f"b={tmp_path / 'b.pt'}"]
    )
    lines = {line.rsplit(None, 4)[0].strip(): float(line.split()[-4]) for line in capsys.readouterr().out.splitlines()}
    assert lines["a"] == pytest.approx(10.0, abs=1e-3)
    assert lines["b"] == pytest.approx(6.0, abs=1e-3)
    assert lines["a vs b"] == pytest.approx(100 * 0.52**0.5 / 5, abs=1e-3)


def test_displacement_rejects_mismatched_models(tmp_path):
    displacement = load_displacement()
    start = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="run 'x': its weights do not match"):
        displacement.relative_distances(start, {"x": {"w": torch.zeros(3)}})
    torch.save({"state_dict": {"net.other": torch.zeros(1)}}, tmp_path / "empty.ckpt")
    with pytest.raises(ValueError, match="no backbone weights"):
        displacement.backbone_weights(tmp_path / "empty.ckpt")
    with pytest.raises(SystemExit, match="'oops' is not NAME=CHECKPOINT"):
        displacement.parse_runs(["oops"])
