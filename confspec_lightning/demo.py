"""The first command: TRADES and TRADES + CSR side by side, per class, on scikit-learn's bundled 8x8 digits.

``make demo`` (``confspec-demo``) trains the two models with the same data, seed, schedule and threat model,
tests each final model on the test split (clean and PGD-20, per class) and prints both tables side by side with
the differences. CSR runs in the paper's form (alpha * sigma_max of the batch's surrogate confusion matrix, kl
surrogate, batch direction) at alpha 0.6, the best setting of the digits benchmark. Each half is an ordinary
``confspec fit`` + ``confspec test`` (printed, to run alone); the runs land in ``runs/demo_trades`` and
``runs/demo_trades_csr``. With ``--seeds 0 1 2 --record FILE`` it repeats the pair per seed and writes the paired
differences (mean and std over seeds), which a later run prints as the evidence behind the difference it shows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from confspec_lightning.validation import check_int

#: The CSR setting of the demo (the digits benchmark's best: the paper form at alpha 0.6).
CSR_SETTING = "{class_path: confspec_lightning.fairness.CSR, init_args: {form: paper, alpha: 0.6}}"
#: (label, recipe, extra command-line options) of the two halves.
ARMS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("TRADES", "digits/trades", ()),
    ("TRADES + CSR", "digits/trades_csr_paper", ("--model.init_args.fairness", f"[{CSR_SETTING}]")),
)
#: The recorded multi-seed result a plain run prints (in a checkout of the repository).
RECORD = Path(__file__).resolve().parents[1] / "benchmarks" / "demo" / "results.json"


def arm_arguments(recipe: str, extra: Sequence[str], epochs: int, seed: int, out: Path, name: str) -> list[str]:
    """``confspec`` options shared by fit and test: the recipe, a shorter schedule, the seed and the run folder."""
    return [
        "--config",
        recipe,
        *extra,
        "--seed_everything",
        str(seed),
        "--trainer.max_epochs",
        str(epochs),
        "--model.init_args.scheduler.init_args.T_max",
        str(epochs),
        "--trainer.check_val_every_n_epoch",
        str(epochs),  # one validation, at the end (the per-class table of the fit)
        "--trainer.logger.init_args.save_dir",
        str(out),
        "--trainer.logger.init_args.name",
        name,
        "--trainer.logger.init_args.version",
        f"seed{seed}",
    ]


def run_arm(recipe: str, extra: Sequence[str], epochs: int, seed: int, out: Path, name: str) -> dict[str, Any]:
    """Fit, then test the final weights (clean + PGD-20 per class); the test report as a dict."""
    from confspec_lightning.cli import main
    from confspec_lightning.evaluation.report import EvaluationReport

    common = arm_arguments(recipe, extra, epochs, seed, out, name)
    run_dir = out / name / f"seed{seed}"
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.exists():  # a run folder of an earlier demo: start it again, not resume it
        shutil.rmtree(run_dir)
    started = time.perf_counter()
    main(["fit", *common])
    fit_seconds = time.perf_counter() - started
    test_options = ["--model.init_args.test_attacks", "[{class_path: confspec_lightning.attacks.PGD}]"]
    main(["test", *common, *test_options, "--ckpt_path", str(last)])
    reports = sorted((run_dir / "evaluation").glob("*/evaluation.json"))
    if not reports:
        raise RuntimeError(f"confspec test wrote no evaluation.json under {run_dir / 'evaluation'}")
    report = EvaluationReport.load_json(reports[-1])
    robust = next(key for key in report.attacks if key != "clean")
    return {
        "class_names": report.class_names,
        "class_counts": report.class_counts,
        "clean": report.attacks["clean"].classwise_acc,
        "robust": report.attacks[robust].classwise_acc,
        "robust_attack": robust,
        "fit_seconds": fit_seconds,
        "run": str(run_dir),
    }


def summary(values: Sequence[float]) -> dict[str, float]:
    """Average and worst class (in %) of per-class accuracies in [0, 1]."""
    return {"avg": 100.0 * statistics.fmean(values), "worst": 100.0 * min(values)}


def side_by_side(base: dict[str, Any], csr: dict[str, Any]) -> str:
    """The per-class table of the two models and their differences (percentage points)."""
    attack = base["robust_attack"]
    lines = [
        f"{'class':<6}{'n':>4}   {'TRADES clean':>12} {'TRADES ' + attack:>13}   {'CSR clean':>9} "
        f"{'CSR ' + attack:>10}   {'diff ' + attack:>11}",
    ]
    for name, n, bc, br, cc, cr in zip(
        base["class_names"],
        base["class_counts"],
        base["clean"],
        base["robust"],
        csr["clean"],
        csr["robust"],
        strict=True,
    ):
        lines.append(
            f"{name:<6}{n:>4}   {100 * bc:>12.2f} {100 * br:>13.2f}   {100 * cc:>9.2f} {100 * cr:>10.2f}   "
            f"{100 * (cr - br):>+11.2f}"
        )
    lines.append("-" * len(lines[0]))
    for key in ("avg", "worst"):
        bc, br = summary(base["clean"])[key], summary(base["robust"])[key]
        cc, cr = summary(csr["clean"])[key], summary(csr["robust"])[key]
        lines.append(f"{key:<10}   {bc:>12.2f} {br:>13.2f}   {cc:>9.2f} {cr:>10.2f}   {cr - br:>+11.2f}")
    return "\n".join(lines)


def paired_differences(pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per seed CSR - TRADES of the average and worst-class clean and robust accuracy; mean and std over seeds."""
    out: dict[str, dict[str, float]] = {}
    for split in ("clean", "robust"):
        for key in ("avg", "worst"):
            diffs = [summary(csr[split])[key] - summary(base[split])[key] for base, csr in pairs]
            out[f"{split}_{key}"] = {
                "mean": statistics.fmean(diffs),
                "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                "per_seed": diffs,
            }
    return out


