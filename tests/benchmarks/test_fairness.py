"""The fairness benchmark runner: time-budget chunks, finished runs never redone, the recording of results
and the tables computed from them (hand-computed cases)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from helpers import ROOT, load_script

RUNNER = ROOT / "benchmarks/fairness/run.py"


def load_runner():
    """benchmarks/fairness/run.py as a module under a unique name (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("fairness_benchmark_run", RUNNER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


fairness_run = load_runner()

QUICK = [
    "--extra=--trainer.max_epochs=1",
    "--extra=--trainer.limit_train_batches=2",
    "--extra=--model.init_args.train_attack.steps=1",
    "--extra=--model.init_args.eval_attack.steps=1",
    f"--extra=--config={ROOT / 'tests/quick_attacks.yaml'}",
    "--extra=--data.init_args.test_fraction=0.05",
]


def runner(out, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(RUNNER), "--protocol", "digits", "--out", str(out), *args, *QUICK]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def runner_in_process(out, capsys, *args: str) -> subprocess.CompletedProcess:
    """:func:`runner` in this process (its confspec runs are still processes): exit status and output."""
    code = 0
    try:
        fairness_run.main(["--protocol", "digits", "--out", str(out), *args, *QUICK])
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["run.py", *args], code, captured.out, captured.err)


@pytest.mark.slow
def test_budget_exit_then_resume_without_redoing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    spent = runner_in_process(tmp_path, capsys, "--methods", "wat", "--seeds", "0", "--time-budget", "1")
    assert spent.returncode == 3, spent.stdout + spent.stderr
    assert "time budget spent" in spent.stdout
    assert not (tmp_path / "digits/wat_seed0/result.json").exists()

    done = runner(tmp_path, "--methods", "wat", "--seeds", "0")  # the script as a process
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "digits/wat_seed0/result.json").read_text())
    assert result["method"] == "wat" and result["epochs"] == 1
    assert set(result["evaluation"]["attacks"]) >= {"clean", "pgd1", "autoattack"}
    log = (tmp_path / "digits/wat_seed0/log.txt").read_text()

    again = runner_in_process(tmp_path, capsys, "--methods", "wat", "--seeds", "0")
    assert again.returncode == 0
    assert (tmp_path / "digits/wat_seed0/log.txt").read_text() == log  # read back, not run again
    assert "not recorded in results.json" in again.stdout

    # the standard AutoAttack on that finished run (benchmarks/fairness/standard_aa.py; tests/benchmarks/
    # test_standard_aa.py has its argument checks): one confspec test on the same images and checkpoint
    standard_aa = load_script(ROOT / "benchmarks/fairness/standard_aa.py", "standard_aa_benchmark")
    output = tmp_path / "standard"
    options = ["--runs", "wat:0", "--out", str(tmp_path), "--output-dir", str(output), "--n-iter", "2"]
    standard_aa.main(["--protocol", "digits", *options, "--min-test-seconds", "0", *QUICK])
    row = json.loads((output / "standard_aa.json").read_text())["runs"]["digits/wat_seed0"]
    assert row["settings"]["autoattack"] == "standard n_iter=2" and row["settings"]["images"] == 90
    custom = result["evaluation"]["attacks"]["autoattack"]
    assert row["custom"] == {key: custom[key] for key in ("avg", "worst", "classwise_acc")}
    assert 0.0 <= row["standard"]["worst"] <= row["standard"]["avg"] <= 1.0
    assert "| digits | wat | 0 |" in (output / "STANDARD_AA.md").read_text()


def fake_result(method: str, seed: int, worst: float, avg: float, fit_seconds: float = 60.0) -> dict:
    """A result as run_one writes it, with one AutoAttack column (2 classes: worst and 2 * avg - worst)."""
    attack = {"avg": avg, "worst": worst, "classwise_acc": [worst, 2 * avg - worst], "confusion_spectral_norm": 0.5}
    return {
        "protocol": "digits",
        "method": method,
        "seed": seed,
        "fit_seconds": fit_seconds,
        "epochs": 30,
        "evaluation": {"class_names": ["a", "b"], "attacks": {"clean": attack, "autoattack": attack}},
    }


