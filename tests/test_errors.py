"""What a user meets on the command line for bad input: one line, exit status 2, the closest valid names.

Each check runs ``python -m confspec_lightning`` as a real process; its further variants run the same entry
point in-process (:func:`helpers.run_confspec_in_process`: exit status and output captured alike).
"""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from helpers import CLI_QUICK, assert_one_paragraph, run_confspec, run_confspec_in_process, run_confspec_sequence


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
    proc = run_confspec_in_process("fit", "--config", "digits/trades", *CLI_QUICK, *args, cwd=tmp_path)
    assert_one_paragraph(proc, *fragments)


@pytest.mark.slow
def test_csr_alpha_unknown_class_path_and_yaml_key(tmp_path):
    (tmp_path / "alpha.yaml").write_text(
        "model:\n  init_args:\n    fairness:\n      - class_path: confspec_lightning.fairness.CSR\n"
        "        init_args: {alpha: 2}\n"
    )
    assert_one_paragraph(
        run_confspec("fit", "--config", "digits/trades", "--config", "alpha.yaml", *CLI_QUICK, cwd=tmp_path),
        "csr.alpha=2",
        "in [0, 1]",
    )
    (tmp_path / "csrr.yaml").write_text(
        "model:\n  init_args:\n    fairness:\n      - class_path: confspec_lightning.fairness.CSRR\n"
    )
    assert_one_paragraph(
        run_confspec_in_process("fit", "--config", "digits/trades", "--config", "csrr.yaml", cwd=tmp_path),
        "'confspec_lightning.fairness.CSRR' is not accepted",
        "did you mean 'confspec_lightning.fairness.CSR'",
    )
    (tmp_path / "key.yaml").write_text("moddel:\n  init_args: {beta: 1}\n")
    assert_one_paragraph(
        run_confspec_in_process("fit", "--config", "digits/trades", "--config", "key.yaml", cwd=tmp_path),
        "moddel",
        "'model",
    )


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    # a real process: one line, exit status 2; with --debug (or CONFSPEC_DEBUG=1) the traceback (in-process)
    proc = run_confspec("fit", "--config", "digits/trades", "--model.init_args.beta=-1", cwd=tmp_path)
    assert_one_paragraph(proc, "model.beta=-1.0 is not accepted", ">= 0")
    args = ("fit", "--config", "digits/trades", "--model.init_args.beta=-1")
    proc = run_confspec_in_process(*args, "--debug", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "beta=-1.0 is not accepted" in proc.stderr
    monkeypatch.setenv("CONFSPEC_DEBUG", "1")
    proc = run_confspec_in_process(*args, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.slow
def test_missing_data_root_and_corrupt_archive(tmp_path):
    """Both commands in one real process, one after the other (:func:`helpers.run_confspec_sequence`)."""
    config = "cifar10/finetune_trades"
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really an archive")
    missing, broken = run_confspec_sequence(
        ["fit", "--config", config, "--data.init_args.root=nowhere/cifar.npz"],
        ["fit", "--config", config, "--data.init_args.root=broken.npz", *CLI_QUICK],
        cwd=tmp_path,
    )
    assert_one_paragraph(missing, "nowhere")
    assert_one_paragraph(broken, "broken.npz")


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
    run = run_confspec if kind == "pickled" else run_confspec_in_process  # one real process, the rest in-process
    proc = run("test", "--config", "digits/trades", f"--ckpt_path={path}", cwd=tmp_path)
    assert_one_paragraph(proc, "--ckpt_path", fragment)
