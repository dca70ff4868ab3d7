"""Export the `cifar10_pretrain` protocol's TRADES model: backbone weights (committed) and a record of how it was made.

    python benchmarks/cifar10_pretrain/export.py

Reads the finished run of ``benchmarks/fairness/run.py --protocol cifar10_pretrain`` (its ``last.ckpt`` and its
entry in ``benchmarks/fairness/results.json``), writes the backbone's state dict as a plain tensor file
``trades_pretrained.pt`` (loads with ``torch.load(weights_only=True)``; ``init_weights`` takes it) and
``pretrained.json``: the command, the backbone, the fit time, the SHA256 of the weights file and the test
metrics. Every later fine-tuning run starts from this file.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RUN = ROOT / "benchmarks/fairness/runs/cifar10_pretrain/trades_seed0"
WEIGHTS = HERE / "trades_pretrained.pt"
RECORD = HERE / "pretrained.json"


def main() -> None:
    checkpoint = RUN / "fit" / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        sys.exit(f"{checkpoint} is missing: run `python benchmarks/fairness/run.py --protocol cifar10_pretrain` first.")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    prefix = "net.backbone."
    backbone = {k[len(prefix) :]: v.clone() for k, v in state["state_dict"].items() if k.startswith(prefix)}
    torch.save(backbone, WEIGHTS)
    results = json.loads((ROOT / "benchmarks/fairness/results.json").read_text())
    (result,) = [r for r in results["protocols"]["cifar10_pretrain"] if r["method"] == "trades" and r["seed"] == 0]
    config = (RUN / "fit" / "config.yaml").read_text()
    attacks = result["evaluation"]["attacks"]
    record = {
        "weights": WEIGHTS.name,
        "sha256": hashlib.sha256(WEIGHTS.read_bytes()).hexdigest(),
        "bytes": WEIGHTS.stat().st_size,
        "parameters": sum(v.numel() for v in backbone.values() if v.is_floating_point()),
        "command": results["commands"]["cifar10_pretrain"],
        "code": result.get("code"),
        "machine": result.get("machine"),
        "epochs": result["epochs"],
        "fit_seconds": result["fit_seconds"],
        "note": results.get("notes", {}).get("cifar10_pretrain"),
        "test_seconds": result["test_seconds"],
        "test": {
            name: {"avg": v["avg"], "worst": v["worst"], "worst_class": v.get("worst_class")}
            for name, v in attacks.items()
        },
        "classwise": {name: v["classwise_acc"] for name, v in attacks.items()},
        "backbone": config[config.index("backbone:") :].split("\n    objective")[0].strip(),
    }
    RECORD.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {WEIGHTS} ({record['bytes']} bytes, sha256 {record['sha256']}) and {RECORD}")


if __name__ == "__main__":
    main()