def test_deltas_are_paired_by_seed_with_the_spread_of_the_differences():
    results = [
        fake_result("trades", 0, worst=0.10, avg=0.60),
        fake_result("trades", 1, worst=0.30, avg=0.70),
        fake_result("trades", 2, worst=0.20, avg=0.65),
        fake_result("wat", 0, worst=0.20, avg=0.60),  # +10, +0
        fake_result("wat", 1, worst=0.50, avg=0.75),  # +20, +5
        fake_result("faal", 2, worst=0.10, avg=0.50),  # -10, -15 (one seed: no spread)
    ]
    lines = fairness_run.deltas(results, ["trades", "wat", "faal"]).splitlines()
    # wat: mean(+10, +20) = +15, stdev = 7.07; mean(0, +5) = +2.5, stdev = 3.54; seed 2 of trades not paired
    assert lines[2] == "| WAT | +15.00 ± 7.07 | +2.50 ± 3.54 | 0, 1 |"
    assert lines[3] == "| FAAL | -10.00 | -15.00 | 2 |"
    assert len(lines) == 4


def test_table_reports_mean_and_std_over_seeds_and_median_time():
    results = [
        fake_result("trades", 0, worst=0.10, avg=0.60, fit_seconds=60),
        fake_result("trades", 1, worst=0.30, avg=0.70, fit_seconds=90),
        fake_result("trades", 2, worst=0.20, avg=0.65, fit_seconds=300),
    ]
    row = fairness_run.table(results, ["trades"]).splitlines()[2].split(" | ")
    # AutoAttack avg: mean 65.00, stdev 5.00; worst: mean 20.00, stdev 10.00; median of 2, 3, 10 s/epoch = 3.0
    assert row[1] == "3"
    assert row[4:6] == ["65.00 ± 5.00", "20.00 ± 10.00"]
    assert row[-1] == "3.0 |"


def test_classwise_table_averages_seeds_and_the_weakest_classes():
    def run(method: str, seed: int, accs: list[float]) -> dict:
        attack = {"avg": sum(accs) / 4, "worst": min(accs), "classwise_acc": accs, "confusion_spectral_norm": 0.5}
        names = ["a", "b", "c", "d"]
        return {"method": method, "seed": seed, "evaluation": {"class_names": names, "attacks": {"autoattack": attack}}}

    results = [
        run("trades", 0, [0.10, 0.40, 0.20, 0.90]),
        run("trades", 1, [0.20, 0.50, 0.30, 0.70]),
        run("wat", 0, [0.30, 0.05, 0.60, 0.80]),
    ]
    lines = fairness_run.classwise_table(results, ["trades", "faal", "wat"], weakest=2).splitlines()
    assert lines[0] == "| method | seeds | a | b | c | d | mean of the 2 weakest |"
    # trades: per-class means 15, 45, 25, 80; weakest two 15 and 25 -> 20
    assert lines[2] == "| TRADES | 2 | 15.0 | 45.0 | 25.0 | 80.0 | 20.00 |"
    # wat: weakest two 5 and 30 -> 17.5; faal has no run and no row
    assert lines[3] == "| WAT | 1 | 30.0 | 5.0 | 60.0 | 80.0 | 17.50 |"
    assert len(lines) == 4


