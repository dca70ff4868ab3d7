"""The per-class fairness audit of any classifier (``confspec test --config audit/...``), offline, end to end."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import ROOT, assert_one_paragraph, run_confspec_in_process
from public_architectures import TINY_ROBUSTBENCH_NAME, TradesWideResNet, install_tiny_robustbench_entry

SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10_q75"
QUICK_AUDIT = """\
model:
  init_args:
    eval_attack: {steps: 2}
    test_attacks:
      - class_path: confspec_lightning.attacks.PGD
      - class_path: confspec_lightning.attacks.CW
      - class_path: confspec_lightning.attacks.AutoAttack
        init_args: {version: custom, attacks: [apgd-ce], n_iter: 2}
data:
  init_args: {test_per_class: 2, eval_batch_size: 10}
trainer:
  enable_progress_bar: false
  enable_model_summary: false
"""


@pytest.fixture
def cifar_root():
    if not SHARED_CIFAR.is_dir():
        pytest.skip(f"the audit test needs the offline CIFAR-10 archive in {SHARED_CIFAR}")
    return str(SHARED_CIFAR)


def _report(run_dir):
    evaluation = run_dir / "evaluation"
    report = json.loads((evaluation / "evaluation.json").read_text())
    for name in ("evaluation.md", "classwise_accuracy.png", "robust_confusion.png"):
        assert (evaluation / name).stat().st_size > 0, name
    return report, (evaluation / "evaluation.md").read_text()


def test_audit_of_a_robustbench_model_in_its_cache_offline(tmp_path, monkeypatch, cifar_root):
    install_tiny_robustbench_entry(monkeypatch, tmp_path / "models")
    (tmp_path / "quick.yaml").write_text(QUICK_AUDIT)
    proc = run_confspec_in_process(
        "test",
        "--config",
        "audit/robustbench_cifar10",
        "--config",
        "quick.yaml",
        f"--model.init_args.backbone.init_args.name={TINY_ROBUSTBENCH_NAME}",
        "--model.init_args.backbone.init_args.model_dir=models",
        f"--data.init_args.root={cifar_root}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report, markdown = _report(tmp_path / "runs/audit_robustbench/version_0")
    assert list(report["attacks"]) == ["clean", "pgd2", "cw2", "autoattack"]
    assert report["class_counts"] == [2] * 10 and report["settings"]["norm"] == "linf"
    for attack in report["attacks"].values():
        assert len(attack["classwise_acc"]) == 10 and {"avg", "worst", "spread"} <= set(attack)
    assert {"robust_acc_worst", "confusion_spectral_norm", "autoattack_acc"} <= set(report["summary"])
    assert "||C||_2" in markdown and "worst" in markdown
    assert "Per-class accuracy (test split" in proc.stdout and "evaluation report written to" in proc.stdout


def test_audit_of_a_checkpoint_file_in_a_public_layout(tmp_path, cifar_root):
    torch.save(TradesWideResNet(depth=10, widen_factor=1).state_dict(), tmp_path / "model_cifar_wrn.pt")
    (tmp_path / "quick.yaml").write_text(QUICK_AUDIT)
    proc = run_confspec_in_process(
        "test",
        "--config",
        "audit/checkpoint_cifar10",
        "--config",
        "quick.yaml",
        "--model.init_args.backbone.init_args.depth=10",
        "--model.init_args.backbone.init_args.widen_factor=1",
        f"--data.init_args.root={cifar_root}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "read layout 'trades_wideresnet' (detected; WRN-10-1)" in proc.stdout and "sub_block1.*" in proc.stdout
    report, _ = _report(tmp_path / "runs/audit_checkpoint/version_0")
    assert list(report["attacks"]) == ["clean", "pgd2", "cw2", "autoattack"]


def test_a_robustbench_name_not_in_the_cache_is_one_line_with_the_path(tmp_path, cifar_root):
    from public_architectures import require_robustbench

    require_robustbench()
    proc = run_confspec_in_process(
        "test",
        "--config",
        "audit/robustbench_cifar10",
        "--model.init_args.backbone.init_args.name=Wu2020Adversarial",
        f"--data.init_args.root={cifar_root}",
        cwd=tmp_path,
    )
    assert_one_paragraph(proc, "'Wu2020Adversarial'", "models/cifar10/Linf/Wu2020Adversarial.pt", "download: true")
