"""Standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) on runs of a fairness-runner protocol, next to the
protocol's own AutoAttack (APGD-CE + APGD-T), so the headline numbers are the standard ones or the gap is measured.

Each run is a directory of ``benchmarks/fairness/run.py`` (``<out>/<protocol>/<method>_seed<k>/``); with
``--fit-missing`` the runner trains and tests a missing one first (same recipe, seed and code as the sweep) and
records it in results.json, as the sweep would.
The standard attack runs as ``confspec test`` on the run's last checkpoint, on the protocol's test images, with
``test_attacks`` replaced by the standard AutoAttack alone; the result lands in ``standard_aa.json`` and
``STANDARD_AA.md`` beside this script. Resumable: ``--time-budget`` exits 3 when spent (a test is started only
with ``--min-test-seconds`` left), rerun the same command to continue.

    python benchmarks/fairness/standard_aa.py --protocol cifar10_finetune \\
        --runs trades:0 trades_csr_streaming:0 faal:0 --fit-missing --time-budget 3600
    python benchmarks/fairness/standard_aa.py --report-only
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def standard_attacks(n_iter: int | None) -> str:
    """The ``test_attacks`` list: the standard AutoAttack alone (``n_iter``: fewer APGD/FAB iterations, smoke only)."""
    options = "version: standard" + ("" if n_iter is None else f", n_iter: {n_iter}")
    return f"[{{class_path: confspec_lightning.attacks.AutoAttack, init_args: {{{options}}}}}]"


def _runner():
    """benchmarks/fairness/run.py as a module (standard library only at import)."""
    name = "fairness_run"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "run.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def parse_run(text: str) -> tuple[str, int]:
    """``method:seed`` -> (method, seed)."""
    method, sep, seed = text.rpartition(":")
    if not sep or not method or not seed.isdigit():
        raise argparse.ArgumentTypeError(f"--runs takes method:seed (e.g. trades:0); got {text!r}.")
    return method, int(seed)


def summary(report: dict, attack: str) -> dict:
    """avg, worst and per-class accuracy of ``attack`` in an evaluation report."""
    entry = report["attacks"][attack]
    return {"avg": entry["avg"], "worst": entry["worst"], "classwise_acc": entry["classwise_acc"]}


def test_arguments(
    runner, protocol: str, method: str, seed: int, out: Path, n_iter: int | None, extra: list[str]
) -> list[str]:
    """The ``confspec test`` arguments: the run's own (recipe, overlays, start weights), then the standard attack."""
    run_dir = out / protocol / f"{method}_seed{seed}"
    args = runner.common_args(protocol, method, seed, run_dir) + runner.start_weights_args(protocol, out) + extra
    args += [f"--model.init_args.test_attacks={standard_attacks(n_iter)}"]
    return [*args, "--trainer.logger.init_args.version=test_standard_aa"]


def standard_test(
    runner,
    protocol: str,
    method: str,
    seed: int,
    out: Path,
    budget,
    min_seconds: float,
    n_iter: int | None,
    extra: list[str],
) -> dict:
    """``confspec test`` of the run's last checkpoint with the standard AutoAttack; the parsed report."""
    run_dir = out / protocol / f"{method}_seed{seed}"
    last = run_dir / "fit" / "checkpoints" / "last.ckpt"
    remaining = budget.remaining()
    if remaining is not None and remaining < min_seconds:
        raise runner.BudgetExhausted
    args = test_arguments(runner, protocol, method, seed, out, n_iter, extra)
    seconds = runner.confspec(["test", *args, f"--ckpt_path={last}"], run_dir / "log_standard_aa.txt", budget)
    from confspec_lightning.runs import latest_report

    report = json.loads(latest_report(run_dir / "fit", "last").read_text())  # <run>/fit/evaluation/last-<n>/
    return {"seconds": seconds, "report": report}