def test_a_signalled_run_is_resumable_not_failed(tmp_path, monkeypatch):
    """confspec's preemption exit (75: last.ckpt saved) ends the chunk like a spent budget (the sweep goes on)."""
    from confspec_lightning.checkpointing import PREEMPTION_EXIT_CODE

    assert fairness_run.PREEMPTED_EXIT == PREEMPTION_EXIT_CODE
    stopped = tmp_path / "stopped"  # stands in for the interpreter: a process that exits as a signalled fit does
    stopped.write_text(f"#!/bin/sh\nexit {PREEMPTION_EXIT_CODE}\n")
    stopped.chmod(0o755)
    monkeypatch.setattr(fairness_run.sys, "executable", str(stopped))
    with pytest.raises(fairness_run.BudgetExhausted):
        fairness_run.confspec(["fit"], tmp_path / "log.txt", fairness_run.Budget(None))
    failing = tmp_path / "failing"
    failing.write_text("#!/bin/sh\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setattr(fairness_run.sys, "executable", str(failing))
    with pytest.raises(SystemExit, match="failed \\(exit 1\\)"):
        fairness_run.confspec(["fit"], tmp_path / "log.txt", fairness_run.Budget(None))


def test_record_keeps_every_run_and_replaces_a_rerun(tmp_path, monkeypatch):
    monkeypatch.setattr(fairness_run, "HERE", tmp_path)
    monkeypatch.setattr(fairness_run, "RESULTS_JSON", tmp_path / "results.json")
    monkeypatch.setattr(fairness_run, "RESULTS_MD", tmp_path / "RESULTS.md")
    fairness_run.record("digits", fake_result("trades", 0, worst=0.1, avg=0.6) | {"code": "abc1234"})
    assert "Difference from TRADES" not in (tmp_path / "RESULTS.md").read_text()  # nothing to compare yet
    fairness_run.record("digits", fake_result("wat", 0, worst=0.2, avg=0.6) | {"code": "abc1234"})
    fairness_run.record("digits", fake_result("trades", 0, worst=0.3, avg=0.6) | {"code": "def5678"})
    stored = json.loads((tmp_path / "results.json").read_text())
    runs = {(r["method"], r["seed"]): r for r in stored["protocols"]["digits"]}
    assert set(runs) == {("trades", 0), ("wat", 0)}
    assert runs["trades", 0]["evaluation"]["attacks"]["autoattack"]["worst"] == 0.3
    assert fairness_run.recorded_runs("digits").keys() == runs.keys()
    report = (tmp_path / "RESULTS.md").read_text()
    assert "Runs on record: 2 of the 27 planned" in report
    assert "Code: `abc1234`, `def5678`" in report
    assert "| WAT | -10.00 | +0.00 | 0 |" in report  # paired with the rerun TRADES (worst 0.3)
    assert (tmp_path / "digits_classwise.png").stat().st_size > 0


def test_a_run_fitted_by_another_tool_replaces_a_stale_record_and_says_so(tmp_path, monkeypatch, capsys):
    """standard_aa.py and bound.py train a missing run and then read its model: its record must be that run."""
    monkeypatch.setattr(fairness_run, "HERE", tmp_path)
    monkeypatch.setattr(fairness_run, "RESULTS_JSON", tmp_path / "results.json")
    monkeypatch.setattr(fairness_run, "RESULTS_MD", tmp_path / "RESULTS.md")
    fairness_run.record_fitted("digits", fake_result("trades", 0, worst=0.1, avg=0.6) | {"code": "abc1234"}, "bound")
    assert capsys.readouterr().out == ""  # nothing was on record: nothing to say
    fairness_run.record_fitted("digits", fake_result("trades", 0, worst=0.3, avg=0.6) | {"code": "def5678"}, "bound")
    said = capsys.readouterr().out
    assert "[bound] digits/trades_seed0: results.json held a run at code abc1234" in said
    assert "replacing it with this one (code def5678)" in said
    (recorded,) = fairness_run.recorded_runs("digits").values()
    assert (recorded["code"], recorded["evaluation"]["attacks"]["autoattack"]["worst"]) == ("def5678", 0.3)


def test_a_run_directory_holding_another_run_than_the_record_is_refused(tmp_path, monkeypatch):
    """bound.py and standard_aa.py read a run's directory beside its record: a model trained again (other code, or
    a record merged from another checkout) must not pass for the recorded one."""
    monkeypatch.setattr(fairness_run, "HERE", tmp_path)
    monkeypatch.setattr(fairness_run, "RESULTS_JSON", tmp_path / "results.json")
    monkeypatch.setattr(fairness_run, "RESULTS_MD", tmp_path / "RESULTS.md")
    recorded = fake_result("trades", 0, worst=0.1, avg=0.6) | {"code": "abc1234"}
    fairness_run.record("digits", recorded)
    assert fairness_run.check_recorded("digits", fake_result("trades", 0, worst=0.1, avg=0.6))["code"] == "abc1234"
    assert fairness_run.check_recorded("digits", fake_result("trades", 1, worst=0.2, avg=0.6)) is None  # unrecorded
    other = fake_result("trades", 0, worst=0.1, avg=0.6)
    other["evaluation"]["attacks"]["autoattack"] = dict(other["evaluation"]["attacks"]["autoattack"])
    other["evaluation"]["attacks"]["autoattack"]["classwise_acc"] = [0.1, 1.2]
    with pytest.raises(
        ValueError,
        match=r"another run than results.json records \(code abc1234\); autoattack "
        r"accuracy, class 1: 1.2000 there, 1.1000 on record",
    ):
        fairness_run.check_recorded("digits", other)
    del other["evaluation"]["attacks"]["autoattack"]
    with pytest.raises(ValueError, match="autoattack accuracy, not evaluated there"):
        fairness_run.check_recorded("digits", other)


def test_code_version_names_the_commit():
    version = fairness_run.code_version()
    head = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        assert version == "unknown"
    else:
        assert version.removesuffix("+changes") == head.stdout.strip()


@pytest.mark.parametrize("protocol", list(fairness_run.PROTOCOLS))
def test_every_protocol_run_is_a_config_the_cli_accepts(protocol, tmp_path, capsys):
    """Each method of each protocol: its config, overlays and fairness replacement parse (print_config)."""
    from confspec_lightning.cli import build_cli

    spec = fairness_run.PROTOCOLS[protocol]
    for method in spec.methods:
        assert method in fairness_run.LABELS, method
        run_dir = tmp_path / protocol / method
        run_dir.mkdir(parents=True)
        args = fairness_run.common_args(protocol, method, 0, run_dir)
        with pytest.raises(SystemExit) as exit_info:
            build_cli(["fit", *args, "--print_config"])
        assert exit_info.value.code in (0, None), (method, capsys.readouterr().err[-2000:])
        printed = capsys.readouterr().out
        if method in spec.fairness:  # the variant's fairness list reached the parsed config
            (class_path,) = re.findall(r"class_path: (\S+)", spec.fairness[method])
            assert class_path in printed, (method, class_path)
            for key, value in fairness_run.CSR_FORMS.get(method, {}).items():
                assert f"{key}: {value}" in printed, (method, key)
        # the parsed fairness list builds (a merged option the variant's form refuses fails here, not mid-sweep)
        for entry in yaml.safe_load(printed)["model"]["init_args"]["fairness"] or []:
            module_name, _, class_name = entry["class_path"].rpartition(".")
            getattr(importlib.import_module(module_name), class_name)(**(entry.get("init_args") or {}))


def test_every_protocol_compares_with_one_of_its_own_methods():
    """The paired deltas need the reference among the protocol's methods (TRADES-AWP for the AWP protocol)."""
    for name, spec in fairness_run.PROTOCOLS.items():
        assert spec.reference in spec.methods, name
    assert fairness_run.PROTOCOLS["digits_awp"].reference == "trades_awp"
    results = [fake_result("trades_awp", 0, worst=0.10, avg=0.60), fake_result("trades_awp_csr", 0, 0.20, 0.55)]
    assert fairness_run.deltas(results, ["trades_awp", "trades_awp_csr"], "trades_awp").splitlines()[-1] == (
        "| TRADES-AWP + CSR | +10.00 | -5.00 | 0 |"
    )


def test_runs_evaluated_with_other_noise_are_not_paired():
    """A re-test under another random-start scheme moves classes by images: such seeds are left out, and said so."""
    runs = [fake_result("trades", 0, 0.10, 0.60), fake_result("wat", 0, 0.20, 0.60)]
    runs += [fake_result("trades", 1, 0.30, 0.70), fake_result("wat", 1, 0.50, 0.75)]
    for run in runs:
        run["evaluation_noise"] = "per-sample"
    runs[3]["evaluation_noise"] = "per-batch"
    row = fairness_run.deltas(runs, ["trades", "wat"]).splitlines()[-1]
    assert row == "| WAT | +10.00 | +0.00 | 0 (not paired, other evaluation noise: seed 1) |"
    runs[1]["evaluation_noise"] = "per-batch"  # no seed left to pair
    assert fairness_run.deltas(runs, ["trades", "wat"]).splitlines()[-1] == (
        "| WAT | | | (not paired, other evaluation noise: seed 0, 1) |"
    )
    assert fairness_run.evaluation_noise({}) == "unknown"
    stored = json.loads((ROOT / "benchmarks/fairness/results.json").read_text())["protocols"]
    assert all(r["evaluation_noise"] in ("per-batch", "per-sample") for runs in stored.values() for r in runs)
