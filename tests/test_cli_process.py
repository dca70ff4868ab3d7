"""The command line as real processes: predictions, recipes by name, --version without torch, quiet output,
the wheel's contents.

A fit and the command that reads its checkpoint run one after another in one process
(:func:`helpers.run_confspec_sequence`: the real stdout and stderr of each, one interpreter start-up).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import zipfile

import pytest

from helpers import CLI_QUICK, ROOT, assert_one_paragraph, run_confspec, run_confspec_sequence


# ---------------------------------------------------------------------------------- product gaps
@pytest.mark.slow
def test_predict_writes_a_csv_in_the_run_directory(tmp_path):
    predict = ["--config", "digits/trades", *CLI_QUICK, "--ckpt_path=last", "--trainer.logger.init_args.version=0"]
    fit, proc = run_confspec_sequence(
        ["fit", "--config", "digits/trades", *CLI_QUICK], ["predict", *predict], cwd=tmp_path
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    # the fit's per-class validation report, with the full table
    report = json.loads(next((tmp_path / "runs").glob("*/version_0/classwise_val.json")).read_text())
    robust = report["attacks"][report["robust_attack"]]
    assert len(robust["classwise_acc"]) == 10 and len(report["attacks"]["clean"]["classwise_acc"]) == 10
    assert len(robust["confusion"]) == 10 and report["history"][0]["epoch"] == 0
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = (tmp_path / "runs/digits_trades").glob("version_0/predictions/last.csv")  # in the checkpoint's run
    assert f"written to {path.relative_to(tmp_path)}" in proc.stdout
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["index", "label", "clean", "adversarial"]
    assert [int(r["index"]) for r in rows] == list(range(len(rows))) and len(rows) == 360  # the test split
    assert all(0 <= int(r["clean"]) < 10 and 0 <= int(r["adversarial"]) < 10 for r in rows)


@pytest.mark.slow
def test_recipes_by_name_and_version_without_torch(tmp_path):
    """A mistyped recipe name is one line naming the closest recipe (a recipe by name runs in
    ``test_progress_where_users_wait``)."""
    assert_one_paragraph(
        run_confspec("fit", "--config", "digits/trades_cs", cwd=tmp_path),
        "neither a file nor a shipped recipe",
        "'digits/trades_csr'",
    )
    script = (
        "from confspec_lightning.__main__ import main; import sys; main(['--version']); print('torch' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert proc.stdout.split() == ["confspec", "0.1.0", "False"]  # --version imports neither torch nor Lightning
    script = "import confspec_lightning, sys; print('torch' in sys.modules, confspec_lightning.CSR.__name__)"
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert proc.stdout.split() == ["False", "CSR"] or proc.stdout.split()[1] == "CSR"


@pytest.mark.slow
def test_the_wheel_ships_the_recipes_and_the_license(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("confspec_lightning-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("recipes.yaml", "digits/base.yaml", "cifar10/finetune.yaml", "methods/trades_csr.yaml"):
        assert f"confspec_lightning/configs/{shipped}" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert "deprecated" not in proc.stderr.lower()


@pytest.mark.slow
def test_progress_where_users_wait(tmp_path):
    """The CSR epoch pass gets its own bar, without library noise; `confspec test` reports AutoAttack per
    attack and test batch."""
    progress = [
        "--trainer.enable_progress_bar=true",
        "--trainer.limit_test_batches=1",
        "--data.init_args.eval_batch_size=16",
    ]
    args = ["--config", "digits/trades_csr", *CLI_QUICK, *progress]
    attacks = [
        "--config",
        str(ROOT / "tests/quick_attacks.yaml"),
        "--ckpt_path=last",
        "--trainer.logger.init_args.version=0",
    ]
    proc, test = run_confspec_sequence(["fit", *args], ["test", *args, *attacks], cwd=tmp_path)  # a recipe by name
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch 0: attack pass (train)" in proc.stderr
    for noise in ("litlogger", "litmodels", "LeafSpec", "`weights_only` was not set", "dirpath"):
        assert noise not in proc.stderr + proc.stdout, noise  # quiet: the progress bars and our lines only
    assert test.returncode == 0, test.stderr[-3000:]
    assert "autoattack, test batch 1: running apgd-ce" in test.stderr


def test_archive_decode_shows_progress_on_a_terminal(tmp_path, monkeypatch):
    import io

    from confspec_lightning.data import archive

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(archive, "PROGRESS_MIN_IMAGES", 4)
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (4, 4)).save(image)
    archive.decode_images(((image, "a") for _ in range(6)), 6, "decoding test")
    assert "decoding test" in terminal.getvalue()
    quiet = Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    archive.decode_images(((image, "a") for _ in range(3)), 3, "decoding test")  # below the threshold: no bar
    assert quiet.getvalue() == ""
