"""The bundled example: a small residual CNN trained on scikit-learn's digits, upsampled to 32x32.

Sized so that its latency follows its compute (widths 32-128 at 32x32 down to 8x8, about 48 M MACs): on the raw
8x8 digits with narrow layers, fixed per-operator overhead dominates and no pruning could reach 0.5x latency.
It has the structures pruning must respect: two residual streams, block-internal convs and a Linear head.
Weights are made by `tools/train_example.py` (deterministic) and shipped in `edgeprune/assets/`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

WEIGHTS = "example_digits.pt"
INPUT_SHAPE = (1, 1, 32, 32)
MEAN, STD = 0.2, 0.3  # of digits scaled to [0, 1]
TRAIN_COUNT = 1000  # first samples of the seeded permutation train the example; the rest are never seen in training
SPLIT_SEED = 0


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + x)


class ExampleNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(1, 32)  # 32x32
        self.down1 = conv_bn(32, 64, 2)  # 16x16
        self.block1 = BasicBlock(64)
        self.down2 = conv_bn(64, 128, 2)  # 8x8
        self.block2 = BasicBlock(128)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(self.down1(self.stem(x)))
        x = self.block2(self.down2(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def digits_32() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All 1797 digits as normalised float32 (N, 1, 32, 32), their labels, and the seeded permutation of indices."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = ((x - MEAN) / STD).numpy()
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    return x, d.target.astype(np.int64), perm
