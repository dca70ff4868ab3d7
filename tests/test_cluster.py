"""The cluster launch examples in configs/cluster: static checks, the SLURM script's command, a real torchrun run."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from confspec_lightning.recipes import recipe_names

from helpers import ROOT

CLUSTER = ROOT / "configs" / "cluster"
SBATCH = CLUSTER / "slurm_ddp.sbatch"
TORCHRUN_SH = CLUSTER / "torchrun.sh"
SCRIPTS = [SBATCH, TORCHRUN_SH]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_names_existing_configs(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    assert "--config" in text
    configs = set(re.findall(r"CONFIG=\$\{CONFIG:-([\w./-]+)\}", text))  # the default: a recipe name
    assert configs, f"{script.name} names no config"
    missing = sorted(c for c in configs if c not in recipe_names())
    assert not missing, f"{script.name} names recipes that do not exist: {missing}"
    assert text.startswith("#!"), "a shebang line"
    assert "set -euo pipefail" in text


def test_torchrun_script_is_executable():
    assert TORCHRUN_SH.stat().st_mode & stat.S_IXUSR


def test_sbatch_directives_match_what_lightning_requires():
    directives = dict(
        (m.group(1), m.group(2) or "")
        for m in re.finditer(r"^#SBATCH --([\w-]+)(?:=(\S+))?", SBATCH.read_text(), flags=re.MULTILINE)
    )
    for key in ("nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "time", "signal", "requeue"):
        assert key in directives, key
    # one process per GPU; Lightning's SLURMEnvironment rejects --ntasks without --ntasks-per-node
    assert directives["ntasks-per-node"] == directives["gpus-per-node"]
    assert "ntasks" not in directives
    # SIGUSR1 is SLURMEnvironment's default requeue signal; sent to the srun tasks (no "B:" prefix)
    assert directives["signal"] == "SIGUSR1@90"


def run_sbatch(tmp_path: Path, nodes: int, tasks_per_node: int, *args: str, **env: str):
    """Run the batch script with a fake ``srun`` that records its arguments (no SLURM, nothing launched)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / "srun_args.txt"
    fake = bin_dir / "srun"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do echo "$a"; done > {record}\n')
    fake.chmod(0o755)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env.update(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_NNODES=str(nodes),
        SLURM_NTASKS_PER_NODE=str(tasks_per_node),
        SLURM_JOB_ID="4242",
        **env,
    )
    for key in ("CONFIG", "RUN_NAME", "SAVE_DIR", "GLOBAL_BATCH", "LR", "CONFSPEC"):
        if key not in env:
            full_env.pop(key, None)
    proc = subprocess.run(
        ["bash", str(SBATCH), *args], cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=60
    )
    srun_args = record.read_text().splitlines() if record.exists() else None
    record.unlink(missing_ok=True)
    return proc, srun_args


def option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_sbatch_builds_the_ddp_command_and_resumes(tmp_path):
    proc, args = run_sbatch(tmp_path, 2, 4, "--trainer.max_epochs", "3")
    assert proc.returncode == 0, proc.stderr
    assert args[1:3] == [".venv/bin/confspec", "fit"]
    assert option(args, "--config") == "cifar10/scratch_trades_csr"
    assert option(args, "--trainer.devices") == "4" and option(args, "--trainer.num_nodes") == "2"
    assert option(args, "--trainer.strategy") == "ddp" and option(args, "--trainer.accelerator") == "gpu"
    assert option(args, "--data.init_args.batch_size") == "16"  # global 128 / (2 x 4)
    assert args[-2:] == ["--trainer.max_epochs", "3"]  # extra arguments come last
    assert "--ckpt_path" not in args  # nothing to resume from
    assert "--model.init_args.optimizer.init_args.lr" not in args

    run_dir = tmp_path / "runs" / "cifar10_scratch_trades_csr_ddp"
    (run_dir / "version_0" / "checkpoints").mkdir(parents=True)
    (run_dir / "version_0" / "checkpoints" / "last.ckpt").touch()
    _, args = run_sbatch(tmp_path, 2, 4, GLOBAL_BATCH="512", LR="0.4")
    assert option(args, "--ckpt_path") == "last"  # resolved by the confspec CLI to the newest last.ckpt
    assert option(args, "--data.init_args.batch_size") == "64"
    assert option(args, "--model.init_args.optimizer.init_args.lr") == "0.4"

    (run_dir / "hpc_ckpt_1.ckpt").touch()  # written by Lightning on SIGUSR1: Lightning resumes from it itself
    _, args = run_sbatch(tmp_path, 2, 4)
    assert "--ckpt_path" not in args
    assert option(args, "--trainer.default_root_dir") == "runs/cifar10_scratch_trades_csr_ddp"


def test_sbatch_rejects_a_global_batch_that_does_not_split(tmp_path):
    proc, args = run_sbatch(tmp_path, 3, 1)
    assert proc.returncode == 2 and args is None
    assert "GLOBAL_BATCH=128 is not divisible by 3 processes" in proc.stderr


PROBE = '''
import json, os
import lightning.pytorch as pl
import torch.distributed as dist


class EnvProbe(pl.Callback):
    """Records how Lightning set up the process group."""

    def on_fit_start(self, trainer, pl_module):
        env = trainer.strategy.cluster_environment
        info = {
            "environment": type(env).__name__,
            "world_size": trainer.world_size,
            "global_rank": trainer.global_rank,
            "backend": dist.get_backend(),
            "torchelastic_run_id": os.environ.get("TORCHELASTIC_RUN_ID"),
        }
        path = os.path.join(os.environ["PROBE_DIR"], f"rank{trainer.global_rank}.json")
        with open(path, "w") as f:
            json.dump(info, f)
'''


@pytest.mark.slow
@pytest.mark.ddp
def test_torchrun_script_trains_two_cpu_processes(tmp_path):
    """configs/cluster/torchrun.sh on one node with 2 CPU processes (gloo), end to end through the CLI.

    ``--standalone`` rendezvous: torchrun picks a free port on localhost and sets MASTER_ADDR/MASTER_PORT
    for the workers, so nothing needs to be set here and parallel runs do not collide.
    """
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip(f"no torchrun next to {sys.executable}")
    (tmp_path / "probe.py").write_text(PROBE)
    save_dir = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k not in ("NNODES", "RDZV_ENDPOINT", "RDZV_ID", "SUBCOMMAND")}
    env.update(
        TORCHRUN=str(torchrun),
        ACCELERATOR="cpu",
        NPROC_PER_NODE="2",
        CONFIG="digits/trades_csr",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]),
        PROBE_DIR=str(tmp_path),
    )
    args = [
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--model.init_args.eval_attack.steps=5",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        "--trainer.callbacks+=probe.EnvProbe",
    ]
    proc = subprocess.run(
        ["bash", str(TORCHRUN_SH), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "--nnodes 1 --nproc_per_node 2 --standalone -m confspec_lightning fit" in proc.stderr
    # both workers ran under torchrun's environment with gloo, as ranks 0 and 1 of 2
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, info in enumerate(infos):
        assert info["environment"] == "TorchElasticEnvironment", info
        assert (info["world_size"], info["global_rank"], info["backend"]) == (2, rank, "gloo"), info
        assert info["torchelastic_run_id"]
    run_dir = save_dir / "digits_trades_csr" / "version_0"
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 0 and state["global_step"] == 2
    # the validation report covers the whole split: both ranks' shares were summed
    report = json.loads((run_dir / "classwise_val.json").read_text())
    assert sum(report["class_counts"]) == 270