def recorded_evidence(path: Path, epochs: int) -> str | None:
    """One line on the recorded multi-seed differences of the same demo settings, if such a record exists."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("epochs") != epochs or record.get("options"):
        return None
    worst, avg = record["differences"]["robust_worst"], record["differences"]["robust_avg"]
    seeds = ", ".join(str(s) for s in record["seeds"])
    return (
        f"Recorded with these settings over seeds {seeds} ({record['machine']}): worst class "
        f"{worst['mean']:+.2f} +- {worst['std']:.2f} points, average {avg['mean']:+.2f} +- {avg['std']:.2f} "
        f"(benchmarks/demo/results.json; `confspec-demo --seeds {' '.join(str(s) for s in record['seeds'])} "
        f"--record benchmarks/demo/results.json` repeats it)."
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``confspec-demo`` (``make demo``)."""
    parser = argparse.ArgumentParser(prog="confspec-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10, help="training epochs of each model (default 10)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds; one pair of runs each (default 0)")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="run folders (default runs/)")
    parser.add_argument("--record", type=Path, default=None, help="write the paired differences as JSON here")
    parser.add_argument(
        "options", nargs=argparse.REMAINDER, help="after --: confspec options for every fit and test of both models"
    )
    args = parser.parse_args(argv)
    options = args.options[1:] if args.options[:1] == ["--"] else args.options
    check_int("--epochs", args.epochs, 1)
    started = time.perf_counter()
    pairs = []
    for seed in args.seeds:
        results = []
        for label, recipe, extra in ARMS:
            name = "demo_" + recipe.split("/")[-1].replace("_paper", "")
            arm_extra = (*extra, *options)
            shown = [
                f"'{a}'" if " " in a else a for a in arm_arguments(recipe, arm_extra, args.epochs, seed, args.out, name)
            ]
            print(f"\n=== {label}, seed {seed}: confspec fit {' '.join(shown)}", flush=True)
            results.append(run_arm(recipe, arm_extra, args.epochs, seed, args.out, name))
        pairs.append(tuple(results))
        base, csr = results
        print(
            f"\nTRADES vs TRADES + CSR (paper form, kl surrogate, batch direction, alpha 0.6), seed {seed}, "
            f"{args.epochs} epochs each; test split, final weights, {base['robust_attack']} = PGD-20 l_inf "
            f"eps 0.2 (accuracy %, diff = CSR - TRADES in points):"
        )
        print(side_by_side(base, csr))
    differences = paired_differences(pairs)
    if len(pairs) > 1:
        worst, avg = differences["robust_worst"], differences["robust_avg"]
        print(
            f"\nOver seeds {', '.join(map(str, args.seeds))}: worst-class {pairs[0][0]['robust_attack']} "
            f"{worst['mean']:+.2f} +- {worst['std']:.2f} points, average {avg['mean']:+.2f} +- {avg['std']:.2f}."
        )
    else:
        evidence = None if options else recorded_evidence(RECORD, args.epochs)
        print("\n" + (evidence or "No multi-seed record of these settings: `--seeds 0 1 2` measures one."))
    elapsed = time.perf_counter() - started
    print(f"Done in {elapsed:.0f} s ({os.cpu_count()} CPU cores visible).")
    if args.record is not None:
        from confspec_lightning.environment import device_name

        record = {
            "command": "confspec-demo " + " ".join(sys.argv[1:] if argv is None else argv),
            "epochs": args.epochs,
            "options": options,
            "seeds": args.seeds,
            "machine": device_name(),
            "seconds": elapsed,
            "differences": differences,
            "runs": [[base, csr] for base, csr in pairs],
        }
        args.record.parent.mkdir(parents=True, exist_ok=True)
        partial = args.record.with_suffix(args.record.suffix + ".partial")
        partial.write_text(json.dumps(record, indent=2) + "\n")
        partial.replace(args.record)  # never a half-written record
        print(f"Recorded in {args.record}")


if __name__ == "__main__":  # pragma: no cover
    main()
