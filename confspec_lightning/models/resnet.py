"""ResNet-18, PreActResNet-18 and WideResNets in the form the robustness literature uses.

* ``ResNet18``: He et al. (2016) with the CIFAR stem (3x3 conv, no max-pool), as in the widely used
  ``pytorch-cifar`` definition; 11.2 M parameters for 10 classes.
* ``PreActResNet18``: pre-activation ResNet (He et al., 2016b) as in Rice et al. (2020) and the CSR
  paper's from-scratch protocol, with a final BN-ReLU before pooling. Two variants of the public code
  compute other functions with the same shapes, and are options: ``shortcut="input"`` (the 1x1 shortcut
  convolution takes the raw block input x, as fast_adversarial and RobustBench's ``PreActBlock`` do, instead of
  relu(bn1(x))) and ``final_bn=False`` (no BN-ReLU before pooling: kuangliu's ``pytorch-cifar`` and
  RobustBench's default ``bn_before_fc=False``).
* ``WideResNet``: Zagoruyko & Komodakis (2016) as in TRADES/CSR (``WRN-34-10``: depth 34, widen 10;
  ``WRN-28-10``: depth 28).

All end in a global average pool, so 32x32 (CIFAR) and 64x64 (Tiny-ImageNet) inputs both work (the public
definitions pool with a fixed kernel, ``avg_pool2d(out, 8)`` or ``(out, 4)``: the same function on 29..32-pixel
inputs; :mod:`confspec_lightning.models.layouts` reads their files).
Inputs are expected normalised; ``RobustFairLitModule`` puts the normalisation in front.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from confspec_lightning.validation import check_bool, check_choice

#: What a PreAct block's 1x1 shortcut convolution takes: relu(bn1(x)) ("activated") or the raw input x ("input").
ShortcutInput = Literal["activated", "input"]


def _conv3x3(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation residual block: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)).relu()
        out = self.bn2(self.conv2(out))
        return (out + self.shortcut(x)).relu()


class PreActBlock(nn.Module):
    """Pre-activation block: conv(relu(bn(conv(relu(bn(x)))))) + shortcut(relu(bn(x))), or + shortcut(x).

    ``shortcut_input`` says what a projection shortcut (where the shape changes) takes: ``"activated"``
    relu(bn1(x)) (He et al. 2016b, kuangliu, Rice et al.), or ``"input"`` the raw x (fast_adversarial,
    RobustBench's ``PreActBlock``). Without projection the identity adds x in both.
    """

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, shortcut_input: ShortcutInput = "activated"
    ) -> None:
        super().__init__()
        self.shortcut_input = shortcut_input
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(x).relu()
        if self.shortcut is None:
            shortcut = x
        else:
            shortcut = self.shortcut(out if self.shortcut_input == "activated" else x)
        out = self.conv1(out)
        out = self.conv2(self.bn2(out).relu())
        return out + shortcut


class _ResNet(nn.Module):
    def __init__(
        self,
        block: type[nn.Module],
        num_blocks: list[int],
        num_classes: int,
        preact: bool,
        final_bn: bool = True,
        **block_options: str,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(3, 64)
        self.stem_bn: nn.Module = nn.Identity() if preact else nn.BatchNorm2d(64)
        self.preact = preact
        layers: list[nn.Module] = []
        in_planes = 64
        for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), num_blocks, strict=True)):
            for block_index in range(blocks):
                stride = 2 if index > 0 and block_index == 0 else 1
                layers.append(block(in_planes, planes, stride, **block_options))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.final_bn: nn.Module = nn.BatchNorm2d(512) if preact and final_bn else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        if not self.preact:
            out = self.stem_bn(out).relu()
        out = self.layers(out)
        if isinstance(self.final_bn, nn.BatchNorm2d):
            out = self.final_bn(out).relu()
        return self.linear(self.pool(out).flatten(1))


class ResNet18(_ResNet):
    """CIFAR-style ResNet-18 (3x3 stem, no max-pool, global average pool).

    Args:
        num_classes: number of output logits.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes, preact=False)


class PreActResNet18(_ResNet):
    """Pre-activation ResNet-18 (Rice et al., 2020), the CSR paper's from-scratch backbone.

    Args:
        num_classes: number of output logits.
        shortcut: what the projection shortcuts take, ``"activated"`` relu(bn1(x)) (default; Rice et al.,
            kuangliu) or ``"input"`` the raw block input (fast_adversarial, RobustBench's ``PreActBlock``).
        final_bn: a BN-ReLU before pooling (default; Rice et al., fast_adversarial), or none (kuangliu,
            RobustBench's ``PreActResNet`` default).
    """

    def __init__(self, num_classes: int = 10, shortcut: ShortcutInput = "activated", final_bn: bool = True) -> None:
        check_choice("PreActResNet18.shortcut", shortcut, ShortcutInput)
        check_bool("PreActResNet18.final_bn", final_bn)
        super().__init__(
            PreActBlock, [2, 2, 2, 2], num_classes, preact=True, final_bn=final_bn, shortcut_input=shortcut
        )
        self.shortcut_input = shortcut


class WideBlock(nn.Module):
    """WRN block: conv(relu(bn(conv(relu(bn(x)))))) + shortcut, as in the TRADES code."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.equal = in_planes == planes and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = self.bn1(x).relu()
        out = self.conv2(self.bn2(self.conv1(activated)).relu())
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nn.Module):
    """WideResNet-depth-widen (Zagoruyko & Komodakis, 2016); WRN-34-10 is the TRADES/CSR backbone.

    Args:
        num_classes: number of output logits.
        depth: 6n + 4 (34 -> 5 blocks per group, 28 -> 4).
        widen_factor: channel multiplier (10).
    """

    def __init__(self, num_classes: int = 10, depth: int = 34, widen_factor: int = 10) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"depth={depth!r} is not accepted; a WideResNet has depth 6n + 4 (e.g. 28, 34).")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = _conv3x3(3, widths[0])
        groups: list[nn.Module] = []
        in_planes = widths[0]
        for group, planes in enumerate(widths[1:]):
            for index in range(n):
                groups.append(WideBlock(in_planes, planes, stride=(1 if group == 0 else 2) if index == 0 else 1))
                in_planes = planes
        self.blocks = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(widths[3])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.blocks(self.conv1(x))
        return self.fc(self.pool(self.bn(out).relu()).flatten(1))
