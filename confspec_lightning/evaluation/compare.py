"""Side-by-side comparison of evaluation reports: one Markdown table, one row per method.

Command line (console script ``confspec-compare``)::

    confspec-compare runs/trades/evaluation.json runs/csr/evaluation.json --names TRADES TRADES+CSR --output table.md
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from confspec_lightning.evaluation.report import EvaluationReport, _cell, _pct, _table
from confspec_lightning.io import atomic_write_text


def compare_reports(paths: Sequence[str | os.PathLike[str]], names: Sequence[str] | None = None) -> str:
    """One Markdown table comparing the reports written by :meth:`EvaluationReport.write_json`.

    One row per report (named by the report's ``name`` or by ``names``); for every attack present in any
    report (in order of first appearance) its avg and worst per-class accuracy in % (``-`` where a report
    lacks the attack), then ||C||_2 of each report's last (strongest) attack.
    """
    if not paths:
        raise ValueError("paths=[] is not accepted; give at least one evaluation.json.")
    if names is not None and len(names) != len(paths):
        raise ValueError(
            f"names={list(names)!r} is not accepted: {len(names)} names for {len(paths)} reports; give one per report."
        )
    reports = [EvaluationReport.load_json(path) for path in paths]
    methods = list(names) if names is not None else [report.name for report in reports]
    attacks: list[str] = []
    for report in reports:
        attacks += [attack for attack in report.attacks if attack not in attacks]
    strongest = [report.strongest_attack for report in reports]
    same_last = len(set(strongest)) == 1 and strongest[0] is not None
    norm_header = "\\|\\|C\\|\\|_2 " + (f"({_cell(strongest[0])})" if same_last else "(last attack)")
    header = ["method"]
    for attack in attacks:
        header += [f"{_cell(attack)} avg %", f"{_cell(attack)} worst %"]
    header.append(norm_header)
    rows = []
    for method, report, last in zip(methods, reports, strongest, strict=True):
        row = [_cell(method)]
        for attack in attacks:
            result = report.attacks.get(attack)
            row += ["-", "-"] if result is None else [_pct(result.avg), _pct(result.worst)]
        norm = None if last is None else report.attacks[last].confusion_spectral_norm
        if norm is None:
            row.append("-")
        else:
            row.append(f"{norm:.4f}" if same_last else f"{norm:.4f} ({_cell(last or '')})")
        rows.append(row)
    return "\n".join(_table(header, rows)) + "\n"


def main(argv: list[str] | None = None) -> None:
    """``confspec-compare A.json B.json [--names ...] [--output table.md]``: print (and write) the table."""
    parser = argparse.ArgumentParser(
        prog="confspec-compare",
        description="Compare evaluation reports (evaluation.json) in one Markdown table: avg and worst-class "
        "accuracy per attack and ||C||_2 of the strongest attack.",
    )
    parser.add_argument("reports", nargs="+", type=Path, help="evaluation.json files written by EvaluationReport")
    parser.add_argument("--names", nargs="+", default=None, help="method names, one per report (default: their names)")
    parser.add_argument("--output", type=Path, default=None, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    try:
        table = compare_reports(args.reports, args.names)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    print(table, end="")
    if args.output is not None:
        atomic_write_text(args.output, table)


if __name__ == "__main__":
    main()
