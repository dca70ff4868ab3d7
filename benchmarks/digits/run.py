"""Digits protocol: TRADES vs TRADES+CSR vs PGD-AT(+CSR), several seeds, per-class PGD-20 on the test split.

Every run is a shipped digits recipe (``digits/<method>``: ``digits/base.yaml`` + the method's overlay) trained
with ``confspec fit`` (30 epochs, DigitsCNN, l_inf eps 0.2) and evaluated with ``confspec test`` on the
held-out test split (360 images, 35-37 per class) with PGD-20, for the final model (``last``) and the checkpoint
with the best worst-class robust accuracy on validation (``best``). Seeds change the model initialisation, attack
noise and data order; the data split stays fixed (seed 0), so every run is tested on the same images.

    python benchmarks/digits/run.py                  # all methods, seeds 0 1 2
    python benchmarks/digits/run.py --seeds 0 --methods trades trades_csr

Finished runs are skipped (their result files are reused), so an interrupted sweep resumes.
Writes ``results.json`` and ``RESULTS.md`` next to this file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STREAMING = HERE / "streaming.yaml"

# name -> (config, extra arguments)
METHODS: dict[str, tuple[str, list[str]]] = {
    "trades": ("trades.yaml", []),
    "trades_csr": ("trades_csr.yaml", []),
    "trades_csr_streaming": ("trades_csr.yaml", ["--config", str(STREAMING)]),
    "pgdat": ("pgdat_csr.yaml", ["--model.init_args.fairness=[]"]),
    "pgdat_csr": ("pgdat_csr.yaml", []),
}
LABELS = {
    "trades": "TRADES",
    "trades_csr": "TRADES + CSR (epoch_pass)",
    "trades_csr_streaming": "TRADES + CSR (streaming)",
    "pgdat": "PGD-AT",
    "pgdat_csr": "PGD-AT + CSR (epoch_pass)",
}
SUMMARY_KEYS = ["clean_acc", "clean_acc_worst", "robust_acc", "robust_acc_worst", "robust_acc_spread"]


def confspec(args: list[str], log: Path) -> float:
    """Run ``python -m confspec_lightning`` and return its wall time in seconds."""
    start = time.perf_counter()
    with log.open("a") as handle:
        proc = subprocess.run(
            [sys.executable, "-m", "confspec_lightning", *args], stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT
        )
    if proc.returncode != 0:
        raise SystemExit(f"confspec {' '.join(args)} failed; see {log}")
    return time.perf_counter() - start


def run_one(method: str, seed: int, out: Path, overrides: list[str]) -> dict:
    """Fit and test one method/seed; reuse the result file of a finished run."""
    name = f"{method}_seed{seed}"
    result_file = out / name / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    if (out / name).exists():
        shutil.rmtree(out / name)  # an interrupted run: start it again from scratch
    (out / name).mkdir(parents=True)
    config, extra = METHODS[method]
    common = [
        "--config",
        f"digits/{config.removesuffix('.yaml')}",  # a recipe name (configs/recipes.yaml)
        *extra,
        f"--seed_everything={seed}",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--trainer.logger.init_args.name={name}",
        "--trainer.enable_progress_bar=false",
        *overrides,
    ]
    log = out / name / "log.txt"
    fit_seconds = confspec(["fit", *common], log)
    result = {"method": method, "seed": seed, "fit_seconds": fit_seconds}
    from confspec_lightning.runs import latest_report

    for which in ("last", "best"):
        confspec(["test", *common, f"--ckpt_path={which}"], log)
        (run_dir,) = (out / name).glob("version_*")  # the report goes into the run: evaluation/<checkpoint>/
        result[which] = json.loads(latest_report(run_dir, "last" if which == "last" else "best").read_text())
    result_file.write_text(json.dumps(result, indent=2))
    return result


def table(results: list[dict], methods: list[str], which: str) -> str:
    from confspec_lightning.evaluation.report import format_mean_std

    lines = [
        "| method | clean avg | clean worst | PGD-20 avg | PGD-20 worst | PGD-20 spread | ‖C‖₂ (test) "
        "| fit time (s, median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        runs = [r for r in results if r["method"] == method]
        if not runs:
            continue
        cells = [format_mean_std([r[which]["summary"][k] for r in runs], scale=100) for k in SUMMARY_KEYS]
        # the test report's summary (older results: the per-class JSON's top level)
        summaries = [(r[which]["summary"], r[which]) for r in runs]
        norm = [s.get("confusion_spectral_norm", top.get("confusion_spectral_norm")) for s, top in summaries]
        norm_cell = format_mean_std(norm, digits=3)
        seconds = statistics.median(r["fit_seconds"] for r in runs)
        lines.append(f"| {LABELS[method]} | {' | '.join(cells)} | {norm_cell} | {seconds:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=HERE / "runs", help="run directories (git-ignored)")
    parser.add_argument("--max-epochs", type=int, default=None, help="override the configs' 30 epochs (smoke runs)")
    args = parser.parse_args()
    overrides = [] if args.max_epochs is None else [f"--trainer.max_epochs={args.max_epochs}"]

    results = []
    for seed in args.seeds:
        for method in args.methods:
            print(f"[digits] {method} seed {seed} ...", flush=True)
            results.append(run_one(method, seed, args.out, overrides))
            r = results[-1]
            print(
                f"[digits] {method} seed {seed}: PGD-20 avg {100 * r['last']['summary']['robust_acc']:.2f} "
                f"worst {100 * r['last']['summary']['robust_acc_worst']:.2f} (fit {r['fit_seconds']:.0f} s)",
                flush=True,
            )

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}"
    command = "python benchmarks/digits/run.py " + " ".join(
        ["--methods", *args.methods, "--seeds", *map(str, args.seeds)]
        + ([] if args.max_epochs is None else ["--max-epochs", str(args.max_epochs)])
    )
    report = [
        "# Digits protocol: TRADES vs CSR",
        "",
        f"Produced by `{command}` on {machine} (CPU only). Accuracies in %, mean ± std over seeds "
        f"{', '.join(map(str, args.seeds))}; avg = mean over the 10 classes, worst = lowest class, spread = best - "
        "worst class; PGD-20 = l_inf eps 0.2, step 0.02, on the 360-image test split (35-37 per class). "
        f"Fit time = wall time of `confspec fit` ({args.max_epochs or 30} epochs, including start-up and validation).",
        "",
        "## Final model (last epoch)",
        "",
        table(results, args.methods, "last"),
        "",
        "## Checkpoint with the best worst-class PGD-20 accuracy on validation",
        "",
        table(results, args.methods, "best"),
        "",
    ]
    (HERE / "RESULTS.md").write_text("\n".join(report))
    (HERE / "results.json").write_text(json.dumps({"command": command, "machine": machine, "runs": results}, indent=2))
    print("\n".join(report))


if __name__ == "__main__":
    main()
