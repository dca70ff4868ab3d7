"""The demo (``make demo``): TRADES and TRADES + CSR side by side, per class, with a multi-seed record."""

from __future__ import annotations

import json

import pytest

from confspec_lightning import demo


def test_demo_runs_both_halves_records_them_and_a_plain_run_cites_the_record(chdir_tmp, capsys):
    quick = [
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.limit_test_batches",
        "1",
    ]
    record = chdir_tmp / "record.json"
    demo.main(["--epochs", "1", "--record", str(record), "--out", "runs", "--", *quick])
    out = capsys.readouterr().out
    assert "TRADES vs TRADES + CSR (paper form, kl surrogate, batch direction, alpha 0.6), seed 0" in out
    assert "diff pgd20" in out and "confspec fit --config digits/trades_csr_paper" in out
    data = json.loads(record.read_text())
    assert data["seeds"] == [0] and data["epochs"] == 1 and data["options"] == quick
    ((base, csr),) = data["runs"]
    assert len(base["robust"]) == len(csr["robust"]) == 10
    assert base["run"].endswith("demo_trades/seed0") and csr["run"].endswith("demo_trades_csr/seed0")
    worst = data["differences"]["robust_worst"]
    assert worst["per_seed"] == [pytest.approx(100 * (min(csr["robust"]) - min(base["robust"])))]
    config = (chdir_tmp / "runs/demo_trades_csr/seed0/config.yaml").read_text()
    assert "form: paper" in config and "alpha: 0.6" in config  # the CSR half ran the demo's setting
    assert "fairness: []" in (chdir_tmp / "runs/demo_trades/seed0/config.yaml").read_text()

    # a record made with extra options is not cited; one with the plain settings is, for its epochs only
    assert demo.recorded_evidence(record, 1) is None
    data["options"] = []
    record.write_text(json.dumps(data))
    assert "Recorded with these settings over seeds 0" in demo.recorded_evidence(record, 1)
    assert demo.recorded_evidence(record, 10) is None


def test_paired_differences_hand_computed():
    def run(clean, robust):
        return {"clean": clean, "robust": robust}

    pairs = [
        (run([0.9, 0.8], [0.5, 0.2]), run([0.9, 0.7], [0.5, 0.3])),  # worst +10, avg +5
        (run([1.0, 0.8], [0.6, 0.4]), run([0.9, 0.8], [0.5, 0.6])),  # worst +10, avg +5
        (run([1.0, 1.0], [0.6, 0.4]), run([1.0, 1.0], [0.4, 0.4])),  # worst 0, avg -10
    ]
    diffs = demo.paired_differences(pairs)
    assert diffs["robust_worst"]["per_seed"] == pytest.approx([10.0, 10.0, 0.0])
    assert diffs["robust_worst"]["mean"] == pytest.approx(20 / 3)
    assert diffs["robust_worst"]["std"] == pytest.approx((100 / 3) ** 0.5)  # sample std of (10, 10, 0)
    assert diffs["robust_avg"]["per_seed"] == pytest.approx([5.0, 5.0, -10.0])
    assert diffs["clean_worst"]["per_seed"] == pytest.approx([-10.0, 0.0, 0.0])
    table = demo.side_by_side(
        {"class_names": ["a", "b"], "class_counts": [3, 4], "robust_attack": "pgd20", **pairs[0][0]},
        {**pairs[0][1]},
    )
    assert table.splitlines()[1].split() == ["a", "3", "90.00", "50.00", "90.00", "50.00", "+0.00"]
    assert table.splitlines()[-1].split() == ["worst", "80.00", "20.00", "70.00", "30.00", "+10.00"]
