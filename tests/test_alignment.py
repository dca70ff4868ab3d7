"""The gradient-alignment check (evaluation.alignment) on hand-made cases, and its benchmark script end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from confspec_lightning import functional as CF
from confspec_lightning.evaluation.alignment import (
    PENALTIES,
    cosine,
    discrete_summary,
    flat_gradient,
    gradient_alignment,
    penalty_objectives,
    smoothed_sigma_max,
    step_along,
)

from conftest import ROOT


def test_smoothed_confusion_tends_to_the_discrete_matrix():
    torch.manual_seed(0)
    logits, target = torch.randn(60, 4) * 3, torch.randint(0, 4, (60,))
    discrete = CF.confusion_from_predictions(logits.argmax(1), target, 4, normalize=True).double()
    expected = torch.linalg.matrix_norm(discrete, ord=2)
    assert float(smoothed_sigma_max(logits, target, 0.001)) == pytest.approx(float(expected), rel=1e-4)
    # T = 1 is the soft surrogate's sigma_max
    assert float(smoothed_sigma_max(logits, target, 1.0)) == pytest.approx(
        float(penalty_objectives(logits, target)["soft"]), rel=1e-6
    )


def test_penalties_hand_case():
    # two samples of class 0: one predicted 1 (CE c), one correct; one sample of class 1, correct
    logits = torch.tensor([[0.0, 2.0], [3.0, 0.0], [0.0, 1.0]], requires_grad=True)
    target = torch.tensor([0, 0, 1])
    values = penalty_objectives(logits, target)
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    # kl: L = [[0, 0], [ce0 / 2, 0]] -> sigma_max = ce0 / 2
    assert float(values["kl"]) == pytest.approx(float(ce[0] / 2))
    # counts: one error in cell (1, 0): G = u1 v1^T = e1 e0^T, rescaled to 2.01 there, 0.01 elsewhere
    weights = torch.tensor([2.01, 0.01, 0.01])
    assert float(values["counts-weighted CE"]) == pytest.approx(float((weights * ce).mean()), rel=1e-6)
    assert float(values["CE"]) == pytest.approx(float(ce.mean()))
    assert set(values) == set(PENALTIES)


def test_alignment_and_steps_on_a_linear_model():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x, target = torch.randn(90, 5), torch.randint(0, 3, (90,))
    gradients, cosines = gradient_alignment(model, x, target, [1.0, 0.1])
    assert set(cosines) == set(PENALTIES) and all(set(c) == {1.0, 0.1} for c in cosines.values())
    assert cosines["soft"][1.0] == pytest.approx(1.0)  # soft = C_T at T = 1
    assert all(-1.0 - 1e-9 <= c <= 1.0 + 1e-9 for values in cosines.values() for c in values.values())
    # a step along minus the gradient of sigma_max(C_T) lowers sigma_max(C_T) (first order)
    reference = smoothed_sigma_max(model(x), target, 1.0).item()
    step_along(model, gradients["C_T=1"], 1e-3)
    assert smoothed_sigma_max(model(x), target, 1.0).item() < reference
    assert cosine(torch.ones(3), torch.zeros(3)) == 0.0
    (g,) = [flat_gradient(model(x).sum(), list(model.parameters()))]
    assert g.shape == (5 * 3 + 3,) and g.dtype == torch.float64


def test_discrete_summary():
    pred, target = torch.tensor([0, 1, 1, 1]), torch.tensor([0, 0, 1, 1])
    summary = discrete_summary(pred, target, 2)
    assert summary["worst_error"] == pytest.approx(0.5) and summary["spectral_norm"] == pytest.approx(0.5)


@pytest.mark.slow
def test_mechanism_benchmark_end_to_end(tmp_path):
    """Train a tiny digits model with confspec, run the check on its checkpoint, read the table."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    config = str(ROOT / "configs/digits/trades.yaml")
    quick = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--model.init_args.train_attack.steps=1"]
    fit = [sys.executable, "-m", "confspec_lightning", "fit", "--config", config, *quick]
    fit += [f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
    proc = subprocess.run(fit, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoint = tmp_path / "digits_trades/version_0/checkpoints/last.ckpt"
    script = tmp_path / "mechanism" / "run.py"  # a copy, so that results stay out of the repository
    script.parent.mkdir()
    script.write_text((ROOT / "benchmarks/csr_mechanism/run.py").read_text())
    check = [sys.executable, str(script), "--name", "tiny", "--config", config, "--checkpoint", str(checkpoint)]
    check += ["--probe-size", "60", "--extra=--model.init_args.eval_attack.steps=2"]
    proc = subprocess.run(check, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((script.parent / "results.json").read_text())["tiny"]
    assert set(result["cosines"]) == set(PENALTIES)
    assert set(result["steps"]) >= {"kl", "soft", "counts-weighted CE", "CE", "C_T=0.05", "random 0"}
    table = (script.parent / "RESULTS.md").read_text()
    assert "| kl |" in table and "| random |" in table and (script.parent / "tiny_alignment.png").is_file()


@pytest.mark.slow
def test_gpu_script_dry_run_on_cpu(tmp_path):
    """benchmarks/gpu/run.py --smoke: the same steps on the CPU with tiny settings, a summary with every step."""
    from confspec_lightning.data.cifar import CIFAR10_ARCHIVE

    archive = ROOT.parent / "shared/data/cifar10_q75" / CIFAR10_ARCHIVE
    if not archive.is_file():
        pytest.skip(f"the CIFAR-10 archive {archive} is absent (../shared/data not beside the checkout)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "benchmarks/gpu/run.py"), "--smoke", "--out", str(tmp_path)]
    command += ["--data", str(archive.parent), "--steps", "throughput", "finetune", "--pretrain-epochs", "1"]
    command += ["--finetune-epochs", "1", "--val-per-class", "2", "--test-per-class", "2", "--budget", "900"]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert all(step["status"] == "ok" for step in summary["steps"].values()), summary["steps"]
    assert set(summary["finetune"]) == {"pretrain_trades", "finetune_trades", "finetune_trades_csr"}
    assert "autoattack" in summary["finetune"]["finetune_trades_csr"]
    assert (tmp_path / "throughput.json").is_file() and "finetune_trades_csr" in (tmp_path / "SUMMARY.md").read_text()
