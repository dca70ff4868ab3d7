"""One rank of a torchrun-style DDP job: several ``confspec fit`` commands one after another in one process group.

Started by :func:`helpers.launch_ranks` once per rank with the environment torchrun sets (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``): Lightning joins the process group instead of launching processes,
so the interpreter's start-up (torch, Lightning: seconds per rank) is paid once for every fit of the file
(``tests/test_ddp.py``: the 2-process side of its state-equality tests). Each command is a ``fit`` argument list
with its own ``--trainer.logger.init_args.save_dir``, where each rank also saves its fairness methods' buffers at the
end (``fairness_buffers_rank{RANK}.pt``: DDP does not broadcast them, so the ranks must agree by themselves);
``faulthandler`` ends a rank still running after ``--timeout`` seconds with every thread's stack.

    python tests/ddp_fits.py --out DIR --timeout 900 COMMANDS.json
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("commands", type=Path, help="a JSON list of argument lists, each a fit")
    args = parser.parse_args()
    faulthandler.dump_traceback_later(args.timeout, exit=True)
    import torch

    from confspec_lightning.cli import build_cli, close_process_group, quiet_lightning

    rank, start = int(os.environ["RANK"]), time.perf_counter()
    for command in json.loads(args.commands.read_text()):
        quiet_lightning(command[0])
        cli = build_cli(command)
        (save_dir,) = [a.split("=", 1)[1] for a in command if a.startswith("--trainer.logger.init_args.save_dir=")]
        buffers = {name: b.detach().cpu().clone() for name, b in cli.model.fairness.named_buffers(prefix="fairness")}
        torch.save(buffers, Path(save_dir) / f"fairness_buffers_rank{rank}.pt")
        print(f"[rank {rank}] {' '.join(command[:3])}: done at {time.perf_counter() - start:.1f} s", flush=True)
    close_process_group()
    faulthandler.cancel_dump_traceback_later()
    sys.exit(0)


if __name__ == "__main__":
    main()