def report_markdown(stored: dict) -> str:
    lines = [
        "# Standard AutoAttack next to the protocols' APGD-CE + APGD-T",
        "",
        "Written by `python benchmarks/fairness/standard_aa.py` (its docstring gives the commands). Accuracy in %;",
        "`custom` = the protocol's AutoAttack (APGD-CE + APGD-T) from the run's own test, checked equal to its",
        "record in results.json; `standard` = APGD-CE, APGD-T, FAB-T and Square on the same checkpoint and test",
        "images; gap = standard - custom. *code*: the commit of the standard test (the run's training commit is",
        "`run_code` in standard_aa.json).",
        "",
        "| protocol | method | seed | custom avg | standard avg | gap avg | custom worst | standard worst "
        "| gap worst | test s | code | machine |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(stored["runs"]):
        row = stored["runs"][key]
        custom, standard = row["custom"], row["standard"]
        cells = [row["protocol"], row["method"], str(row["seed"])]
        for part in ("avg", "worst"):
            a, b = 100 * custom[part], 100 * standard[part]
            cells += [f"{a:.2f}", f"{b:.2f}", f"{b - a:+.2f}"]
        cells += [f"{row['seconds']:.0f}", row["code"], row["machine"]]
        lines.append("| " + " | ".join(cells) + " |")
    if not stored["runs"]:
        lines.append("| (no run yet) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    runner = _runner()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", default="cifar10_finetune", choices=sorted(runner.PROTOCOLS))
    parser.add_argument("--runs", nargs="+", type=parse_run, default=[], help="method:seed ...")
    parser.add_argument("--out", type=Path, default=HERE / "runs", help="the fairness runner's run directories")
    parser.add_argument("--fit-missing", action="store_true", help="train and test a missing run first (runner)")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; exit 3 when spent (resumable)")
    parser.add_argument("--min-test-seconds", type=float, default=1800.0, help="start a test only with this left")
    parser.add_argument("--extra", action="append", default=[], help="one more confspec argument (smoke tests)")
    parser.add_argument("--n-iter", type=int, default=None, help="APGD/FAB iterations (smoke tests; default 100)")
    parser.add_argument("--output-dir", type=Path, default=HERE, help="where standard_aa.json and STANDARD_AA.md go")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if (args.extra or args.n_iter is not None) and args.output_dir.resolve() == HERE:
        parser.error("--extra and --n-iter make smoke runs: give them an --output-dir other than the record's")
    from confspec_lightning.io import atomic_write_text

    results_json, results_md = args.output_dir / "standard_aa.json", args.output_dir / "STANDARD_AA.md"
    stored = json.loads(results_json.read_text()) if results_json.is_file() else {"runs": {}}

    def save() -> None:
        atomic_write_text(results_json, json.dumps(stored, indent=1))
        atomic_write_text(results_md, report_markdown(stored))

    if args.report_only:
        save()
        return
    if not args.runs:
        parser.error("give --runs method:seed ... (or --report-only)")
    known = set(runner.PROTOCOLS[args.protocol].methods)
    unknown = sorted({m for m, _ in args.runs} - known)
    if unknown:
        parser.error(f"--runs names methods {unknown} that protocol {args.protocol!r} lacks; it has {sorted(known)}")
    budget = runner.Budget(args.time_budget)
    code = runner.code_version()
    try:
        for method, seed in args.runs:
            key = f"{args.protocol}/{method}_seed{seed}"
            if key in stored["runs"]:
                print(f"[standard_aa] {key}: on record", flush=True)
                continue
            run_dir = args.out / args.protocol / f"{method}_seed{seed}"
            if not (run_dir / "result.json").is_file():
                if not args.fit_missing:
                    raise SystemExit(f"{run_dir} has no finished run; add --fit-missing to train and test it.")
                print(f"[standard_aa] {key}: training and testing it first (fairness runner)", flush=True)
                result = runner.run_one(args.protocol, method, seed, args.out, budget, args.extra)
                if not args.extra:  # a run of the sweep like any other: on record, as the runner records it
                    runner.record_fitted(args.protocol, runner.stamp(result, code), "standard_aa")
            run = json.loads((run_dir / "result.json").read_text())
            if not args.extra:  # "custom" must be the recorded run's AutoAttack (smoke runs are never recorded)
                try:
                    runner.check_recorded(args.protocol, run)
                except ValueError as error:
                    raise SystemExit(f"[standard_aa] {error}") from None
            custom = run["evaluation"]
            print(f"[standard_aa] {key}: standard AutoAttack ...", flush=True)
            start = time.perf_counter()
            done = standard_test(
                runner, args.protocol, method, seed, args.out, budget, args.min_test_seconds, args.n_iter, args.extra
            )
            standard = done["report"]
            if not str(standard["settings"].get("autoattack")).startswith("standard"):
                raise SystemExit(f"{key}: the test ran AutoAttack {standard['settings'].get('autoattack')!r}")
            if standard["class_counts"] != custom["class_counts"]:
                raise SystemExit(f"{key}: the standard test saw other images than the protocol's test (counts differ)")
            stored["runs"][key] = {
                "protocol": args.protocol,
                "method": method,
                "seed": seed,
                "custom": summary(custom, "autoattack"),
                "standard": summary(standard, "autoattack"),
                "settings": standard["settings"],
                "seconds": time.perf_counter() - start,
                "code": code,
                "run_code": custom.get("environment", {}).get("commit"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            }
            save()
            row = stored["runs"][key]
            print(
                f"[standard_aa] {key}: worst {100 * row['custom']['worst']:.2f} -> {100 * row['standard']['worst']:.2f}"
                f", avg {100 * row['custom']['avg']:.2f} -> {100 * row['standard']['avg']:.2f}",
                flush=True,
            )
    except runner.BudgetExhausted:
        print("[standard_aa] time budget spent; run the same command again to continue.", flush=True)
        sys.exit(runner.BUDGET_EXIT)
    save()


if __name__ == "__main__":
    main()
