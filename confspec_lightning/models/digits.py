"""A small CNN for the 8x8 digits data set.

No BatchNorm: per-rank batch statistics would break the exact DDP-vs-single-process equivalence
the tests check.
"""

from __future__ import annotations

from torch import Tensor, nn


class DigitsCNN(nn.Module):
    """conv(w)-conv(2w)-pool-conv(4w)-pool-fc(128)-fc(K), ReLU activations; about 0.2 M parameters at w=32.

    Args:
        num_classes: number of output logits.
        in_channels: input channels (1 for digits).
        width: channels of the first convolution.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveMaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * w * 4, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
