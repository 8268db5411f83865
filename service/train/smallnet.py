"""A small ResNet for small inputs (digits at 8x8 or upsampled, CIFAR at 32x32).

Plain nn.Modules (conv, BN, ReLU, add, adaptive pooling, flatten, linear), so torch.fx traces it
into the IR, torch-pruning prunes it, and the profiler times it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SmallResNetConfig:
    """Shape of a SmallResNet.

    Attributes:
        in_channels: image channels (1 for digits, 3 for colour images).
        num_classes: classifier outputs.
        widths: channels of each stage; stages after the first halve the resolution.
        blocks_per_stage: basic blocks in each stage.
    """

    in_channels: int = 1
    num_classes: int = 10
    widths: tuple[int, ...] = (32, 64, 128)
    blocks_per_stage: int = 1


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (1x1 projection when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))  # (N, C_out, H', W')
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class SmallResNet(nn.Module):
    """Stem conv, stages of basic blocks, global average pooling, linear classifier."""

    def __init__(self, config: SmallResNetConfig | None = None) -> None:
        super().__init__()
        config = config or SmallResNetConfig()
        widths: Sequence[int] = config.widths
        self.stem = nn.Sequential(
            nn.Conv2d(config.in_channels, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        blocks: list[nn.Module] = []
        channels = widths[0]
        for stage, width in enumerate(widths):
            for block in range(config.blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append(BasicBlock(channels, width, stride))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.pool(self.blocks(self.stem(x)))  # (N, C, 1, 1)
        return self.fc(torch.flatten(features, 1))  # (N, classes)
