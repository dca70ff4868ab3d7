"""The command line as a new user meets it: one-paragraph errors, runs named by --ckpt_path, recipes, quiet output.

Every test here runs ``python -m confspec_lightning`` as a real process (exit status, stdout and stderr).
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch

from conftest import ROOT

PGD_ONLY = "--model.init_args.test_attacks=[{class_path: confspec_lightning.attacks.PGD}]"
QUICK = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--model.init_args.train_attack.steps=1",
    "--model.init_args.eval_attack.steps=1",
]


def confspec(*args: str, cwd, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    command = [sys.executable, "-m", "confspec_lightning", *args]
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)


def assert_one_paragraph(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, no traceback, the error one line and the last, naming every fragment."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 6, proc.stderr  # at most Lightning's start-up lines before it
    last = lines[-1]
    assert last.startswith("confspec"), last
    for fragment in fragments:
        assert fragment in last, (fragment, last)
    return last


# ----------------------------------------------------------------------------- errors and messages
@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--model.init_args.beta=-1"], ["model.beta=-1.0 is not accepted", ">= 0"]),
        (["--model.init_args.eval_attack.steps=0"], ["model.eval_attack.steps=0 is not accepted", ">= 1"]),
        (["--model.init_args.train_attack.eps=2"], ["model.train_attack.eps=2.0 is not accepted", "(0, 1]"]),
        (["--data.init_args.batch_size=0"], ["data.batch_size=0 is not accepted"]),
        (["--data.init_args.train_eval_per_class=10000"], ["data.train_eval_per_class=10000 is not accepted"]),
        (["--model.init_args.betta=1"], ["option 'betta' is not accepted", "did you mean 'beta'"]),
    ],
    ids=["beta", "eval-steps", "linf-eps", "batch-size", "train-per-class", "typo-option"],
)
def test_a_rejected_value_is_one_line_with_exit_code_2(args, fragments, tmp_path):
    proc = confspec("fit", "--config", "digits/trades", *QUICK, *args, cwd=tmp_path)
    assert_one_paragraph(proc, *fragments)


def test_csr_alpha_unknown_class_path_and_yaml_key(tmp_path):
    (tmp_path / "alpha.yaml").write_text(
        "model:\n  init_args:\n    fairness:\n      - class_path: confspec_lightning.fairness.CSR\n"
        "        init_args: {alpha: 2}\n"
    )
    assert_one_paragraph(
        confspec("fit", "--config", "digits/trades", "--config", "alpha.yaml", *QUICK, cwd=tmp_path),
        "csr.alpha=2",
        "in [0, 1]",
    )
    (tmp_path / "csrr.yaml").write_text(
        "model:\n  init_args:\n    fairness:\n      - class_path: confspec_lightning.fairness.CSRR\n"
    )
    assert_one_paragraph(
        confspec("fit", "--config", "digits/trades", "--config", "csrr.yaml", cwd=tmp_path),
        "'confspec_lightning.fairness.CSRR' is not accepted",
        "did you mean 'confspec_lightning.fairness.CSR'",
    )
    (tmp_path / "key.yaml").write_text("moddel:\n  init_args: {beta: 1}\n")
    assert_one_paragraph(
        confspec("fit", "--config", "digits/trades", "--config", "key.yaml", cwd=tmp_path), "moddel", "'model"
    )


def test_debug_shows_the_traceback(tmp_path):
    proc = confspec("fit", "--config", "digits/trades", "--model.init_args.beta=-1", "--debug", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "beta=-1.0 is not accepted" in proc.stderr
    proc = confspec(
        "fit", "--config", "digits/trades", "--model.init_args.beta=-1", cwd=tmp_path, env={"CONFSPEC_DEBUG": "1"}
    )
    assert "Traceback" in proc.stderr


def test_missing_data_root_and_corrupt_archive(tmp_path):
    config = "cifar10/finetune_trades"
    assert_one_paragraph(
        confspec("fit", "--config", config, "--data.init_args.root=nowhere/cifar.npz", cwd=tmp_path),
        "nowhere",
    )
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really an archive")
    assert_one_paragraph(
        confspec("fit", "--config", config, "--data.init_args.root=broken.npz", *QUICK, cwd=tmp_path), "broken.npz"
    )


@pytest.mark.parametrize("kind", ["random", "truncated", "pickled", "missing"])
def test_ckpt_path_that_cannot_be_read_is_named(kind, tmp_path):
    path = tmp_path / "bad.ckpt"
    if kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        torch.save({"state_dict": {"w": torch.ones(1000)}}, path)
        path.write_bytes(path.read_bytes()[:700])
    elif kind == "pickled":
        path.write_bytes(pickle.dumps({"state_dict": {}, "callback": os.getcwd}))  # a function: refused
    fragment = "no such file" if kind == "missing" else "bad.ckpt"
    proc = confspec("test", "--config", "digits/trades", f"--ckpt_path={path}", cwd=tmp_path)
    assert_one_paragraph(proc, "--ckpt_path", fragment)


# ------------------------------------------------------------------------- runs named by --ckpt_path
def test_best_and_last_resolve_within_the_named_run(tmp_path):
    for _ in range(2):  # two runs of the same name: version_0, version_1
        assert confspec("fit", "--config", "digits/trades", *QUICK, cwd=tmp_path).returncode == 0
    proc = confspec("test", "--config", "digits/trades", *QUICK, "--ckpt_path=best", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "--ckpt_path best is ambiguous: 2 runs" in proc.stderr  # refused, rather than taking the newest
    assert "version_0 (1 epochs" in proc.stderr and "version_1 (1 epochs" in proc.stderr
    assert "--trainer.logger.init_args.version" in proc.stderr
    proc = confspec(
        "test", "--config", "digits/trades", *QUICK, "--ckpt_path=best", "--trainer.logger.init_args.version=0",
        PGD_ONLY, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--ckpt_path best -> runs/digits_trades/version_0/checkpoints/best-epoch000.ckpt" in proc.stdout
    run_dir = tmp_path / "runs/digits_trades/version_0"
    proc = confspec(
        "test", "--config", "digits/trades", *QUICK, f"--ckpt_path={run_dir}", PGD_ONLY,
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0 and f"--ckpt_path {run_dir} -> " in proc.stdout
    assert "version_0/checkpoints/best-epoch000.ckpt" in proc.stdout


def test_fit_resume_continues_the_same_run(tmp_path):
    assert confspec("fit", "--config", "digits/trades", *QUICK, cwd=tmp_path).returncode == 0
    proc = confspec(
        "fit", "--config", "digits/trades", *QUICK, "--trainer.max_epochs=2", "--ckpt_path=last", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming the run runs/digits_trades/version_0 (logger version 0)" in proc.stdout
    assert "dirpath has changed" not in proc.stderr and "exists and is not empty" not in proc.stderr
    runs = sorted(p.name for p in (tmp_path / "runs/digits_trades").iterdir())
    assert runs == ["version_0"]
    state = torch.load(tmp_path / "runs/digits_trades/version_0/checkpoints/last.ckpt", weights_only=True)
    assert state["epoch"] == 1
    (best,) = [v for k, v in state["callbacks"].items() if k.startswith("ModelCheckpoint") and v["monitor"]]
    assert best["best_model_score"] is not None  # kept across the resume (same directory)


# ---------------------------------------------------------------------------------- product gaps
def test_predict_writes_a_csv_in_the_run_directory(tmp_path):
    assert confspec("fit", "--config", "digits/trades", *QUICK, cwd=tmp_path).returncode == 0
    proc = confspec(
        "predict", "--config", "digits/trades", *QUICK, "--ckpt_path=last", "--trainer.logger.init_args.version=0",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = (tmp_path / "runs/digits_trades").glob("*/predictions.csv")
    assert f"written to {path.relative_to(tmp_path)}" in proc.stdout
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["index", "label", "clean", "adversarial"]
    assert [int(r["index"]) for r in rows] == list(range(len(rows))) and len(rows) == 360  # the test split
    assert all(0 <= int(r["clean"]) < 10 and 0 <= int(r["adversarial"]) < 10 for r in rows)


def test_recipes_by_name_version_fast_and_quiet(tmp_path):
    proc = confspec("fit", "--config", "digits/trades_csr", *QUICK, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for noise in ("litlogger", "litmodels", "LeafSpec", "`weights_only` was not set", "dirpath"):
        assert noise not in proc.stderr + proc.stdout, noise
    assert_one_paragraph(
        confspec("fit", "--config", "digits/trades_cs", cwd=tmp_path),
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
    assert "confspec_lightning/configs/digits/trades_csr.yaml" in names
    assert "confspec_lightning/configs/cifar10/finetune_trades_csr_paper.yaml" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert "deprecated" not in proc.stderr.lower()


def test_classwise_json_is_written_with_the_full_table(tmp_path):
    assert confspec("fit", "--config", "digits/trades", *QUICK, cwd=tmp_path).returncode == 0
    report = json.loads(next((tmp_path / "runs").glob("*/version_0/classwise_val.json")).read_text())
    assert len(report["robust_acc"]) == 10 and report["history"][0]["epoch"] == 0
