"""A wide_dense family: one synthetic network of dense 3x3 convolutions too wide for a CPU's caches.

A convolution whose weights pass the device's spill point (the smaller of its last-level cache and
the 32 MB past which glibc maps every block afresh, so that oneDNN's per-call copy of the weights is
page-faulted in) runs several times slower than its work suggests: on a 2-core AMD EPYC with a
32 MB L3, a dense 3x3 convolution at 7x7 ran at 16 GMACs/s with 960 channels (31.6 MB of weights)
and at 5.6 GMACs/s with 1,024 (36 MB) (`bench.spill_point`). Wide ResNets, VGG-style stacks and
users' own wide heads have such layers, and neither the named families nor the generated networks
of a short profile do, so a predictor has nothing to price them from (`lpnet.predictor.model`: the
base's price per weight past the spill point).

The network reaches 1/32 of its input (7x7 at 224x224) in four strided convolutions and a pool, and
then runs three dense 3x3 convolutions of 1,024-1,536 channels holding 38, 57 and 85 MB of weights.
The sampler's width variants (the uniform points first, then Latin-hypercube blocks) scale each
group on its own, so the profile times these layers from a few MB of weights to well past 32 MB,
on either side of any spill point from about 4 to 85 MB. At 224x224 it does 2.6 GMACs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lpnet.arch.ir import Network
from profiler.family_names import WIDE_DENSE_FAMILY


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


class WideDenseNet(nn.Module):
    """Four strided 3x3 convolutions and a pool to 1/32 of the input, then three wide dense 3x3
    convolutions, a global pool and a classifier."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, 32, 2),
            nn.MaxPool2d(2),
            *_conv_bn_relu(32, 128, 2),
            *_conv_bn_relu(128, 512, 2),
            *_conv_bn_relu(512, 1024, 2),
            *_conv_bn_relu(1024, 1024, 1),
            *_conv_bn_relu(1024, 1536, 1),
            *_conv_bn_relu(1536, 1536, 1),
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(1536, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


def wide_dense_network(input_shape: Sequence[int] = (1, 3, 224, 224)) -> Network:
    """The wide_dense network's IR for an (N, C, H, W) input (shapes only: the IR holds no weights)."""
    from lpnet.arch.from_torch import network_from_module

    module = WideDenseNet(in_channels=int(input_shape[1])).eval()
    return network_from_module(module, input_shape, name=WIDE_DENSE_FAMILY, family=WIDE_DENSE_FAMILY)
