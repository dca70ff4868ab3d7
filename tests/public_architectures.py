"""Faithful re-definitions of the public code's networks, for the checkpoint-layout tests (written here, not copied).

Each computes what the public file named in its docstring computes, with the same module names (so the same state
dict keys): TRADES ``models/wideresnet.py`` (its ``sub_block1`` built and unused), kuangliu ``pytorch-cifar``
``models/resnet.py`` and ``models/preact_resnet.py``, fast_adversarial ``CIFAR10/preact_resnet.py``. Where
``robustbench`` is installed the tests also use RobustBench's own classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class TradesBasicBlock(nn.Module):
    """TRADES's WRN block: the shortcut conv (where in != out) takes relu(bn1(x)), else x is added."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = conv3x3(cout, cout)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        a = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return (x if self.equal else self.convShortcut(a)) + out


class TradesNetworkBlock(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[TradesBasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)]
        )

    def forward(self, x):
        return self.layer(x)


class TradesWideResNet(nn.Module):
    """TRADES ``models/wideresnet.py``: ``sub_block1`` is built but ``forward`` never calls it; avg_pool2d(8)."""

    def __init__(self, depth: int = 34, num_classes: int = 10, widen_factor: int = 10, sub_block1: bool = True) -> None:
        super().__init__()
        w = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) // 6
        self.conv1 = conv3x3(3, w[0])
        self.block1 = TradesNetworkBlock(n, w[0], w[1], 1)
        if sub_block1:
            self.sub_block1 = TradesNetworkBlock(n, w[0], w[1], 1)
        self.block2 = TradesNetworkBlock(n, w[1], w[2], 2)
        self.block3 = TradesNetworkBlock(n, w[2], w[3], 2)
        self.bn1 = nn.BatchNorm2d(w[3])
        self.fc = nn.Linear(w[3], num_classes)
        self.channels = w[3]

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.avg_pool2d(F.relu(self.bn1(out)), 8)
        return self.fc(out.view(-1, self.channels))


class KuangliuBasicBlock(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return F.relu(out)


class PublicPreActBlock(nn.Module):
    """``activated``: kuangliu (shortcut(relu(bn1(x)))); ``input``: fast_adversarial (shortcut(x))."""

    def __init__(self, cin: int, planes: int, stride: int = 1, shortcut_takes: str = "activated") -> None:
        super().__init__()
        self.takes = shortcut_takes
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out if self.takes == "activated" else x) if hasattr(self, "shortcut") else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class PublicResNet18(nn.Module):
    """kuangliu ResNet-18, or PreActResNet-18 (kuangliu: no final ``bn``; fast_adversarial: ``bn``)."""

    def __init__(self, preact: bool = False, shortcut_takes: str = "activated", final_bn: bool = False) -> None:
        super().__init__()
        self.preact = preact
        self.conv1 = conv3x3(3, 64)
        if not preact:
            self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for stage, planes in enumerate((64, 128, 256, 512), start=1):
            blocks = []
            for j in range(2):
                stride = 2 if stage > 1 and j == 0 else 1
                if preact:
                    blocks.append(PublicPreActBlock(cin, planes, stride, shortcut_takes))
                else:
                    blocks.append(KuangliuBasicBlock(cin, planes, stride))
                cin = planes
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        if final_bn:
            self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, 10)

    def forward(self, x):
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if hasattr(self, "bn"):
            out = F.relu(self.bn(out))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.view(out.size(0), -1))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and random BatchNorm statistics (affine and running), in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=gen))
                module.running_mean.copy_(0.2 * torch.randn(module.running_mean.shape, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=gen))
                module.num_batches_tracked.fill_(7)
            elif isinstance(module, nn.Conv2d | nn.Linear):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
    return model.eval()


def require_robustbench():
    """Skip unless the ``robustbench`` distribution is installed; import it as the library does.

    (``pytest.importorskip("robustbench")`` would skip where it is installed too: robustbench 1.1.1's package
    ``__init__`` needs ``autoattack`` and ``pkg_resources``, which :mod:`confspec_lightning.models.robustbench` avoids.)
    """
    import importlib.util

    import pytest

    if importlib.util.find_spec("robustbench") is None:
        pytest.skip("the optional package robustbench is not installed (pip install 'confspec-lightning[robustbench]')")
    from confspec_lightning.models.robustbench import robustbench_utils

    return robustbench_utils()


#: A RobustBench model zoo entry the tests add: RobustBench's own WideResNet, small (WRN-10-1, with sub_block1 as
#: its TRADES entries), so that RobustBench's loading code runs end to end on a file in its cache layout.
TINY_ROBUSTBENCH_NAME = "ConfspecTiny2024Test"


def install_tiny_robustbench_entry(monkeypatch, model_dir, dataset: str = "cifar10", threat_model: str = "Linf"):
    """Add the tiny entry to RobustBench's model zoo and save its random weights where RobustBench keeps them.

    The file is ``<model_dir>/<dataset>/<threat_model>/<name>.pt`` as RobustBench saves its downloads:
    ``{"state_dict": {"module." + key: tensor}}``. Returns the RobustBench network with those weights (eval mode).
    """
    import importlib
    from pathlib import Path

    require_robustbench()
    from confspec_lightning.models.robustbench import model_zoo

    wide_resnet = importlib.import_module("robustbench.model_zoo.architectures.wide_resnet")

    def build():
        return wide_resnet.WideResNet(depth=10, widen_factor=1, sub_block1=True, num_classes=10)

    monkeypatch.setitem(model_zoo(dataset, threat_model), TINY_ROBUSTBENCH_NAME, {"model": build, "gdrive_id": "none"})
    torch.manual_seed(0)
    network = randomize(build(), seed=11)
    path = Path(model_dir) / dataset / threat_model / f"{TINY_ROBUSTBENCH_NAME}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in network.state_dict().items()}}, path)
    return network
