"""What a user meets after a fit: test-time options win over the checkpoint's, reports land in the checkpoint's run,
parse errors name the file, line and reason, and every report says what it ran with."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

from helpers import CLI_QUICK, assert_one_paragraph, run_confspec_in_process, run_confspec_sequence

#: the digits TRADES recipe tests with PGD, CW and standard AutoAttack; a test command overrides them
PGD3 = "--model.init_args.test_attacks=[{class_path: confspec_lightning.attacks.PGD, init_args: {steps: 3}}]"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One quick digits fit (2 epochs): its run directory and working directory."""
    cwd = tmp_path_factory.mktemp("fitted")
    proc = run_confspec_in_process("fit", "--config", "digits/trades", *CLI_QUICK, "--trainer.max_epochs=2", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, cwd / "runs/digits_trades/version_0"


@pytest.mark.slow
def test_command_line_options_win_over_the_checkpoint_for_test_validate_and_predict(fitted):
    """A real process (test, validate and predict one after another in it: one start-up): the checkpoint saved the
    recipe's test attacks (PGD, CW, AutoAttack), eval batch and eval_attack; what the command gives runs, and the
    report's config.yaml and --print_config say so."""
    cwd, run = fitted
    common = ["--config", "digits/trades", *CLI_QUICK, "--ckpt_path=best", "--trainer.logger.init_args.version=0"]
    overrides = [PGD3, "--data.init_args.eval_batch_size=50", "--model.init_args.eval_attack.steps=3"]
    test, validate, predict = run_confspec_sequence(
        *([command, *common, *overrides] for command in ("test", "validate", "predict")), cwd=cwd
    )
    assert test.returncode == 0, test.stderr[-3000:]
    assert "autoattack" not in test.stderr.lower()
    folder = next((run / "evaluation").glob("best-epoch*/evaluation.json")).parent  # the test's (validate's: below)
    report = json.loads((folder / "evaluation.json").read_text())
    assert list(report["attacks"]) == ["clean", "pgd3"]  # the command's attack, not the checkpoint's three
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    assert [a["class_path"] for a in saved["model"]["init_args"]["test_attacks"]] == ["confspec_lightning.attacks.PGD"]
    assert saved["data"]["init_args"]["eval_batch_size"] == 50
    assert saved["model"]["init_args"]["eval_attack"]["steps"] == 3
    printed = run_confspec_in_process("test", *common, *overrides, "--print_config", cwd=cwd)
    assert printed.returncode == 0, printed.stderr[-2000:]
    shown = yaml.safe_load(printed.stdout)
    assert shown["model"]["init_args"]["test_attacks"] == saved["model"]["init_args"]["test_attacks"]
    assert validate.returncode == 0, validate.stderr[-3000:]
    assert "robust = PGD-3" in validate.stdout
    val = json.loads(next((run / "evaluation").glob("best-epoch*/classwise_val.json")).read_text())
    assert val["robust_attack"] == "pgd3"
    assert json.loads((run / "classwise_val.json").read_text())["robust_attack"] == "pgd1"  # the fit's, untouched
    assert predict.returncode == 0, predict.stderr[-3000:]
    (csv,) = (run / "predictions").glob("best-epoch*.csv")
    assert f"written to {csv.relative_to(cwd)}" in predict.stdout
    assert len(csv.read_text().splitlines()) == 361


def test_reports_never_overwrite_an_earlier_one(fitted):
    cwd, run = fitted
    common = ["--config", "digits/trades", *CLI_QUICK, "--ckpt_path=last", "--trainer.logger.init_args.version=0"]
    for _ in range(2):
        proc = run_confspec_in_process("test", *common, PGD3, cwd=cwd)
        assert proc.returncode == 0, proc.stderr[-3000:]
    folders = sorted(p.name for p in (run / "evaluation").glob("last*"))
    assert folders == ["last", "last-2"]
    assert "evaluation report written to runs/digits_trades/version_0/evaluation/last-2/evaluation.md" in proc.stdout
    assert sorted(p.name for p in (run.parent).iterdir()) == ["version_0"]  # no new run folder


def test_a_checkpoint_of_another_model_is_refused_by_name(fitted):
    cwd, run = fitted
    proc = run_confspec_in_process(
        "test", "--config", "digits/trades", *CLI_QUICK, f"--ckpt_path={run / 'checkpoints/last.ckpt'}",
        "--model.init_args.backbone.init_args.width=16", cwd=cwd,
    )  # fmt: skip
    last = assert_one_paragraph(proc, "holds another model than the config builds", "backbone", "width")
    assert "config.yaml" in last


def test_a_command_that_fails_before_it_starts_leaves_no_run_folder(tmp_path):
    """A backbone with the wrong output size: the error, and no empty version_0 (config and events file only)."""
    proc = run_confspec_in_process(
        "fit", "--config", "digits/trades", *CLI_QUICK, "--model.init_args.backbone.init_args.num_classes=7",
        cwd=tmp_path,
    )  # fmt: skip
    assert_one_paragraph(proc, "num_classes=10")
    assert not list((tmp_path / "runs").glob("*/version_*")), list((tmp_path / "runs").rglob("*"))


def test_a_yaml_error_names_the_file_the_line_and_the_reason(tmp_path):
    (tmp_path / "tabs.yaml").write_text("trainer:\n\tmax_epochs: 2\n")
    proc = run_confspec_in_process("fit", "--config", "digits/trades", "--config", "tabs.yaml", cwd=tmp_path)
    last = assert_one_paragraph(proc, "tabs.yaml, line 2, column 1", "'\\t'", "never tabs")
    assert "<unicode string>" not in last
    debug = run_confspec_in_process(
        "fit", "--config", "digits/trades", "--config", "tabs.yaml", "--debug", cwd=tmp_path
    )
    assert debug.returncode == 2 and "Problems parsing config" in debug.stderr  # the parser's own message


def test_missing_checkpoint_messages_say_what_is_missing(tmp_path):
    run = tmp_path / "runs/digits_trades/version_0"
    (run / "checkpoints").mkdir(parents=True)
    proc = run_confspec_in_process("test", "--config", "digits/trades", f"--ckpt_path={run}", cwd=tmp_path)
    assert_one_paragraph(proc, "has no best checkpoint to take", "no best-*.ckpt")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    proc = run_confspec_in_process(
        "fit", "--config", "digits/trades", *CLI_QUICK, "--model.init_args.init_weights=notes.txt", cwd=tmp_path
    )
    assert_one_paragraph(proc, "init_weights='notes.txt' is not a readable torch file")


def test_config_and_reports_record_versions_commit_and_device(fitted):
    _, run = fitted
    header = [line for line in (run / "config.yaml").read_text().splitlines() if line.startswith("#")]
    assert f"# torch: {torch.__version__}" in header
    assert any(re.match(r"# device: CPU .*\(\d+ cores\)", line) for line in header)
    assert any(line.startswith("# commit: ") for line in header)
    report = json.loads((run / "classwise_val.json").read_text())
    assert report["environment"]["torch"] == torch.__version__ and report["environment"]["device"].startswith("CPU")
