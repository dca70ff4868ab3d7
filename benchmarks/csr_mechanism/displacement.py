"""How far fine-tuning moves the weights: relative distances between a start model and fine-tuned checkpoints.

For the start weights theta_0 and fine-tuned weights theta_i (backbone parameters, batch-norm running
statistics left out), prints ||theta_i - theta_0|| / ||theta_0|| for every run and
||theta_i - theta_j|| / ||theta_0|| for every pair: the scale to read the step sizes s of ``run.py`` against
(s is a fraction of ||theta||), and whether a method's end point is further from TRADES' than another seed's.

    python benchmarks/csr_mechanism/displacement.py --start benchmarks/cifar10_pretrain/trades_pretrained.pt \
        --runs trades_seed1=RUNS/trades_seed1/fit/checkpoints/last.ckpt trades_seed2=... csr_seed1=...
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from confspec_lightning.models.weights import read_state_dict

BACKBONE_PREFIX = "net.backbone."


def backbone_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The backbone's floating-point weights of a ``confspec fit`` checkpoint (``net.backbone.*`` of its
    ``state_dict``) or of a bare backbone state dict (``benchmarks/cifar10_pretrain/export.py``), without the
    batch-norm running statistics."""
    state = read_state_dict(path, "checkpoint")  # safe load; a checkpoint's nested state_dict unwrapped
    if any(k.startswith("net.") for k in state):  # a RobustFairLitModule checkpoint: its backbone only
        state = {k.removeprefix(BACKBONE_PREFIX): v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
    weights = {k: v for k, v in state.items() if v.is_floating_point() and "running_" not in k}
    if not weights:
        raise ValueError(f"{path}: no backbone weights (expected '{BACKBONE_PREFIX}*' keys or a backbone state dict)")
    return weights


def flatten(weights: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    return torch.cat([weights[k].reshape(-1).double() for k in keys])


def relative_distances(start: dict[str, torch.Tensor], runs: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    """``{name: ||theta_name - theta_0|| / ||theta_0||}`` and ``{"a vs b": ||theta_a - theta_b|| / ||theta_0||}``."""
    keys = sorted(start)
    for name, weights in runs.items():
        if sorted(weights) != keys or any(weights[k].shape != start[k].shape for k in keys):
            raise ValueError(f"run {name!r}: its weights do not match the start model's names and shapes")
    theta0 = flatten(start, keys)
    scale = float(theta0.norm())
    flat = {name: flatten(weights, keys) for name, weights in runs.items()}
    out = {name: float((theta - theta0).norm()) / scale for name, theta in flat.items()}
    for a, b in itertools.combinations(flat, 2):
        out[f"{a} vs {b}"] = float((flat[a] - flat[b]).norm()) / scale
    return out


def parse_runs(items: list[str]) -> dict[str, str]:
    runs = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--runs: {item!r} is not NAME=CHECKPOINT")
        runs[name] = path
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", required=True, help="the start model (bare backbone state dict or .ckpt)")
    parser.add_argument("--runs", nargs="+", required=True, help="NAME=CHECKPOINT of each fine-tuned model")
    args = parser.parse_args(argv)
    runs = {name: backbone_weights(path) for name, path in parse_runs(args.runs).items()}
    for name, value in relative_distances(backbone_weights(args.start), runs).items():
        print(f"{name:60s} {100 * value:7.3f} % of ||theta_0||")


if __name__ == "__main__":
    main()
