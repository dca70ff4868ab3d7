"""benchmarks/csr_mechanism/bound.py: its statistics by hand, and end to end on three tiny digits checkpoints."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch

from helpers import ROOT


def load_bound():
    spec = importlib.util.spec_from_file_location("csr_bound", ROOT / "benchmarks/csr_mechanism/bound.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rank_statistics_by_hand():
    """Ranks with ties averaged; rho([1, 2, 3], [1, 3, 2]) = 1 - 6 * 2 / (3 * 8) = 0.5; a constant vector: NaN."""
    bound = load_bound()
    assert bound.ranks([10.0, 30.0, 20.0, 20.0]) == [1.0, 4.0, 2.5, 2.5]
    assert bound.spearman([1.0, 2.0, 3.0], [1.0, 3.0, 2.0]) == pytest.approx(0.5)
    assert bound.spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert math.isnan(bound.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    a, b = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [1.0, 3.0, 2.0, 5.0, 4.0, 6.0]
    low, high, kept = bound.bootstrap_interval(a, b, resamples=500, seed=0)
    assert (low, high, kept) == bound.bootstrap_interval(a, b, resamples=500, seed=0)  # seeded
    assert -1.0 <= low <= bound.spearman(a, b) <= high <= 1.0 and 0 < kept <= 500
    analysis = {"runs": ["x"] * 6, "terms": {"train_spectral_norm": {"spearman": 0.8, "ci95": [0.2, 1.0]}}}
    assert bound.verdict(analysis).startswith("yes")
    analysis["terms"]["train_spectral_norm"]["ci95"] = [-0.3, 1.0]
    assert bound.verdict(analysis).startswith("not shown")
    analysis = {"runs": ["x"] * 4, "terms": {"train_spectral_norm": {"spearman": -1.0, "ci95": [-1.0, -1.0]}}}
    assert bound.verdict(analysis).startswith("too few runs to say (4, fewer than 6")


def make_run(directory, module, config_text: str, seed: int, report: bool) -> None:
    """A run directory in the fairness runner's layout: fit/config.yaml, fit/checkpoints/last.ckpt, result.json."""
    torch.manual_seed(seed)
    for layer in module.net.modules():
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    (directory / "fit" / "checkpoints").mkdir(parents=True)
    (directory / "fit" / "config.yaml").write_text(config_text)
    torch.save({"state_dict": module.state_dict(), "epoch": 0}, directory / "fit" / "checkpoints" / "last.ckpt")
    if report:
        accuracies = [0.5 + 0.04 * seed] * 9 + [0.1 * seed]
        evaluation = {"stage": "test", "attacks": {"pgd20": {"classwise_acc": accuracies}}}
        (directory / "result.json").write_text(json.dumps({"evaluation": evaluation}))


@pytest.mark.slow
def test_bound_script_end_to_end(tmp_path, capsys):
    """Three digits checkpoints (initialisations of seeds 0-2; two with an evaluation report, one without): every
    term per run, the correlation table, the report; a second call finds the runs on record."""
    from confspec_lightning.cli import build_cli

    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        cli = build_cli(["--config", "digits/trades", "--trainer.logger=false"], run=False)
    finally:
        sys.argv = argv
    config_text = "ckpt_path: null\nweights_only: null\n" + cli.parser.dump(cli.config, skip_check=True)
    for seed in range(3):
        make_run(tmp_path / f"run{seed}", cli.model, config_text, seed, report=seed < 2)
    bound = load_bound()
    out = tmp_path / "out"
    out.mkdir()
    args = ["--runs", *(f"r{s}={tmp_path / f'run{s}'}" for s in range(3)), "--group", "tiny"]
    args += ["--train-limit", "20", "--test-limit", "20", "--extra=--model.init_args.eval_attack.steps=1"]
    args += ["--output-dir", str(out), "--work-dir", str(tmp_path / "work")]
    bound.main(args)
    results = json.loads((out / "bound.json").read_text())
    rows = results["runs"]
    assert set(rows) == {"r0", "r1", "r2"}
    assert rows["r1"]["test_worst_error"] == pytest.approx(0.9) and "report" in rows["r1"]["test_source"]
    assert rows["r2"]["test_source"].startswith("computed: PGD-1")
    for row in rows.values():
        assert row["m_min"] == 2 and row["train_images"] == 20 and row["depth"] == 5 and row["alpha"] == 0.0
        assert row["nu_sqrt_k"] == pytest.approx(math.sqrt(10))
        assert all(math.isfinite(row[key]) for key in ("train_spectral_norm", "log10_neyshabur", "log10_bartlett"))
        assert [layer["kind"] for layer in row["layers"]] == ["conv2d"] * 3 + ["linear"] * 2
        assert row["layers"][0]["input"] == [1, 8, 8] and row["layers"][0]["folded"] == ["normalize"]
    assert set(results["analysis"]["tiny"]["terms"]) >= {"train_spectral_norm", "bound", "log10_neyshabur"}
    table = (out / "BOUND.md").read_text()
    assert "| r0 | 0 |" in table and "| training ‖C_γ‖₂ |" in table and "Does a lower training" in table
    bound.main(args)
    assert capsys.readouterr().out.count("on record") == 3
