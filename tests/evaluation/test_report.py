"""The evaluation report: exact numbers, empty classes, JSON round trip, Markdown, figures, comparison."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau

from confspec_lightning.evaluation import Divergence, EvaluationReport, compare_reports
from confspec_lightning.evaluation.compare import main as compare_main

CLASSES = ["a", "b", "c"]


TARGET = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])


PREDICTIONS = {
    "clean": torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2]),  # acc a 3/4, b 2/2, c 4/4
    "pgd20": torch.tensor([0, 0, 1, 2, 1, 0, 2, 2, 2, 0]),  # acc a 2/4, b 1/2, c 3/4
    "autoattack": torch.tensor([1, 0, 1, 2, 0, 0, 2, 2, 0, 0]),  # acc a 1/4, b 0/2, c 2/4
}


SETTINGS = {"norm": "linf", "eps": 8 / 255, "checkpoint": "best.ckpt", "seeds": [0, 1]}


def make_report(name="TRADES", predictions=None, divergence=None) -> EvaluationReport:
    return EvaluationReport.from_predictions(
        name, CLASSES, TARGET, predictions or PREDICTIONS, SETTINGS, divergence=divergence
    )


def test_report_exact_numbers():
    report = make_report()
    assert list(report.attacks) == ["clean", "pgd20", "autoattack"] and report.strongest_attack == "autoattack"
    assert report.class_counts == [4, 2, 4]
    clean, pgd20, aa = report.attacks["clean"], report.attacks["pgd20"], report.attacks["autoattack"]
    assert clean.classwise_acc == pytest.approx([0.75, 1.0, 1.0])
    assert (clean.avg, clean.worst, clean.worst_class, clean.spread, clean.overall) == pytest.approx(
        (2.75 / 3, 0.75, "a", 0.25, 0.9)
    )
    assert clean.confusion is None and clean.confusion_spectral_norm is None
    assert pgd20.classwise_acc == pytest.approx([0.5, 0.5, 0.75])
    assert (pgd20.avg, pgd20.worst, pgd20.worst_class, pgd20.spread, pgd20.overall) == pytest.approx(
        (1.75 / 3, 0.5, "a", 0.25, 0.6)
    )
    assert aa.classwise_acc == pytest.approx([0.25, 0.0, 0.5])
    assert (aa.avg, aa.worst, aa.worst_class, aa.spread, aa.overall) == pytest.approx((0.25, 0.0, "b", 0.5, 0.3))
    # rows = predicted, columns = true class, per-class error rates
    c_pgd = np.array([[0, 0.5, 0.25], [0.25, 0, 0], [0.25, 0, 0]])
    c_aa = np.array([[0, 1.0, 0.5], [0.5, 0, 0], [0.25, 0, 0]])
    np.testing.assert_allclose(pgd20.confusion, c_pgd)
    np.testing.assert_allclose(aa.confusion, c_aa)
    assert pgd20.confusion_spectral_norm == pytest.approx(np.linalg.norm(c_pgd, 2))
    assert aa.confusion_spectral_norm == pytest.approx(np.linalg.norm(c_aa, 2))
    # column sums of C are the class-wise errors
    np.testing.assert_allclose(np.array(aa.confusion).sum(0), 1 - np.array(aa.classwise_acc))


def test_report_class_without_samples_is_nan_and_null(tmp_path):
    report = EvaluationReport.from_predictions(
        "x", [*CLASSES, "empty"], TARGET, {k: v for k, v in PREDICTIONS.items() if k != "pgd20"}, {}
    )
    aa = report.attacks["autoattack"]
    assert math.isnan(aa.classwise_acc[3]) and aa.avg == pytest.approx(0.25) and aa.worst_class == "b"
    report.write_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["attacks"]["autoattack"]["classwise_acc"][3] is None
    loaded = EvaluationReport.load_json(tmp_path / "r.json")
    assert math.isnan(loaded.attacks["autoattack"].classwise_acc[3])
    assert "| empty | 0 | - | - |" in report.to_markdown()


def test_report_json_round_trip_and_markdown(tmp_path):
    divergence = Divergence.from_accuracies("autoattack", [0.3, 0.1, 0.6], [0.25, 0.0, 0.5], train_size=30)
    assert divergence.kendall_tau == pytest.approx(1.0)
    report = make_report(divergence=divergence)
    report.write_json(tmp_path / "report.json")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert EvaluationReport.load_json(tmp_path / "report.json") == report
    md = report.to_markdown()
    norm_pgd, norm_aa = (
        report.attacks["pgd20"].confusion_spectral_norm,
        report.attacks["autoattack"].confusion_spectral_norm,
    )
    assert "| clean | 91.67 | 75.00 (a) | 25.00 | - | 90.00 |" in md
    assert f"| pgd20 | 58.33 | 50.00 (a) | 25.00 | {norm_pgd:.4f} | 60.00 |" in md
    assert f"| autoattack | 25.00 | 0.00 (b) | 50.00 | {norm_aa:.4f} | 30.00 |" in md
    assert "| class | n | clean | pgd20 | autoattack |" in md
    assert "| b | 2 | 100.00 | 50.00 | 0.00 |" in md
    assert "Kendall's tau-b rank correlation = 1.0000" in md and "| a | 30.00 | 25.00 | 5.00 |" in md
    assert "- `checkpoint`: best.ckpt" in md and "- `seeds`: [0, 1]" in md
    sections = [md.index(s) for s in ("## Summary", "## Per-class", "## Train/test divergence", "## Settings")]
    assert sections == sorted(sections)


def test_report_write_files(tmp_path):
    written = make_report().write(tmp_path / "eval")
    for key, name in [
        ("json", "evaluation.json"),
        ("markdown", "evaluation.md"),
        ("classwise_accuracy", "classwise_accuracy.png"),
        ("robust_confusion", "robust_confusion.png"),
    ]:
        assert written[key] == tmp_path / "eval" / name
        assert written[key].stat().st_size > 0
    assert written["classwise_accuracy"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = written["markdown"].read_text()
    assert "](classwise_accuracy.png)" in md and "](robust_confusion.png)" in md
    assert EvaluationReport.load_json(written["json"]) == make_report()


def test_report_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"predictions\['pgd20'\] must have shape \(10,\)"):
        make_report(predictions={"pgd20": torch.zeros(3, dtype=torch.long)})
    with pytest.raises(
        ValueError, match=r"predictions\['pgd20'\] holds the class index 3, outside \[0, num_classes=3\)"
    ):
        make_report(predictions={"pgd20": torch.full((10,), 3)})
    with pytest.raises(ValueError, match=r"predictions=\{\}"):
        EvaluationReport.from_predictions("x", CLASSES, TARGET, {}, {})
    with pytest.raises(ValueError, match=r"one per class \(3\)"):
        make_report(divergence=Divergence.from_accuracies("aa", [0.1, 0.2], [0.1, 0.2]))


def test_divergence_from_predictions():
    d = Divergence.from_predictions("pgd20", 3, TARGET, PREDICTIONS["pgd20"], TARGET, PREDICTIONS["autoattack"])
    assert d.train_acc == pytest.approx([0.5, 0.5, 0.75]) and d.test_acc == pytest.approx([0.25, 0.0, 0.5])
    assert d.train_size == 10
    assert d.kendall_tau == pytest.approx(kendalltau(d.train_acc, d.test_acc).statistic)


def test_compare_reports_and_command(tmp_path, capsys):
    make_report("TRADES").write_json(tmp_path / "a.json")
    partial = {k: v for k, v in PREDICTIONS.items() if k != "pgd20"}
    make_report("CSR", predictions=partial).write_json(tmp_path / "b.json")
    table = compare_reports([tmp_path / "a.json", str(tmp_path / "b.json")])
    lines = table.strip().splitlines()
    assert len(lines) == 4
    assert lines[0] == (
        "| method | clean avg % | clean worst % | pgd20 avg % | pgd20 worst % | autoattack avg % | autoattack worst % "
        "| \\|\\|C\\|\\|_2 (autoattack) |"
    )
    norm = make_report().attacks["autoattack"].confusion_spectral_norm
    assert lines[2] == f"| TRADES | 91.67 | 75.00 | 58.33 | 50.00 | 25.00 | 0.00 | {norm:.4f} |"
    assert lines[3] == f"| CSR | 91.67 | 75.00 | - | - | 25.00 | 0.00 | {norm:.4f} |"
    renamed = compare_reports([tmp_path / "a.json", tmp_path / "b.json"], names=["base", "ours"])
    assert "| base |" in renamed and "| ours |" in renamed
    with pytest.raises(ValueError, match=r"2 names for 1 reports"):
        compare_reports([tmp_path / "a.json"], names=["x", "y"])

    out = tmp_path / "tables" / "table.md"
    compare_main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--names", "base", "ours", "--output", str(out)])
    printed = capsys.readouterr().out
    assert out.read_text() == printed and "| ours |" in printed
    with pytest.raises(SystemExit):
        compare_main([str(tmp_path / "a.json"), "--names", "x", "y"])
    assert "2 names for 1 reports" in capsys.readouterr().err


def test_format_mean_std_over_runs():
    from confspec_lightning.evaluation import format_mean_std

    assert format_mean_std([0.5], scale=100) == "50.00"
    # mean 0.25 -> 25.00 %; sample std of (10, 40) points = sqrt(450) = 21.21
    assert format_mean_std([0.1, 0.4], scale=100) == "25.00 ± 21.21"
    # norms: 3 digits, std of (0.4, 0.5) = 0.0707
    assert format_mean_std([0.4, 0.5], digits=3) == "0.450 ± 0.071"
    # signed differences; a mean that rounds to zero is written +0.00, not -0.00
    assert format_mean_std([-2.0, 4.0], signed=True) == "+1.00 ± 4.24"
    assert format_mean_std([-0.001], signed=True) == "+0.00"


def test_many_classes_print_the_worst_and_best_few():
    k = 200
    names = [f"c{i}" for i in range(k)]
    target = torch.arange(k).repeat(2)
    pred = torch.where(target < 10, (target + 1) % k, target)  # classes 0..9 always wrong
    report = EvaluationReport.from_predictions(
        "many", names, target, {"clean": target, "pgd20": pred}, robust_attack="pgd20"
    )
    table = report.format_table()
    rows = [line for line in table.splitlines() if line.split()[0][1:].isdigit()]
    assert len(rows) == 10 and "(190 classes not shown; all in the JSON)" in table
    assert rows[0].split()[0] == "c0" and len(report.to_dict()["attacks"]["pgd20"]["classwise_acc"]) == k


def test_kendall_tau_undefined_is_said_so():
    zeros = Divergence.from_accuracies("pgd20", [0.0, 0.0, 0.0], [0.1, 0.5, 0.2])
    assert zeros.describe_tau() == "undefined (every class at 0 % on the train subset)"
    assert Divergence.from_accuracies("pgd20", [0.1, 0.5], [0.2, 0.4]).describe_tau() == "1.000"
