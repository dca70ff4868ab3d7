"""Every GPU check of the project in one command (about 8 minutes on an H100/H200), figures written to files.

On a lent GPU machine, after ``../shared/tools/gpu-carry`` filled ``.gpu/`` here (jsonargparse, pyautoattack
and the CIFAR-10 archive) and with ``.gpu`` in the run's carry list:

    export PYTHONPATH=$PWD/.gpu/site:$PWD; python3 benchmarks/gpu/run.py --out "$OUT"

Steps (each with its own time limit; a failed or timed-out step is recorded and the next one runs):

1. ``tests``: the CUDA-only tests (no host-device sync in the CSR step, fp16 attack on the GPU);
2. ``throughput``: ``benchmarks/throughput/run.py`` on PreActResNet-18 and WRN-34-10: fp32 vs bf16 +
   channels_last + torch.compile, images/s and the fraction of peak bf16 FLOP/s;
3. ``finetune``: through ``confspec``: a short TRADES pretraining of PreActResNet-18 on CIFAR-10 (the JPEG
   archive), then TRADES vs TRADES + CSR fine-tuning from it, each tested with PGD-20 and AutoAttack.

Writes ``summary.json`` and ``SUMMARY.md`` (+ each step's log and JSON) into ``--out``. ``--smoke`` runs the
same steps on the CPU with tiny settings (the test suite does, so this script cannot rot).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


#: The fine-tuning runs compared from the pretrained model: TRADES continued (the control) and TRADES + CSR.
FINETUNE_METHODS = ("finetune_trades", "finetune_trades_csr")
#: also accepted by --finetune-methods: the paper's second base (TRADES-AWP, fine-tuned at lr 0.01) with and without CSR
MORE_FINETUNE_METHODS = ("finetune_trades_awp", "finetune_trades_awp_csr")


class Deadline:
    """The whole run's time budget: a step gets its own limit or what is left, whichever is less."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def limit(self, step_limit: float) -> float:
        return max(1.0, min(step_limit, self.end - time.monotonic()))


def run_step(name: str, command: list[str], out: Path, limit: float, env: dict[str, str]) -> dict:
    """Run one step with a time limit; its output goes to ``out/<name>.log``."""
    start = time.perf_counter()
    log = out / f"{name}.log"
    with log.open("w") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        handle.flush()
        try:
            code = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=limit)
            status = "ok" if code.returncode == 0 else f"failed (exit {code.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit:.0f} s"
    seconds = time.perf_counter() - start
    print(f"[gpu] {name}: {status} in {seconds:.0f} s (log {log})", flush=True)
    return {"status": status, "seconds": round(seconds, 1), "command": " ".join(command)}


def confspec(*args: str) -> list[str]:
    return [sys.executable, "-m", "confspec_lightning", *args]


def finetune_commands(args: argparse.Namespace, out: Path) -> list[tuple[str, list[str]]]:
    """TRADES pretraining of PreActResNet-18, then TRADES vs CSR fine-tuning, each fit + test."""
    runs = out / "runs"
    attacks = "[apgd-ce]" if args.smoke else "[apgd-ce, apgd-t]"
    overlay = out / "test_attacks.yaml"  # PGD-20, CW-20, AutoAttack APGD-CE + APGD-T (smoke: APGD-CE)
    overlay.write_text(
        "model:\n  init_args:\n    test_attacks:\n"
        "      - class_path: confspec_lightning.attacks.PGD\n      - class_path: confspec_lightning.attacks.CW\n"
        "      - class_path: confspec_lightning.attacks.AutoAttack\n"
        f"        init_args: {{version: custom, attacks: {attacks}}}\n"
    )
    common = [
        "--config",
        str(overlay),
        f"--data.init_args.root={args.data}",
        f"--data.init_args.val_per_class={args.val_per_class}",
        f"--data.init_args.test_per_class={args.test_per_class}",
        "--data.init_args.train_eval_per_class=0",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={runs}",
    ]
    if args.smoke:  # the same commands with a tiny backbone and budget: seconds on a CPU
        common += [
            "--model.init_args.backbone.class_path=confspec_lightning.models.DigitsCNN",
            "--model.init_args.backbone.init_args={num_classes: 10, in_channels: 3, width: 4}",
            "--trainer.accelerator=cpu",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=1",
            "--data.init_args.batch_size=8",
            "--data.init_args.eval_batch_size=8",
            "--model.init_args.train_attack.steps=1",
            "--model.init_args.eval_attack.steps=1",
        ]
    else:
        common += [
            "--trainer.precision=bf16-mixed",
            "--model.init_args.channels_last=true",
            "--data.init_args.on_device=true",
            "--data.init_args.eval_batch_size=1000",
        ]
    pretrain = [
        "--config",
        "cifar10/scratch_trades",
        *common,
        f"--trainer.max_epochs={args.pretrain_epochs}",
        "--model.init_args.scheduler=null",
        "--trainer.logger.init_args.name=pretrain_trades",
        "--trainer.logger.init_args.version=0",
    ]
    weights = runs / "pretrain_trades/version_0/checkpoints/last.ckpt"
    commands = [
        ("pretrain_fit", confspec("fit", *pretrain)),
        ("pretrain_test", confspec("test", *pretrain, f"--ckpt_path={weights}")),
    ]
    for method in args.finetune_methods:
        finetune = [
            "--config",
            f"cifar10/{method}",  # a recipe name (configs/recipes.yaml)
            "--model.init_args.backbone.class_path=confspec_lightning.models.PreActResNet18",
            "--model.init_args.backbone.init_args={num_classes: 10}",
            *common,
            f"--model.init_args.init_weights={weights}",
            f"--trainer.max_epochs={args.finetune_epochs}",
            f"--trainer.logger.init_args.name={method}",
            "--trainer.logger.init_args.version=0",
        ]
        last = runs / f"{method}/version_0/checkpoints/last.ckpt"
        commands += [
            (f"{method}_fit", confspec("fit", *finetune)),
            (f"{method}_test", confspec("test", *finetune, f"--ckpt_path={last}")),
        ]
    return commands


