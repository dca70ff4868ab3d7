"""Which backbone gives the most robust CIFAR-10 model for a fixed CPU budget? Equal-time pilots.

Each candidate trains with TRADES-10 (l_inf 8/255, step 2/255, beta 6; SGD momentum 0.9, wd 5e-4, batch 128,
lr cosine in wall time from ``--lr`` to 0 over ``--seconds``, then stops) on the full
CIFAR-10 training set of the JPEG archive less a held-out validation split (100 images per class), then is
evaluated with PGD-20 on that validation split. The candidate with the best PGD-20 accuracy at equal wall
time is the one the pretraining uses (``pretrain.yaml``); ``pilot.json`` records every figure.

    python benchmarks/cifar10_pretrain/pilot.py --seconds 360
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from confspec_lightning.attacks import AttackConfig
from confspec_lightning.data import CIFAR10DataModule
from confspec_lightning.data.base import random_crop_flip
from confspec_lightning.models import DigitsCNN, Normalize, WideResNet
from confspec_lightning.objectives import TRADES

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

CANDIDATES = {
    "DigitsCNN(width=16)": lambda: DigitsCNN(10, in_channels=3, width=16),
    "DigitsCNN(width=32)": lambda: DigitsCNN(10, in_channels=3, width=32),
    "WideResNet(depth=10, widen_factor=1)": lambda: WideResNet(10, depth=10, widen_factor=1),
    "WideResNet(depth=16, widen_factor=1)": lambda: WideResNet(10, depth=16, widen_factor=1),
}


def pilot(name: str, data: CIFAR10DataModule, seconds: float, lr: float) -> dict:
    torch.manual_seed(0)
    net = torch.nn.Sequential(Normalize(data.mean, data.std), CANDIDATES[name]())
    objective, threat = TRADES(beta=6.0), AttackConfig(steps=10)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    images, labels = data.splits["train"].tensors
    generator = torch.Generator().manual_seed(0)

    def step(idx: torch.Tensor, lr_now: float) -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        x = random_crop_flip(images[idx].float() / 255, 4, generator)
        y = labels[idx]
        x_adv = threat.perturb(net, x, y, objective.attack_loss)
        out = objective(net, x, x_adv, y)
        loss = out.terms["ce"].mean() + objective.beta * out.terms["kl"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    order = torch.randperm(len(labels), generator=generator)
    position = 0

    def batch() -> torch.Tensor:
        nonlocal order, position
        if position + 128 > len(order):
            order, position = torch.randperm(len(labels), generator=generator), 0
        position += 128
        return order[position - 128 : position]

    net.train()
    start = time.perf_counter()
    total = 0
    while (elapsed := time.perf_counter() - start) < seconds:  # cosine in wall time: every candidate gets `seconds`
        step(batch(), 0.5 * lr * (1 + math.cos(math.pi * elapsed / seconds)))
        total += 1
    train_seconds = time.perf_counter() - start
    net.eval()
    val_x, val_y = data.splits["val"].tensors
    attack = AttackConfig(steps=20, random_start=True)
    clean = robust = 0
    for i in range(0, len(val_y), 500):
        x, y = val_x[i : i + 500].float() / 255, val_y[i : i + 500]
        x_adv = attack.perturb(net, x, y, "ce", generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            clean += int((net(x).argmax(1) == y).sum())
            robust += int((net(x_adv).argmax(1) == y).sum())
    return {
        "backbone": name,
        "parameters": sum(p.numel() for p in net.parameters()),
        "train_images_per_s": 128 * total / train_seconds,
        "steps": total,
        "epochs": 128 * total / len(labels),
        "train_seconds": train_seconds,
        "val_clean_acc": clean / len(val_y),
        "val_pgd20_acc": robust / len(val_y),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=360.0, help="training wall time per candidate")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "cifar10_q75"))
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES))
    args = parser.parse_args()
    data = CIFAR10DataModule(root=args.root, val_per_class=100)
    data.setup()
    results = []
    for name in args.candidates:
        result = pilot(name, data, args.seconds, args.lr)
        print(json.dumps(result), flush=True)
        results.append(result)
    record = {
        "command": f"python benchmarks/cifar10_pretrain/pilot.py --seconds {args.seconds:g} --lr {args.lr:g}",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "results": results,
    }
    (HERE / "pilot.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
