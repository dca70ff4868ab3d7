"""Gradient-alignment check of CSR's surrogates (docs/explanation/method.md, "Mechanism diagnostics").

For a trained model (a ``confspec fit`` checkpoint and its config) and a probe set (the validation split),
with fixed adversarial examples (the config's evaluation PGD, seeded):

(a) the cosine between each penalty's weight gradient (counts-weighted CE = code form, kl = paper form, soft)
    and the gradient of sigma_max(C_T) of the temperature-smoothed confusion matrix, T = 1 ... 0.05;
(b) small steps theta <- theta - s ||theta|| d / ||d|| along each penalty's gradient d, the smallest-T
    C_T gradient, the plain CE gradient and random directions of the same norm: the change of the discrete
    ||C||_2 and worst-class error on the probe set, with the adversarial examples kept fixed and re-attacked.

    python benchmarks/csr_mechanism/run.py --name digits --config digits/trades --checkpoint CKPT
    python benchmarks/csr_mechanism/run.py --report-only

Writes ``results.json`` (every model checked), ``RESULTS.md`` and ``<name>_alignment.png`` next to this file.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from confspec_lightning.evaluation.alignment import PENALTIES, discrete_summary, gradient_alignment, step_along

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS_JSON = HERE / "results.json"
RESULTS_MD = HERE / "RESULTS.md"
TEMPERATURES = (1.0, 0.5, 0.2, 0.1, 0.05)
STEPS = (0.001, 0.003, 0.01, 0.03)
RANDOM_DIRECTIONS = 5


def load_module(config: str, checkpoint: str, extra: list[str]):
    from confspec_lightning.cli import build_cli, quiet_lightning

    quiet_lightning()
    argv, sys.argv = sys.argv, sys.argv[:1]  # the CLI is given its arguments, not this script's
    try:
        cli = build_cli(["--config", config, "--trainer.logger=false", *extra], run=False)
    finally:
        sys.argv = argv
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    cli.model.on_load_checkpoint(state)
    cli.model.load_state_dict(state["state_dict"])
    return cli.model, cli.datamodule


def probe_set(datamodule, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    datamodule.setup()
    x, y = datamodule.splits[split].tensors
    if limit is not None:
        x, y = x[:limit], y[:limit]
    x = x.float() / 255 if not x.is_floating_point() else x
    return x, y


def attack(module, net, x, y, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return module.eval_attack.perturb(net, x, y, "ce", generator=generator).detach()


def predictions(net, x) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([net(x[i : i + 500]).argmax(1) for i in range(0, len(x), 500)])


def check(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    module, datamodule = load_module(args.config, args.checkpoint, args.extra)
    net = module.net.eval()
    for p in net.parameters():
        p.requires_grad_(True)
    x, y = probe_set(datamodule, args.probe, args.probe_size)
    k = module.num_classes
    start = time.perf_counter()
    x_adv = attack(module, net, x, y, args.seed)
    base = discrete_summary(predictions(net, x_adv), y, k)
    gradients, cosines = gradient_alignment(net, x_adv, y, TEMPERATURES)
    theta_norm = float(torch.cat([p.detach().reshape(-1) for p in net.parameters()]).norm())
    directions = {name: gradients[name] for name in PENALTIES}
    directions[f"C_T={TEMPERATURES[-1]:g}"] = gradients[f"C_T={TEMPERATURES[-1]:g}"]
    generator = torch.Generator().manual_seed(args.seed)
    for r in range(RANDOM_DIRECTIONS):  # step_along normalises: "the same norm" as every other direction
        directions[f"random {r}"] = torch.randn(gradients["CE"].numel(), generator=generator, dtype=torch.float64)
    steps: dict[str, dict[str, dict[str, list[float]]]] = {}
    for name, direction in directions.items():
        rows: dict[str, dict[str, list[float]]] = {"fixed": {}, "reattacked": {}}
        for fraction in STEPS:
            moved = copy.deepcopy(net)
            step_along(moved, direction, fraction * theta_norm)
            fixed = discrete_summary(predictions(moved, x_adv), y, k)
            again = discrete_summary(predictions(moved, attack(module, moved, x, y, args.seed)), y, k)
            for kind, summary in (("fixed", fixed), ("reattacked", again)):
                rows[kind][f"{fraction:g}"] = [
                    summary["spectral_norm"] - base["spectral_norm"],
                    summary["worst_error"] - base["worst_error"],
                ]
        steps[name] = rows
    return {
        "name": args.name,
        "config": args.config,
        "checkpoint": str(args.checkpoint),
        "checkpoint_sha256": sha256(args.checkpoint),
        "probe": f"{args.probe} split, {len(y)} images, adversarial examples: {module.eval_attack.describe()}",
        "base": base,
        "theta_norm": theta_norm,
        "gradient_norms": {name: float(gradients[name].norm()) for name in PENALTIES},
        "cosines": {name: {f"{t:g}": c for t, c in values.items()} for name, values in cosines.items()},
        "steps": steps,
        "seconds": time.perf_counter() - start,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "command": "python benchmarks/csr_mechanism/run.py "
        + " ".join(
            [f"--name {args.name}", f"--config {args.config}", f"--checkpoint {args.checkpoint}"]
            + [f"--extra={e}" for e in args.extra]
        ),
        "code": code_version(),
    }


def sha256(path: str) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def code_version() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=7", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "confspec_lightning", "benchmarks/csr_mechanism/run.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}+changes" if dirty else commit


# ------------------------------------------------------------------ reporting
def random_summary(rows: dict, kind: str, fraction: str) -> tuple[list[float], list[float]]:
    norms = [rows[f"random {r}"][kind][fraction][0] for r in range(RANDOM_DIRECTIONS)]
    worst = [rows[f"random {r}"][kind][fraction][1] for r in range(RANDOM_DIRECTIONS)]
    return norms, worst


def report(results: dict[str, dict]) -> None:
    lines = [
        "# Does a CSR surrogate's gradient follow the discrete robust confusion matrix?",
        "",
        "Produced by `benchmarks/csr_mechanism/run.py` (the command under each model). Probe: the validation "
        "split with fixed adversarial examples (the config's evaluation PGD, seeded). (a) cosine between each "
        "penalty's weight gradient and the gradient of sigma_max(C_T), the temperature-smoothed confusion matrix "
        "(softmax(z/T) in every wrong cell, per class; T -> 0 tends to the discrete matrix). *counts-weighted CE* "
        "is the code form's CSR term, *kl* the paper form's sigma_max(L), *soft* sigma_max of the soft matrix "
        "(= C_T at T = 1), *CE* the plain adversarial cross entropy. (b) change of the discrete ||C||_2 and of the "
        "worst-class robust error (points) after a step theta <- theta - s ||theta|| d/||d|| along each direction, "
        f"with the adversarial examples kept fixed or re-attacked; *random* = mean ± std over {RANDOM_DIRECTIONS} "
        "Gaussian directions. Negative = lowered.",
        "",
    ]
    for name, result in results.items():
        temps = list(next(iter(result["cosines"].values())))
        lines += [
            f"## `{name}`",
            "",
            f"Command: `{result['command']}` on {result['machine']} (code `{result['code']}`, "
            f"{result['seconds']:.0f} s). Checkpoint SHA256 `{result['checkpoint_sha256'][:16]}…`. "
            f"Probe: {result['probe']}; discrete ||C||_2 {result['base']['spectral_norm']:.4f}, worst-class error "
            f"{100 * result['base']['worst_error']:.2f} %.",
            "",
            "(a) cosine with the gradient of sigma_max(C_T):",
            "",
            "| penalty | " + " | ".join(f"T = {t}" for t in temps) + " |",
            "|---|" + "---|" * len(temps),
        ]
        for penalty in PENALTIES:
            cells = [f"{result['cosines'][penalty][t]:+.3f}" for t in temps]
            lines.append(f"| {penalty} | " + " | ".join(cells) + " |")
        lines += ["", "(b) change of the discrete ||C||_2 / worst-class error (points) after a step of size s:", ""]
        fractions = list(next(iter(result["steps"].values()))["fixed"])
        for kind in ("fixed", "reattacked"):
            lines += [
                f"{'Fixed' if kind == 'fixed' else 'Re-attacked'} adversarial examples:",
                "",
                "| direction | " + " | ".join(f"s = {f}" for f in fractions) + " |",
                "|---|" + "---|" * len(fractions),
            ]
            for direction, rows in result["steps"].items():
                if direction.startswith("random"):
                    continue
                cells = [f"{rows[kind][f][0]:+.4f} / {100 * rows[kind][f][1]:+.2f}" for f in fractions]
                lines.append(f"| -{direction} | " + " | ".join(cells) + " |")
            cells = []
            for f in fractions:
                norms, worst = random_summary(result["steps"], kind, f)
                cells.append(
                    f"{statistics.mean(norms):+.4f} ± {statistics.stdev(norms):.4f} / "
                    f"{100 * statistics.mean(worst):+.2f} ± {100 * statistics.stdev(worst):.2f}"
                )
            lines += ["| random | " + " | ".join(cells) + " |", ""]
        lines += [f"![alignment]({name}_alignment.png)", ""]
        figure(result, HERE / f"{name}_alignment.png")
    RESULTS_MD.write_text("\n".join(lines))


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    temps = list(next(iter(result["cosines"].values())))
    for penalty in PENALTIES:
        axes[0].plot([float(t) for t in temps], [result["cosines"][penalty][t] for t in temps], "o-", label=penalty)
    axes[0].set_xscale("log")
    axes[0].invert_xaxis()
    axes[0].set_xlabel("temperature T of C_T")
    axes[0].set_ylabel("cosine with grad sigma_max(C_T)")
    axes[0].set_title(f"{result['name']}: gradient alignment")
    axes[0].legend(fontsize=8)
    fractions = list(next(iter(result["steps"].values()))["fixed"])
    xs = [float(f) for f in fractions]
    for ax, kind in zip(axes[1:], ("fixed", "reattacked"), strict=True):
        for direction, rows in result["steps"].items():
            if direction.startswith("random"):
                continue
            ax.plot(xs, [rows[kind][f][0] for f in fractions], "o-", label=f"-{direction}")
        means = [statistics.mean(random_summary(result["steps"], kind, f)[0]) for f in fractions]
        stds = [statistics.stdev(random_summary(result["steps"], kind, f)[0]) for f in fractions]
        ax.errorbar(xs, means, yerr=stds, fmt="k--", label="random (mean ± std)")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("step s (fraction of ||theta||)")
        ax.set_ylabel("change of discrete ||C||_2")
        ax.set_title(f"{'fixed' if kind == 'fixed' else 're-attacked'} adversarial examples")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", help="key of this model in results.json")
    parser.add_argument("--config", help="the config the model was trained with")
    parser.add_argument("--checkpoint", help="a confspec fit checkpoint (.ckpt)")
    parser.add_argument("--probe", default="val", help="data split of the probe set (default: val)")
    parser.add_argument("--probe-size", type=int, default=None, help="first N images of the split (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra", action="append", default=[], help="one more config argument (repeatable)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    results = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.is_file() else {}
    if not args.report_only:
        if not (args.name and args.config and args.checkpoint):
            parser.error("--name, --config and --checkpoint are required (or --report-only)")
        torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
        results[args.name] = check(args)
        from confspec_lightning.io import atomic_write_text

        atomic_write_text(RESULTS_JSON, json.dumps(results, indent=1))
    report(results)
    print(f"wrote {RESULTS_MD}", flush=True)


if __name__ == "__main__":
    main()