def collect_finetune(out: Path) -> dict:
    """Clean / PGD-20 / AutoAttack avg and worst class of every tested run."""
    results = {}
    for evaluation in sorted((out / "runs").glob("*/version_0/evaluation/*/evaluation.json")):
        data = json.loads(evaluation.read_text())
        results[evaluation.parents[3].name] = {
            attack: {"avg": values["avg"], "worst": values["worst"]} for attack, values in data["attacks"].items()
        }
    return results


def write_summary(summary: dict, out: Path) -> None:
    lines = [
        "# GPU checks",
        "",
        f"`{summary['command']}` on {summary['machine']}.",
        "",
        "| step | status | seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {step['status']} | {step['seconds']} |" for name, step in summary["steps"].items()]
    if summary.get("finetune"):
        lines += ["", "| run | attack | avg % | worst % |", "|---|---|---|---|"]
        for run, attacks in summary["finetune"].items():
            for attack, values in attacks.items():
                lines.append(f"| {run} | {attack} | {100 * values['avg']:.2f} | {100 * values['worst']:.2f} |")
    (out / "SUMMARY.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", HERE / "out")))
    parser.add_argument("--data", default=str(ROOT / ".gpu" / "data"), help="folder of cifar10_q75_jpeg.npz")
    parser.add_argument("--steps", nargs="+", default=["tests", "throughput", "finetune"])
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all steps together")
    parser.add_argument("--pretrain-epochs", type=int, default=5)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument(
        "--finetune-methods",
        nargs="+",
        default=list(FINETUNE_METHODS),
        choices=FINETUNE_METHODS + MORE_FINETUNE_METHODS,
        help="the fine-tuning recipes (cifar10/<name>) compared from the pretrained model",
    )
    parser.add_argument("--val-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--smoke", action="store_true", help="tiny settings on the CPU (a dry run)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
    summary: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "steps": {}}
    try:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
        summary["machine"] = f"{device}, {platform.machine()}, torch {torch.__version__}"
    except ImportError:  # pragma: no cover
        summary["machine"] = platform.machine()
    deadline = Deadline(args.budget)
    limits = {"tests": 60.0, "throughput": 200.0, "finetune": 120.0}
    if "tests" in args.steps:
        tests = ["tests/test_performance.py", "tests/test_precision.py"]
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, "-k", "cuda", "-rs"]
        summary["steps"]["tests"] = run_step("tests", command, args.out, deadline.limit(limits["tests"]), env)
    if "throughput" in args.steps:
        throughput = args.out / "throughput.json"
        if args.smoke:
            setup = ["--device", "cpu", "--setups", "smallcnn", "--steps", "1", "--repeats", "1", "--no-compile"]
            setup += ["--attack-steps", "1"]
            setup += ["--batch-size", "8", "--warmup", "0"]
            setup += ["--precisions", "32-true"]
            setup += ["--sections", "steps", "--no-memory"]
        else:
            setup = ["--device", "cuda", "--setups", "preact18", "wrn34", "--steps", "5", "--repeats", "2"]
            setup += ["--sections", "steps"]
        command = [sys.executable, str(ROOT / "benchmarks/throughput/run.py"), *setup, "--out", str(throughput)]
        summary["steps"]["throughput"] = run_step(
            "throughput", command, args.out, deadline.limit(limits["throughput"]), env
        )
    if "finetune" in args.steps:
        for name, command in finetune_commands(args, args.out):
            summary["steps"][name] = run_step(name, command, args.out, deadline.limit(limits["finetune"]), env)
        summary["finetune"] = collect_finetune(args.out)
    write_summary(summary, args.out)
    print(f"[gpu] wrote {args.out / 'SUMMARY.md'}", flush=True)


if __name__ == "__main__":
    main()
