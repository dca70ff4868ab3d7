"""One rank of a torchrun-style DDP job: every given digits recipe in turn, fit + validate + test, Trainer defaults.

Started by ``tests/test_ddp_defaults.py`` once per rank with the environment torchrun sets (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``): Lightning then joins the process group instead of launching
processes, so one process group runs many Trainers one after another (the CLI's commands, through
``build_cli``). The progress bar, the TensorBoard logger and checkpointing stay on (the Trainer's defaults and
the recipes'). ``faulthandler`` ends a rank that is still running after ``--timeout`` seconds and prints every
thread's stack: a hang becomes a failure that shows where each rank waits.

    python tests/ddp_worker.py --out DIR --timeout 300 digits/trades digits/cfa ...
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import time
from pathlib import Path

#: Small enough for a test, large enough that every hook runs: 2 epochs of 1 batch, validation every epoch (one batch
#: per rank: with 3 ranks the split's 5 batches of 64 leave none idle), the sanity check's default 2 batches.
QUICK = [
    "--trainer.accelerator=cpu",
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=1",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--model.init_args.train_attack.steps=1",
    "--model.init_args.eval_attack.steps=2",
    "--data.init_args.eval_batch_size=64",
]
PGD_ONLY = "--model.init_args.test_attacks=[{class_path: confspec_lightning.attacks.PGD}]"
NO_FIGURES = (
    "--model.init_args.evaluator={class_path: confspec_lightning.evaluation.Evaluator, init_args: {figures: false}}"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("configs", nargs="+")
    args = parser.parse_args()
    faulthandler.dump_traceback_later(args.timeout, exit=True)
    from confspec_lightning.cli import build_cli, close_process_group, quiet_lightning

    world_size, rank = os.environ["WORLD_SIZE"], int(os.environ["RANK"])
    layout = [f"--trainer.devices={world_size}", "--trainer.strategy=ddp"]
    results = {}
    start = time.perf_counter()
    for config in args.configs:
        name = Path(config).stem
        save = [f"--trainer.logger.init_args.save_dir={args.out / 'runs'}", f"--trainer.logger.init_args.name={name}"]
        quiet_lightning("fit")
        cli = build_cli(["fit", "--config", config, *QUICK, *layout, *save, PGD_ONLY, NO_FIGURES])
        # validate and test the best checkpoint with the same Trainer (one parse per recipe: the CLI's start-up
        # is most of a run this small; the CLI's own validate/test paths have their tests)
        evaluator = cli.model.evaluator
        cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path="best")
        val = evaluator.reports["val"]
        cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best")
        test = evaluator.reports["test"]
        results[name] = {
            "val": val.robust.classwise_acc,
            "val_counts": val.class_counts,
            "test": test.attacks["pgd2"].classwise_acc,
            "test_counts": test.class_counts,
        }
        print(f"[rank {rank}] {name}: fit + validate + test done at {time.perf_counter() - start:.1f} s", flush=True)
    (args.out / f"results_rank{rank}.json").write_text(json.dumps(results))
    close_process_group()
    faulthandler.cancel_dump_traceback_later()
    sys.exit(0)


if __name__ == "__main__":
    main()
