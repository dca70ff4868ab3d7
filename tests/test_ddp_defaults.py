"""DDP as users run it: the Trainer's defaults (progress bar, logger, checkpointing), 2 and 3 gloo processes.

Collectives hide in hooks (metric syncs, checkpoint dumps, the logged values' reduction). Each must run on every
rank in the same order whatever callbacks are on: the progress bar once reduced the epoch's logged values on
rank 0 alone while the other ranks were in a metric's sync, and the multi-GPU guide's DDP command hung. Every shipped
digits recipe runs fit (2 epochs) + validate + test once: on 3 processes those whose hooks run collectives of their
own (``COLLECTIVES``: 3 ranks are the harder case for them), on 2 processes the others; a rank still running after
its timeout prints every thread's stack and fails (``tests/ddp_worker.py``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from confspec_lightning.recipes import recipe_names

from helpers import ROOT, launch_ranks, run_confspec

pytestmark = [pytest.mark.slow, pytest.mark.ddp]

DIGITS = [name for name in recipe_names() if name.startswith("digits/")]
#: with 3 ranks, recipes whose hooks run collectives of their own (per-step all-reduces, weight averages with a
#: validation pass, AWP's ascent all-reduce and CSR's epoch pass)
COLLECTIVES = [f"digits/{m}" for m in ("trades_csr_paper", "cfa", "trades_awp_csr")]


def launch(world_size: int, out, configs: list[str], timeout: float) -> list[str]:
    """Run ``tests/ddp_worker.py`` as ``world_size`` ranks (torchrun's environment); the ranks' logs."""
    worker = ROOT / "tests" / "ddp_worker.py"
    return launch_ranks(worker, world_size, out, ["--out", str(out), "--timeout", str(timeout), *configs], timeout)


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_digits_recipe_fits_validates_and_tests_with_default_settings(tmp_path, world_size):
    assert set(COLLECTIVES) < set(DIGITS)  # between the two launches, every digits recipe runs once
    recipes = [name for name in DIGITS if name not in COLLECTIVES] if world_size == 2 else COLLECTIVES
    texts = launch(world_size, tmp_path, recipes, timeout=420)
    assert "Epoch 1" in texts[0]  # the progress bar was on (rank 0 draws it)
    results = [json.loads((tmp_path / f"results_rank{r}.json").read_text()) for r in range(world_size)]
    assert set(results[0]) == {name.split("/")[1] for name in recipes}
    for other in results[1:]:
        assert other == results[0]  # every rank holds the same global report
    for name, report in results[0].items():  # one batch of 64 per rank: every image of those batches once
        assert sum(report["val_counts"]) == sum(report["test_counts"]) == 64 * world_size, name
        # the Trainer's own test (no confspec command around it) writes the report into the logger's run, as before
        assert (tmp_path / "runs" / name / "version_0" / "evaluation" / "evaluation.json").is_file()


def test_readme_ddp_command_finishes_with_lightnings_own_launcher(tmp_path):
    """The multi-GPU guide's command (Lightning starts rank 1), progress bar and logger on: it finishes, with its
    checkpoints and the per-class report of one process (every validation image once). `confspec test` on several
    processes through this launcher: tests/test_ddp.py."""
    common = ["--config", "digits/trades_csr", "--trainer.limit_train_batches=2"]
    common += ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    common += ["--model.init_args.train_attack.steps=1", "--model.init_args.eval_attack.steps=1"]
    common += [f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", "--preemption.stuck_timeout=20"]
    fit = run_confspec("fit", *common, "--trainer.max_epochs=2", cwd=tmp_path, timeout=400)
    assert fit.returncode == 0, fit.stdout[-3000:] + fit.stderr[-6000:]
    assert "Epoch 1" in fit.stdout + fit.stderr  # the progress bar was on
    run = next((tmp_path / "runs").glob("*/version_0"))
    assert (run / "checkpoints/last.ckpt").is_file() and list(run.glob("checkpoints/best-*.ckpt"))
    assert sum(json.loads((run / "classwise_val.json").read_text())["class_counts"]) == 270


HANG = '''
import torch.distributed as dist
from lightning.pytorch import Callback


class CollectiveOnRankOne(Callback):
    """A broken callback: rank 1 alone joins a collective at the end of the first training epoch."""

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.global_rank == 1:
            open("stuck", "w").close()  # noqa: SIM115 - tells the test the ranks now wait in different collectives
            dist.barrier()
'''


def test_sigterm_ends_a_run_stuck_in_a_collective_with_the_stacks(tmp_path):
    """A collective that only one rank joins hangs the job; SIGTERM (as a scheduler or `kill` sends it) ends it
    within the watchdog's timeout, with a message and the threads' stacks, instead of needing SIGKILL."""
    (tmp_path / "hang.py").write_text(HANG)
    args = ["fit", "--config", "digits/trades_csr", "--trainer.accelerator=cpu", "--trainer.devices=2"]
    args += ["--trainer.strategy=ddp", "--trainer.max_epochs=2", "--trainer.limit_train_batches=2"]
    args += ["--model.init_args.train_attack.steps=1", "--model.init_args.eval_attack.steps=1"]
    args += ["--trainer.callbacks+=hang.CollectiveOnRankOne", "--preemption.stuck_timeout=5"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "log.txt", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "confspec_lightning", *args], cwd=tmp_path, env=env, stdout=log, stderr=log
        )
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "stuck").exists():
            assert process.poll() is None, (tmp_path / "log.txt").read_text()[-4000:]
            assert time.monotonic() < deadline, "the run never reached the broken collective"
            time.sleep(0.2)
        time.sleep(3)  # both ranks are now waiting in different collectives
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
        elapsed = time.monotonic() - start
    finally:
        if process.poll() is None:
            process.kill()
    text = (tmp_path / "log.txt").read_text()
    assert code == 128 + signal.SIGTERM, text[-4000:]
    assert elapsed < 60, elapsed
    assert "SIGTERM received, but the main thread has been stuck in one call for 5 s" in text
    assert "Stacks of this process's threads" in text and "most recent call first" in text
